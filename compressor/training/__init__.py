"""The training loop, its runs, distributed set-up, recipes and evaluation."""
