"""Training of what the scoring service serves: the learned machine-text detector."""
