"""Data: TFDS loading (offline builders included) and the in-memory input pipeline."""
