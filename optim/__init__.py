"""scalelab: optim."""
