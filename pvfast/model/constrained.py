"""Schema-constrained greedy decoding: every generated token keeps the output a prefix of a valid answer.

A valid answer is exactly what :func:`pvfast.data.jsonfmt.serialize` writes for annotations of *this*
message, followed by the end-of-turn token (the token training appends, :func:`end_of_turn_id`)::

    {"results": []}
    {"results": [{"Code": "<code>", "Sub-code": "<sub-code>", "Span": "<span>"}, {"Code": ...}]}

* ``<code>``: a code allowed for the message's direction (:func:`pvfast.data.codebook.codes_for_direction`);
* ``<sub-code>``: a sub-code valid for that code, ``"None"`` for a code without sub-codes;
* ``<span>``: a non-empty, verbatim substring of the message, JSON-escaped as ``serialize`` escapes it
  (``json.dumps``, ``ensure_ascii=False``).

The scaffold strings (``{"results": [``, ``", "Sub-code": "``, ``"}, {"Code": "`` ...) are read off
``serialize`` itself, so the two cannot drift apart. ``JSON_END`` is not part of the answer: training
completions are ``serialize(...)`` plus the end-of-turn token (:mod:`pvfast.data.tokenization`).

How it works, for any tokenizer
-------------------------------
The automaton runs on **bytes**, not characters or tokens, because a BPE token may cover the end of one
field and the start of the next (``e"}`` or ``", "``) or only part of a multi-byte character.

1. :class:`TokenTable`, once per tokenizer: the exact UTF-8 bytes each token id stands for (byte-level BPE:
   the GPT-2 byte alphabet; SentencePiece: ``▁`` and ``<0xNN>`` byte pieces; otherwise decoding the single
   token), checked by tokenizing sample answers and comparing bytes. Special tokens are never allowed,
   except the end-of-turn token once the answer is complete. The distinct byte strings are kept sorted.
2. :class:`AnswerAutomaton`, per message: a nondeterministic byte automaton run as sets of states (a span
   prefix may occur at several places in the message, and an escaped ``\\"`` makes a quote ambiguous).
   A span state is a byte offset into the escaped message; a span may close only at a character boundary.
3. Allowed tokens at a state: a depth-first walk of the sorted token strings in step with the automaton
   (binary search per byte), so only token prefixes that stay valid are ever visited. Results are
   memoised per state; in a span the walk starts from the few offsets where the span so far occurs.
4. Budget: with ``r`` tokens left, a token is allowed only if the answer can still be closed and the
   end-of-turn token written in the ``r - 1`` tokens after it. The tokens needed from a state are bounded
   from above by the tokenizer's own tokenization of the shortest completion (scaffold and labels; any
   token sequence with the right bytes is a valid way to write them), one token per byte for the rest of a
   span character. So generation ends with a complete answer even when the model would go on listing
   triples until ``max_new_tokens``; only a budget too small for ``{"results": []}`` itself leaves an
   incomplete (but still valid so far) prefix.

Greedy decoding then takes the highest-scoring allowed token (:meth:`ConstrainedAnswer.allowed`).
"""

from __future__ import annotations

import bisect
import functools
import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from pvfast.data.codebook import CODES, codes_for_direction, valid_subcodes
from pvfast.data.jsonfmt import serialize
from pvfast.data.records import Annotation


class ConstraintError(ValueError):
    """A tokenizer cannot be used for constrained decoding; the message says why."""


def escape(text: str) -> str:
    """``text`` as it appears between the quotes of a JSON string written by ``serialize``."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


# ----------------------------------------------------------------------------------------------------
# The scaffold, read off serialize()
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scaffold:
    """The fixed parts of a serialized answer, as bytes.

    ``list_open + empty_close`` is the empty answer; ``list_open + first_open`` starts the first triple,
    ``code_to_sub`` and ``sub_to_span`` sit between the values, ``next_open`` closes a triple and opens
    the next, ``last_close`` closes the last triple and the answer.
    """

    list_open: bytes
    empty_close: bytes
    first_open: bytes
    code_to_sub: bytes
    sub_to_span: bytes
    next_open: bytes
    last_close: bytes


@functools.lru_cache(maxsize=1)
def scaffold() -> Scaffold:
    marks = ("\ue000", "\ue001", "\ue002")  # private-use characters: json.dumps keeps them as they are
    empty = serialize([])
    one = serialize([Annotation(*marks)])
    two = serialize([Annotation(*marks), Annotation(*marks)])
    code_at, sub_at, span_at = (one.index(m) for m in marks)
    first = one[:code_at]
    common = 0
    while common < min(len(empty), len(first)) and empty[common] == first[common]:
        common += 1
    after_span = two.index(marks[2]) + 1
    parts = Scaffold(
        list_open=first[:common].encode(),
        empty_close=empty[common:].encode(),
        first_open=first[common:].encode(),
        code_to_sub=one[code_at + 1:sub_at].encode(),
        sub_to_span=one[sub_at + 1:span_at].encode(),
        next_open=two[after_span:two.index(marks[0], after_span)].encode(),
        last_close=one[span_at + 1:].encode(),
    )
    rebuilt = (parts.list_open + parts.first_open + b"C" + parts.code_to_sub + b"S" + parts.sub_to_span + b"P"
               + parts.next_open + b"C" + parts.code_to_sub + b"S" + parts.sub_to_span + b"P" + parts.last_close)
    if rebuilt != serialize([Annotation("C", "S", "P")] * 2).encode() or \
            parts.list_open + parts.empty_close != empty.encode():
        raise AssertionError("constrained decoding: the scaffold does not rebuild serialize()'s output")
    return parts


# ----------------------------------------------------------------------------------------------------
# Token bytes
# ----------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted (character -> byte)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _decoder_kind(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "decode"
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    types = {part.get("type") for part in parts if isinstance(part, dict)}
    if "ByteLevel" in types:
        return "byte_level"
    if types & {"Metaspace", "ByteFallback", "Replace"}:
        return "metaspace"
    return "decode"


def _bytes_of_tokens(tokenizer) -> list[bytes | None]:
    """The bytes each token id stands for (None: a special token, or one that stands for no fixed bytes)."""
    n = len(tokenizer)
    added = dict(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    special = {i for i, tok in added.items() if getattr(tok, "special", False)}
    special.update(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    kind = _decoder_kind(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    alphabet = _byte_level_alphabet()
    out: list[bytes | None] = []
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            out.append(None)
        elif i in added:  # added (non-special) tokens are stored as plain text
            out.append(added[i].content.encode("utf-8"))
        elif kind == "byte_level":
            try:
                out.append(bytes(alphabet[c] for c in piece))
            except KeyError:
                out.append(piece.encode("utf-8"))
        elif kind == "metaspace":
            match = _BYTE_PIECE.fullmatch(piece)
            out.append(bytes([int(match.group(1), 16)]) if match else piece.replace("\u2581", " ").encode("utf-8"))
        else:
            text = tokenizer.decode([i])
            out.append(None if "\ufffd" in text else text.encode("utf-8"))
    return [b if b else None for b in out]  # an empty token could be repeated forever: never allowed


#: Texts a tokenizer must round-trip through :class:`TokenTable` bytes (scaffold, labels, punctuation,
#: escapes, accented and non-Latin characters, an emoji).
_CHECK_TEXTS = (
    serialize([Annotation("PartnershipPatient", "Clinical Care", 'Dr. "Lee" said: 12:30 \\ ok\n\tthanks')]),
    serialize([Annotation(code, sub, "café – naïve 日本 😀") for code in CODES for sub in valid_subcodes(code)]),
    serialize([]),
)


@dataclass(eq=False)  # hashed by identity: automata are memoised per (message, direction, table)
class TokenTable:
    """The byte string of every usable token id, and the distinct strings sorted for prefix search."""

    token_bytes: list[bytes | None]  # by token id; None = never generated under the constraint
    keys: list[bytes]  # distinct token byte strings, sorted
    ids: list[tuple[int, ...]]  # token ids of each key
    tokenizer: object = None  # for count_tokens

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "TokenTable":
        token_bytes = _bytes_of_tokens(tokenizer)
        by_key: dict[bytes, list[int]] = {}
        for i, b in enumerate(token_bytes):
            if b is not None:
                by_key.setdefault(b, []).append(i)
        keys = sorted(by_key)
        table = cls(token_bytes, keys, [tuple(by_key[k]) for k in keys], tokenizer)
        table._check(tokenizer)
        return table

    def count_tokens(self, text: bytes) -> int:
        """An upper bound on the tokens needed to write ``text``: the tokenizer's own tokenization when its
        bytes are exactly ``text`` (any token sequence with those bytes is a valid way to write it), else
        one token per byte."""
        cache = self.__dict__.setdefault("_counts", {})
        if text not in cache:
            count = len(text)
            try:
                ids = self.tokenizer(text.decode("utf-8"), add_special_tokens=False)["input_ids"]
                if self.bytes_of(ids) == text:
                    count = min(count, len(ids))
            except (UnicodeDecodeError, TypeError):
                pass
            cache[text] = count
        return cache[text]

    def _check(self, tokenizer) -> None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        for text in _CHECK_TEXTS:
            text = unicodedata.normalize("NFC", text)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            got = self.bytes_of(ids)
            if got is None or got not in (text.encode(), b" " + text.encode()):
                raise ConstraintError(
                    f"constrained decoding: the tokens of {name!r} do not map onto the bytes of the text they "
                    "encode (unsupported decoder); turn the constraint off (GenerationConfig.constrained=False)")

    def bytes_of(self, ids: Iterable[int]) -> bytes | None:
        """The bytes a token sequence stands for (None if it holds a special / unusable token)."""
        parts = []
        for i in ids:
            b = self.token_bytes[i] if 0 <= i < len(self.token_bytes) else None
            if b is None:
                return None
            parts.append(b)
        return b"".join(parts)


# ``lru_cache`` holds tokenizers by identity (they hash by id), so a table is built once per tokenizer.
token_table = functools.lru_cache(maxsize=4)(TokenTable.from_tokenizer)


# ----------------------------------------------------------------------------------------------------
# The answer automaton
# ----------------------------------------------------------------------------------------------------

_END = ("E",)
_SPAN_START = ("P0",)
_INF = 1 << 30


@functools.lru_cache(maxsize=4)
def _slots(direction: str, with_triples: bool) -> dict:
    """Slot name -> [(bytes, continuation)]; a continuation is a slot name, "SPAN" or "END"."""
    s = scaffold()
    slots: dict = {
        "OPEN": [(s.list_open, "B")],
        "B": [(s.empty_close, "END")] + ([(s.first_open, "CODE")] if with_triples else []),
        "CODE": [(escape(c).encode() + s.code_to_sub, ("SUB", c)) for c in codes_for_direction(direction)],
        "CLOSE": [(s.next_open, "CODE"), (s.last_close, "END")],
    }
    for code in codes_for_direction(direction):
        slots[("SUB", code)] = [(escape(sub).encode() + s.sub_to_span, "SPAN") for sub in valid_subcodes(code)]
    return slots


class AnswerAutomaton:
    """Byte automaton of the valid answers for one message (module docstring); states are frozensets of
    ``("S", slot, prefix)`` (inside a scaffold/label slot), ``("P0",)`` (span start), ``("P", offset)``
    (inside a span, after ``offset`` bytes of the escaped message) and ``("E",)`` (complete)."""

    def __init__(self, message: str, direction: str, table: TokenTable):
        self.table = table
        pieces = [escape(ch).encode("utf-8", "surrogatepass") for ch in message]
        self.text = b"".join(pieces)
        bounds = [0]
        for piece in pieces:
            bounds.append(bounds[-1] + len(piece))
        self.boundaries = frozenset(bounds)
        self._next_boundary = np.searchsorted(np.asarray(bounds), np.arange(len(self.text) + 1)).tolist()
        self._bounds = bounds
        self.starts: dict[int, list[int]] = {}
        for p in bounds[:-1]:
            self.starts.setdefault(self.text[p], []).append(p + 1)
        self.slots = _slots(direction, with_triples=bool(message))
        self.min_char = min((b - a for a, b in zip(bounds, bounds[1:])), default=1)
        self._slot_dist = self._slot_distances()
        self.start = frozenset({("S", "OPEN", b"")})
        self._step: dict = {}
        self._next: dict = {}
        self._dist: dict = {}
        self._allowed: dict = {}

    # --- structure ---
    def _entry(self, cont) -> tuple:
        if cont == "END":
            return (_END,)
        if cont == "SPAN":
            return (_SPAN_START,)
        return (("S", cont, b""),)

    def _span_at(self, offset: int) -> tuple:
        if offset in self.boundaries:  # a complete character: the span may close here
            return (("P", offset), ("S", "CLOSE", b""))
        return (("P", offset),)

    def _slot_distances(self) -> dict:
        """Tokens that suffice from the start of each slot to a complete answer (a small fixed-point
        iteration: CLOSE -> CODE -> SUB -> SPAN -> CLOSE is a cycle, left through CLOSE -> END)."""
        dist = {name: _INF for name in self.slots}
        span = _INF
        for _ in range(len(self.slots) + 2):
            for name, cands in self.slots.items():
                for text, cont in cands:
                    after = 0 if cont == "END" else span if cont == "SPAN" else dist[cont]
                    dist[name] = min(dist[name], self.table.count_tokens(text) + after)
            span = self.min_char + dist["CLOSE"]
        self._span_dist = span
        return dist

    def _sub_dist(self, sub) -> int:
        kind = sub[0]
        if kind == "E":
            return 0
        if kind == "P0":
            return self._span_dist
        if kind == "P":
            offset = sub[1]
            return self._bounds[self._next_boundary[offset]] - offset + self._slot_dist["CLOSE"]
        _, slot, prefix = sub
        best = _INF
        for text, cont in self.slots[slot]:
            if text.startswith(prefix):
                after = 0 if cont == "END" else self._span_dist if cont == "SPAN" else self._slot_dist[cont]
                best = min(best, self.table.count_tokens(text[len(prefix):]) + after)
        return best

    # --- running ---
    def step(self, state: frozenset, byte: int) -> frozenset | None:
        """The state after ``byte``, or None if no valid answer continues that way."""
        key = (state, byte)
        if key in self._step:
            return self._step[key]
        out: set = set()
        for sub in state:
            kind = sub[0]
            if kind == "S":
                _, slot, prefix = sub
                grown = prefix + bytes((byte,))
                for text, cont in self.slots[slot]:
                    if text.startswith(grown):
                        out.update(self._entry(cont) if len(text) == len(grown) else (("S", slot, grown),))
            elif kind == "P0":
                for offset in self.starts.get(byte, ()):
                    out.update(self._span_at(offset))
            elif kind == "P":
                offset = sub[1]
                if offset < len(self.text) and self.text[offset] == byte:
                    out.update(self._span_at(offset + 1))
        result = frozenset(out) if out else None
        self._step[key] = result
        return result

    def next_bytes(self, state: frozenset) -> bytes:
        """The bytes that have a valid transition from ``state``, sorted."""
        if state in self._next:
            return self._next[state]
        found: set[int] = set()
        for sub in state:
            kind = sub[0]
            if kind == "S":
                _, slot, prefix = sub
                found.update(text[len(prefix)] for text, _ in self.slots[slot]
                             if text.startswith(prefix) and len(text) > len(prefix))
            elif kind == "P0":
                found.update(self.starts)
            elif kind == "P" and sub[1] < len(self.text):
                found.add(self.text[sub[1]])
        result = bytes(sorted(found))
        self._next[state] = result
        return result

    def distance(self, state: frozenset) -> int:
        """Tokens that suffice from ``state`` to a complete answer (an upper bound: scaffold and labels
        counted as the tokenizer writes them, the rest of a span character one token per byte)."""
        if state not in self._dist:
            self._dist[state] = min(self._sub_dist(sub) for sub in state)
        return self._dist[state]

    @staticmethod
    def complete(state: frozenset) -> bool:
        return _END in state

    def tokens(self, state: frozenset) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, need)`` of every token that keeps the answer valid from ``state``: token ids (int64) and
        the tokens that suffice after each to complete the answer (int64), memoised per state."""
        cached = self._allowed.get(state)
        if cached is not None:
            return cached
        keys, ids_of = self.table.keys, self.table.ids
        out_ids: list[int] = []
        out_need: list[int] = []
        stack = [(0, len(keys), b"", state)]
        while stack:
            lo, hi, prefix, current = stack.pop()
            for byte in self.next_bytes(current):
                child = prefix + bytes((byte,))
                first = bisect.bisect_left(keys, child, lo, hi)
                if first >= hi or not keys[first].startswith(child):
                    continue
                last = hi if byte == 255 else bisect.bisect_left(keys, prefix + bytes((byte + 1,)), first, hi)
                after = self.step(current, byte)
                if keys[first] == child:
                    need = self.distance(after)
                    out_ids.extend(ids_of[first])
                    out_need.extend([need] * len(ids_of[first]))
                    first += 1
                if last > first:
                    stack.append((first, last, child, after))
        order = np.argsort(np.asarray(out_ids, dtype=np.int64), kind="stable")
        result = (np.asarray(out_ids, dtype=np.int64)[order], np.asarray(out_need, dtype=np.int64)[order])
        self._allowed[state] = result
        return result


# ----------------------------------------------------------------------------------------------------
# One row of a batch
# ----------------------------------------------------------------------------------------------------

class ConstrainedAnswer:
    """The constraint for one message during greedy decoding.

    ``allowed(remaining)`` lists the token ids the next token may take (``remaining``: tokens that may
    still be generated, this one included); ``advance(token_id)`` moves past the chosen token; ``done``
    is True once the end-of-turn token was taken; ``text`` is the answer written so far.
    """

    def __init__(self, table: TokenTable, message: str, direction: str, end_of_turn: int):
        self.table = table
        self.automaton = _automaton(message, direction, table)
        self.state = self.automaton.start
        self.end_of_turn = int(end_of_turn)
        self.done = False
        self._bytes = bytearray()

    def allowed(self, remaining: int) -> np.ndarray:
        if self.done:
            raise RuntimeError("ConstrainedAnswer.allowed called after the answer ended")
        if self.automaton.complete(self.state):
            return np.asarray([self.end_of_turn], dtype=np.int64)
        ids, need = self.automaton.tokens(self.state)
        fits = ids[need + 2 <= remaining]  # after it: the shortest completion, then the end-of-turn token
        return fits if fits.size else ids  # too little budget from the start: stay valid as long as it lasts

    def advance(self, token_id: int) -> None:
        if token_id == self.end_of_turn and self.automaton.complete(self.state):
            self.done = True
            return
        piece = self.table.token_bytes[token_id] if 0 <= token_id < len(self.table.token_bytes) else None
        state = self.state if piece else None
        for byte in piece or b"":
            state = self.automaton.step(state, byte)
            if state is None:
                break
        if state is None:
            raise ValueError(f"token {token_id} does not continue a valid answer (not an allowed token)")
        self.state = state
        self._bytes += piece

    @property
    def text(self) -> str:
        return self._bytes.decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=256)
def _automaton(message: str, direction: str, table: TokenTable) -> AnswerAutomaton:
    # Cached by (message, direction, table): a repeated message reuses its memoised states. The cache lives
    # in process memory only (messages are never written anywhere from here).
    return AnswerAutomaton(message, direction, table)
