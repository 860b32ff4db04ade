"""The synthetic corpus: label distribution, verbatim spans, direction rules, determinism, splits, files.

Distribution tolerance (stated once, used by every distribution test): for each of the 29 label strings
(26 sub-codes + 3 codes without sub-codes) the observed annotation count must be within
``2 + 3 %`` of its target ``published_count * n / 1137``, and the total-variation distance between the
observed and target label shares must be at most 0.01. Rounding the per-direction counts moves a label
by at most 1, so a correct generator passes at any seed; a generator that samples labels uniformly,
drops a label or confuses two labels fails (checked below with a deliberately corrupted corpus).
"""

import random
import statistics
import time
from collections import Counter

import pytest

from pvfast.data import io, synth
from pvfast.data.codebook import (
    CODEBOOK,
    NONE_SUBCODE,
    PUBLISHED_CODE_COUNTS,
    PUBLISHED_N_MESSAGES,
    PUBLISHED_SUBCODE_COUNTS,
    is_valid_pair,
)
from pvfast.data.phrases import FILLER_SENTENCES, PHRASE_BANKS, SLOT_VALUES
from pvfast.data.records import Annotation, Example

COUNT_SLACK, COUNT_RELATIVE, MAX_TV = 2.0, 0.03, 0.01
SEEDS = (0, 1, 7)


def target_counts(n: int) -> dict[str, float]:
    """Label string -> expected annotation count, straight from the published tables."""
    scale = n / PUBLISHED_N_MESSAGES
    targets = {s: c * scale for s, c in PUBLISHED_SUBCODE_COUNTS.items()}
    for code, subcodes in CODEBOOK.items():
        if not subcodes:
            targets[code] = PUBLISHED_CODE_COUNTS[code] * scale
    return targets


def observed_counts(examples) -> Counter:
    """Label string -> annotation count; codes without sub-codes count under the code name."""
    return Counter(a.code if a.subcode == NONE_SUBCODE else a.subcode
                   for e in examples for a in e.annotations)


def distribution_problems(examples, n: int) -> list[str]:
    targets, observed = target_counts(n), observed_counts(examples)
    problems = [f"{label}: {observed[label]} vs target {t:.1f}" for label, t in targets.items()
                if abs(observed[label] - t) > COUNT_SLACK + COUNT_RELATIVE * t]
    problems += [f"unexpected label {label}" for label in observed if label not in targets]
    total_obs, total_target = sum(observed.values()), sum(targets.values())
    tv = 0.5 * sum(abs(observed[label] / total_obs - targets[label] / total_target)
                   for label in set(targets) | set(observed))
    if tv > MAX_TV:
        problems.append(f"total variation {tv:.4f} > {MAX_TV}")
    return problems


@pytest.fixture(scope="module")
def corpora():
    return {seed: synth.generate_corpus(n=PUBLISHED_N_MESSAGES, seed=seed) for seed in SEEDS}


@pytest.mark.parametrize("seed", SEEDS)
def test_label_distribution_matches_published_counts(corpora, seed):
    assert distribution_problems(corpora[seed], PUBLISHED_N_MESSAGES) == []


def test_label_distribution_at_a_smaller_size():
    n = 300
    assert distribution_problems(synth.generate_corpus(n=n, seed=3), n) == []


def test_distribution_check_rejects_a_corrupted_corpus(corpora):
    """The tolerance is tight enough to catch a generator that confuses two labels."""
    swapped = [Example(e.id, e.direction, e.message,
                       tuple(Annotation(a.code, "salutation" if a.subcode == "signoff" else a.subcode, a.span)
                             for a in e.annotations)) for e in corpora[0]]
    problems = distribution_problems(swapped, PUBLISHED_N_MESSAGES)
    assert any(p.startswith("signoff") for p in problems)
    assert any(p.startswith("salutation") for p in problems)
    rng = random.Random(0)
    uniform = [Example(e.id, e.direction, e.message,
                       tuple(Annotation(a.code, rng.choice(CODEBOOK[a.code]) if CODEBOOK[a.code] else a.subcode,
                                        a.span) for a in e.annotations)) for e in corpora[0]]
    assert any(p.startswith("total variation") for p in distribution_problems(uniform, PUBLISHED_N_MESSAGES))


def test_shared_partnership_subcodes_split_like_the_partnership_codes(corpora):
    """Sub-codes under both Partnership codes are split PartnershipPatient : PartnershipProvider = 671 : 378."""
    patient_share = PUBLISHED_CODE_COUNTS["PartnershipPatient"] / (
        PUBLISHED_CODE_COUNTS["PartnershipPatient"] + PUBLISHED_CODE_COUNTS["PartnershipProvider"])
    shared = set(CODEBOOK["PartnershipPatient"]) & set(CODEBOOK["PartnershipProvider"])
    assert len(shared) == 7
    by_label = Counter((a.code, a.subcode) for e in corpora[0] for a in e.annotations)
    for subcode in shared:
        n_patient = by_label[("PartnershipPatient", subcode)]
        n_total = n_patient + by_label[("PartnershipProvider", subcode)]
        assert abs(n_patient / n_total - patient_share) <= 1.0 / n_total + 0.01, subcode


def test_spans_are_verbatim_and_labels_valid(corpora):
    for examples in corpora.values():
        for e in examples:
            assert e.message and e.message == e.message.strip()
            for a in e.annotations:
                assert is_valid_pair(a.code, a.subcode), (e.id, a.code, a.subcode)
                assert a.span and a.span == a.span.strip()
                assert a.span in e.message, e.id
                assert "[" not in a.span and "]" not in e.message


def test_directions_respected_and_both_present(corpora):
    for examples in corpora.values():
        directions = Counter(e.direction for e in examples)
        assert set(directions) == {"Y", "N"}
        for e in examples:
            for a in e.annotations:
                # The rule written out: *Provider codes only from providers, *Patient codes only from patients.
                if a.code.endswith("Provider"):
                    assert e.direction == "Y", (e.id, a.code)
                elif a.code.endswith("Patient"):
                    assert e.direction == "N", (e.id, a.code)
                else:
                    assert a.code in ("SDOH", "SocioEmotionalBehaviour")


def test_message_shape_is_realistic(corpora):
    examples = corpora[0]
    n_annotations = [len(e.annotations) for e in examples]
    published_mean = (sum(PUBLISHED_SUBCODE_COUNTS.values()) + sum(
        PUBLISHED_CODE_COUNTS[c] for c, subs in CODEBOOK.items() if not subs)) / PUBLISHED_N_MESSAGES
    assert abs(statistics.mean(n_annotations) - published_mean) < 0.05
    assert min(n_annotations) == 0 and max(n_annotations) >= 10  # some empty, some long messages
    words = [len(e.message.split()) for e in examples]
    assert 35.5 <= statistics.mean(words) <= 45.5  # published 40.5 +- 32.8 words
    assert 24.0 <= statistics.pstdev(words) <= 40.0
    assert len({e.message for e in examples}) >= 0.97 * len(examples)  # repeats are reworded
    for e in examples:
        labels = [a.label for a in e.annotations]
        assert len(labels) == len(set(labels)), e.id  # a label at most once per message
        for a in e.annotations:
            if a.subcode == "salutation":
                assert e.message.startswith(a.span), e.id
            if a.subcode == "signoff":
                assert e.message.endswith(a.span), e.id


def test_phrase_banks_cover_every_label_of_each_direction():
    for direction in ("Y", "N"):
        for code, subcodes in CODEBOOK.items():
            allowed = not (code.endswith("Provider") and direction == "N") and not (
                code.endswith("Patient") and direction == "Y")
            for subcode in subcodes or (NONE_SUBCODE,):
                bank = PHRASE_BANKS.get((direction, code, subcode))
                assert (bank is not None) == allowed, (direction, code, subcode)
                if allowed:
                    assert len(bank) >= 3 and len(set(bank)) == len(bank)
    assert set(FILLER_SENTENCES) == {"Y", "N"}


def test_every_template_renders_a_span_inside_its_sentence():
    first_values = {name: values[0] for name, values in SLOT_VALUES.items()}
    for key, bank in PHRASE_BANKS.items():
        for template in bank:
            text, span = synth._render(template, first_values)
            assert span and span in text and "[" not in text and "{" not in text, (key, template)


def test_same_seed_same_corpus_other_seed_other_corpus(corpora):
    random.seed(123)
    state = random.getstate()
    again = synth.generate_corpus(n=PUBLISHED_N_MESSAGES, seed=0)
    assert random.getstate() == state  # no global random state touched
    assert again == corpora[0]
    assert [e.message for e in corpora[1]] != [e.message for e in corpora[0]]
    ids = [e.id for e in corpora[0]]
    assert ids == [f"syn-{i:06d}" for i in range(PUBLISHED_N_MESSAGES)]
    assert ids == [e.id for e in corpora[1]]


def test_generation_is_fast():
    start = time.perf_counter()
    synth.generate_corpus(n=PUBLISHED_N_MESSAGES, seed=11)
    assert time.perf_counter() - start < 3.0  # ~0.1 s on one CPU core; the bound guards against blow-ups


def test_default_corpus_is_cached_and_equals_a_fresh_generation():
    first = synth.default_corpus()
    assert synth.default_corpus() is first
    assert list(first) == synth.generate_corpus()


def test_split_is_disjoint_covering_deterministic_and_stratified(corpora):
    examples = corpora[0]
    splits = synth.split_corpus(examples, seed=0)
    assert list(splits) == ["train", "validation", "test"]
    ids = [e.id for part in splits.values() for e in part]
    assert len(ids) == len(set(ids)) and set(ids) == {e.id for e in examples}
    for direction in ("Y", "N"):
        n_dir = sum(e.direction == direction for e in examples)
        for name, fraction in zip(splits, (0.8, 0.1, 0.1)):
            got = sum(e.direction == direction for e in splits[name])
            assert abs(got - fraction * n_dir) <= 1, (name, direction)
    assert synth.split_corpus(examples, seed=0) == splits
    assert synth.split_corpus(examples, seed=1)["test"] != splits["test"]
    with pytest.raises(ValueError, match="fractions"):
        synth.split_corpus(examples, fractions=(0.8, 0.3, 0.1))


def test_write_corpus_round_trips_through_the_reader(tmp_path):
    n, seed = 60, 5
    paths = synth.write_corpus(tmp_path / "corpus", n=n, seed=seed)
    assert {name: p.name for name, p in paths.items()} == {
        "train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"}
    expected = synth.split_corpus(synth.generate_corpus(n=n, seed=seed, heldout_phrasing=True), seed=seed)
    for name, path in paths.items():
        loaded, problems = io.load_examples(path)
        assert problems == []
        assert list(loaded) == expected[name]
    plain = synth.write_corpus(tmp_path / "plain", n=n, seed=seed, heldout_phrasing=False)
    expected = synth.split_corpus(synth.generate_corpus(n=n, seed=seed), seed=seed)
    for name, path in plain.items():
        assert list(io.load_examples(path)[0]) == expected[name]


# --- held-out phrasings ---------------------------------------------------------------------------------
# Tolerance for one split (stated once): total-variation distance between the split's label shares and the
# published ones at most 0.02 for train (~3,700 labels) and 0.10 for validation and test (~450 labels each,
# whose multinomial sampling noise alone gives ~0.06). The whole corpus keeps the tolerance stated at the top.
SPLIT_MAX_TV = {"train": 0.02, "validation": 0.10, "test": 0.10}


def _triples(examples):
    return {(a.code, a.subcode, a.span) for e in examples for a in e.annotations}


def _tv(examples, n: int) -> float:
    targets, observed = target_counts(n), observed_counts(examples)
    total_obs, total_target = sum(observed.values()), sum(targets.values())
    return 0.5 * sum(abs(observed[label] / total_obs - targets[label] / total_target)
                     for label in set(targets) | set(observed))


@pytest.mark.parametrize("seed", SEEDS)
def test_heldout_split_never_shows_a_test_phrasing_in_training(seed):
    splits = synth.synthetic_splits(PUBLISHED_N_MESSAGES, seed)
    train = _triples(splits["train"])
    for name in ("validation", "test"):
        assert _triples(splits[name]), name
        assert _triples(splits[name]) & train == set(), name  # no labelled (code, sub-code, span) seen in training
        train_sentences = {s for e in splits["train"] for s in e.message.split(". ")}
        overlap = [s for e in splits[name] for s in e.message.split(". ") if s in train_sentences and len(s) > 25]
        assert overlap == [], overlap[:3]
    # The random-phrasing split of the same corpus does share phrasings (what the held-out split removes).
    plain = synth.split_corpus(synth.default_corpus(PUBLISHED_N_MESSAGES, seed), seed)
    assert len(_triples(plain["test"]) & _triples(plain["train"])) > 50


def test_phrasing_split_is_a_partition_of_every_bank():
    seen, held = synth.phrasing_split(0)
    for key, bank in PHRASE_BANKS.items():
        assert set(seen.labelled[key]) | set(held.labelled[key]) == set(bank), key
        assert not set(seen.labelled[key]) & set(held.labelled[key]), key
        assert seen.labelled[key] and held.labelled[key], key
        assert len(held.labelled[key]) <= max(1, round(synth.HELDOUT_SHARE * len(bank))), key
    for direction, bank in FILLER_SENTENCES.items():
        assert set(seen.filler[direction]) | set(held.filler[direction]) == set(bank)
        assert not set(seen.filler[direction]) & set(held.filler[direction])
    assert synth.phrasing_split(0) == synth.phrasing_split(0) and synth.phrasing_split(1) != synth.phrasing_split(0)


@pytest.mark.parametrize("seed", SEEDS)
def test_heldout_split_keeps_ids_labels_and_distribution(seed):
    held = synth.synthetic_splits(PUBLISHED_N_MESSAGES, seed)
    plain = synth.synthetic_splits(PUBLISHED_N_MESSAGES, seed, heldout_phrasing=False)
    for name in synth.SPLITS:
        assert [e.id for e in held[name]] == [e.id for e in plain[name]]
        assert ([sorted((a.code, a.subcode) for a in e.annotations) for e in held[name]]
                == [sorted((a.code, a.subcode) for a in e.annotations) for e in plain[name]])
        assert _tv(held[name], PUBLISHED_N_MESSAGES) <= SPLIT_MAX_TV[name], name
    everything = [e for name in synth.SPLITS for e in held[name]]
    assert distribution_problems(everything, PUBLISHED_N_MESSAGES) == []
    for e in everything:  # spans verbatim, as in every synthetic message
        assert all(a.span in e.message for a in e.annotations)


def test_write_corpus_uses_the_heldout_split(tmp_path):
    paths = synth.write_corpus(tmp_path, n=200, seed=3)
    loaded = {name: list(io.load_examples(path)[0]) for name, path in paths.items()}
    assert loaded == synth.synthetic_splits(200, 3)
