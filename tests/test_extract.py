"""``python -m pvfast.extract``: input files, run-folder resolution, output records, and the command end to end
on the tiny model with a LoRA adapter saved the way the trainer saves it."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from pvfast.data.io import DataError
from pvfast.data.jsonfmt import serialize
from pvfast.data.records import Annotation, Example
from pvfast.extract import (
    EXIT_BAD_INPUT,
    EXIT_MODEL,
    RunFolderError,
    check_answer,
    main,
    read_messages,
    resolve_model,
    resolve_run,
)
from pvfast.model.tiny import tiny_model_dir

SECRET = "Zanzibarian"  # a word of message text that must never reach stdout/stderr or a problem
MESSAGES = [
    {"id": "m1", "direction": "N", "message": f"Hi Dr. Lee, my {SECRET} sugar was 180 today. Thanks, Ann"},
    {"id": 7, "direction": "Y", "message": f"Dear Ann, please take 5 mg twice a day ({SECRET}). - Nurse Kim"},
    {"id": "m3", "direction": "N", "message": f"I can't pay for the {SECRET} insulin this month.",
     "annotations": [{"Code": "SDOH", "Sub-code": "EconomicStability", "Span": "can't pay"}]},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# ---------------------------------------------------------------------------------------------------
# Input


def test_reads_jsonl_and_csv_in_file_order(tmp_path):
    from_jsonl = read_messages(_jsonl(tmp_path / "m.jsonl", MESSAGES))
    rows = [[m["id"], m["direction"], m["message"]] for m in MESSAGES]
    rows[0][2] = rows[0][2].replace("Thanks", "Thanks,\nsecond line")  # a quoted field over two lines
    from_csv = read_messages(_csv(tmp_path / "m.csv", ["message", "id", "direction"],
                                  [[m, i, d] for i, d, m in rows]))
    assert [e.id for e in from_jsonl] == ["m1", "7", "m3"] == [e.id for e in from_csv]
    assert [e.direction for e in from_csv] == ["N", "Y", "N"]
    assert from_jsonl[1] == Example("7", "Y", MESSAGES[1]["message"])
    assert from_jsonl[2].annotations == ()  # gold fields are ignored
    assert from_csv[0].message == rows[0][2]


def test_bad_jsonl_names_file_line_field_and_never_the_text(tmp_path):
    rows = [MESSAGES[0], {"id": "m1", "direction": "N", "message": "again"},
            {"id": "m2", "direction": f"Patient {SECRET}", "message": "x"}, {"id": "m3", "direction": "y"},
            {"direction": "N", "message": "x"}, {"id": "m5", "direction": "N", "message": "  "}]
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("{not json\n")
    with pytest.raises(DataError) as info:
        read_messages(path)
    text = str(info.value)
    for expected in (f"{path}:2: id: duplicate id (first on line 1)",
                     f"{path}:3: direction: wrong direction value a string of 19 chars",
                     f"{path}:4: direction: wrong direction value 'y'", f"{path}:4: message: missing",
                     f"{path}:5: id: missing", f"{path}:6: message: is empty", f"{path}:7: malformed JSON"):
        assert expected in text
    assert SECRET not in text


def test_bad_csv_is_refused(tmp_path):
    with pytest.raises(DataError, match="the header has no column"):
        read_messages(_csv(tmp_path / "a.csv", ["id", "text"], [["1", "hello"]]))
    path = _csv(tmp_path / "b.csv", ["id", "direction", "message"], [["1", "N", "ok"], ["2", "N", "ok", "extra"],
                                                                      ["3", "X", SECRET]])
    with pytest.raises(DataError) as info:
        read_messages(path)
    assert f"{path}:3: 1 more value(s) than header columns" in str(info.value)
    assert f"{path}:4: direction: wrong direction value 'X'" in str(info.value)
    assert SECRET not in str(info.value)
    with pytest.raises(DataError, match="no such file"):
        read_messages(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        read_messages(tmp_path / "empty.jsonl")


# ---------------------------------------------------------------------------------------------------
# Output records


def test_check_answer_keeps_valid_triples_and_explains_the_rest():
    ex = Example("m", "N", f"My {SECRET} rent is due and I am scared.")
    good = [Annotation("SDOH", "EconomicStability", "rent is due"), Annotation("SocioEmotionalBehaviour", "None",
                                                                                 "scared")]
    record = check_answer(serialize(good), ex)
    assert record == {"id": "m", "results": [a.to_dict() for a in good], "valid": True, "problems": []}

    provider = Annotation("PartnershipProvider", "salutation", "My")
    wrong_span = Annotation("SDOH", "EconomicStability", f"{SECRET} mortgage")
    record = check_answer(serialize([good[0], provider, wrong_span]), ex)
    assert record["results"] == [good[0].to_dict()] and not record["valid"]
    assert record["problems"] == [
        "triple 1: code 'PartnershipProvider' is not used for direction 'N' (dropped)",
        f"triple 2: span ({len(wrong_span.span)} chars) does not occur verbatim in the message (dropped)"]

    spaced = json.dumps({"results": [good[0].to_dict()]}, indent=1)
    record = check_answer(spaced, ex)
    assert record["results"] == [good[0].to_dict()] and not record["valid"]
    assert record["problems"] == ["not the canonical JSON layout (spacing, key order or escapes differ)"]

    record = check_answer(serialize(good)[:-20], ex, stopped=False)
    assert not record["valid"] and record["problems"][-1] == "the answer was cut off at generation.max_new_tokens"
    assert all(SECRET not in p for p in record["problems"])
    assert check_answer(serialize([]) + " JSON_END", ex)["valid"]


# ---------------------------------------------------------------------------------------------------
# Run folders


def _run_config(folder, quant="none", template=None):
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model": {"name_or_path": None, "tiny_arch": "qwen2", "quant": quant}, "data": {"template": template},
              "run": {"output_dir": str(folder)}}
    (folder / "config.json").write_text(json.dumps(config))


def _touch(folder, name):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("{}")


def test_resolve_run_layouts(tmp_path):
    tiny = str(tiny_model_dir("qwen2"))
    # sft run: the config's base model + adapter
    sft = tmp_path / "sft"
    _run_config(sft, quant="nf4", template="t.txt")
    _touch(sft / "adapter", "adapter_config.json")
    spec = resolve_run(sft)
    assert (spec.base, spec.adapter, spec.load_in_4bit, spec.template) == (tiny, str(sft / "adapter"), True, "t.txt")
    # ... and with merge_adapter, the merged model
    _touch(sft / "merged", "config.json")
    assert (resolve_run(sft).base, resolve_run(sft).adapter) == (str(sft / "merged"), None)
    # po run: its SFT-merged base + adapter
    po = tmp_path / "po-run"
    _run_config(po)
    _touch(po / "adapter", "adapter_config.json")
    _touch(po / "sft_merged", "config.json")
    assert (resolve_run(po).base, resolve_run(po).adapter) == (str(po / "sft_merged"), str(po / "adapter"))
    # pipeline: the po stage folder, merged first
    pipe = tmp_path / "pipe"
    _run_config(pipe)
    _touch(pipe / "sft" / "adapter", "adapter_config.json")
    _touch(pipe / "po" / "sft_merged", "config.json")
    with pytest.raises(RunFolderError, match="has not finished.*SFT stage finished"):
        resolve_run(pipe)
    _touch(pipe / "po" / "adapter", "adapter_config.json")
    spec = resolve_run(pipe)
    assert (spec.base, spec.adapter) == (str(pipe / "po" / "sft_merged"), str(pipe / "po" / "adapter"))
    _touch(pipe / "po" / "merged", "config.json")
    assert (resolve_run(pipe).base, resolve_run(pipe).adapter) == (str(pipe / "po" / "merged"), None)
    # a model folder and an adapter folder are used as they are
    assert resolve_run(tiny).base == tiny and resolve_run(tiny).adapter is None
    (po / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": tiny}))
    assert (resolve_run(po / "adapter").base, resolve_run(po / "adapter").adapter) == (tiny, str(po / "adapter"))
    with pytest.raises(RunFolderError, match="not a python -m pvfast.train output folder"):
        resolve_run(tmp_path)
    with pytest.raises(RunFolderError, match="no such directory"):
        resolve_run(tmp_path / "nowhere")
    assert resolve_model(model=tiny).base == tiny


# ---------------------------------------------------------------------------------------------------
# The command end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """An sft-stage run folder as the trainer leaves it: config.json + adapter/ (a LoRA on the tiny model with
    seeded non-zero B, so the adapter changes the outputs)."""
    from pvfast.testing import activate_lora, load_tiny_model

    root = tmp_path_factory.mktemp("run")
    _run_config(root)
    model = activate_lora(load_tiny_model("qwen2", lora=True), std=0.3)
    model.save_pretrained(root / "adapter")
    return root


@pytest.mark.slow
def test_extract_command_end_to_end(tiny_run, tmp_path, capsys):
    from pvfast.extract import extract
    from pvfast.model.generation import load_model_for_generation

    data = _jsonl(tmp_path / "in.jsonl", MESSAGES)
    out = tmp_path / "out.jsonl"
    code = main(["--run", str(tiny_run), "--input", str(data), "--out", str(out), "--max-new-tokens", "48",
                 "--batch-size", "2"])
    assert code == 0
    captured = capsys.readouterr()
    assert "msg/s" in captured.err and SECRET not in captured.out + captured.err
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in records] == ["m1", "7", "m3"]
    assert all(r["valid"] and r["problems"] == [] for r in records)  # constrained: valid by construction
    # the same records as the library on the resolved model (base + adapter, merged as the command does)
    model, tokenizer = load_model_for_generation(str(tiny_model_dir("qwen2")), str(tiny_run / "adapter"), merge=True)
    from pvfast.config.sections import GenerationConfig

    examples = read_messages(data)
    assert records == extract(model, tokenizer, examples, generation=GenerationConfig(max_new_tokens=48),
                              progress=False)
    # unconstrained, the same model writes free text: problems explain it, still no message text printed
    free = tmp_path / "free.jsonl"
    assert main(["--run", str(tiny_run), "--input", str(data), "--out", str(free), "--max-new-tokens", "24",
                 "--no-generation.constrained"]) == 0
    free_records = [json.loads(line) for line in free.read_text(encoding="utf-8").splitlines()]
    assert any(not r["valid"] and r["problems"] for r in free_records)
    assert SECRET not in "".join(capsys.readouterr())


def test_extract_command_refusals(tiny_run, tmp_path, capsys):
    data = _jsonl(tmp_path / "in.jsonl", MESSAGES)
    bad = _jsonl(tmp_path / "bad.jsonl", [{"id": "x", "direction": "Q", "message": SECRET}])
    out = str(tmp_path / "out.jsonl")
    # bad input: refused before any model is looked at (the run folder does not even exist)
    assert main(["--run", str(tmp_path / "nowhere"), "--input", str(bad), "--out", out]) == EXIT_BAD_INPUT
    assert "bad.jsonl:1: direction" in capsys.readouterr().err
    assert main(["--run", str(tmp_path / "nowhere"), "--input", str(data), "--out", out]) == EXIT_BAD_INPUT
    unfinished = tmp_path / "unfinished"
    _run_config(unfinished)
    assert main(["--run", str(unfinished), "--input", str(data), "--out", out]) == EXIT_BAD_INPUT
    assert "has not finished" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir("qwen2"), broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["--model", str(broken), "--input", str(data), "--out", out]) == EXIT_MODEL
    with pytest.raises(SystemExit) as info:
        main(["--input", str(data), "--out", out])
    assert info.value.code == EXIT_BAD_INPUT and "exactly one of --run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--run", str(tiny_run), "--adapter", "a", "--input", str(data), "--out", out])
    assert "adapter: needs --model" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()
