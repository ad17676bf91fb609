"""Checkpoints, run folders and atomic writes: what the library reads and writes."""
