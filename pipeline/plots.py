"""Figures people would rather look at than read: PNG files under run.out.

matplotlib runs headless (the Agg backend), so plots work on servers and in CI.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

from features.atomic import atomic_path  # noqa: E402

_DPI = 130


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=_DPI, format="png")
    finally:
        plt.close(fig)
    return path


def sweep_plot(
    names: Sequence[str],
    accuracy: Sequence[float],
    std: Sequence[float],
    logme: Sequence[float],
    best: str,
    path: Path,
    *,
    title: str,
) -> Path:
    """Linear-probe accuracy and LogME against depth (Yosinski et al.'s curve)."""
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(names) + 2), 4.2))
    x = np.arange(len(names))
    ax.errorbar(
        x,
        accuracy,
        yerr=std,
        marker="o",
        capsize=3,
        color="tab:blue",
        label="linear probe, CV accuracy",
    )
    ax.set_ylabel("cross-validated accuracy", color="tab:blue")
    ax.set_xticks(x, names, rotation=35, ha="right")
    ax.set_xlabel("layer (input → output)")
    i = list(names).index(best)
    ax.annotate(
        f"best: {accuracy[i]:.3f}",
        (x[i], accuracy[i]),
        xytext=(0, 12),
        textcoords="offset points",
        ha="center",
        color="tab:blue",
    )
    twin = ax.twinx()
    twin.plot(x, logme, marker="s", linestyle="--", color="tab:orange", label="LogME")
    twin.set_ylabel("LogME (no training)", color="tab:orange")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, ["linear probe, CV accuracy", "LogME"], loc="lower right")
    return _save(fig, path)


def confusion_plot(
    matrix: npt.NDArray[np.integer[Any]],
    labels: Sequence[str],
    path: Path,
    *,
    title: str,
) -> Path:
    """Row-normalised confusion matrix, with the counts in each cell."""
    size = max(4.5, 0.55 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    display = ConfusionMatrixDisplay(share, display_labels=list(labels))
    display.plot(
        ax=ax, cmap="Blues", colorbar=False, values_format=".2f", xticks_rotation=45
    )
    if len(labels) <= 20:
        for (i, j), count in np.ndenumerate(matrix):
            # Blank zero cells: the eye goes to the mistakes that happened.
            text = f"{share[i, j]:.2f}\n({count})" if count else ""
            display.text_[i, j].set_text(text)
    else:
        for text in display.text_.ravel():
            text.set_text("")
    # NOTE: long titles (a fine-tuned model's name and its accuracy) are
    # wrapped to the figure's width instead of running off both edges.
    ax.set_title(_wrap(title, size), fontsize=10)
    return _save(fig, path)


def _wrap(text: str, inches: float) -> str:
    """`text` broken into lines that fit a figure `inches` wide at 10 pt."""
    import textwrap

    return "\n".join(textwrap.wrap(text, width=max(20, int(inches * 11))))


def training_curves(
    epochs: Sequence[dict[str, float]], path: Path, *, title: str
) -> Path:
    """Loss and accuracy per epoch, training and validation, side by side."""
    fig, (loss, acc) = plt.subplots(1, 2, figsize=(10, 4))
    x = [row["epoch"] for row in epochs]
    for split, style in (("train", "-o"), ("val", "--s")):
        loss.plot(x, [row[f"{split}_loss"] for row in epochs], style, label=split)
        acc.plot(x, [row[f"{split}_accuracy"] for row in epochs], style, label=split)
    for ax, name in ((loss, "loss"), (acc, "accuracy")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return _save(fig, path)


THUMBNAIL_SIDE = 256


def sample_grid(samples: dict[str, list[Path]], path: Path) -> Path:
    """A grid of images: one row per class, a few images per row."""
    from features.errors import ImageDecodeError
    from features.images import decode_image

    rows = len(samples)
    cols = max((len(v) for v in samples.values()), default=1) or 1
    fig, axes = plt.subplots(
        rows, cols, figsize=(1.3 * cols + 1.5, 1.3 * rows), squeeze=False
    )
    for r, (name, files) in enumerate(samples.items()):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(files):
                try:
                    # NOTE: a thumbnail: camera photos decode small and fast.
                    image = decode_image(files[c], min_side=THUMBNAIL_SIDE)
                    ax.imshow(np.asarray(image))
                except ImageDecodeError:
                    ax.text(0.5, 0.5, "unreadable", ha="center", va="center")
            else:
                ax.axis("off")
        axes[r][0].set_ylabel(name, rotation=0, ha="right", va="center")
    return _save(fig, path)


def cv_plot(
    values: Sequence[Any],
    mean: Sequence[float],
    std: Sequence[float],
    param: str,
    path: Path,
    *,
    chosen: int,
    title: str,
) -> Path:
    """Cross-validated score against one hyper-parameter; the chosen value marked."""
    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.arange(len(values))
    ax.errorbar(x, mean, yerr=std, marker="o", capsize=3)
    ax.plot(
        [x[chosen]],
        [mean[chosen]],
        marker="*",
        markersize=16,
        color="tab:red",
        linestyle="none",
        label=f"chosen: {param} = {values[chosen]}",
    )
    ax.legend(loc="lower right")
    ax.set_xticks(x, [str(v) for v in values], rotation=30)
    ax.set_xlabel(param)
    ax.set_ylabel("cross-validated score")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)
