"""quadrant's stages: config, command line and one module per stage."""

# NOTE: the one place the version is written; pyproject.toml reads it from
# here, and `quadrant --version` prints it without importing anything else.
__version__ = "0.2.0"

__all__ = ["__version__"]
