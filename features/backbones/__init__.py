"""Backbones by name: torchvision's classification models, EfficientNet-Lite, timm.

This is the package's only door: other modules import these names from
`features.backbones`, never from its modules.
"""

from features.backbones.registry import (
    Backbone,
    available_backbones,
    build_backbone,
    check_input_size,
    fixed_input_size,
    head_name,
    is_weights_path,
    sha256_of,
)
from features.backbones.timm_backbones import INSTALL as TIMM_INSTALL
from features.backbones.timm_backbones import check_name as check_timm_name
from features.backbones.timm_backbones import classifier_names as timm_classifier_names
from features.backbones.timm_backbones import (
    feature_extractor as timm_feature_extractor,
)
from features.backbones.timm_backbones import graph_node_names as timm_graph_node_names
from features.backbones.timm_backbones import (
    import_timm,
    is_timm_model,
    is_timm_name,
    stage_reductions,
)
from features.backbones.timm_backbones import stage_names as timm_stage_names
from features.backbones.timm_backbones import suggest as suggest_timm_names

__all__ = [
    "TIMM_INSTALL",
    "Backbone",
    "available_backbones",
    "build_backbone",
    "check_input_size",
    "fixed_input_size",
    "check_timm_name",
    "head_name",
    "import_timm",
    "is_timm_model",
    "is_timm_name",
    "is_weights_path",
    "sha256_of",
    "stage_reductions",
    "suggest_timm_names",
    "timm_classifier_names",
    "timm_feature_extractor",
    "timm_graph_node_names",
    "timm_stage_names",
]
