"""Launchers: SLURM, Cloud TPU VMs, local processes, and the sweep runner (no training logic)."""
