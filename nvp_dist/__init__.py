"""nvp-dist: Real NVP at scale."""
__version__ = "0.1.0"
