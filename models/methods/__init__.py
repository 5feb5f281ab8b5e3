"""Importing this package registers every method (see models.registry)."""

from vitssl.models.methods import (  # noqa: F401
    byol,
    dino,
    distil,
    finetune,
    mae,
    mocov3,
    qat,
    simclr,
    simsiam,
)
