"""The synthetic PV-Miner corpus: portal messages with the published label distribution (SPEC §1).

The real corpus is not public, so demos, tests and benchmarks run on this one. A message is built from
the phrase banks of :mod:`pvfast.data.phrases`: a salutation first if it has one, a sign-off last, and in
between one sentence per other label plus unlabelled filler sentences, shuffled. Each labelled sentence
yields one (Code, Sub-code, Span) triple whose span is the sentence or a contiguous part of it, so every
span occurs verbatim in its message.

How the label distribution is matched
-------------------------------------
Label counts are fixed first, then placed into messages (a "deck"), so every seed reproduces the target
counts up to rounding instead of drifting with sampling noise:

1. Directions. ``q = 671 / (671 + 378)`` (PartnershipPatient vs PartnershipProvider in
   PUBLISHED_CODE_COUNTS) is the share of patient-written ("N") messages; the rest are provider-written.
2. Per-label targets, scaled by ``n / 1137``:
   - sub-codes that exist under one code only keep their published count (e.g. ``expressOpinions`` is
     PartnershipPatient, ``MakeDecision`` is SharedDecisionProvider);
   - the 7 sub-code strings shared by PartnershipPatient and PartnershipProvider (Clinical Care,
     salutation, signoff, Appreciation/Gratitude, connection, alignment, build trust) are split ``q : 1 - q``
     between the patient and provider code. The published table gives only the string's total, and the
     Partnership code counts are the best available evidence of how the two voices divide;
   - SDOH sub-codes and SocioEmotionalBehaviour apply in both directions and are split ``q : 1 - q`` too;
   - the three codes without sub-codes take their PUBLISHED_CODE_COUNTS value (242 + 182 + 162 = 586).
   This gives 4037 + 586 = 4623 annotations over 1137 messages, about 4.07 per message.
3. Each message draws a label budget from a gamma-Poisson (negative binomial) law with that mean, so
   most messages carry 2-6 labels and a few carry none or many; budgets are then nudged so they sum to
   the label total of their direction.
4. Labels, most frequent first, are dealt to distinct messages of the right direction, each message
   drawn with probability proportional to its remaining budget. A label appears at most once per message.
5. Each message is worded from the banks; a text that already occurs in the corpus is reworded.

Held-out phrasings (:func:`synthetic_splits`, the trainer's default): every bank is split ~70/30 into
training and held-out phrasings (:func:`phrasing_split`); messages of the training split are worded only
from the first part, validation and test messages only from the second, so a test score measures how
well a model generalises to sentences it never saw, not how well it recalls them. Steps 1-4 (labels,
directions, ids, split membership) are the same with or without it, so the label distribution is kept.

The published PUBLISHED_CODE_COUNTS of codes *with* sub-codes are smaller than the sum of their sub-code
counts (SDOH 536 vs 696), i.e. they count messages carrying the code; this corpus matches them only
roughly, as a side effect of step 4.

Everything is driven by one ``random.Random(seed)``: the same (n, seed) gives the same corpus and ids.

    python -m pvfast.data synth --n 1137 --seed 0 --out data/pv-synth
"""

from __future__ import annotations

import functools
import math
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from pvfast.data.codebook import (
    ANNOTATION_PAIRS,
    CODEBOOK,
    DIRECTIONS,
    NONE_SUBCODE,
    PATIENT_TO_PROVIDER,
    PROVIDER_TO_PATIENT,
    PUBLISHED_CODE_COUNTS,
    PUBLISHED_N_MESSAGES,
    PUBLISHED_SUBCODE_COUNTS,
    code_allowed,
)
from pvfast.data.io import write_examples
from pvfast.data.phrases import FILLER_SENTENCES, PHRASE_BANKS, SLOT_VALUES
from pvfast.data.records import Annotation, Example

SPLITS = ("train", "validation", "test")
ID_PREFIX = "syn-"

#: Share of patient-written messages, and of each label that both voices use (see module docstring).
PATIENT_SHARE = PUBLISHED_CODE_COUNTS["PartnershipPatient"] / (
    PUBLISHED_CODE_COUNTS["PartnershipPatient"] + PUBLISHED_CODE_COUNTS["PartnershipProvider"])

_SPAN_MARK = re.compile(r"\[([^\[\]]+)\]")
_OPENING, _CLOSING = "salutation", "signoff"


@dataclass(frozen=True)
class SynthConfig:
    """Shape of the generated messages (label counts come from the codebook, not from here)."""

    budget_dispersion: float = 2.0  # gamma shape r of the per-message label budget; variance = m + m^2/r;
    # 2.0 gives the published spread of message length (40.5 +- 32.8 words) together with the fillers
    max_labels_per_message: int = 14  # a budget cap; keeps the longest messages plausible
    filler_mean: float = 0.5  # mean number of unlabelled sentences per message (Poisson)
    filler_min_if_empty: int = 1  # a message with no labels still says something
    max_rewordings: int = 20  # redraws of a message whose text already occurs in the corpus


# --- label targets ---------------------------------------------------------------------------------------

def _codes_with_subcode(subcode: str) -> list[str]:
    return [code for code, subs in CODEBOOK.items() if subcode in subs]


def published_label_targets() -> dict[tuple[str, str, str], float]:
    """Target annotation count per (direction, Code, Sub-code) for the published corpus size (1137).

    Real-valued; :func:`label_counts` rounds them for a given corpus size.
    """
    targets: dict[tuple[str, str, str], float] = {}
    for code, subcode in ANNOTATION_PAIRS:
        if subcode == NONE_SUBCODE:
            total = float(PUBLISHED_CODE_COUNTS[code])
            owners = 1
        else:
            total = float(PUBLISHED_SUBCODE_COUNTS[subcode])
            owners = len(_codes_with_subcode(subcode))  # 2 for the shared Partnership sub-codes
        for direction in DIRECTIONS:
            if not code_allowed(code, direction):
                continue
            both_directions = code_allowed(code, PROVIDER_TO_PATIENT) and code_allowed(code, PATIENT_TO_PROVIDER)
            if owners == 1 and not both_directions:
                share = 1.0
            else:  # shared between the two voices: split like the Partnership codes
                share = PATIENT_SHARE if direction == PATIENT_TO_PROVIDER else 1.0 - PATIENT_SHARE
            targets[(direction, code, subcode)] = total * share
    return targets


def label_counts(n: int) -> dict[tuple[str, str, str], int]:
    """Integer annotation count per (direction, Code, Sub-code) for a corpus of ``n`` messages."""
    scale = n / PUBLISHED_N_MESSAGES
    return {key: int(round(t * scale)) for key, t in published_label_targets().items()}


def _check_banks() -> None:
    """Every label allowed in a direction needs a phrase bank, and every bank a valid allowed label."""
    needed = set(published_label_targets())
    missing = sorted(needed - set(PHRASE_BANKS))
    extra = sorted(set(PHRASE_BANKS) - needed)
    if missing or extra:
        raise AssertionError(f"pvfast/data/phrases.py: banks missing for {missing}, unexpected banks {extra}")
    slot_names = set(SLOT_VALUES)
    for key, bank in PHRASE_BANKS.items():
        for template in bank:
            for _, slot, _, _ in string.Formatter().parse(template):
                if slot is not None and slot not in slot_names:
                    raise AssertionError(f"pvfast/data/phrases.py: bank {key} uses unknown slot {{{slot}}}")


_check_banks()


# --- budgets and dealing ---------------------------------------------------------------------------------

def _poisson(rng: random.Random, lam: float) -> int:
    """Knuth's multiplication method; fine for the small means used here (< 30)."""
    limit, k, p = math.exp(-lam), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def _label_budgets(rng: random.Random, n_messages: int, total: int, n_labels: int,
                   config: SynthConfig) -> list[int]:
    """Per-message label budgets: gamma-Poisson draws, then nudged by ±1 until they sum to ``total``."""
    if n_messages == 0:
        return []
    cap = min(config.max_labels_per_message, n_labels)
    if total > cap * n_messages:
        raise ValueError(f"{total} labels do not fit in {n_messages} messages of at most {cap} labels; "
                         "raise SynthConfig.max_labels_per_message")
    mean = total / n_messages
    r = config.budget_dispersion
    budgets = [min(cap, _poisson(rng, rng.gammavariate(r, mean / r))) if mean > 0 else 0
               for _ in range(n_messages)]
    diff = total - sum(budgets)
    while diff != 0:
        i = rng.randrange(n_messages)
        if diff > 0 and budgets[i] < cap:
            budgets[i] += 1
            diff -= 1
        elif diff < 0 and budgets[i] > 0:
            budgets[i] -= 1
            diff += 1
    return budgets


def _deal_labels(rng: random.Random, budgets: list[int], counts: dict[tuple[str, str], int]
                 ) -> list[list[tuple[str, str]]]:
    """Give each (code, subcode) ``counts[label]`` distinct messages, favouring large remaining budgets."""
    remaining = list(budgets)
    labels: list[list[tuple[str, str]]] = [[] for _ in budgets]
    order = sorted(counts, key=lambda label: (-counts[label], label))
    for label in order:
        want = min(counts[label], len(budgets))
        # Efraimidis-Spirakis weighted sampling without replacement: key u^(1/w), keep the largest.
        keyed = sorted(((rng.random() ** (1.0 / remaining[i]), i) for i in range(len(budgets))
                        if remaining[i] > 0), reverse=True)
        chosen = [i for _, i in keyed[:want]]
        if len(chosen) < want:  # budgets ran dry for this label: overflow into other messages
            rest = [i for i in range(len(budgets)) if remaining[i] <= 0]
            chosen += rng.sample(rest, want - len(chosen))
        for i in chosen:
            labels[i].append(label)
            remaining[i] -= 1
    return labels


# --- rendering -------------------------------------------------------------------------------------------

def _render(template: str, slots: dict[str, str]) -> tuple[str, str]:
    """(sentence text, span) for a bank template with slots filled; span marked by [...] or whole."""
    filled = template.format_map(slots)
    marked = _SPAN_MARK.search(filled)
    text = _SPAN_MARK.sub(r"\1", filled)
    span = marked.group(1) if marked else text.rstrip(".,!?;: ").strip()
    return text, span


def _message(rng: random.Random, direction: str, labels: list[tuple[str, str]], config: SynthConfig,
             banks: PhrasingSet | None = None) -> tuple[str, tuple[Annotation, ...]]:
    phrase_banks = PHRASE_BANKS if banks is None else banks.labelled
    filler_banks = FILLER_SENTENCES if banks is None else banks.filler
    slots = {name: rng.choice(values) for name, values in SLOT_VALUES.items()}
    opening: list[tuple[str, Annotation | None]] = []
    closing: list[tuple[str, Annotation | None]] = []
    body: list[tuple[str, Annotation | None]] = []
    for code, subcode in labels:
        text, span = _render(rng.choice(phrase_banks[(direction, code, subcode)]), slots)
        entry = (text, Annotation(code, subcode, span))
        (opening if subcode == _OPENING else closing if subcode == _CLOSING else body).append(entry)
    n_filler = _poisson(rng, config.filler_mean)
    if not labels:
        n_filler = max(n_filler, config.filler_min_if_empty)
    fillers = filler_banks[direction]
    for template in rng.sample(fillers, min(n_filler, len(fillers))):
        body.append((_render(template, slots)[0], None))
    rng.shuffle(body)
    sentences = opening + body + closing
    message = " ".join(text for text, _ in sentences)
    # Annotations in reading order, as an annotator would list them.
    annotations = tuple(ann for _, ann in sentences if ann is not None)
    return message, annotations


def generate_corpus(n: int = PUBLISHED_N_MESSAGES, seed: int = 0,
                    config: SynthConfig = SynthConfig(), heldout_phrasing: bool = False,
                    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> list[Example]:
    """``n`` synthetic messages with ids ``syn-000000``..., deterministic in ``seed``.

    ``heldout_phrasing``: the messages that :func:`split_corpus` (same ``seed`` and ``fractions``) puts in
    validation and test are worded only from held-out phrasings (:func:`phrasing_split`), the training
    messages only from the others. Labels, directions, ids and the split are the same either way; only
    the wording changes.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    n_patient = int(round(n * PATIENT_SHARE))
    directions = [PATIENT_TO_PROVIDER] * n_patient + [PROVIDER_TO_PATIENT] * (n - n_patient)
    rng.shuffle(directions)

    counts = label_counts(n)
    labels_of_message: dict[int, list[tuple[str, str]]] = {}
    for direction in DIRECTIONS:
        members = [i for i, d in enumerate(directions) if d == direction]
        direction_counts = {(c, s): k for (d, c, s), k in counts.items() if d == direction and k > 0}
        budgets = _label_budgets(rng, len(members), sum(direction_counts.values()),
                                 len(direction_counts), config)
        for i, labels in zip(members, _deal_labels(rng, budgets, direction_counts)):
            labels_of_message[i] = labels

    banks_of_message: list[PhrasingSet | None] = [None] * n
    if heldout_phrasing:
        seen, held = phrasing_split(seed)
        split_of = _split_assignment(directions, seed, fractions)
        banks_of_message = [seen if split_of[i] == SPLITS[0] else held for i in range(n)]

    examples = []
    seen_messages: set[str] = set()
    for i, direction in enumerate(directions):
        # Redraw the wording (never the labels) of a message that repeats an earlier one, so identical
        # texts do not land in both train and test; short label sets may still repeat after the retries.
        for _ in range(config.max_rewordings + 1):
            message, annotations = _message(rng, direction, labels_of_message[i], config, banks_of_message[i])
            if message not in seen_messages:
                break
        seen_messages.add(message)
        examples.append(Example(id=f"{ID_PREFIX}{i:06d}", direction=direction, message=message,
                                annotations=annotations))
    return examples


# --- held-out phrasings ----------------------------------------------------------------------------------

#: Share of each phrase bank (and of the filler sentences) reserved for validation and test messages.
HELDOUT_SHARE = 0.3


@dataclass(frozen=True)
class PhrasingSet:
    """The phrase banks one part of the corpus is worded from (a subset of every bank)."""

    labelled: Mapping[tuple[str, str, str], tuple[str, ...]]
    filler: Mapping[str, tuple[str, ...]]


def _partition(bank: tuple[str, ...], rng: random.Random) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(seen, held out): about HELDOUT_SHARE of the bank held out, at least one each side."""
    order = list(bank)
    rng.shuffle(order)
    n_held = min(len(order) - 1, max(1, round(HELDOUT_SHARE * len(order))))
    held = set(order[:n_held])
    # Keep the bank's own order inside each part (stable output when a bank gains a phrasing at the end).
    return tuple(t for t in bank if t not in held), tuple(t for t in bank if t in held)


@functools.lru_cache(maxsize=8)
def phrasing_split(seed: int = 0) -> tuple[PhrasingSet, PhrasingSet]:
    """(training phrasings, held-out phrasings): every bank of :mod:`pvfast.data.phrases` split ~70/30,
    deterministic in ``seed``; no phrasing is on both sides, every label keeps phrasings on both."""
    seen_l, held_l, seen_f, held_f = {}, {}, {}, {}
    for key in sorted(PHRASE_BANKS):
        rng = random.Random(f"{seed}:phrasing:{'|'.join(key)}")
        seen_l[key], held_l[key] = _partition(PHRASE_BANKS[key], rng)
    for direction in sorted(FILLER_SENTENCES):
        rng = random.Random(f"{seed}:filler:{direction}")
        seen_f[direction], held_f[direction] = _partition(FILLER_SENTENCES[direction], rng)
    return PhrasingSet(seen_l, seen_f), PhrasingSet(held_l, held_f)


@functools.lru_cache(maxsize=8)
def default_corpus(n: int = PUBLISHED_N_MESSAGES, seed: int = 0) -> tuple[Example, ...]:
    """The embedded default dataset for demos, tests and benchmarks (generated once, then cached)."""
    return tuple(generate_corpus(n=n, seed=seed))


@functools.lru_cache(maxsize=8)
def _synthetic_splits(n: int, seed: int, heldout_phrasing: bool) -> dict[str, tuple[Example, ...]]:
    corpus = generate_corpus(n=n, seed=seed, heldout_phrasing=heldout_phrasing)
    return {name: tuple(examples) for name, examples in split_corpus(corpus, seed=seed).items()}


def synthetic_splits(n: int = PUBLISHED_N_MESSAGES, seed: int = 0, heldout_phrasing: bool = True
                     ) -> dict[str, list[Example]]:
    """The train / validation / test splits of the synthetic corpus used for training and evaluation.

    By default (``heldout_phrasing``) validation and test messages are worded from phrasings that no
    training message uses, so F1 on them measures generalisation rather than recall of memorised
    sentences; ``heldout_phrasing=False`` gives the split of :func:`default_corpus` (same ids and labels).
    """
    return {name: list(examples) for name, examples in _synthetic_splits(n, seed, heldout_phrasing).items()}


# --- splits and files ------------------------------------------------------------------------------------

def _split_assignment(directions: list[str], seed: int, fractions: tuple[float, float, float]) -> list[str]:
    """The split name of each message, stratified by direction (depends only on directions and seed)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    rng = random.Random(seed)
    split_of = [SPLITS[0]] * len(directions)
    for direction in DIRECTIONS:
        members = [i for i, d in enumerate(directions) if d == direction]
        rng.shuffle(members)
        n_train = int(round(fractions[0] * len(members)))
        n_val = int(round(fractions[1] * len(members)))
        n_val = min(n_val, len(members) - n_train)
        for rank, i in enumerate(members):
            split_of[i] = SPLITS[0] if rank < n_train else SPLITS[1] if rank < n_train + n_val else SPLITS[2]
    return split_of


def split_corpus(examples, seed: int = 0, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
                 ) -> dict[str, list[Example]]:
    """Deterministic train/validation/test split, stratified by direction; each split keeps input order."""
    examples = list(examples)
    split_of = _split_assignment([ex.direction for ex in examples], seed, fractions)
    return {name: [ex for i, ex in enumerate(examples) if split_of[i] == name] for name in SPLITS}


def write_corpus(out_dir, n: int = PUBLISHED_N_MESSAGES, seed: int = 0,
                 heldout_phrasing: bool = True) -> dict[str, Path]:
    """Write ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl`` under ``out_dir``; returns their paths.
    Validation and test use held-out phrasings unless ``heldout_phrasing`` is False (:func:`synthetic_splits`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, examples in synthetic_splits(n, seed, heldout_phrasing).items():
        paths[name] = out_dir / f"{name}.jsonl"
        write_examples(paths[name], examples)
    return paths
