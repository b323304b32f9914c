"""gradhealth: a diagnostic service for gradient health."""

__version__ = "0.1.0"
