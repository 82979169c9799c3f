"""scalelab: models."""
