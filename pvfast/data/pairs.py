"""Confusion-aware preference pairs (SPEC §4): mine the SFT model's label confusions, make rejected outputs.

Pipeline:

1. Greedy predictions of the SFT model on the validation split: generated here with
   :func:`pvfast.model.generation.generate_completions` (``--model``), or read from a ``{"id", "output"}``
   JSONL file (``--predictions``). Outputs are parsed with :func:`pvfast.data.jsonfmt.parse_output`.
2. Confusion counts, per validation message, at the Code and the Sub-code level:

   - *matched* predictions: predicted and gold triples are matched one-to-one with the span rule of
     :func:`pvfast.eval.metrics.greedy_span_matching` (ties prefer the same label); a matched pair with a
     different Code counts (gold code → predicted code), one with a different Sub-code counts (gold
     sub-code → predicted sub-code) when both are real sub-codes ("None" is no sub-code label);
   - *set* confusions: every missed gold label (gold set − predicted set) × every spurious predicted
     label (predicted set − gold set) counts once. A clean label swap on a matched span therefore
     counts twice (once per kind), as SPEC §4 lists both.

   Rows are normalised into M_code (8 × 8) and M_sub (26 × 26): ``M[g][p] = (n[g][p] + α) / Σ_q (n[g][q] + α)``
   over the labels q ≠ g (α = ``smoothing``, default 0; the diagonal is 0). A row with no counts (and
   α = 0) is uniform over the other labels. Both tables are written as CSV (``confusion_code.csv``,
   ``confusion_subcode.csv``: a ``gold`` column, one column per predicted label, then ``row_count``, the
   raw count of the row, so fallback rows are visible).
3. For each training example with gold triples Y+ (chosen = ``serialize(Y+)``), rejected outputs, each
   written with :func:`pvfast.data.jsonfmt.serialize` (the chosen's JSON style) and schema-valid
   (valid (Code, Sub-code) pairs, codes allowed for the message's direction, spans verbatim):

   - ``label``: one triple (uniform) gets its Sub-code replaced (probability ``subcode_confusion_prob``
     when its code has sub-codes) or else its Code. The new label is drawn from the row of M restricted
     to the *valid alternatives* (codes allowed for the direction / sub-codes valid for the code, minus
     the current label) and renormalised; when the row puts no mass on any of them the draw is uniform
     over them. A new code that does not accept the old sub-code gets a new sub-code: drawn from the old
     sub-code's M_sub row over the new code's sub-codes, or, when the old one was "None", by sub-code
     confusion frequency (below). The span is kept.
   - ``missing``: one triple removed (uniform); needs ≥ 2 triples.
   - ``extra``: one spurious triple inserted (at its span's place in message order). Code drawn by
     *confusion frequency* among the direction's codes: weight of code c = how often c was the
     predicted side of a confusion (the column total of the code counts) + α, uniform if all are 0.
     Sub-code likewise among the code's valid sub-codes ("None" for codes without). Span: a word n-gram
     of the message (n uniform in ``extra_span_words``, words = ``\\w+`` runs), copied verbatim from the
     first word's start to the last word's end; a triple identical to a gold one is redrawn.

   ``strategies`` lists one rejected output per entry (default: one of each, up to 3 per example
   sharing one prompt); repeat a name for more draws. A rejected output equal to the chosen one, as text
   or as a set of triples, or equal to an earlier rejected output of the same example, is dropped;
   examples left without any rejected output get no record. Examples with no gold triples get only
   ``extra`` (the other two need triples to change); ``include_empty=False`` skips them.

Reproducibility: every draw of (example, strategy, k-th occurrence) uses its own
``random.Random(f"{seed}:{example id}:{strategy}:{k}")`` (string seeds hash with SHA-512, independent of
``PYTHONHASHSEED``), so a record does not change when other examples or strategies are added or removed.

The command line is :mod:`pvfast.pairs` (``python -m pvfast.pairs``). Message and span text are never printed.
"""

from __future__ import annotations

import bisect
import csv
import io
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pvfast import atomic
from pvfast.config.sections import PairConfig
from pvfast.data.codebook import (
    CODES,
    NONE_SUBCODE,
    SUBCODES,
    codes_for_direction,
    has_subcodes,
    is_valid_pair,
    valid_subcodes,
)
from pvfast.data.jsonfmt import parse_output, serialize
from pvfast.data.matching import code_labels, greedy_span_matching, subcode_labels
from pvfast.data.records import Annotation, Example, PreferenceRecord

_WORD_RE = re.compile(r"\w+")


# ----------------------------------------------------------------------------------------------------
# Confusion tables
# ----------------------------------------------------------------------------------------------------

@dataclass
class ConfusionTable:
    """Confusion counts n[gold][pred] over a fixed label set, and draws from their row-normalised form."""

    labels: tuple[str, ...]
    counts: dict[str, Counter]

    @classmethod
    def empty(cls, labels: Sequence[str]) -> "ConfusionTable":
        return cls(tuple(labels), {label: Counter() for label in labels})

    def add(self, gold: str, predicted: str, n: int = 1) -> None:
        if gold == predicted:
            return
        if gold not in self.counts or predicted not in self.counts:
            raise ValueError(f"confusion label not in the table: {gold!r} -> {predicted!r}")
        self.counts[gold][predicted] += n

    def row_total(self, gold: str) -> int:
        return sum(self.counts[gold].values())

    def column_total(self, predicted: str) -> int:
        return sum(row[predicted] for row in self.counts.values())

    @property
    def total(self) -> int:
        return sum(self.row_total(g) for g in self.labels)

    def row(self, gold: str, smoothing: float = 0.0) -> dict[str, float]:
        """M[gold]: a distribution over the other labels (uniform when the row has no mass)."""
        others = [p for p in self.labels if p != gold]
        weights = [self.counts[gold][p] + smoothing for p in others]
        total = sum(weights)
        if total == 0:
            return {p: 1.0 / len(others) for p in others}
        return {p: w / total for p, w in zip(others, weights)}

    def draw(self, rng: random.Random, gold: str, candidates: Sequence[str], smoothing: float = 0.0) -> str:
        """A label from M[gold] restricted to ``candidates`` (renormalised); uniform if that has no mass."""
        if not candidates:
            raise ValueError(f"no candidate labels to replace {gold!r} with")
        weights = [self.counts[gold][c] + smoothing if c != gold else 0.0 for c in candidates]
        return _weighted_choice(rng, candidates, weights)

    def draw_by_frequency(self, rng: random.Random, candidates: Sequence[str], smoothing: float = 0.0) -> str:
        """A label weighted by how often it was the predicted side of a confusion (column totals)."""
        return _weighted_choice(rng, candidates, [self.column_total(c) + smoothing for c in candidates])


def _weighted_choice(rng: random.Random, candidates: Sequence[str], weights: Sequence[float]) -> str:
    if sum(weights) <= 0:
        return candidates[rng.randrange(len(candidates))]
    return rng.choices(list(candidates), weights=list(weights), k=1)[0]


def confusion_tables(golds: Sequence[Sequence[Annotation]],
                     predictions: Sequence[Sequence[Annotation]]) -> tuple[ConfusionTable, ConfusionTable]:
    """(code table, sub-code table) of counts from gold vs predicted triples, message by message."""
    if len(golds) != len(predictions):
        raise ValueError(f"confusion_tables: {len(golds)} gold messages but {len(predictions)} predictions")
    code_table, sub_table = ConfusionTable.empty(CODES), ConfusionTable.empty(SUBCODES)
    for gold, pred in zip(golds, predictions):
        gold, pred = list(gold), list(pred)
        matches = greedy_span_matching([p.span for p in pred], [g.span for g in gold],
                                       tie_break=lambda i, j: int(pred[i].label != gold[j].label))
        for i, j in matches:
            g, p = gold[j], pred[i]
            code_table.add(g.code, p.code)
            if NONE_SUBCODE not in (g.subcode, p.subcode):
                sub_table.add(g.subcode, p.subcode)
        for table, labels in ((code_table, code_labels), (sub_table, subcode_labels)):
            gold_set, pred_set = labels(gold), labels(pred)
            for missed in sorted(gold_set - pred_set):
                for spurious in sorted(pred_set - gold_set):
                    table.add(missed, spurious)
    return code_table, sub_table


def write_confusion_csv(path: str | os.PathLike, table: ConfusionTable, smoothing: float = 0.0) -> Path:
    """M (row-normalised, diagonal 0) as CSV: ``gold``, one column per predicted label, ``row_count``."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["gold", *table.labels, "row_count"])
    for gold in table.labels:
        row = table.row(gold, smoothing)
        writer.writerow([gold, *(f"{row.get(p, 0.0):.6g}" for p in table.labels), table.row_total(gold)])
    return atomic.write_text(path, text.getvalue())


def read_confusion_csv(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """``{gold: {predicted: probability}}`` from :func:`write_confusion_csv` output."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    header = rows[0][1:-1]
    return {row[0]: {label: float(v) for label, v in zip(header, row[1:-1])} for row in rows[1:]}


# ----------------------------------------------------------------------------------------------------
# Rejected outputs
# ----------------------------------------------------------------------------------------------------

def _confuse_label(example: Example, rng: random.Random, code_table: ConfusionTable,
                   sub_table: ConfusionTable, config: PairConfig) -> list[Annotation] | None:
    triples = list(example.annotations)
    if not triples:
        return None
    index = rng.randrange(len(triples))
    old = triples[index]
    if has_subcodes(old.code) and rng.random() < config.subcode_confusion_prob:
        alternatives = [s for s in valid_subcodes(old.code) if s != old.subcode]
        new = Annotation(old.code, sub_table.draw(rng, old.subcode, alternatives, config.smoothing), old.span)
    else:
        alternatives = [c for c in codes_for_direction(example.direction) if c != old.code]
        code = code_table.draw(rng, old.code, alternatives, config.smoothing)
        subcode = old.subcode
        if not is_valid_pair(code, subcode):
            subcode = _draw_subcode(rng, code, subcode, sub_table, config)
        new = Annotation(code, subcode, old.span)
    triples[index] = new
    return triples


def _draw_subcode(rng: random.Random, code: str, old_subcode: str, sub_table: ConfusionTable,
                  config: PairConfig) -> str:
    """A sub-code valid for ``code``: from the old sub-code's confusion row, else by confusion frequency."""
    if not has_subcodes(code):
        return NONE_SUBCODE
    candidates = valid_subcodes(code)
    if old_subcode != NONE_SUBCODE:
        return sub_table.draw(rng, old_subcode, candidates, config.smoothing)
    return sub_table.draw_by_frequency(rng, candidates, config.smoothing)


def _drop_one(example: Example, rng: random.Random) -> list[Annotation] | None:
    triples = list(example.annotations)
    if len(triples) < 2:
        return None
    del triples[rng.randrange(len(triples))]
    return triples


def _message_phrase(message: str, rng: random.Random, min_words: int, max_words: int) -> str | None:
    """A contiguous n-gram of the message's words, copied verbatim (None if it has no words)."""
    words = list(_WORD_RE.finditer(message))
    if not words:
        return None
    hi = min(max_words, len(words))
    n = rng.randint(min(min_words, hi), hi)
    start = rng.randrange(len(words) - n + 1)
    return message[words[start].start():words[start + n - 1].end()]


def _add_spurious(example: Example, rng: random.Random, code_table: ConfusionTable,
                  sub_table: ConfusionTable, config: PairConfig) -> list[Annotation] | None:
    gold = set(example.annotations)
    codes = codes_for_direction(example.direction)
    for _ in range(config.max_redraws):
        span = _message_phrase(example.message, rng, *config.extra_span_words)
        if span is None:
            return None
        code = code_table.draw_by_frequency(rng, codes, config.smoothing)
        subcode = (sub_table.draw_by_frequency(rng, valid_subcodes(code), config.smoothing)
                   if has_subcodes(code) else NONE_SUBCODE)
        extra = Annotation(code, subcode, span)
        if extra not in gold:
            break
    else:
        return None
    # Insert in message order (gold lists follow the message), after triples starting at or before it.
    starts = [example.message.find(a.span) for a in example.annotations]
    position = bisect.bisect_right(sorted(starts), example.message.find(span))
    triples = list(example.annotations)
    triples.insert(position, extra)
    return triples


def make_preference_record(example: Example, code_table: ConfusionTable, sub_table: ConfusionTable,
                           config: PairConfig = PairConfig()) -> PreferenceRecord | None:
    """The example's chosen output and its rejected outputs (None when no strategy applies)."""
    if not example.annotations and not config.include_empty:
        return None
    chosen = serialize(example.annotations)
    chosen_set = frozenset(example.annotations)
    rejected: list[str] = []
    strategies: list[str] = []
    occurrence: Counter = Counter()
    for strategy in config.strategies:
        k = occurrence[strategy]
        occurrence[strategy] += 1
        rng = random.Random(f"{config.seed}:{example.id}:{strategy}:{k}")
        if strategy == "label":
            triples = _confuse_label(example, rng, code_table, sub_table, config)
        elif strategy == "missing":
            triples = _drop_one(example, rng)
        else:
            triples = _add_spurious(example, rng, code_table, sub_table, config)
        if triples is None or frozenset(triples) == chosen_set:
            continue
        text = serialize(triples)
        if text == chosen or text in rejected:
            continue
        rejected.append(text)
        strategies.append(strategy)
    if not rejected:
        return None
    return PreferenceRecord(example.id, chosen, tuple(rejected), direction=example.direction,
                            message=example.message, strategies=tuple(strategies))


def make_preference_records(examples: Sequence[Example], code_table: ConfusionTable, sub_table: ConfusionTable,
                            config: PairConfig = PairConfig()) -> list[PreferenceRecord]:
    """:func:`make_preference_record` over ``examples``, skipping examples that got none."""
    records = (make_preference_record(ex, code_table, sub_table, config) for ex in examples)
    return [r for r in records if r is not None]


def tables_from_outputs(val_examples: Sequence[Example],
                        outputs: Sequence[str]) -> tuple[ConfusionTable, ConfusionTable]:
    """Confusion tables from raw validation outputs (parsed with the tolerant parser)."""
    parsed = [parse_output(text).annotations for text in outputs]
    return confusion_tables([ex.annotations for ex in val_examples], parsed)
