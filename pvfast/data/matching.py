"""SPEC §5's rules for comparing annotations: label sets per message and the span-match rule.

Shared by scoring (:mod:`pvfast.eval.metrics`, which documents the rule in full) and by confusion-aware pair
mining (:mod:`pvfast.data.pairs`, which matches predicted to gold triples the same way).

- Code / Sub-code labels of a message: the *sets* of its codes and of its real sub-codes ("None" is not a
  sub-code label).
- Span match: word sets (``\\w+`` runs of the lower-cased text); a pair matches if both are non-empty and one
  contains the other or their Jaccard is at least 0.6 (exact fractions); greedy one-to-one matching by Jaccard
  descending, then an optional tie-break, then predicted and gold order.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Callable, Iterable, Sequence

from pvfast.data.codebook import NONE_SUBCODE
from pvfast.data.records import Annotation

_WORD_RE = re.compile(r"\w+")

#: Minimum word-set Jaccard for two spans to match (SPEC §5), as an exact fraction.
SPAN_JACCARD_THRESHOLD = Fraction(3, 5)


def span_words(text: str) -> frozenset[str]:
    """The word set of a span: ``\\w+`` runs of the lower-cased text."""
    return frozenset(_WORD_RE.findall(text.lower()))


def span_jaccard(a: frozenset[str], b: frozenset[str]) -> Fraction:
    """Exact word-set Jaccard |a ∩ b| / |a ∪ b| (0 when both are empty)."""
    union = len(a | b)
    return Fraction(len(a & b), union) if union else Fraction(0)


def spans_match(a: frozenset[str], b: frozenset[str]) -> bool:
    """SPEC §5 span rule on two word sets: containment either way, or Jaccard ≥ 0.6; empty never matches."""
    if not a or not b:
        return False
    return a <= b or b <= a or span_jaccard(a, b) >= SPAN_JACCARD_THRESHOLD


def greedy_span_matching(
    predicted: Sequence[str],
    gold: Sequence[str],
    tie_break: Callable[[int, int], int] | None = None,
) -> list[tuple[int, int]]:
    """One-to-one greedy matching of predicted to gold spans; returns accepted ``(pred_idx, gold_idx)``.

    Candidates are the pairs that satisfy :func:`spans_match`, taken in order of Jaccard descending, then
    ``tie_break(i, j)`` ascending if given (e.g. prefer equal labels), then predicted index, then gold
    index. The result is sorted by predicted index.
    """
    pred_words = [span_words(s) for s in predicted]
    gold_words = [span_words(s) for s in gold]
    candidates = []
    for i, pw in enumerate(pred_words):
        for j, gw in enumerate(gold_words):
            if spans_match(pw, gw):
                extra = tie_break(i, j) if tie_break is not None else 0
                candidates.append((-span_jaccard(pw, gw), extra, i, j))
    candidates.sort()
    used_pred: set[int] = set()
    used_gold: set[int] = set()
    matches = []
    for _, _, i, j in candidates:
        if i not in used_pred and j not in used_gold:
            used_pred.add(i)
            used_gold.add(j)
            matches.append((i, j))
    return sorted(matches)


def code_labels(annotations: Iterable[Annotation]) -> set[str]:
    """The set of Code labels of one message."""
    return {a.code for a in annotations}


def subcode_labels(annotations: Iterable[Annotation]) -> set[str]:
    """The set of Sub-code labels of one message ("None" is not a label)."""
    return {a.subcode for a in annotations if a.subcode != NONE_SUBCODE}
