"""The package version (one place; the bottom layer, so writers can record it without importing the API)."""

__version__ = "0.1.0"
