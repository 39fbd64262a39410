"""The fine-tune path (cases 3 and 4): train the whole network with a new head.

- `stage`: the stage (`run`: prepare, fit, publish), the model with its new
  head, the model stamp.
- `loop`: the training loop alone (`Trainer`).
- `optim`: parameter groups, the optimiser and its schedule.
- `checkpoints`: checkpoints, best-model tracking, early stopping, history.
- `pilot`: the advisor's budgeted pilot fine-tune.
- `data`: datasets, augmentation and loaders; the images' native size.
"""

from pipeline.finetune.cost import StepRate, step_rate
from pipeline.finetune.data import loader, native_side, split_dataset
from pipeline.finetune.pilot import PilotRun, pilot, pilot_budget
from pipeline.finetune.stage import FinetuneResult, build_model, model_stamp, run

__all__ = [
    "FinetuneResult",
    "StepRate",
    "PilotRun",
    "build_model",
    "loader",
    "model_stamp",
    "native_side",
    "pilot",
    "pilot_budget",
    "run",
    "split_dataset",
    "step_rate",
]
