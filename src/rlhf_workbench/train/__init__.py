"""Training: the shared update engine, one module per algorithm (its batch and loss), losses, reward models, offline training."""
