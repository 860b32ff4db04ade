"""Class-balance example weights from the effective number of samples (Cui et al., 2019; SPEC §3).

Per label k with n_k training examples containing it, the label weight is

    a_k = (1 − b) / (1 − b^{n_k})        (the inverse effective number of samples)

normalised to mean 1 over the labels seen in the training set. An example's weight is

    c_i = combine( max_{codes k of i} a_k ,  max_{sub-codes k of i} a_k )

with combine = mean (default), max or geometric mean; either level can be switched off. The weights are
capped at ``cap``, renormalised to mean 1 over the training set and capped again (so a rare label cannot
dominate a batch). Counts are over the chosen annotations, one per distinct label per example. A sub-code
label is the sub-code string itself (as in the evaluation); "None" is not a sub-code label.

An example with no label at an enabled level (no annotations, or only "None" sub-codes) leaves that level
out of its combination; with no label at any enabled level it gets the neutral weight 1.0 (the mean label
weight) before the cap and renormalisation.

With class balance off (``enabled=False``) every weight is exactly 1.0.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence, Union

from pvfast.data.codebook import NONE_SUBCODE
from pvfast.data.records import Annotation, Example, PreferenceRecord
from pvfast.objectives.config import LEVELS, ClassBalanceConfig

# One example's gold annotations, as an Example or as a plain sequence of Annotation.
AnnotatedExample = Union[Example, Sequence[Annotation]]


def _annotations_of(example: AnnotatedExample, index: int) -> Sequence[Annotation]:
    annotations = example.annotations if isinstance(example, Example) else example
    for j, annotation in enumerate(annotations):
        if not isinstance(annotation, Annotation):
            raise TypeError(f"example {index}, annotation {j}: expected Annotation, "
                            f"got {type(annotation).__name__}")
    return annotations


def example_labels(annotations: Sequence[Annotation], level: str) -> frozenset[str]:
    """The distinct labels of one example at ``level`` ("code" or "subcode"; "None" is not a label)."""
    if level == "code":
        return frozenset(a.code for a in annotations)
    if level == "subcode":
        return frozenset(a.subcode for a in annotations if a.subcode != NONE_SUBCODE)
    raise ValueError(f"unknown label level {level!r}; expected one of {LEVELS}")


def label_weights(label_sets: Sequence[frozenset[str]], b: float) -> dict[str, float]:
    """a_k = (1 − b)/(1 − b^{n_k}) for every label seen, normalised to mean 1 over those labels.

    Args:
        label_sets: the distinct labels of each training example (one level).
        b: effective-number constant in [0, 1).
    """
    counts = Counter(label for labels in label_sets for label in labels)
    if not counts:
        return {}
    raw = {label: (1.0 - b) / (1.0 - b ** n) for label, n in counts.items()}
    mean = sum(raw.values()) / len(raw)
    return {label: a / mean for label, a in raw.items()}


def _combine(values: list[float], mode: str) -> float:
    if mode == "mean":
        return sum(values) / len(values)
    if mode == "max":
        return max(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))  # geometric


def class_balance_weights(examples: Sequence[AnnotatedExample], config: ClassBalanceConfig) -> list[float]:
    """Example weights c_i for a training set (one per example, in order).

    Args:
        examples: each example's chosen (gold) annotations, as ``Example`` or a sequence of ``Annotation``.
        config: the class-balance settings; ``enabled=False`` gives all ones.
    Returns:
        list of floats, mean 1 over the set (before the final cap), each at most ``config.cap``.
    """
    if not config.enabled:
        return [1.0] * len(examples)
    if not examples:
        return []
    annotations = [_annotations_of(example, i) for i, example in enumerate(examples)]
    labels_by_level = {level: [example_labels(a, level) for a in annotations] for level in config.levels}
    weights_by_level = {level: label_weights(sets, config.b) for level, sets in labels_by_level.items()}

    weights = []
    for i in range(len(examples)):
        per_level = [max(weights_by_level[level][k] for k in labels_by_level[level][i])
                     for level in config.levels if labels_by_level[level][i]]
        weights.append(_combine(per_level, config.combine) if per_level else 1.0)

    capped = [min(w, config.cap) for w in weights]
    mean = sum(capped) / len(capped)
    return [min(w / mean, config.cap) for w in capped]


def chosen_annotations(records: Sequence[PreferenceRecord]) -> list[Sequence[Annotation]]:
    """The chosen annotations of each preference record, parsed from its canonical JSON.

    A chosen completion that does not parse cleanly is an error naming the record (never its text).
    """
    from pvfast.data.jsonfmt import parse_output  # local: only this path needs the parser

    annotations = []
    for record in records:
        parsed = parse_output(record.chosen)
        if parsed.errors or not parsed.strict:
            raise ValueError(f"preference record {record.id!r}: chosen completion is not clean canonical JSON "
                             f"({parsed.n_format_errors} format error(s), strict={parsed.strict}); class "
                             f"balance needs its labels")
        annotations.append(parsed.annotations)
    return annotations


def class_balance_table(ids: Sequence[str], examples: Sequence[AnnotatedExample],
                        config: ClassBalanceConfig) -> dict[str, float] | None:
    """Class-balance weight c_i by record id, for a training set; None when class balance is off.

    The objective looks each pair's (or SFT target's) weight up by the id of its record
    (:class:`pvfast.objectives.fused_loss.FusedTokenPOLoss` ``class_weights``); with None every c_i is 1.
    ``ids`` and ``examples`` (gold / chosen annotations) are aligned; a record's k pairs share its c_i.
    """
    if len(ids) != len(examples):
        raise ValueError(f"class_balance_table: {len(ids)} ids for {len(examples)} examples")
    if len(set(ids)) != len(ids):
        raise ValueError("class_balance_table: record ids repeat; class-balance weights are looked up by id")
    if not config.enabled:
        return None
    return dict(zip(ids, class_balance_weights(examples, config)))
