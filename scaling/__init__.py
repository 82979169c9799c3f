"""scalelab: scaling."""
