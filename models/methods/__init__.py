"""Importing this package registers every method (see models.registry)."""

from models.methods import byol, dino, distil, mae, mocov3, qat, simclr, simsiam  # noqa: F401
