"""quadrant's lower layer: images, backbones, CNN codes and their HDF5 cache.

The public API for reading codes::

    from features import load_codes
    codes = load_codes("runs/demo/cache/codes-....h5", "top")
    codes.X, codes.y, codes.split
"""

from features.codes import Codes, available_codes, iter_codes, load_codes

__all__ = ["Codes", "available_codes", "iter_codes", "load_codes"]
