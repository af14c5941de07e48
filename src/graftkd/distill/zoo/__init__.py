"""The classic feature-distiller zoo (CIFAR-100 benchmark): one file per distiller, one contract.

See :mod:`graftkd.distill.zoo.base`. Importing this package registers every distiller in it.
"""
from graftkd.distill.zoo.base import (  # noqa: F401
    DISTILLERS,
    Distiller,
    InitStage,
    build_distiller,
    distiller_class,
    list_distillers,
    register_distiller,
    resolve_spots,
)
