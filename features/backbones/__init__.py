"""Backbones by name: torchvision's classification models and EfficientNet-Lite."""

from features.backbones.registry import (
    Backbone,
    available_backbones,
    build_backbone,
    sha256_of,
)

__all__ = ["Backbone", "available_backbones", "build_backbone", "sha256_of"]
