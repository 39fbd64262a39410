"""A trained model, whichever path made it: one abstraction for every stage.

`load_model(files)` returns a `CodesModel` (a scikit-learn head on the codes
of a frozen backbone layer, cases 1-2) or a `FinetunedModel` (a whole network,
cases 3-4). Both know their label names, their preprocessing, how to score
images (`image_scores`, with the kind of the scores) and how to become one
ONNX graph (`onnx_graph`). evaluate, export and report use this module and
nothing else to learn what a model is.

The model record (`model.json`) holds everything needed to rebuild the model
and to check it: the backbone's identity with its weights file's sha256, the
preprocessing, the layer and pooling or the network weights' sha256, the
label names, the stamp of the settings it was trained from, and those
settings themselves.
"""

from __future__ import annotations

import datetime
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from features.atomic import read_json, read_torch
from features.backbones import (
    Backbone,
    build_backbone,
    is_weights_path,
    sha256_of,
)
from features.errors import CacheMismatchError, RecordError, StageInputError
from features.extractor import CodeModel
from features.heads import Scores, head_scores, load_head
from features.names import MODEL_KINDS
from features.transforms import Normalize, Preprocessing
from pipeline import __version__
from pipeline.config import Config, config_to_dict
from pipeline.layout import ModelFiles, RunLayout

log = logging.getLogger(__name__)

FORMAT = "quadrant-model"
FORMAT_VERSION = 2
RETRAIN = {
    "codes": "run `quadrant train` again",
    "finetune": "run `quadrant finetune --restart` again",
}


class ImageClassifier(nn.Module):
    """uint8 images (N, 3, H, W) in, class logits out: normalisation inside.

    The same module is trained, evaluated and exported to ONNX, so deployment
    feeds it raw pixels.
    """

    def __init__(self, net: nn.Module, prep: Preprocessing) -> None:
        super().__init__()
        self.normalize = Normalize(prep.mean, prep.std)
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(images))


# ---------------------------------------------------------------------------
# The model record


def new_record(
    kind: str,
    cfg: Config,
    *,
    label_names: Iterable[str],
    preprocessing: Preprocessing,
    backbone: Mapping[str, Any],
    stamp: str,
    **details: Any,
) -> dict[str, Any]:
    """The common part of a model record, plus the kind's own `details`."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "created": datetime.datetime.now(datetime.UTC).isoformat(),
        "quadrant": __version__,
        "label_names": list(label_names),
        "preprocessing": preprocessing.as_dict(),
        "backbone": dict(backbone),
        **details,
        "stamp": stamp,
        "config": config_to_dict(cfg),
    }


def read_record(files: ModelFiles) -> dict[str, Any]:
    """A model record, checked for format and kind.

    Raises:
        StageInputError: no model in the folder.
        CacheMismatchError: not a quadrant model record of this version.
    """
    if not files.record.is_file():
        raise StageInputError(
            f"no {files.kind} model in {files.folder}; {_train_command(files.kind)}"
        )
    record = read_json(files.record, fix=RETRAIN[files.kind])
    if (
        not isinstance(record, dict)
        or record.get("format") != FORMAT
        or record.get("format_version") != FORMAT_VERSION
        or record.get("kind") != files.kind
    ):
        raise CacheMismatchError(
            f"{files.record} is not a {files.kind} model record of this quadrant "
            f"version; {RETRAIN[files.kind]}"
        )
    return record


def _train_command(kind: str) -> str:
    return (
        "run `quadrant train` first"
        if kind == "codes"
        else ("run `quadrant finetune` first")
    )


def select_model(layout: RunLayout, choice: str = "latest") -> ModelFiles:
    """The model a stage works on: `run.model`, or the latest trained one.

    Raises:
        StageInputError: no such model, naming the command that makes one.
        CacheMismatchError: the folder holds a model of quadrant 0.1's layout.
    """
    if choice != "latest":
        files = layout.model(choice)
        read_record(files)  # raises with the command that trains one
        return files
    trained = [layout.model(k) for k in MODEL_KINDS if layout.model(k).record.is_file()]
    if trained:
        return max(trained, key=lambda f: str(read_record(f)["created"]))
    if (layout.legacy_model / "model.json").is_file():
        raise CacheMismatchError(
            f"{layout.legacy_model} holds a model in the layout of quadrant 0.1, "
            "which saved scikit-learn heads with joblib (pickle); quadrant no longer "
            "loads pickle files, since loading one runs any code it holds. Retrain: "
            "`quadrant train` (or `quadrant finetune`), then delete that folder."
        )
    raise StageInputError(
        f"no trained model in {layout.models}; run `quadrant train` (codes path) "
        "or `quadrant finetune` first"
    )


# ---------------------------------------------------------------------------
# Models


@dataclass
class TrainedModel(ABC):
    """What every stage needs to know about a trained model."""

    files: ModelFiles
    record: dict[str, Any]
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def kind(self) -> str:
        return self.files.kind

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(self.record["label_names"])

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing().updated(self.record["preprocessing"])

    @property
    def score_kind(self) -> str:
        return str(self.record["score_kind"])

    @property
    @abstractmethod
    def title(self) -> str:
        """One line saying what the model is, for plots and the report."""

    @abstractmethod
    def image_scores(self, pixels: npt.NDArray[np.uint8]) -> Scores:
        """Scores of uint8 images (N, 3, S, S), resized as `preprocessing` says."""

    @abstractmethod
    def onnx_graph(self, *, opset: int, input_dtype: torch.dtype) -> Any:
        """The whole model as one ONNX graph: images -> (scores, label)."""

    def check_labels(self, label_names: Iterable[str]) -> None:
        """Refuse data whose classes are not those the model was trained on.

        Raises:
            CacheMismatchError: naming both class lists and the fix.
        """
        found = tuple(label_names)
        if found != self.label_names:
            raise CacheMismatchError(
                f"the {self.kind} model in {self.files.folder} was trained on "
                f"classes {list(self.label_names)}, the data has {list(found)}; "
                f"{RETRAIN[self.kind]} (or point data.root at the data it was "
                "trained on)"
            )

    def backbone(self) -> Backbone:
        """The backbone as it was when the model was trained, its weights checked.

        Raises:
            CacheMismatchError: the weights file changed since training.
        """
        if "backbone" not in self._cache:
            self._cache["backbone"] = _rebuild_backbone(self.record, self.kind)
        backbone: Backbone = self._cache["backbone"]
        return backbone


def _rebuild_backbone(record: Mapping[str, Any], kind: str) -> Backbone:
    identity = record["backbone"]
    weights = str(identity["weights"])
    seed = 0
    if weights == "random":
        seed = int(str(identity["weights_sha256"]).rpartition("=")[2] or 0)
    elif is_weights_path(weights):
        weights = str(identity["weights_file"])  # resolved when it was trained
    elif identity.get("weights_source") and Path(identity["weights_file"]).is_file():
        # NOTE: timm's hub weights: the very file (hub revision) trained on,
        # even where the hub cache has a newer revision since.
        weights = str(identity["weights_file"])
    backbone = build_backbone(
        identity["name"], weights, seed=seed, preprocessing=record["preprocessing"]
    )
    if backbone.weights_sha256 != identity["weights_sha256"]:
        raise CacheMismatchError(
            f"the weights of {identity['name']} ({backbone.weights_file}) changed "
            f"since the model was trained (sha256 {identity['weights_sha256'][:16]} "
            f"then, {backbone.weights_sha256[:16]} now); restore them or "
            f"{RETRAIN[kind]}"
        )
    return backbone


@dataclass
class CodesModel(TrainedModel):
    """A scikit-learn head on the codes of one layer of a frozen backbone."""

    @property
    def head(self) -> Any:
        if "head" not in self._cache:
            self._cache["head"] = load_head(self.files.head, self.record["head"])
        return self._cache["head"]

    @property
    def layer(self) -> str:
        return str(self.record["codes"]["layer"])

    @property
    def pooling(self) -> str:
        return str(self.record["codes"]["pooling"])

    @property
    def classifier(self) -> str:
        return str(self.record["classifier"])

    @property
    def title(self) -> str:
        return f"{self.classifier} on {self.layer}/{self.pooling}"

    def scores(self, codes: npt.NDArray[Any]) -> Scores:
        """The head's scores on code rows of the model's layer."""
        return head_scores(self.head, codes)

    def code_model(self) -> CodeModel:
        """The frozen backbone cut at the model's layer, pooled as trained."""
        if "code_model" not in self._cache:
            # Flat layers are cached under "none"; any pooling leaves them as is.
            pooling = "avg" if self.pooling == "none" else self.pooling
            built = CodeModel(self.backbone(), [self.layer], [pooling]).eval()
            self._cache["code_model"] = built
        model: CodeModel = self._cache["code_model"]
        return model

    @torch.inference_mode()
    def image_scores(self, pixels: npt.NDArray[np.uint8]) -> Scores:
        model = self.code_model()
        codes = model(torch.from_numpy(pixels))[model.specs[0].name].numpy()
        return self.scores(codes)

    def onnx_graph(self, *, opset: int, input_dtype: torch.dtype) -> Any:
        from features.onnx_engine import export_module, head_graph, join_graphs

        model = self.code_model()
        spec = model.specs[0]
        body = export_module(
            _SingleCode(model, spec.name),
            self.preprocessing.input_size,
            ["codes"],
            opset=opset,
            input_dtype=input_dtype,
        )
        # NOTE: skl2onnx reports a binary SVC's scores as (margin, -margin);
        # swapped, column k is the evidence for class k as for every head.
        binary_svm = self.classifier == "svm" and len(self.label_names) == 2
        head = head_graph(self.head, spec.dims, opset)
        return join_graphs(body, head, swap_columns=binary_svm)


class _SingleCode(nn.Module):
    def __init__(self, model: CodeModel, name: str) -> None:
        super().__init__()
        self.model = model
        self.name = name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)[self.name]


@dataclass
class FinetunedModel(TrainedModel):
    """A whole network fine-tuned (or trained from scratch) on the data."""

    @property
    def title(self) -> str:
        return f"fine-tuned {self.record['backbone']['name']} ({self.record['init']})"

    def network(self, device: torch.device | None = None) -> ImageClassifier:
        """The network with its trained weights, in eval mode.

        Raises:
            CacheMismatchError: the weights file changed since training.
        """
        if "network" not in self._cache:
            self._cache["network"] = self._load_network()
        network: ImageClassifier = self._cache["network"]
        return network.to(device) if device is not None else network

    def _load_network(self) -> ImageClassifier:
        file = self.files.weights
        if not file.is_file():
            raise StageInputError(f"{file} not found; {RETRAIN['finetune']}")
        if sha256_of(file) != self.record["weights"]["sha256"]:
            raise CacheMismatchError(
                f"{file} changed since quadrant wrote it (sha256 mismatch); "
                f"{RETRAIN['finetune']}"
            )
        identity = self.record["backbone"]
        backbone = build_backbone(
            identity["name"],
            "random",
            preprocessing=self.record["preprocessing"],
            num_classes=len(self.label_names),
        )
        network = ImageClassifier(backbone.model, backbone.preprocessing)
        state = read_torch(
            file,
            what="the fine-tuned weights quadrant wrote",
            fix=RETRAIN["finetune"],
            error=RecordError,
        )
        try:
            network.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as err:
            raise RecordError(
                f"{file} holds weights of another network than model.json "
                f"describes ({' '.join(str(err).split())[:300]}); "
                f"{RETRAIN['finetune']}"
            ) from None
        return network.eval()

    @torch.inference_mode()
    def image_scores(self, pixels: npt.NDArray[np.uint8]) -> Scores:
        probs = torch.softmax(self.network()(torch.from_numpy(pixels)).float(), dim=1)
        values = probs.double().numpy()
        return Scores(values, values.argmax(1), "probability")

    def onnx_graph(self, *, opset: int, input_dtype: torch.dtype) -> Any:
        from features.onnx_engine import export_module

        return export_module(
            _Softmaxed(self.network()).eval(),
            self.preprocessing.input_size,
            ["scores", "label"],
            opset=opset,
            input_dtype=input_dtype,
        )


class _Softmaxed(nn.Module):
    """Logits to (softmax scores, argmax label): the fine-tuned graph's outputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(self.model(images).float(), dim=1)
        return probs, probs.argmax(dim=1)


_CLASSES: dict[str, type[TrainedModel]] = {
    "codes": CodesModel,
    "finetune": FinetunedModel,
}


def load_model(files: ModelFiles) -> TrainedModel:
    """The model in `files.folder`; its parts are loaded (and checked) on use.

    Raises:
        StageInputError: no model there.
        CacheMismatchError: a record of another version, or files changed
            since quadrant wrote them.
    """
    return _CLASSES[files.kind](files, read_record(files))


@torch.inference_mode()
def predict_batches(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    device: torch.device,
    amp: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax probabilities, labels and indices of every (images, y, index) batch.

    Batches of a loader that dropped undecodable images may be empty.
    """
    model.eval()
    probs, labels, indices = [], [], []
    for images, y, index in batches:
        if len(y) == 0:
            continue
        images = images.to(device, non_blocking=True)
        with torch.autocast(
            device.type, dtype=amp or torch.float32, enabled=amp is not None
        ):
            logits = model(images)
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
        labels.append(y)
        indices.append(index)
    if not probs:
        empty = torch.zeros(0, dtype=torch.long)
        return torch.zeros(0, 0), empty, empty
    return torch.cat(probs), torch.cat(labels), torch.cat(indices)
