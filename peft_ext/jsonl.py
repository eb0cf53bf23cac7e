"""The one JSON-lines reader of the project: a broken line is reported with its file and line number."""

from __future__ import annotations

import json
import os


def read_jsonl(path: str | os.PathLike, what: str = "JSONL file") -> list[dict]:
    """The records of a JSON-lines file (blank lines skipped). Raises FileNotFoundError, or ValueError naming the
    file, the line and the fix for a line that is not one JSON object."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} '{path}' does not exist. Fix: pass an existing .jsonl file.")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{what} '{path}', line {number}: not valid JSON ({exc.msg} at column {exc.colno}). "
                                 f"Fix: one JSON object per line.") from None
            if not isinstance(record, dict):
                raise ValueError(f"{what} '{path}', line {number}: a {type(record).__name__}, not a JSON object. "
                                 f"Fix: one JSON object per line.")
            records.append(record)
    return records
