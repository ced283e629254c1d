"""Training: the per-worker loop, evaluation and checkpoints."""
