"""Reports over checkpoints and runs: rows, baselines, rendering, curves and plots."""
