"""scalelab: experiments."""
