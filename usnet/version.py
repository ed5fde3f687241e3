"""usnet's version (base of the house: artifacts record it)."""

__version__ = "0.1.0"
