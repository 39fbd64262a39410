"""The advisor: which of the four transfer-learning cases is this data in?

Two questions, each answered with measurements on the user's own images, and
each answer given with its uncertainty:

- similarity to the backbone's original data (`similarity`): a linear probe
  on the codes of layers spread over the network and of the top layer, on
  the same repeated folds, so that each earlier layer's gain over top is a
  paired difference with a confidence interval; an earlier layer that beats
  top by more than `advise.top_margin`, interval and all, means the data is
  different.
- size (`size`): below `advise.small_per_class` images per class the data is
  small; above it, a learning curve of the frozen probe and a budgeted pilot
  fine-tune decide whether fine-tuning pays off.

Then (`stage.decide`): codes path + similar = 1, codes path + different = 2,
fine-tune + similar = 3, fine-tune + different = 4 (pretrained or scratch,
by a second pilot). "Undecided" (the interval straddles the margin) picks
the cheaper side. The decision, every figure with its interval and the
settings go to `advice.json` (`record`), stamped with the settings, the
images and the backbone it was made from: an unchanged rerun reuses it. The
reasons in words are `reasons`.

This module is the package's only door: other modules import from
`pipeline.advisor`, never from its modules (report.py alone reads the case
names from `pipeline.advisor.record`, the data-only one).
"""

from __future__ import annotations

from pipeline.advisor.reasons import announce, explain, summary_lines
from pipeline.advisor.record import CASES, Advice, read_advice
from pipeline.advisor.stage import advice_stamp, codes_layers, decide, run

__all__ = [
    "CASES",
    "Advice",
    "advice_stamp",
    "announce",
    "codes_layers",
    "decide",
    "explain",
    "read_advice",
    "run",
    "summary_lines",
]
