"""fairgen: fair and scalable generative training in JAX."""

__version__ = "0.1.0"
