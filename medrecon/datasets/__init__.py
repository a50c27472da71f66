"""Readers, writers, simulation and training datasets (see docs/data.md)."""
