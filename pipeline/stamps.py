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

from features.atomic import read_optional_json
from features.errors import RecordError


def stamp(*parts: Any) -> str:
    """sha256 of the canonical JSON of `parts` (non-JSON values as strings)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def stamp_of(record: Path) -> str | None:
    """The stamp kept in a JSON record, or None when there is none to read.

    NOTE: an unreadable record has no stamp: the artefact is made again, which
    replaces the record, rather than stopping the run.
    """
    try:
        data = read_optional_json(record)
    except RecordError:
        return None
    value = data.get("stamp") if isinstance(data, dict) else None
    return None if value is None else str(value)
