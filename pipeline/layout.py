"""The run folder's layout: every path a stage reads or writes, in one place.

```
<run.out>/
  config.toml          the resolved config of the last command that succeeded
  quadrant.log         every command's log, appended
  run.json             `quadrant run`: the case, the model, timings, reuse
  report.html          one page about the selected model
  advice.json          `quadrant advise`
  advise/              the advisor's pilot fine-tunes: pilot-pretrained/, pilot-scratch/
  extract.json         the last extraction: cache file, counts, skipped files
  sweep.json/.csv/.png the layer sweep
  samples.png          sample images per class (the report's)
  cache/               codes-<key>.h5 (unless extract.cache_dir is set)
  finetune/            fine-tuning work: last.pt (resume), best.pt, stamp.json
  models/
    codes/             `quadrant train`: model.json, head.skops, train.json, ...
    finetune/          `quadrant finetune`: model.json, model.pt, finetune.*, ...
```

Each model folder also receives what is made from that model: `metrics.json`,
`confusion_matrix.png`, `misclassified.csv` (evaluate), `model.onnx` and its
variants with `export.json` (export), `predictions.csv` (run --predict). A
model folder is published as a whole when training ends, so retraining
replaces the model together with everything made from the old one, and a
codes model and a fine-tuned model never overwrite each other.
docs/run-folder.md describes the same layout for users.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from features.names import MODEL_KINDS


@dataclass(frozen=True)
class ModelFiles:
    """The files of one trained model and of what was made from it."""

    folder: Path
    kind: str

    @property
    def record(self) -> Path:
        return self.folder / "model.json"

    @property
    def head(self) -> Path:
        return self.folder / "head.skops"

    @property
    def weights(self) -> Path:
        return self.folder / "model.pt"

    @property
    def train_summary(self) -> Path:
        return self.folder / "train.json"

    @property
    def train_plot(self) -> Path:
        return self.folder / "train_cv.png"

    @property
    def history_json(self) -> Path:
        return self.folder / "finetune.json"

    @property
    def history_csv(self) -> Path:
        return self.folder / "finetune.csv"

    @property
    def curves(self) -> Path:
        return self.folder / "training_curves.png"

    @property
    def metrics(self) -> Path:
        return self.folder / "metrics.json"

    @property
    def confusion(self) -> Path:
        return self.folder / "confusion_matrix.png"

    @property
    def misclassified(self) -> Path:
        return self.folder / "misclassified.csv"

    @property
    def onnx(self) -> Path:
        return self.folder / "model.onnx"

    @property
    def onnx_failed(self) -> Path:
        return self.folder / "model.failed.onnx"

    def variant(self, name: str) -> Path:
        """`model.fp16.onnx`, `model.int8.onnx`."""
        return self.folder / f"model.{name}.onnx"

    @property
    def export_summary(self) -> Path:
        return self.folder / "export.json"

    @property
    def predictions(self) -> Path:
        return self.folder / "predictions.csv"


@dataclass(frozen=True)
class RunLayout:
    """The run folder (`run.out`) and the code-cache folder it uses."""

    root: Path
    cache_dir: Path

    @classmethod
    def of(cls, run_out: Path | str, cache_dir: Path | str | None = None) -> RunLayout:
        """The layout of the run folder `run_out` (cache in `<run_out>/cache`)."""
        root = Path(run_out)
        return cls(root, Path(cache_dir) if cache_dir else root / "cache")

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def log(self) -> Path:
        return self.root / "quadrant.log"

    @property
    def summary(self) -> Path:
        return self.root / "run.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def samples(self) -> Path:
        return self.root / "samples.png"

    @property
    def advice(self) -> Path:
        return self.root / "advice.json"

    def pilot(self, init: str) -> Path:
        """The run folder of the advisor's pilot fine-tune with this init."""
        return self.root / "advise" / f"pilot-{init}"

    @property
    def extract_summary(self) -> Path:
        return self.root / "extract.json"

    @property
    def sweep_json(self) -> Path:
        return self.root / "sweep.json"

    @property
    def sweep_csv(self) -> Path:
        return self.root / "sweep.csv"

    @property
    def sweep_plot(self) -> Path:
        return self.root / "sweep.png"

    @property
    def pilot_record(self) -> Path:
        """pilot.json, in the run folder of one of the advisor's pilots."""
        return self.root / "pilot.json"

    @property
    def finetune_work(self) -> Path:
        return self.root / "finetune"

    @property
    def checkpoint(self) -> Path:
        return self.finetune_work / "last.pt"

    @property
    def best_weights(self) -> Path:
        return self.finetune_work / "best.pt"

    @property
    def finetune_stamp(self) -> Path:
        return self.finetune_work / "stamp.json"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def legacy_model(self) -> Path:
        """Where quadrant 0.1 kept its one model (refused, with how to retrain)."""
        return self.root / "model"

    def model(self, kind: str) -> ModelFiles:
        """The folder of the codes model or of the fine-tuned model."""
        if kind not in MODEL_KINDS:
            raise ValueError(f"model kind {kind!r} is not one of {MODEL_KINDS}")
        return ModelFiles(self.models / kind, kind)
