"""A discovery run: its typed config, run directories and their lock, the training loop with
checkpoints and resume, and the checkpoint selection."""
