"""The data command line (python -m pvfast.data validate / convert): refusal, skipping, layouts."""

import json
import subprocess
import sys
from collections import Counter

import pytest

from pvfast.data import io
from pvfast.data.__main__ import EXIT_INVALID_DATA, main
from pvfast.data.jsonfmt import serialize
from pvfast.data.records import Annotation

MESSAGE = "Umbrella orchid: my insurance dropped me, can you call the pharmacy?"
SPAN = "my insurance dropped me"
PROVIDER_MESSAGE = "Good morning Tobias, I will call the pharmacy today."
SECRETS = ("Umbrella", "orchid", "insurance", "Tobias")


def rows():
    return [
        {"id": "a", "direction": "N", "message": MESSAGE, "annotations": [
            {"Code": "SDOH", "Sub-code": "HealthCareAccessAndQuality", "Span": SPAN},
            {"Code": "CareCoordinationPatient", "Sub-code": "None", "Span": "can you call the pharmacy?"}]},
        {"id": "b", "direction": "Y", "message": PROVIDER_MESSAGE, "annotations": [
            {"Code": "PartnershipProvider", "Sub-code": "salutation", "Span": "Good morning Tobias"}]},
        {"id": "c", "direction": "Y", "message": PROVIDER_MESSAGE, "annotations": [
            {"Code": "CareCoordinationProvider", "Sub-code": "None", "Span": "I will call the pharmacy today."}]},
    ]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def bad_file(tmp_path):
    records = rows()
    records[1]["annotations"][0]["Span"] = "Good evening Tobias"  # not in the message
    return write_jsonl(tmp_path / "bad.jsonl", records)


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pvfast.data", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_convert_refuses_bad_file_and_writes_nothing(tmp_path):
    bad = bad_file(tmp_path)
    out = tmp_path / "out" / "out.jsonl"
    proc = run_cli("convert", bad, out, cwd=tmp_path)
    assert proc.returncode == EXIT_INVALID_DATA
    assert f"{bad}:2: annotations[0].Span: span (19 chars) not found verbatim" in proc.stderr
    assert not out.exists()
    for secret in SECRETS:
        assert secret not in proc.stderr + proc.stdout


def test_convert_skip_invalid_writes_only_good_records(tmp_path):
    bad = bad_file(tmp_path)
    out = tmp_path / "out.jsonl"
    proc = run_cli("convert", bad, out, "--skip-invalid", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"skipped: {bad}:2: annotations[0].Span" in proc.stderr
    assert "wrote 2 records" in proc.stdout
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    expected = [r for r in rows() if r["id"] != "b"]
    assert written == expected
    for secret in SECRETS:
        assert secret not in proc.stderr + proc.stdout


def test_validate_summarises_a_good_file(tmp_path, capsys):
    path = write_jsonl(tmp_path / "good.jsonl", rows())
    assert main(["validate", str(path)]) == 0
    directions = Counter(r["direction"] for r in rows())
    n_annotations = sum(len(r["annotations"]) for r in rows())
    out = capsys.readouterr().out
    assert (f"{path}: {len(rows())} valid examples ({directions['Y']} provider->patient, "
            f"{directions['N']} patient->provider), {n_annotations} annotations") in out


def test_validate_refuses_and_skips(tmp_path, capsys):
    bad = bad_file(tmp_path)
    assert main(["validate", str(bad)]) == EXIT_INVALID_DATA
    err = capsys.readouterr().err
    assert err.startswith("error: 1 problem:") and f"{bad}:2: annotations[0].Span" in err
    assert main(["validate", str(bad), "--skip-invalid"]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 invalid record(s)" in captured.err
    assert f"{bad}: 2 valid examples" in captured.out


def test_missing_and_malformed_files_exit_2(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    assert main(["validate", str(missing)]) == EXIT_INVALID_DATA
    assert f"{missing}: no such file or directory" in capsys.readouterr().err
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(rows()[0]) + "\n{not json\n")
    out = tmp_path / "o.jsonl"
    assert main(["convert", str(broken), str(out)]) == EXIT_INVALID_DATA
    assert f"{broken}:2: malformed JSON" in capsys.readouterr().err
    assert not out.exists()


def test_convert_published_dataset_to_jsonl(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    query = ("Instructions...\nINPUT: TO_PAT_YN: N  (Speaker: Patient speaking TO provider)\n"
             f"Context: {MESSAGE}\n\n\nOUTPUT:")
    answer = serialize([Annotation("SDOH", "HealthCareAccessAndQuality", SPAN)])
    directory = tmp_path / "published"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"query": [query], "answer": [answer]})}
                         ).save_to_disk(str(directory))
    out = tmp_path / "train.jsonl"
    assert main(["convert", f"{directory}::train", str(out)]) == 0
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert written == [{"id": "published-train-0", "direction": "N", "message": MESSAGE,
                        "annotations": [{"Code": "SDOH", "Sub-code": "HealthCareAccessAndQuality",
                                         "Span": SPAN}]}]
    capsys.readouterr()


def test_convert_trl_preferences_then_validate(tmp_path, capsys):
    chosen = serialize([Annotation("SDOH", "HealthCareAccessAndQuality", SPAN)])
    rejected = [serialize([Annotation("SDOH", "EconomicStability", SPAN)]), serialize([])]
    trl = write_jsonl(tmp_path / "trl.jsonl", [{"prompt": "P", "chosen": chosen, "rejected": r} for r in rejected])
    out = tmp_path / "prefs.jsonl"
    assert main(["convert", str(trl), str(out), "--kind", "preference"]) == 0
    assert "wrote 1 records" in capsys.readouterr().out
    records, _ = io.load_preferences(out)
    assert [(r.prompt, r.chosen, r.rejected) for r in records] == [("P", chosen, tuple(rejected))]
    assert main(["validate", str(out), "--kind", "preference"]) == 0
    assert f"{out}: 1 valid preference records, 2 pairs" in capsys.readouterr().out


# --- validate with the trainer's tokenizer and budgets (issue 10 item 7) ------------------------------


def test_validate_with_the_trainers_tokenizer_names_records_that_can_never_fit(tmp_path, capsys):
    from pvfast.model.tiny import load_tiny_tokenizer

    tokenizer = load_tiny_tokenizer("qwen2")  # the tiny preset's model
    template = tmp_path / "short.txt"
    template.write_text("Direction: {direction}\nMessage: {message}", encoding="utf-8")
    records = rows()
    long_message = " ".join(["Umbrella orchid pharmacy."] * 120)  # a prompt far over the budget below
    records[1] = {"id": "b", "direction": "N", "message": long_message, "annotations": []}
    spans = ["Umbrella", "orchid", "my insurance", "dropped me", "call the pharmacy", "can you call"]
    records[2] = {"id": "c", "direction": "N", "message": MESSAGE, "annotations": [
        {"Code": "CareCoordinationPatient", "Sub-code": "None", "Span": s} for s in spans]}
    path = write_jsonl(tmp_path / "lengths.jsonl", records)
    # Independent lengths: the tokenizer on the message and on the completion text.
    def n_tokens(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def completion(record):
        return n_tokens(serialize([Annotation(a["Code"], a["Sub-code"], a["Span"]) for a in record["annotations"]]))

    assert n_tokens(long_message) > 1000 and completion(records[2]) > completion(records[0]) + 20
    cap = completion(records[0]) + 10  # room for record a's end-of-turn tokens, not for record c's completion
    args = ["validate", str(path), "--preset", "tiny", "--template", str(template), "--token-budget", "1000",
            "--max-completion-tokens", str(cap)]
    assert main(args) == EXIT_INVALID_DATA
    err = capsys.readouterr().err
    assert err.startswith("error: 2 problems:")
    prompt_line = next(line for line in err.splitlines() if line.startswith(f"{path}:2: prompt: "))
    assert "--data.truncate cannot help" in prompt_line and "raise data.token_budget" in prompt_line
    completion_line = next(line for line in err.splitlines() if line.startswith(f"{path}:3: completion: "))
    assert f"over data.max_completion_tokens {cap}" in completion_line and "--data.truncate" in completion_line
    assert f"{path}:1:" not in err
    for secret in SECRETS:
        assert secret not in err
    # Truncation fixes the completion, never the prompt.
    assert main([*args, "--truncate"]) == EXIT_INVALID_DATA
    err = capsys.readouterr().err
    assert err.startswith("error: 1 problem:") and f"{path}:2: prompt: " in err
    # Without the long prompt every record fits (truncated where allowed), and it says so.
    assert main([*args, "--truncate", "--token-budget", "4000"]) == 0
    assert "every record fits data.token_budget 4000" in capsys.readouterr().out


def test_validate_reports_how_many_labels_it_normalised_without_their_text(tmp_path, capsys):
    records = rows()
    records[0]["annotations"][0]["Code"] = "sdoh"
    records[1]["annotations"][0]["Sub-code"] = "Salutation"
    assert main(["validate", str(write_jsonl(tmp_path / "case.jsonl", records))]) == 0
    out = capsys.readouterr().out
    assert "normalised 2 labels to their canonical spelling (Code 1, Sub-code 1)" in out
    assert "sdoh" not in out and "Salutation" not in out
