"""Read and write pvfast data files, validating every record (SPEC §1).

Readers accept these layouts:

* **pvfast SFT JSONL**: one object per line,
  ``{"id": "m1", "direction": "Y", "message": "...", "annotations": [{"Code", "Sub-code", "Span"}, ...]}``.
* **The published layout**: a Hugging Face dataset saved with ``save_to_disk`` (string columns ``query``
  and ``answer``). Direction and message come from the final ``INPUT: TO_PAT_YN: ...`` / ``Context: ...``
  block of ``query`` (the message is the Context text up to the whitespace before ``OUTPUT:``; a
  ``(Speaker: ...)`` note that contradicts TO_PAT_YN is an error); the annotations from ``answer``,
  which must be strict JSON (a trailing ``JSON_END`` is allowed). Records get the id ``<name>-<row>``
  (``<name>`` is the directory or file stem, plus ``-<split>`` for a DatasetDict). Rows in this shape in
  a JSONL file are read too (with 1-based line numbers in their ids).
  For a saved ``DatasetDict`` pick the split with ``PATH::SPLIT`` (``data/pv::train``); a dict with
  exactly one split needs no suffix.
* **pvfast preference JSONL**: :meth:`PreferenceRecord.to_dict` per line (``id``, ``direction`` +
  ``message`` or ``prompt``, ``chosen``, ``rejected`` list, optional ``strategies``, ``weight``).
* **TRL preference layout**: ``prompt``, ``chosen``, ``rejected`` strings, one pair per row (JSONL or a
  saved dataset). Consecutive rows with the same ``prompt`` and ``chosen`` become one record with k
  rejected completions (k pairs sharing one prompt), id ``<name>-<first row>``, weight 1.0.

Every problem names the file, the line (JSONL, 1-based) or row (saved dataset, 0-based index), the field
and what is wrong; message and span text never appear in a problem. A UTF-8 byte-order mark at the start of
a JSONL file (spreadsheet exports write one) is skipped. Labels are matched case- and space-insensitively and
stored canonical; the loaders count how many they normalised (``result.normalized``, per field) so callers
report it, without the label text (a label column can hold patient text by mistake). By default a file with any invalid
record is refused (:class:`DataError` listing every problem); ``skip_invalid=True`` drops the invalid
records and returns their problems. A file with no valid record at all is always refused.

Writers produce pvfast JSONL (UTF-8, non-ASCII kept, one record per line), atomically
(:mod:`pvfast.atomic`): the file appears complete or not at all.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from pvfast import atomic
from pvfast.data.codebook import (
    CODES,
    DIRECTIONS,
    NONE_SUBCODE,
    SUBCODES,
    canonical_code,
    canonical_subcode,
    code_allowed,
    codes_for_direction,
    is_valid_pair,
    valid_subcodes,
)
from pvfast.data.jsonfmt import STOP_TEXT, describe_unknown_label, parse_output
from pvfast.data.records import Annotation, Example, PreferenceRecord

#: Problems listed in a :class:`DataError` message before "... and K more".
MAX_LISTED_PROBLEMS = 20
#: Longest direction / id value quoted in a problem (longer values are described by length, so a column
#: holding message text by mistake cannot leak it into logs). Label values are never quoted: see
#: :func:`pvfast.data.jsonfmt.describe_unknown_label`.
MAX_QUOTED_DIRECTION_CHARS = 8
MAX_QUOTED_ID_CHARS = 60
#: Separator between a saved DatasetDict directory and the split to read.
SPLIT_SEPARATOR = "::"
#: Files that ``save_to_disk`` writes into a Dataset / a DatasetDict directory.
DATASET_FILES = ("dataset_info.json", "state.json")
DATASET_DICT_FILE = "dataset_dict.json"

_FIELDS = ("Code", "Sub-code", "Span")
_BOM = b"\xef\xbb\xbf"

# The last "INPUT: TO_PAT_YN: <d> ... \n Context: <message> \n\n\n OUTPUT:" block of a published query.
# The greedy prefix makes it the *last* block, so an example block in the instruction text is skipped.
_QUERY_RE = re.compile(
    r"\A.*INPUT:[ \t]*TO_PAT_YN:[ \t]*(?P<direction>[^\s(]*)(?P<speaker>[^\n]*)\n"
    r"[ \t]*Context:[ \t]?(?P<message>.*?)\s*OUTPUT:\s*\Z",
    re.S,
)
_SPEAKER_RE = re.compile(r"Speaker:\s*(?P<who>Provider|Patient)\s+speaking", re.I)
_SPEAKER_DIRECTION = {"provider": "Y", "patient": "N"}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a data file: where (file, line or row, field) and what."""

    path: str
    line: int | None
    field: str | None
    message: str
    unit: str = "line"  # "line" (JSONL, 1-based) or "row" (saved dataset, 0-based index)

    def __str__(self) -> str:
        where = self.path
        if self.line is not None:
            where += f":{self.line}" if self.unit == "line" else f":{self.unit} {self.line}"
        parts = [where] + ([self.field] if self.field is not None else []) + [self.message]
        return ": ".join(parts)


class LoadResult(tuple):
    """``(records, skipped)`` as the loaders always returned it (unpack it as before), plus ``normalized``:
    how many labels were given in another case or spacing and stored canonical, per field
    (``{"Code": 3, "Sub-code": 1}``), and where each record came from (:meth:`problem`)."""

    normalized: Counter

    def __new__(cls, records: list, skipped: list[Problem], normalized: Counter | None = None,
                positions: dict[str, int] | None = None, source: _Source | None = None):
        result = super().__new__(cls, (records, skipped))
        result.normalized = Counter() if normalized is None else normalized
        result._positions = positions or {}
        result._source = source
        return result

    def problem(self, record_id: str, field: str | None, message: str) -> Problem:
        """A problem with the record ``record_id`` found after loading (e.g. its token length), at its line."""
        if self._source is None:
            return Problem(f"record {record_id!r}", None, field, message)
        return self._source.problem(self._positions.get(record_id), field, message)

    @property
    def records(self) -> list:
        return self[0]

    @property
    def skipped(self) -> list[Problem]:
        return self[1]

    def normalized_summary(self) -> str | None:
        """"normalised 4 labels to their canonical spelling (Code 3, Sub-code 1)", or None when none were."""
        total = sum(self.normalized.values())
        if not total:
            return None
        fields = ", ".join(f"{name} {count}" for name, count in sorted(self.normalized.items()))
        return f"normalised {total} label{'s' if total != 1 else ''} to their canonical spelling ({fields})"


class DataError(ValueError):
    """A data file was refused; ``problems`` lists everything wrong with it."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        lines = [str(p) for p in self.problems[:MAX_LISTED_PROBLEMS]]
        if len(self.problems) > MAX_LISTED_PROBLEMS:
            lines.append(f"... and {len(self.problems) - MAX_LISTED_PROBLEMS} more")
        count = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        super().__init__(f"{count}:\n" + "\n".join(lines))


# ---------------------------------------------------------------------------------------------------
# Reading rows: one place turns a path into (position, row dict) pairs plus file-level problems.


@dataclass
class _Source:
    """The rows of one input file or saved dataset, with how to name positions in problems."""

    path: str  # as shown in problems (with ::split for a DatasetDict)
    name: str  # prefix of generated record ids
    unit: str  # "line" or "row"
    rows: list[tuple[int, dict]]
    problems: list[Problem]  # rows that could not be read at all (malformed JSON, not an object)
    normalized: Counter = field(default_factory=Counter)  # labels stored canonical, per field

    def problem(self, position: int | None, field: str | None, message: str) -> Problem:
        return Problem(self.path, position, field, message, self.unit)


def _refuse(path: str, message: str) -> DataError:
    return DataError([Problem(path, None, None, message)])


def _split_path(path: str | os.PathLike) -> tuple[Path, str | None]:
    text = os.fspath(path)
    if SPLIT_SEPARATOR in text and not Path(text).exists():
        base, split = text.rsplit(SPLIT_SEPARATOR, 1)
        return Path(base), split
    return Path(text), None


def _read_source(path: str | os.PathLike) -> _Source:
    base, split = _split_path(path)
    shown = os.fspath(path)
    if not base.exists():
        raise _refuse(shown, "no such file or directory")
    if base.is_dir():
        return _read_saved_dataset(base, split, shown)
    if split is not None:
        raise _refuse(shown, f"a split ({split!r}) can only be chosen in a saved DatasetDict directory")
    return _read_jsonl(base, shown)


def _read_jsonl(path: Path, shown: str) -> _Source:
    source = _Source(shown, path.stem, "line", [], [])
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]  # a byte-order mark (spreadsheet exports), not content
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                source.problems.append(source.problem(number, None, f"not valid UTF-8 (byte {err.start})"))
                continue
            if not text.strip():
                continue
            try:
                text = text.rstrip("\r\n")  # the line ending is not part of the record
                row = json.loads(text)
            except json.JSONDecodeError as err:
                source.problems.append(source.problem(number, None, _json_error(err, text)))
                continue
            if not isinstance(row, dict):
                source.problems.append(
                    source.problem(number, None, f"expected a JSON object, got {_json_type(row)}"))
                continue
            source.rows.append((number, row))
    if not source.rows and not source.problems:
        raise _refuse(shown, "file is empty (no records)")
    return source


def read_jsonl(path: str | os.PathLike) -> tuple[list[tuple[int, dict]], list[Problem]]:
    """``([(line number, object), ...], problems)`` of any JSONL file of objects (1-based lines).

    Lines that are not UTF-8, not JSON or not an object become problems; blank lines are skipped.
    Raises :class:`DataError` for a missing or empty file. Other readers of JSONL (predictions, ...)
    use this so their errors name file, line and column the same way.
    """
    shown = os.fspath(path)
    if not Path(shown).is_file():
        raise _refuse(shown, "no such file" if not Path(shown).exists() else "not a file")
    source = _read_jsonl(Path(shown), shown)
    return source.rows, source.problems


def _read_saved_dataset(directory: Path, split: str | None, shown: str) -> _Source:
    is_dict = (directory / DATASET_DICT_FILE).is_file()
    if not is_dict and not all((directory / f).is_file() for f in DATASET_FILES):
        raise _refuse(shown, f"directory is not a dataset saved with save_to_disk (no "
                             f"{DATASET_DICT_FILE}, or no {' and '.join(DATASET_FILES)})")
    if not is_dict and split is not None:
        raise _refuse(shown, f"a split ({split!r}) was given but this is a single saved Dataset")
    try:
        import datasets  # lazy: only the published layout needs it
    except ImportError as err:
        raise ImportError("reading a saved Hugging Face dataset needs the `datasets` package "
                          "(pip install datasets)") from err
    loaded = datasets.load_from_disk(str(directory))
    name = directory.name
    if is_dict:
        splits = list(loaded.keys())
        if split is None:
            if len(splits) != 1:
                raise _refuse(shown, f"saved DatasetDict has splits {', '.join(splits)}: "
                                     f"choose one with PATH{SPLIT_SEPARATOR}SPLIT")
            split = splits[0]
        elif split not in loaded:
            raise _refuse(shown, f"no split {split!r}; the saved DatasetDict has {', '.join(splits)}")
        loaded = loaded[split]
        shown = f"{directory}{SPLIT_SEPARATOR}{split}"
        name = f"{name}-{split}"
    if len(loaded) == 0:
        raise _refuse(shown, "dataset is empty (no rows)")
    return _Source(shown, name, "row", list(enumerate(loaded)), [])


def _json_error(err: json.JSONDecodeError, text: str, offset: int = 0) -> str:
    """"malformed JSON: <what> at column C" (line L, column C for a value spanning lines), positions 1-based in
    characters of ``text``, where the parsed part started at character ``offset``. The parser's own messages
    may end in "at" ("Unterminated string starting at"): the position completes them."""
    index = offset + err.pos
    line = text.count("\n", 0, index) + 1
    column = index - (text.rfind("\n", 0, index) + 1) + 1
    what = err.msg.removesuffix(" at")
    where = f"line {line}, column {column}" if "\n" in text.rstrip("\r\n") else f"column {column}"
    return f"malformed JSON: {what} at {where}"


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
             int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def _quote(value: Any, limit: int) -> str:
    """``repr(value)`` if it is a short string; otherwise its type and length (never long text)."""
    if isinstance(value, str):
        return repr(value) if len(value) <= limit else f"a string of {len(value)} chars"
    return _json_type(value)


# ---------------------------------------------------------------------------------------------------
# Field checks shared by both record kinds. Each returns the value or None after adding a problem.


class _RowCheck:
    """Collects the problems of one row; ``ok`` tells whether the row is valid so far."""

    def __init__(self, source: _Source, position: int):
        self.source = source
        self.position = position
        self.problems: list[Problem] = []
        self.normalized: Counter = Counter()  # labels of this row stored canonical (counted if the row is kept)
        self.unused_weights = 0  # a preference row's legacy "weight" other than 1 (reported once per file)

    def add(self, field: str | None, message: str) -> None:
        self.problems.append(self.source.problem(self.position, field, message))

    @property
    def ok(self) -> bool:
        return not self.problems

    def string(self, row: dict, field: str, *, non_empty: bool = True) -> str | None:
        if field not in row:
            self.add(field, "missing field")
            return None
        value = row[field]
        if not isinstance(value, str):
            self.add(field, f"wrong type: expected a string, got {_json_type(value)}")
            return None
        if non_empty and not value.strip():
            self.add(field, "is empty")
            return None
        return value

    def record_id(self, row: dict, seen: dict[str, int]) -> str | None:
        if "id" not in row:
            self.add("id", "missing field")
            return None
        value = row["id"]
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            self.add("id", f"wrong type: expected a string, got {_json_type(value)}")
            return None
        return self.unique_id(str(value), seen)

    def unique_id(self, record_id: str, seen: dict[str, int]) -> str | None:
        if record_id in seen:
            self.add("id", f"duplicate id {_quote(record_id, MAX_QUOTED_ID_CHARS)} (first on "
                           f"{self.source.unit} {seen[record_id]})")
            return None
        seen[record_id] = self.position
        return record_id

    def direction(self, value: Any, field: str) -> str | None:
        if value not in DIRECTIONS:
            self.add(field, f"wrong direction value {_quote(value, MAX_QUOTED_DIRECTION_CHARS)}: expected "
                            f"'Y' (provider to patient) or 'N' (patient to provider)")
            return None
        return value

    def annotations(self, items: Any, field: str, direction: str | None,
                    message: str | None) -> list[Annotation] | None:
        """Validate a list of gold triples; canonicalises labels, checks direction rules and spans."""
        if not isinstance(items, list):
            self.add(field, f"wrong type: expected an array of annotations, got {_json_type(items)}")
            return None
        out: list[Annotation] = []
        for index, item in enumerate(items):
            annotation = self.annotation(item, f"{field}[{index}]", direction, message)
            if annotation is not None:
                out.append(annotation)
        return out if len(out) == len(items) else None

    def annotation(self, item: Any, where: str, direction: str | None,
                   message: str | None) -> Annotation | None:
        if not isinstance(item, dict):
            self.add(where, f"wrong type: expected an object with Code, Sub-code, Span, got {_json_type(item)}")
            return None
        n_before = len(self.problems)
        values = {}
        for key in _FIELDS:
            if key not in item:
                self.add(f"{where}.{key}", "missing field")
            elif not isinstance(item[key], str):
                self.add(f"{where}.{key}", f"wrong type: expected a string, got {_json_type(item[key])}")
            else:
                values[key] = item[key]
        if len(self.problems) > n_before:
            return None
        code = canonical_code(values["Code"])
        subcode = canonical_subcode(values["Sub-code"])
        self.normalized.update(name for name, given, stored in (("Code", values["Code"], code),
                                                                          ("Sub-code", values["Sub-code"], subcode))
                                      if stored is not None and given != stored)
        if code is None:
            self.add(f"{where}.Code", f"unknown code {describe_unknown_label(values['Code'], CODES)}")
        if subcode is None:
            self.add(f"{where}.Sub-code",
                     f"unknown sub-code {describe_unknown_label(values['Sub-code'], (*SUBCODES, NONE_SUBCODE))}")
        if code is not None and subcode is not None and not is_valid_pair(code, subcode):
            self.add(f"{where}.Sub-code", f"sub-code {subcode!r} is not valid for code {code!r} "
                                          f"(valid: {', '.join(valid_subcodes(code))})")
        if code is not None and direction is not None and not code_allowed(code, direction):
            self.add(f"{where}.Code", f"code {code!r} is not allowed for direction {direction!r} "
                                      f"(allowed: {', '.join(codes_for_direction(direction))})")
        span = values["Span"]
        if not span:
            self.add(f"{where}.Span", "span is empty")
        elif message is not None and span not in message:
            self.add(f"{where}.Span", f"span ({len(span)} chars) not found verbatim in the message")
        if len(self.problems) > n_before:
            return None
        return Annotation(code, subcode, span)


# ---------------------------------------------------------------------------------------------------
# SFT examples.


def _example_from_pvfast(row: dict, check: _RowCheck, seen: dict[str, int]) -> Example | None:
    record_id = check.record_id(row, seen)
    direction = None
    if "direction" not in row:
        check.add("direction", "missing field")
    else:
        direction = check.direction(row["direction"], "direction")
    message = check.string(row, "message")
    if "annotations" not in row:
        check.add("annotations", "missing field")
        return None
    annotations = check.annotations(row["annotations"], "annotations", direction, message)
    if not check.ok:
        return None
    return Example(record_id, direction, message, tuple(annotations))


def _split_query(query: str, check: _RowCheck) -> tuple[str | None, str | None]:
    """Direction and message from the final INPUT/Context block of a published query."""
    match = _QUERY_RE.match(query)
    if match is None:
        check.add("query", "no final 'INPUT: TO_PAT_YN: ...' / 'Context: ...' / 'OUTPUT:' block found")
        return None, None
    direction = check.direction(match.group("direction"), "query")
    speaker = _SPEAKER_RE.search(match.group("speaker"))
    if direction is not None and speaker is not None:
        said = _SPEAKER_DIRECTION[speaker.group("who").lower()]
        if said != direction:
            check.add("query", f"TO_PAT_YN is {direction!r} but the speaker note says "
                               f"{speaker.group('who')} speaking")
            direction = None
    message = match.group("message")
    if not message.strip():
        check.add("query", "message (Context) is empty")
        message = None
    return direction, message


def _example_from_published(row: dict, check: _RowCheck, seen: dict[str, int]) -> Example | None:
    query = check.string(row, "query")
    answer = check.string(row, "answer")
    direction = message = None
    if query is not None:
        direction, message = _split_query(query, check)
    annotations = None
    if answer is not None:
        body = answer.strip()
        if body.endswith(STOP_TEXT):  # the published completions may end in the stop text
            body = body[: -len(STOP_TEXT)].rstrip()
        try:
            parsed = json.loads(body)
        except json.JSONDecodeError as err:
            # positions in the answer as stored (the parsed body has its leading whitespace stripped)
            check.add("answer", _json_error(err, answer, offset=len(answer) - len(answer.lstrip())))
            parsed = None
        if parsed is not None:
            if not isinstance(parsed, dict) or "results" not in parsed:
                check.add("answer", 'expected a JSON object with a "results" array')
            else:
                annotations = check.annotations(parsed["results"], "answer.results", direction, message)
    record_id = check.unique_id(f"{check.source.name}-{check.position}", seen)
    if not check.ok:
        return None
    return Example(record_id, direction, message, tuple(annotations))


def _example_from_row(row: dict, check: _RowCheck, seen: dict[str, int]) -> Example | None:
    published = ("query" in row or "answer" in row) and "message" not in row
    return (_example_from_published if published else _example_from_pvfast)(row, check, seen)


def load_examples(path: str | os.PathLike, *, skip_invalid: bool = False) -> LoadResult:
    """Read SFT examples (pvfast JSONL or the published saved dataset), validating every record.

    Returns ``(examples, problems)`` (a :class:`LoadResult`, which also counts normalised labels);
    ``problems`` is empty unless ``skip_invalid`` is set, in which case it lists why each skipped record
    was skipped. Raises :class:`DataError` when the file is
    refused (any problem without ``skip_invalid``; missing, empty or unreadable; no valid record).
    """
    source = _read_source(path)
    seen: dict[str, int] = {}

    def build(rows):
        for position, row in rows:
            check = _RowCheck(source, position)
            example = _example_from_row(row, check, seen)
            if example is not None and check.ok:
                source.normalized.update(check.normalized)
            yield position, example, check.problems

    return _collect(source, build(source.rows), skip_invalid)


# ---------------------------------------------------------------------------------------------------
# Preference records.


def _check_completion(text: str, field: str, check: _RowCheck):
    """Parse a chosen/rejected completion strictly; returns its triples or None (format problem)."""
    result = parse_output(text)
    if not result.strict:
        check.add(field, "not a strict JSON completion of the form {\"results\": [...]}"
                  + (f" ({'; '.join(result.errors)})" if result.errors else ""))
        return None
    if result.errors:
        check.add(field, f"format errors: {'; '.join(result.errors)}")
        return None
    return result.annotations


def _check_pair(chosen: list[Annotation], chosen_text: str, rejected: list[Annotation],
                rejected_text: str, field: str, check: _RowCheck) -> None:
    if rejected_text == chosen_text:
        check.add(field, "rejected is identical to chosen")
    elif Counter(rejected) == Counter(chosen):
        check.add(field, "rejected has the same triples as chosen (only their order differs)")


def _preference_from_pvfast(row: dict, check: _RowCheck, seen: dict[str, int]) -> PreferenceRecord | None:
    record_id = check.record_id(row, seen)
    direction = message = prompt = None
    if "prompt" in row:
        prompt = check.string(row, "prompt")
    if "direction" in row or "message" in row or "prompt" not in row:
        if "direction" not in row:
            check.add("direction", "missing field (give direction and message, or prompt)")
        else:
            direction = check.direction(row["direction"], "direction")
        message = check.string(row, "message")
    chosen_text = check.string(row, "chosen")
    chosen = None
    if chosen_text is not None:
        chosen = _check_completion(chosen_text, "chosen", check)
        if chosen is not None and message is not None:
            # The chosen completion is gold: it obeys the direction rules and copies spans verbatim.
            check.annotations([a.to_dict() for a in chosen], "chosen.results", direction, message)
    rejected_texts: list[str] = []
    if "rejected" not in row:
        check.add("rejected", "missing field")
    elif not isinstance(row["rejected"], list):
        check.add("rejected", f"wrong type: expected an array of strings, got {_json_type(row['rejected'])}")
    elif not row["rejected"]:
        check.add("rejected", "is empty (needs at least one rejected completion)")
    else:
        for index, text in enumerate(row["rejected"]):
            field = f"rejected[{index}]"
            if not isinstance(text, str):
                check.add(field, f"wrong type: expected a string, got {_json_type(text)}")
                continue
            rejected = _check_completion(text, field, check)
            if rejected is not None and chosen is not None:
                _check_pair(chosen, chosen_text, rejected, text, field, check)
            rejected_texts.append(text)
    strategies = row.get("strategies", [])
    if not isinstance(strategies, list) or not all(isinstance(s, str) for s in strategies):
        check.add("strategies", "wrong type: expected an array of strings")
    elif strategies and isinstance(row.get("rejected"), list) and len(strategies) != len(row["rejected"]):
        check.add("strategies", f"{len(strategies)} strategies for {len(row['rejected'])} rejected completions")
    weight = _check_weight(row.get("weight", 1.0), check)
    if not check.ok:
        return None
    if weight != 1.0:
        check.unused_weights += 1
    return PreferenceRecord(record_id, chosen_text, tuple(rejected_texts), direction=direction,
                            message=message, prompt=prompt, strategies=tuple(strategies))


def _check_weight(value: Any, check: _RowCheck) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        check.add("weight", f"wrong type: expected a number, got {_json_type(value)}")
        return None
    if not math.isfinite(value) or value <= 0:
        check.add("weight", f"must be a finite number > 0, got {value!r}")
        return None
    return float(value)


@dataclass
class _TrlPair:
    position: int
    prompt: str
    chosen: str
    rejected: str


def _trl_pair_from_row(row: dict, check: _RowCheck) -> _TrlPair | None:
    prompt = check.string(row, "prompt")
    chosen_text = check.string(row, "chosen")
    rejected_text = check.string(row, "rejected")
    chosen = _check_completion(chosen_text, "chosen", check) if chosen_text is not None else None
    rejected = _check_completion(rejected_text, "rejected", check) if rejected_text is not None else None
    if chosen is not None and rejected is not None:
        _check_pair(chosen, chosen_text, rejected, rejected_text, "rejected", check)
    if not check.ok:
        return None
    return _TrlPair(check.position, prompt, chosen_text, rejected_text)


def _close_trl_group(source: _Source, group: list[_TrlPair], seen: dict[str, int]
                     ) -> tuple[int, PreferenceRecord | None, list[Problem]]:
    """One record from consecutive TRL pairs sharing prompt and chosen."""
    first = group[0]
    check = _RowCheck(source, first.position)
    record_id = check.unique_id(f"{source.name}-{first.position}", seen)
    if record_id is None:
        return first.position, None, check.problems
    record = PreferenceRecord(record_id, first.chosen, tuple(p.rejected for p in group), prompt=first.prompt)
    return first.position, record, check.problems


def _is_trl_row(row: dict) -> bool:
    return "id" not in row and isinstance(row.get("rejected"), str)


def load_preferences(path: str | os.PathLike, *, skip_invalid: bool = False) -> LoadResult:
    """Read preference records (pvfast JSONL or TRL prompt/chosen/rejected rows), validating each.

    Chosen and rejected completions must parse strictly (:func:`parse_output`), every rejected must
    differ from chosen, and a legacy ``weight`` must be > 0 (it is read, validated and not used). TRL rows
    are grouped: consecutive valid rows with the same prompt and chosen make one record. Returns and raises
    like :func:`load_examples`.
    """
    source = _read_source(path)
    seen: dict[str, int] = {}

    unused_weights = 0

    def build(rows):
        nonlocal unused_weights
        group: list[_TrlPair] = []
        for position, row in rows:
            check = _RowCheck(source, position)
            is_trl = _is_trl_row(row)
            pair = _trl_pair_from_row(row, check) if is_trl else None
            # A group stays open only while each next row continues it; any other row (invalid,
            # pvfast layout, another prompt or chosen) closes it first.
            continues = pair is not None and group and (pair.prompt, pair.chosen) == (group[0].prompt,
                                                                                       group[0].chosen)
            if group and not continues:
                yield _close_trl_group(source, group, seen)
                group = []
            if pair is not None:
                group.append(pair)
            elif is_trl:
                yield position, None, check.problems
            else:
                yield position, _preference_from_pvfast(row, check, seen), check.problems
                unused_weights += check.unused_weights
        if group:
            yield _close_trl_group(source, group, seen)

    result = _collect(source, build(source.rows), skip_invalid)
    if unused_weights:
        # Files of earlier pvfast versions may carry a per-record "weight" (class balance was attached to
        # records then): it is still validated, but the objective now computes class-balance weights itself.
        warnings.warn(f"{source.path}: the 'weight' of {unused_weights} record(s) is not used: class-balance "
                      f"weights come from the chosen annotations when the objective's class_balance.enabled is "
                      f"set", stacklevel=2)
    return result


# ---------------------------------------------------------------------------------------------------
# Shared: refuse or skip, and write.


def _collect(source: _Source, built: Iterable[tuple[int, Any, list[Problem]]], skip_invalid: bool) -> LoadResult:
    records = []
    positions = {}
    problems = list(source.problems)
    for position, record, row_problems in built:
        if record is not None and not row_problems:
            records.append(record)
            positions[record.id] = position
        problems.extend(row_problems)
    problems.sort(key=lambda p: -1 if p.line is None else p.line)
    if problems and (not skip_invalid or not records):
        if not records and skip_invalid:
            problems.append(source.problem(None, None, "no valid record left after skipping"))
        raise DataError(problems)
    return LoadResult(records, problems, source.normalized, positions, source)


def _write_jsonl_atomic(path: str | os.PathLike, rows: Iterator[dict]) -> Path:
    return atomic.write_lines(path, (json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Write JSON objects one per line (UTF-8, non-ASCII kept), atomically, creating parent directories."""
    return _write_jsonl_atomic(path, iter(rows))


def write_examples(path: str | os.PathLike, examples: Iterable[Example]) -> Path:
    """Write SFT examples as pvfast JSONL (atomically, creating parent directories)."""
    return _write_jsonl_atomic(path, (e.to_dict() for e in examples))


def write_preferences(path: str | os.PathLike, records: Iterable[PreferenceRecord]) -> Path:
    """Write preference records as pvfast preference JSONL (atomically, creating parent directories)."""
    return _write_jsonl_atomic(path, (r.to_dict() for r in records))
