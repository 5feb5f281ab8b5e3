"""Importing this package registers every method (see models.registry)."""

from models.methods import mae  # noqa: F401
