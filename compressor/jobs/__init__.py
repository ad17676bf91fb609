"""Command-line runs around the API: the prune job and sweeps, with their files and data."""
