"""Prediction files: one ``{"id": ..., "output": ...}`` JSON object per line (a model's raw outputs).

Written by evaluation and pair mining, read back to score or mine without a model. Read through the data
layer's JSONL reader, so a bad line is a :class:`pvfast.data.io.DataError` naming file, line and field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from pvfast.data.io import DataError, Problem, read_jsonl, write_jsonl
from pvfast.data.records import Example


def write_predictions(path: str | os.PathLike, ids: Sequence[str], outputs: Sequence[str]) -> Path:
    """Write ``{"id", "output"}`` JSONL (atomically)."""
    if len(ids) != len(outputs):
        raise ValueError(f"write_predictions: {len(ids)} ids but {len(outputs)} outputs")
    return write_jsonl(path, ({"id": i, "output": o} for i, o in zip(ids, outputs)))


def read_predictions(path: str | os.PathLike) -> dict[str, str]:
    """Read a predictions JSONL file into ``{id: output}``; every bad line is a :class:`DataError` problem."""
    shown = os.fspath(path)
    rows, problems = read_jsonl(path)  # the data layer's reader: UTF-8, JSON and object checks per line
    outputs: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, row in rows:
        record_id, output = row.get("id"), row.get("output")
        if isinstance(record_id, bool) or not isinstance(record_id, (str, int)):
            problems.append(Problem(shown, number, "id", "missing, or not a string"))
            continue
        if not isinstance(output, str):
            problems.append(Problem(shown, number, "output", "missing, or not a string"))
            continue
        record_id = str(record_id)
        if record_id in first_line:
            problems.append(Problem(shown, number, "id",
                                    f"duplicate id {record_id!r} (first on line {first_line[record_id]})"))
            continue
        first_line[record_id] = number
        outputs[record_id] = output
    if problems:
        raise DataError(sorted(problems, key=lambda p: p.line or 0))
    if not outputs:
        raise DataError([Problem(shown, None, None, "file is empty (no predictions)")])
    return outputs


def align_predictions(examples: Sequence[Example], outputs: dict[str, str], *, predictions_path: str,
                      data_path: str) -> list[str]:
    """Outputs in the order of ``examples``; refuses ids missing on either side (names both files)."""
    data_ids = [ex.id for ex in examples]
    missing = [i for i in data_ids if i not in outputs]
    data_id_set = set(data_ids)
    unknown = [i for i in outputs if i not in data_id_set]
    problems = []
    if missing:
        problems.append(Problem(predictions_path, None, "id",
                                f"{len(missing)} id(s) of {data_path} have no prediction: {_some(missing)}"))
    if unknown:
        problems.append(Problem(predictions_path, None, "id",
                                f"{len(unknown)} predicted id(s) are not in {data_path}: {_some(unknown)}"))
    if problems:
        raise DataError(problems)
    return [outputs[i] for i in data_ids]


def _some(ids: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")
