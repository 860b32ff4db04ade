"""``python -m pvfast.evaluate`` end to end: predictions files against hand-computed scores, id checks,
text privacy, and a greedy-generation smoke run with the tiny model."""

import json
import math

import pytest

from pvfast.data.io import write_examples
from pvfast.data.jsonfmt import STOP_TEXT, parse_output, serialize
from pvfast.data.predictions import read_predictions
from pvfast.data.records import Annotation, Example
from pvfast.evaluate import main
from pvfast.model.generation import truncate_at_stop_text

PP, SDOH, SEB = "PartnershipPatient", "SDOH", "SocioEmotionalBehaviour"

EXAMPLES = [
    Example("m1", "N", "Hi, my meds make me worried.", (
        Annotation(PP, "salutation", "Hi"), Annotation(PP, "Clinical Care", "my meds"),
        Annotation(SEB, "None", "worried"))),
    Example("m2", "N", "The clinic is far away and hard to reach.", (
        Annotation(SDOH, "HealthCareAccessAndQuality", "clinic is far away"),)),
    Example("m3", "N", "I cannot pay the rent this month.", (
        Annotation(SDOH, "EconomicStability", "cannot pay the rent"),)),
]

# Seed 0: m1 one right label set with an extra wrong span; m2 truncated output; m3 exact.
SEED0 = {
    "m1": serialize([Annotation(PP, "salutation", "Hi"), Annotation(PP, "Clinical Care", "meds"),
                     Annotation(SDOH, "EconomicStability", "pay")]),
    "m2": '{"results": [{"Code": "SDOH", "Sub-code": "HealthCareAccessAndQuality", "Span": "clinic',
    "m3": serialize(EXAMPLES[2].annotations) + " " + STOP_TEXT,
}
# Seed 1: everything exact, m2 with an unknown code triple besides the right one.
SEED1 = {
    "m1": serialize(EXAMPLES[0].annotations),
    "m2": json.dumps({"results": [EXAMPLES[1].annotations[0].to_dict(),
                                  {"Code": "Mood", "Sub-code": "None", "Span": "far"}]}),
    "m3": serialize(EXAMPLES[2].annotations),
}


def _f1(tp, fp, fn):
    return 2 * tp / (2 * tp + fp + fn)


# Hand-worked counts.
# Seed 0 codes: m1 gold {PP, SEB} pred {PP, SDOH}: TP1 FP1 FN1; m2 gold {SDOH} pred {}: FN1; m3 TP1.
# Seed 0 sub-codes: m1 gold {salutation, Clinical Care} pred {salutation, Clinical Care, EconomicStability}:
#   TP2 FP1; m2 FN1; m3 TP1.
# Seed 0 spans: m1 gold {Hi, my meds, worried} pred {Hi, meds, pay}: Hi-Hi, meds ⊂ my meds -> TP2 FP1 FN1;
#   m2 FN1; m3 TP1.
# Seed 0 format errors: m2 one (truncated), m1/m3 none. Seed 1: m2 one (unknown code).
HAND = {
    0: {"code": (2, 1, 2), "subcode": (3, 1, 1), "span": (3, 1, 2), "format_error_rate": 1 / 3},
    1: {"code": (4, 0, 0), "subcode": (4, 0, 0), "span": (5, 0, 0), "format_error_rate": 1 / 3},
}


def _write_preds(path, outputs):
    path.write_text("".join(json.dumps({"id": i, "output": o}) + "\n" for i, o in outputs.items()))
    return str(path)


@pytest.fixture
def files(tmp_path):
    data = write_examples(tmp_path / "gold.jsonl", EXAMPLES)
    return str(data), _write_preds(tmp_path / "seed0.jsonl", SEED0), _write_preds(tmp_path / "seed1.jsonl", SEED1)


def test_hand_outputs_parse_as_assumed():
    assert parse_output(SEED0["m2"]).errors and not parse_output(SEED0["m2"]).annotations
    assert parse_output(SEED0["m3"]).annotations == list(EXAMPLES[2].annotations)
    assert parse_output(SEED1["m2"]).n_format_errors == 1


def test_predictions_mode_matches_hand_computed(files, tmp_path, capsys):
    data, seed0, seed1 = files
    out = tmp_path / "report.json"
    assert main(["--data", data, "--predictions", seed0, seed1, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [run["source"] for run in report["runs"]] == [seed0, seed1]
    for k, run in enumerate(report["runs"]):
        scores = run["report"]
        assert scores["n_messages"] == 3
        for level in ("code", "subcode", "span"):
            tp, fp, fn = HAND[k][level]
            assert (scores[level]["tp"], scores[level]["fp"], scores[level]["fn"]) == (tp, fp, fn)
            assert scores[level]["precision"] == pytest.approx(tp / (tp + fp))
            assert scores[level]["recall"] == pytest.approx(tp / (tp + fn))
            assert scores[level]["f1"] == pytest.approx(_f1(tp, fp, fn))
        assert scores["format_error_rate"] == pytest.approx(HAND[k]["format_error_rate"])
    # Seed 0 per-class: SDOH TP1 (m3) FP1 (m1) FN1 (m2) -> F1 1/2; SEB only missed -> 0.
    assert report["runs"][0]["report"]["per_class_code"][SDOH]["f1"] == pytest.approx(0.5)
    assert report["runs"][0]["report"]["per_class_code"][SEB]["f1"] == 0.0
    # mean ± sample std over the two files
    values = [_f1(*HAND[0]["span"]), _f1(*HAND[1]["span"])]
    mean = sum(values) / 2
    std = math.sqrt(sum((v - mean) ** 2 for v in values))  # n - 1 = 1
    assert report["aggregate"]["span.f1"]["mean"] == pytest.approx(mean)
    assert report["aggregate"]["span.f1"]["std"] == pytest.approx(std)
    printed = capsys.readouterr().out
    span_line = next(line for line in printed.splitlines() if line.startswith("span"))
    assert f"{100 * mean:.2f}" in span_line and f"{100 * std:.2f}" in span_line
    for ex in EXAMPLES:
        assert ex.message not in printed
        for a in ex.annotations:
            assert repr(a.span) not in printed


def test_show_text_prints_wrong_messages_only(files, capsys):
    data, seed0, _ = files
    assert main(["--data", data, "--predictions", seed0, "--show-text"]) == 0
    printed = capsys.readouterr().out
    assert EXAMPLES[0].message in printed and EXAMPLES[1].message in printed
    assert EXAMPLES[2].message not in printed  # m3 was exactly right


def test_missing_and_unknown_ids_are_errors(files, tmp_path, capsys):
    data, _, _ = files
    partial = _write_preds(tmp_path / "partial.jsonl", {"m1": SEED1["m1"], "m9": "{}"})
    assert main(["--data", data, "--predictions", partial]) == 2
    err = capsys.readouterr().err
    assert partial in err and data in err
    assert "2 id(s)" in err and "'m2'" in err and "'m3'" in err and "have no prediction" in err
    assert "'m9'" in err and "not in" in err


def test_bad_predictions_file_names_the_line(files, tmp_path, capsys):
    data, _, _ = files
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "m1", "output": "{}"}) + "\n" + "{not json\n"
                   + json.dumps({"id": "m1", "output": "{}"}) + "\n")
    assert main(["--data", data, "--predictions", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "malformed JSON" in err
    assert f"{bad}:3: id: duplicate id 'm1' (first on line 1)" in err


@pytest.mark.parametrize("flag", [["--adapter", "somewhere"], ["--limit", "2"], ["--save-predictions", "p.jsonl"]])
def test_generation_only_flags_need_a_model(files, flag, capsys):
    data, seed0, _ = files
    with pytest.raises(SystemExit) as info:
        main(["--data", data, "--predictions", seed0, *flag])
    assert info.value.code == 2
    key = flag[0].removeprefix("--").replace("-", "_")
    assert f"error: {key}: needs --model (it only applies when generating)" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--predictions", "p.jsonl"], "data: is required"),
    (["--data", "d.jsonl"], "predictions: is required unless --model is given"),
    (["--data", "d.jsonl", "--predictions", "p.jsonl", "--model", "m"], "predictions: cannot be combined with --model"),
    (["--data", "d.jsonl", "--model", "m", "--adapter", "a", "b", "--save-predictions", "x"],
     "save_predictions: needs one file per run (2), got 1"),
    (["--data", "d.jsonl", "--model", "m", "--limit", "0"], "limit: must be >= 1 or None, got 0"),
    (["--data", "d.jsonl", "--model", "m", "--dtype", "bf16"], "dtype: expected one of 'auto', 'float32', "),
    (["--data", "d.jsonl", "--predictions", "p.jsonl", "--dedup-span"], "dedup_span: unknown key; did you mean "
                                                                         "'dedup_spans'?"),
])
def test_refused_options_name_the_key(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert f"error: {message}" in capsys.readouterr().err


def test_config_file_and_flags(files, tmp_path, capsys):
    data, seed0, seed1 = files
    config = tmp_path / "eval.yaml"
    config.write_text(f"data: {data}\npredictions: [{seed0}, {seed1}]\ndedup_spans: true\n")
    out = tmp_path / "r.json"
    assert main(["--config", str(config), "--no-dedup-spans", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["dedup_spans"] is False and len(report["runs"]) == 2
    assert [r["source"] for r in report["runs"]] == [seed0, seed1]


def test_help_lists_keys_and_exit_codes(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m pvfast.evaluate")
    assert "--generation.max_new_tokens 1024" in text and "alias --max-new-tokens" in text
    assert "exit status:" in text and "  2    " in text
    with pytest.raises(SystemExit):
        main(["--data", "d.jsonl", "--max-new-tokens", "16", "--help-keys"])
    assert "--generation.max_new_tokens 16  (default 1024)" in capsys.readouterr().out


def test_truncate_at_stop_text():
    assert truncate_at_stop_text('{"results": []} JSON_END trailing JSON_END') == '{"results": []} JSON_END'
    assert truncate_at_stop_text("no stop") == "no stop"


# ---------------------------------------------------------------------------------------------------
# Generation with the tiny random model (generation itself is tested in tests/test_generation.py)


@pytest.mark.slow
def test_generate_mode_smoke(files, tmp_path, capsys):
    from pvfast.model.tiny import tiny_model_dir

    data, _, _ = files
    saved, out = tmp_path / "gen.jsonl", tmp_path / "gen-report.json"
    code = main(["--data", data, "--model", str(tiny_model_dir("qwen2")), "--limit", "2", "--batch-size", "2",
                 "--max-new-tokens", "8", "--save-predictions", str(saved), "--out", str(out)])
    assert code == 0
    outputs = read_predictions(saved)
    assert list(outputs) == ["m1", "m2"]
    report = json.loads(out.read_text())["runs"][0]["report"]
    assert report["n_messages"] == 2
    parsed = [parse_output(outputs[i]) for i in ("m1", "m2")]
    assert report["format_errors"] == sum(p.n_format_errors for p in parsed)
    assert report["format_error_rate"] == pytest.approx(sum(p.n_format_errors > 0 for p in parsed) / 2)
