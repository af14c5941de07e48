"""graftkd: compress a trained network into a small student from a few unlabeled images.

The method is progressive network grafting (Shen et al., AAAI 2021); see ``graftkd.graft``.
"""
from graftkd.errors import GraftkdError

__all__ = ["GraftkdError", "__version__"]
__version__ = "0.1.0"
