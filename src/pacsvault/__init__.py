"""pacsvault: a secure-by-default medical imaging archive for private practices."""

__version__ = "0.1.0"
