"""Training: the loop, the run directory and its checkpoints."""
