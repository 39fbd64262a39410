"""quadrant's lower layer: images, backbones, CNN codes and their HDF5 cache.

The public API for reading codes::

    from features import load_codes
    codes = load_codes("runs/demo/cache/codes-....h5", "top")
    codes.X, codes.y, codes.split

Names are imported on first use, so that `import features.errors` (which
the command line needs before it knows the command) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from features.cnn_codes import CNNCodes
    from features.codes import Codes, available_codes, iter_codes, load_codes

__all__ = ["CNNCodes", "Codes", "available_codes", "iter_codes", "load_codes"]

_HOMES = {
    "CNNCodes": "features.cnn_codes",
    "Codes": "features.codes",
    "available_codes": "features.codes",
    "iter_codes": "features.codes",
    "load_codes": "features.codes",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'features' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
