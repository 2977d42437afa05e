"""Where a run executes: CPU devices and memory (host), the mesh (sharding), processes
(distributed), and what the run records about them (provenance)."""
