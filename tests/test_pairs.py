"""Confusion-aware preference pairs (SPEC §4): confusion counts, draws, schema validity, reproducibility, CLI."""

import csv
import json
from collections import Counter

import pytest

from pvfast.config.sections import PairConfig
from pvfast.data.codebook import CODES, SUBCODES, code_allowed, codes_for_direction, is_valid_pair, valid_subcodes
from pvfast.data.io import load_preferences, write_examples
from pvfast.data.jsonfmt import parse_output, serialize
from pvfast.data.pairs import (
    ConfusionTable,
    confusion_tables,
    make_preference_record,
    make_preference_records,
    read_confusion_csv,
    write_confusion_csv,
)
from pvfast.data.records import Annotation, Example
from pvfast.data.synth import default_corpus
from pvfast.pairs import main

PP, SDOH, SEB, CCP = "PartnershipPatient", "SDOH", "SocioEmotionalBehaviour", "CareCoordinationPatient"


def _empty_tables():
    return ConfusionTable.empty(CODES), ConfusionTable.empty(SUBCODES)


# ---------------------------------------------------------------------------------------------------
# Confusion counts


def _hand_confusions():
    golds = [
        [Annotation(PP, "salutation", "Hi Dr Smith"), Annotation(SDOH, "EconomicStability", "cannot pay rent"),
         Annotation(SEB, "None", "worried")],
        # one span coded twice; the prediction repeats one of the two labels exactly
        [Annotation(PP, "salutation", "Hi"), Annotation(SEB, "None", "Hi")],
    ]
    preds = [
        [Annotation(PP, "signoff", "Hi Dr Smith"),  # matched: sub-code salutation -> signoff
         Annotation(SDOH, "HealthCareAccessAndQuality", "pay rent"),  # matched by containment: Econ -> HCAQ
         Annotation(CCP, "None", "worried")],  # matched: code SEB -> CCP ("None" is no sub-code)
        [Annotation(SEB, "None", "Hi")],  # ties prefer the same label: matched to the SEB gold, no confusion
    ]
    return golds, preds


def test_confusion_counts_hand_worked():
    code_table, sub_table = confusion_tables(*_hand_confusions())
    # Codes. Matched: SEB -> CCP. Sets msg1: missed {SEB} x spurious {CCP} -> SEB -> CCP again.
    # msg2: missed {PP}, spurious {} -> nothing.
    assert {g: dict(r) for g, r in code_table.counts.items() if r} == {SEB: {CCP: 2}}
    # Sub-codes. Matched: salutation -> signoff, EconomicStability -> HCAQ. Sets msg1: missed
    # {salutation, EconomicStability} x spurious {signoff, HCAQ}: four more counts.
    assert {g: dict(r) for g, r in sub_table.counts.items() if r} == {
        "salutation": {"signoff": 2, "HealthCareAccessAndQuality": 1},
        "EconomicStability": {"signoff": 1, "HealthCareAccessAndQuality": 2},
    }
    assert sub_table.row("salutation") == pytest.approx(
        {s: {"signoff": 2 / 3, "HealthCareAccessAndQuality": 1 / 3}.get(s, 0.0) for s in SUBCODES if s != "salutation"})


def test_rows_without_counts_fall_back_to_uniform_and_smoothing():
    code_table, _ = confusion_tables(*_hand_confusions())
    row = code_table.row(PP)  # no counts
    assert set(row) == set(CODES) - {PP}
    assert all(v == pytest.approx(1 / 7) for v in row.values())
    smoothed = code_table.row(SEB, smoothing=1.0)  # SEB -> CCP 2, the 6 others 0; +1 each: 3/9 and 1/9
    assert smoothed[CCP] == pytest.approx(3 / 9)
    assert smoothed[PP] == pytest.approx(1 / 9)


def test_confusion_csv_round_trip(tmp_path):
    code_table, sub_table = confusion_tables(*_hand_confusions())
    path = write_confusion_csv(tmp_path / "confusion_subcode.csv", sub_table)
    table = read_confusion_csv(path)
    assert list(table) == list(SUBCODES)
    for gold in SUBCODES:
        expected = sub_table.row(gold)
        assert table[gold][gold] == 0.0
        assert sum(table[gold].values()) == pytest.approx(1.0, abs=1e-5)
        for pred, p in expected.items():
            assert table[gold][pred] == pytest.approx(p, abs=1e-6)
    with open(path, newline="") as handle:
        rows = {r["gold"]: r for r in csv.DictReader(handle)}
    assert int(rows["salutation"]["row_count"]) == 3
    assert int(rows["signoff"]["row_count"]) == 0


# ---------------------------------------------------------------------------------------------------
# Draws follow the confusion table


def _label_draws(example, code_table, sub_table, n, **config):
    counts = Counter()
    for seed in range(n):
        record = make_preference_record(example, code_table, sub_table,
                                        PairConfig(seed=seed, strategies=("label",), **config))
        (annotation,) = parse_output(record.rejected[0]).annotations
        counts[annotation.label] += 1
    return counts


def test_code_confusion_draw_follows_table_restricted_to_direction():
    code_table, sub_table = _empty_tables()
    code_table.add(SDOH, SEB, 3)
    code_table.add(SDOH, CCP, 1)
    code_table.add(SDOH, "PartnershipProvider", 5)  # not allowed for a patient message: never drawn
    sub_table.add("EconomicStability", "HealthCareAccessAndQuality", 1)
    example = Example("x", "N", "I cannot pay my rent.", (Annotation(SDOH, "EconomicStability", "pay my rent"),))
    n = 2000
    counts = _label_draws(example, code_table, sub_table, n, subcode_confusion_prob=0.0)
    # Renormalised over the allowed alternatives: SEB 3/4, CCP 1/4 (both have no sub-code -> "None").
    # Tolerance 0.04 is 4 binomial standard deviations (sqrt(0.75 * 0.25 / 2000) = 0.0097).
    assert set(counts) == {(SEB, "None"), (CCP, "None")}
    assert counts[(SEB, "None")] / n == pytest.approx(0.75, abs=0.04)


def test_subcode_confusion_draw_follows_table_within_code():
    code_table, sub_table = _empty_tables()
    sub_table.add("salutation", "signoff", 2)
    sub_table.add("salutation", "connection", 1)
    sub_table.add("salutation", "MakeDecision", 9)  # not a PartnershipPatient sub-code: never drawn
    example = Example("y", "N", "Hello doctor, thanks.", (Annotation(PP, "salutation", "Hello doctor"),))
    n = 1500
    counts = _label_draws(example, code_table, sub_table, n, subcode_confusion_prob=1.0)
    assert set(counts) == {(PP, "signoff"), (PP, "connection")}
    # 2/3 with tolerance 0.05 = 4 standard deviations (sqrt(2/9 / 1500) = 0.012)
    assert counts[(PP, "signoff")] / n == pytest.approx(2 / 3, abs=0.05)


def test_code_change_redraws_invalid_subcode_from_its_row():
    code_table, sub_table = _empty_tables()
    code_table.add(PP, SDOH, 1)
    sub_table.add("salutation", "EducationAccessAndQuality", 1)
    example = Example("z", "N", "Hi there, my school bill is due.", (Annotation(PP, "salutation", "Hi there"),))
    counts = _label_draws(example, code_table, sub_table, 50, subcode_confusion_prob=0.0)
    assert counts == {(SDOH, "EducationAccessAndQuality"): 50}


def test_unseen_row_is_uniform_over_valid_alternatives():
    code_table, sub_table = _empty_tables()
    example = Example("u", "Y", "See you soon.", (Annotation(SEB, "None", "See you soon"),))
    counts = _label_draws(example, code_table, sub_table, 800)
    codes = Counter(code for code, _ in counts.elements())
    alternatives = set(codes_for_direction("Y")) - {SEB}
    assert set(codes) == alternatives  # 4 alternatives, each 1/4; 4 sd of sqrt(3/16/800) = 0.061
    for code in alternatives:
        assert codes[code] / 800 == pytest.approx(0.25, abs=0.061)


# ---------------------------------------------------------------------------------------------------
# Every rejected output is schema-valid, canonical, verbatim, different


@pytest.fixture(scope="module")
def corpus():
    return list(default_corpus(n=80, seed=0))


@pytest.fixture(scope="module")
def tables(corpus):
    # A confusion table from a "model" that swaps labels of every third example and drops others.
    golds, preds = [], []
    for k, ex in enumerate(corpus[:40]):
        golds.append(ex.annotations)
        pred = list(ex.annotations)
        if k % 3 == 0 and pred:
            first = pred[0]
            code = next(c for c in codes_for_direction(ex.direction) if c != first.code)
            pred[0] = Annotation(code, valid_subcodes(code)[0], first.span)
        elif k % 3 == 1:
            pred = pred[1:]
        preds.append(pred)
    return confusion_tables(golds, preds)


def _rejected_triples(text):
    result = parse_output(text)
    assert result.strict and not result.errors
    assert serialize(result.annotations) == text  # the chosen's canonical JSON style
    return result.annotations


def test_rejected_outputs_are_schema_valid(corpus, tables):
    records = make_preference_records(corpus, *tables, PairConfig(seed=3))
    by_id = {ex.id: ex for ex in corpus}
    assert {r.id for r in records} == {ex.id for ex in corpus}  # every example gets at least 'extra'
    for record in records:
        ex = by_id[record.id]
        assert record.chosen == serialize(ex.annotations)
        assert (record.direction, record.message) == (ex.direction, ex.message)
        assert len(record.strategies) == len(record.rejected) <= 3
        assert len(set(record.rejected)) == len(record.rejected)
        for text in record.rejected:
            triples = _rejected_triples(text)
            assert text != record.chosen and set(triples) != set(ex.annotations)
            for a in triples:
                assert is_valid_pair(a.code, a.subcode)
                assert code_allowed(a.code, ex.direction)
                assert a.span and a.span in ex.message


def test_each_strategy_changes_exactly_what_it_says(corpus, tables):
    records = make_preference_records(corpus, *tables, PairConfig(seed=5))
    by_id = {ex.id: ex for ex in corpus}
    seen = Counter()
    for record in records:
        gold = list(by_id[record.id].annotations)
        if not gold:
            assert record.strategies == ("extra",)
        for strategy, text in zip(record.strategies, record.rejected):
            triples = _rejected_triples(text)
            seen[strategy] += 1
            if strategy == "missing":
                assert len(gold) >= 2 and len(triples) == len(gold) - 1
                assert sum((Counter(gold) - Counter(triples)).values()) == 1
                assert not Counter(triples) - Counter(gold)
            elif strategy == "extra":
                assert len(triples) == len(gold) + 1
                assert [t for t in triples if t in gold] == gold  # gold order kept, one triple inserted
            else:
                assert len(triples) == len(gold)
                changed = [(g, t) for g, t in zip(gold, triples) if g != t]
                assert len(changed) == 1
                g, t = changed[0]
                assert t.span == g.span and t.label != g.label
    assert all(seen[s] > 0 for s in ("label", "missing", "extra"))


def test_single_triple_gets_no_missing():
    example = Example("one", "N", "Hi doc.", (Annotation(PP, "salutation", "Hi doc"),))
    record = make_preference_record(example, *_empty_tables())
    assert record.strategies == ("label", "extra")


def test_message_without_words_and_no_triples_gets_no_record():
    example = Example("blank", "N", "...", ())
    assert make_preference_record(example, *_empty_tables()) is None
    assert make_preference_record(Example("e", "N", "ok thanks", ()), *_empty_tables(),
                                  PairConfig(include_empty=False)) is None


def test_reproducible_and_seed_dependent(corpus, tables):
    first = [r.to_dict() for r in make_preference_records(corpus, *tables, PairConfig(seed=11))]
    again = [r.to_dict() for r in make_preference_records(corpus, *tables, PairConfig(seed=11))]
    other = [r.to_dict() for r in make_preference_records(corpus, *tables, PairConfig(seed=12))]
    assert first == again
    assert first != other
    # Per-(example, strategy) generators: dropping a strategy leaves the others' outputs unchanged.
    only_extra = make_preference_records(corpus, *tables, PairConfig(seed=11, strategies=("extra",)))
    extra_of = {r["id"]: r["rejected"][r["strategies"].index("extra")] for r in first if "extra" in r["strategies"]}
    assert {r.id: r.rejected[0] for r in only_extra} == extra_of


def test_repeated_strategy_gives_more_draws(corpus, tables):
    config = PairConfig(seed=2, strategies=("label", "label", "label"))
    records = make_preference_records(corpus, *tables, config)
    assert max(len(r.rejected) for r in records) == 3
    assert all(set(r.strategies) == {"label"} for r in records)


def test_config_validation():
    with pytest.raises(ValueError, match="strategies"):
        PairConfig(strategies=("swap",))
    with pytest.raises(ValueError, match="extra_span_words"):
        PairConfig(extra_span_words=(3, 2))
    with pytest.raises(ValueError, match="subcode_confusion_prob"):
        PairConfig(subcode_confusion_prob=1.5)


# ---------------------------------------------------------------------------------------------------
# Command line, end to end with --predictions


def _write_predictions(path, ids_outputs):
    path.write_text("".join(json.dumps({"id": i, "output": o}) + "\n" for i, o in ids_outputs))


def test_main_with_predictions(tmp_path, corpus, capsys):
    train, val = corpus[:30], corpus[30:50]
    write_examples(tmp_path / "train.jsonl", train)
    write_examples(tmp_path / "val.jsonl", val)
    # The "model" predicts every validation message's gold, except one relabelled code per odd message.
    outputs, golds, preds = [], [], []
    for k, ex in enumerate(val):
        pred = list(ex.annotations)
        if k % 2 and pred:
            alt = next(c for c in codes_for_direction(ex.direction) if c not in {a.code for a in pred}
                       and c in (SEB, "CareCoordinationPatient", "CareCoordinationProvider"))
            pred[0] = Annotation(alt, "None", pred[0].span)
        outputs.append((ex.id, serialize(pred)))
        golds.append(ex.annotations)
        preds.append(pred)
    _write_predictions(tmp_path / "preds.jsonl", outputs)
    out = tmp_path / "out" / "prefs.jsonl"
    code = main(["--train", str(tmp_path / "train.jsonl"), "--val", str(tmp_path / "val.jsonl"),
                 "--predictions", str(tmp_path / "preds.jsonl"), "--out", str(out), "--seed", "7",
                 "--strategies", "label", "extra"])
    assert code == 0
    records, problems = load_preferences(out)
    assert not problems
    expected_tables = confusion_tables(golds, preds)
    expected = make_preference_records(train, *expected_tables, PairConfig(seed=7, strategies=("label", "extra")))
    assert [r.to_dict() for r in records] == [r.to_dict() for r in expected]
    written = read_confusion_csv(out.parent / "confusion_code.csv")
    for gold in CODES:
        for pred, p in expected_tables[0].row(gold).items():
            assert written[gold][pred] == pytest.approx(p, abs=1e-6)
    assert (out.parent / "confusion_subcode.csv").is_file()
    printed = capsys.readouterr().out
    for ex in train + val:
        assert ex.message not in printed


def test_main_refuses_mismatched_ids(tmp_path, corpus, capsys):
    val = corpus[:3]
    write_examples(tmp_path / "val.jsonl", val)
    write_examples(tmp_path / "train.jsonl", corpus[3:6])
    _write_predictions(tmp_path / "preds.jsonl", [(val[0].id, "{}"), ("ghost", "{}")])
    code = main(["--train", str(tmp_path / "train.jsonl"), "--val", str(tmp_path / "val.jsonl"),
                 "--predictions", str(tmp_path / "preds.jsonl"), "--out", str(tmp_path / "p.jsonl")])
    assert code == 2
    err = capsys.readouterr().err
    assert "have no prediction" in err and repr(val[1].id) in err
    assert "'ghost'" in err and "not in" in err
    assert not (tmp_path / "p.jsonl").exists()


def _pairs_files(tmp_path, corpus):
    write_examples(tmp_path / "train.jsonl", corpus[:20])
    write_examples(tmp_path / "val.jsonl", corpus[20:30])
    _write_predictions(tmp_path / "preds.jsonl", [(ex.id, serialize(ex.annotations)) for ex in corpus[20:30]])
    return ["--train", str(tmp_path / "train.jsonl"), "--val", str(tmp_path / "val.jsonl"),
            "--predictions", str(tmp_path / "preds.jsonl")]


def test_main_flags_and_config_file_share_the_pair_keys(tmp_path, corpus):
    base = _pairs_files(tmp_path, corpus)
    flags = tmp_path / "flags.jsonl"
    assert main([*base, "--out", str(flags), "--strategies", "label", "label", "missing", "extra", "--seed", "1",
                 "--no-include-empty", "--extra-span-words", "2", "4", "--smoothing=0.5"]) == 0
    expected = PairConfig(seed=1, strategies=("label", "label", "missing", "extra"), include_empty=False,
                          extra_span_words=(2, 4), smoothing=0.5)
    # The same settings from a --config file whose pairs block is the trainer's pairs section.
    config = tmp_path / "pairs.yaml"
    config.write_text("pairs:\n  seed: 1\n  strategies: [label, label, missing, extra]\n  include_empty: false\n"
                      "  extra_span_words: [2, 4]\n  smoothing: 0.5\n")
    from_file = tmp_path / "file.jsonl"
    assert main([*base, "--config", str(config), "--out", str(from_file)]) == 0
    records, _ = load_preferences(flags)
    assert [r.to_dict() for r in records] == [r.to_dict() for r in load_preferences(from_file)[0]]
    golds = [ex.annotations for ex in corpus[20:30]]
    tables = confusion_tables(golds, golds)  # the predictions are the gold outputs
    assert [r.to_dict() for r in records] == \
        [r.to_dict() for r in make_preference_records(corpus[:20], *tables, expected)]


@pytest.mark.parametrize("extra, message", [
    (["--strategies", "swap"], "pairs.strategies: must be a non-empty list"),
    (["--seeds", "1"], "seeds: unknown key; did you mean"),
    (["--model", "m"], "predictions: cannot be combined with --model"),
    (["--adapter", "a"], "adapter: needs --model"),
    (["--batch-size", "0", "--model", "m", "--predictions", "none"], "generation.batch_size: must be >= 1, got 0"),
])
def test_main_refuses_bad_options_with_the_key(tmp_path, corpus, capsys, extra, message):
    out = tmp_path / "p.jsonl"
    with pytest.raises(SystemExit) as info:
        main([*_pairs_files(tmp_path, corpus), "--out", str(out), *extra])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err and err.count("\n") == 2  # one error line and the --help hint
    assert not out.exists()


def test_main_requires_out_and_lists_exit_codes(tmp_path, corpus, capsys):
    with pytest.raises(SystemExit) as info:
        main(_pairs_files(tmp_path, corpus))
    assert info.value.code == 2 and "error: out: is required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "exit status:" in text and "  2    " in text and "alias --no-include-empty" not in text
    assert "--pairs.include_empty True" in text and "alias --include-empty" in text
