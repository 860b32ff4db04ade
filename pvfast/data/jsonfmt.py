"""Canonical JSON for annotations, character offsets of field values, and a tolerant output parser.

Chosen and rejected completions are always written by :func:`serialize`, so they never differ in
formatting (SPEC §2): one line, ``{"results": [{"Code": ..., "Sub-code": ..., "Span": ...}, ...]}``,
keys in that order, ``json.dumps`` default separators, non-ASCII kept as is.

:func:`value_spans` finds the character ranges of the Code / Sub-code / Span values in any such text
(token roles are assigned from them). :func:`parse_output` reads model output: strict JSON first, then
a tolerant recovery of triple objects (truncated output, single quotes); unknown labels and invalid
(code, sub-code) pairs are dropped and reported, never silently kept.
"""

from __future__ import annotations

import ast
import difflib
import json
import re
from dataclasses import dataclass, field
from typing import Iterable

from pvfast.data.codebook import CODES, NONE_SUBCODE, SUBCODES, canonical_code, canonical_subcode, is_valid_pair
from pvfast.data.records import Annotation

#: Text the published models emit after the JSON; generation stops there.
STOP_TEXT = "JSON_END"

FIELD_ROLES = {"Code": "code", "Sub-code": "subcode", "Span": "span"}


def serialize(annotations: Iterable[Annotation]) -> str:
    """The canonical one-line JSON completion for ``annotations``."""
    return json.dumps({"results": [a.to_dict() for a in annotations]}, ensure_ascii=False)


def value_spans(text: str) -> list[tuple[int, int, str]]:
    """``(start, end, role)`` character ranges of Code/Sub-code/Span string values in a JSON text.

    Ranges cover the characters between the quotes (escape sequences included as written). Works on
    truncated text: an unterminated value string runs to the end of the text.
    """
    spans: list[tuple[int, int, str]] = []
    i, n = 0, len(text)
    last_key: str | None = None
    expecting_value = False
    while i < n:
        ch = text[i]
        if ch == '"':
            start = i + 1
            j = start
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            end = min(j, n)
            if expecting_value:
                role = FIELD_ROLES.get(last_key or "")
                if role is not None:
                    spans.append((start, end, role))
                expecting_value = False
                last_key = None
            else:
                try:
                    last_key = json.loads(text[i:end + 1])
                except ValueError:
                    last_key = text[start:end]
            i = end + 1
            continue
        if ch == ":":
            expecting_value = last_key is not None
        elif ch in ",{}[]":
            expecting_value = False
            last_key = None
        i += 1
    return spans


@dataclass
class ParseResult:
    """What :func:`parse_output` read from one model output."""

    annotations: list[Annotation] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # one entry per format error (no span text)
    strict: bool = False  # the whole output was valid JSON of the expected shape

    @property
    def n_format_errors(self) -> int:
        return len(self.errors)


_FIELD_RE = re.compile(
    r"""["'](?P<key>Code|Sub-code|Span)["']\s*:\s*(?:"(?P<dq>(?:[^"\\]|\\.)*)"|'(?P<sq>(?:[^'\\]|\\.)*)')""",
    re.S | re.I,
)
_KEY_BY_LOWER = {k.lower(): k for k in FIELD_ROLES}


def _item_fields(item: dict) -> dict[str, object]:
    return {_KEY_BY_LOWER.get(str(k).strip().lower(), str(k)): v for k, v in item.items()}


def describe_unknown_label(value: object, known: Iterable[str]) -> str:
    """An unknown label for an error message, without its text: a label field may hold message or span
    text (a column mix-up, a model that copied the message), so only its length is shown, plus the
    closest canonical label when one is close (that names our label, not the user's text)."""
    if not isinstance(value, str):
        return f"(not a string: {type(value).__name__})"
    by_key = {re.sub(r"\s+", "", k).lower(): k for k in known}
    close = difflib.get_close_matches(re.sub(r"\s+", "", value).lower(), list(by_key), n=1, cutoff=0.75)
    hint = f"; closest label: {by_key[close[0]]!r}" if close else ""
    return f"(a string of {len(value)} chars{hint})"


def _to_annotation(item: dict, where: str, result: ParseResult) -> None:
    fields = _item_fields(item)
    missing = [k for k in FIELD_ROLES if k not in fields]
    if "Sub-code" in missing and "Code" in fields:
        missing.remove("Sub-code")
        fields["Sub-code"] = NONE_SUBCODE
    if missing:
        result.errors.append(f"{where}: missing field(s) {', '.join(missing)}")
        return
    raw_code, raw_sub, span = fields["Code"], fields["Sub-code"], fields["Span"]
    if raw_sub is None:
        raw_sub = NONE_SUBCODE
    code = canonical_code(raw_code) if isinstance(raw_code, str) else None
    sub = canonical_subcode(raw_sub) if isinstance(raw_sub, str) else None
    if code is None:
        result.errors.append(f"{where}: unknown Code {describe_unknown_label(raw_code, CODES)}")
        return
    if sub is None:
        result.errors.append(f"{where}: unknown Sub-code {describe_unknown_label(raw_sub, (*SUBCODES, NONE_SUBCODE))}")
        return
    if not is_valid_pair(code, sub):
        result.errors.append(f"{where}: Sub-code {sub!r} is not valid for Code {code!r}")
        return
    if not isinstance(span, str):
        result.errors.append(f"{where}: Span is not a string")
        return
    result.annotations.append(Annotation(code, sub, span))


def _strict(text: str) -> list | None:
    """The ``results`` list if ``text`` (up to the stop text) is exactly the expected JSON object."""
    body = text.split(STOP_TEXT, 1)[0].strip()
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if isinstance(obj, dict) and isinstance(obj.get("results"), list):
        if all(isinstance(x, dict) for x in obj["results"]):
            return obj["results"]
    return None


def _loose_object(chunk: str) -> dict | None:
    for loader in (json.loads, ast.literal_eval):
        try:
            obj = loader(chunk)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            continue
        if isinstance(obj, dict):
            return obj
    fields = {}
    for m in _FIELD_RE.finditer(chunk):
        raw = m.group("dq") if m.group("dq") is not None else m.group("sq")
        try:
            raw = json.loads(f'"{raw}"') if m.group("dq") is not None else raw.replace("\\'", "'")
        except ValueError:
            pass
        fields[m.group("key")] = raw
    return fields or None


def _leaf_objects(body: str) -> tuple[list[tuple[int, int]], bool]:
    """``(start, end)`` of every closed ``{...}`` holding no nested object, and whether the text ends
    inside an unclosed object (truncated output).

    Braces inside quoted strings are text, not structure, so a span like ``"a {b} c"`` stays inside its
    triple. Quotes count only inside an object: an apostrophe in prose around the JSON opens nothing.
    """
    leaves: list[tuple[int, int]] = []
    open_objects: list[list] = []  # [start, has_nested_object] per unclosed "{"
    quote: str | None = None
    i = 0
    while i < len(body):
        ch = body[i]
        if quote is not None:
            if ch == "\\":
                i += 1  # skip the escaped character
            elif ch == quote:
                quote = None
        elif ch in "\"'" and open_objects:
            quote = ch
        elif ch == "{":
            if open_objects:
                open_objects[-1][1] = True
            open_objects.append([i, False])
        elif ch == "}" and open_objects:
            start, nested = open_objects.pop()
            if not nested:
                leaves.append((start, i + 1))
        i += 1
    return leaves, bool(open_objects)


def _is_empty_wrapper(obj: dict) -> bool:
    """``{"results": []}`` met by the tolerant path (e.g. followed by stray text): no triple, no error."""
    return set(obj) == {"results"} and obj["results"] == []


def parse_output(text: str) -> ParseResult:
    """Parse one model output into canonical annotations; never raises on bad text."""
    result = ParseResult()
    items = _strict(text)
    if items is not None:
        result.strict = True
        for idx, item in enumerate(items):
            _to_annotation(item, f"results[{idx}]", result)
        return result
    body = text.split(STOP_TEXT, 1)[0]
    leaves, truncated = _leaf_objects(body)
    for idx, (start, end) in enumerate(leaves):
        obj = _loose_object(body[start:end])
        if obj is None:
            result.errors.append(f"object {idx}: not readable as a triple")
            continue
        if _is_empty_wrapper(obj):
            continue
        _to_annotation(obj, f"object {idx}", result)
    # Truncated generation: whatever sits in the unclosed object is a format error, not a triple.
    if truncated:
        result.errors.append("truncated: the output ends inside an unclosed object (its content was dropped)")
    if not leaves and not result.errors:
        result.errors.append("no JSON object found")
    return result
