"""Stamps: a digest of the settings and inputs an artefact was made from.

An artefact's record (model.json, sweep.json, export.json, advice.json)
keeps the stamp it was made with; `quadrant run` reuses the artefact when the
stamp it would make now is the same, and redoes it otherwise.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def stamp(*parts: Any) -> str:
    """sha256 of the canonical JSON of `parts` (non-JSON values as strings)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def stamp_of(record: Path) -> str | None:
    """The stamp kept in a JSON record, or None when there is none to read."""
    try:
        value = json.loads(Path(record).read_text()).get("stamp")
    except (OSError, ValueError, AttributeError):
        return None
    return None if value is None else str(value)
