"""The one exception hierarchy of quadrant.

Both layers (`features` and `pipeline`) raise these classes, so a caller can catch
`PipelineError` for every error the tool raises on purpose. Each class also mixes
in the builtin a caller would naturally catch, as scikit-learn's
`NotFittedError(ValueError, AttributeError)` does.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class for errors this project raises on purpose.

    The command line prints the message of these errors (no traceback) and exits
    with status 1; any other exception keeps its full traceback.
    """


class ConfigError(PipelineError, ValueError):
    """A configuration file, key or value is wrong."""


class StageInputError(PipelineError, FileNotFoundError):
    """A stage's input (a folder, a file, an earlier output) is missing."""


class DataError(PipelineError, ValueError):
    """The labelled images cannot be used as they are (no images, empty class)."""


class ImageDecodeError(PipelineError, OSError):
    """One image cannot be decoded; extraction skips it and reports the reason."""


class BackboneError(PipelineError, ValueError):
    """A backbone, its weights or one of its layers cannot be built or found."""


class WeightsNotFoundError(BackboneError, FileNotFoundError):
    """Pretrained weights are neither on disk nor downloadable."""


class CacheError(PipelineError):
    """Base class for problems with an HDF5 code cache."""


class CacheMismatchError(CacheError, ValueError):
    """A cache holds codes for another configuration than the one asked for."""


class CacheCorruptError(CacheError, OSError):
    """A cache file is truncated, incomplete or fails its checksums."""


class CacheLockedError(CacheError, OSError):
    """Another process is writing the cache this process wants."""


class DistributedError(PipelineError, RuntimeError):
    """Another process of a torchrun job stopped it; the message says why."""


class OutputError(PipelineError, OSError):
    """A result cannot be written: full disk, read-only folder, a file in the way."""


class ExportParityError(PipelineError):
    """An exported model disagrees with the model it was exported from."""


class RecordError(PipelineError, ValueError):
    """A JSON record quadrant wrote (advice.json, model.json ...) is unreadable."""


class CheckpointError(PipelineError, ValueError):
    """A training checkpoint is missing, foreign or does not fit the config."""


class TrainingError(PipelineError, RuntimeError):
    """Training cannot go on as configured (out of memory, diverged ...)."""
