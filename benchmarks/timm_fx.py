"""Which timm models quadrant can cut: FX tracing with timm's leaf modules.

For each model (random weights, a small input), trace it the way
`features.layers` does for timm networks (`timm.models.get_graph_node_names`
and `create_feature_extractor`), run the traced graph and the eager model on
the same input, and print the node count, the largest output difference and
timm's feature stages. docs/libraries.md cites the result.

Usage:
    python benchmarks/timm_fx.py                     # the models below
    python benchmarks/timm_fx.py resnet50 eva02_tiny_patch14_224
"""

from __future__ import annotations

import sys
import time
import warnings

import timm
import torch
from timm.models import create_feature_extractor, get_graph_node_names

MODELS = (
    "resnet18",
    "resnet50",
    "convnext_atto",
    "convnextv2_atto",
    "efficientnet_b0",
    "tf_efficientnet_lite0",
    "efficientnetv2_rw_t",
    "regnety_002",
    "mobilenetv3_small_100",
    "vit_tiny_patch16_224",
    "vit_small_patch14_dinov2",
    "vit_small_patch14_reg4_dinov2",
    "vit_base_patch16_clip_224",
    "vit_base_patch16_siglip_224",
    "eva02_tiny_patch14_224",
    "beit_base_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "swin_tiny_patch4_window7_224",
    "maxvit_tiny_rw_224",
    "levit_128s",
    "fastvit_t8",
    "caformer_s18",
)


def check(name: str) -> str:
    """One line: traced or not, nodes, largest difference, stages, seconds."""
    start = time.perf_counter()
    cfg = timm.models.get_pretrained_cfg(name)
    kwargs = {}
    if cfg is not None and cfg.fixed_input_size:
        kwargs["img_size"] = 56 if "patch14" in name else 64
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    size = kwargs.get("img_size", 64)
    try:
        _, nodes = get_graph_node_names(model)
        traced = create_feature_extractor(model, {nodes[-1]: "out"}).eval()
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            diff = (traced(x)["out"] - model(x)).abs().max().item()
    except Exception as err:  # tracing errors come in many types: report any
        return f"{name}: NOT traced ({type(err).__name__}: {str(err)[:120]})"
    stages = [f["module"] for f in getattr(model, "feature_info", [])]
    return (
        f"{name}: traced, {len(nodes)} nodes, largest difference {diff:.1e}, "
        f"stages {stages[:3]}...{stages[-1:]}, {time.perf_counter() - start:.1f} s"
    )


def main() -> None:
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    print(f"# timm {timm.__version__}, torch {torch.__version__}")
    for name in sys.argv[1:] or MODELS:
        print(check(name), flush=True)


if __name__ == "__main__":
    main()
