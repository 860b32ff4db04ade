"""Fault injection on the tiny model (CPU): kills, damaged checkpoints, a full disk, bad inputs, a huge learning rate.

The kills are real SIGKILLs of a ``python -m pvfast.train`` subprocess at named moments (the ``PVFAST_FAULT``
hook of :mod:`pvfast.train.faults`: the process kills itself exactly there, no timing guesses); after each,
``--run.resume`` must finish the run with the adapter of an uninterrupted run, bit for bit. Refusals must leave
the output folder exactly as it was, and every expected failure must end with one ``error:`` line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pvfast.train import errors, layout
from pvfast.train import recipe as train
from pvfast.train.checkpoint import find_resume_checkpoint, verify_checkpoint
from pvfast.train.faults import ENV_VAR

SHORT_TEMPLATE = "Direction: {direction}\nMessage: {message}"
STEPS = 3  # per stage


def base_args(root: Path, out: str) -> list[str]:
    template = root / "template.txt"
    template.write_text(SHORT_TEMPLATE, encoding="utf-8")
    return ["--preset", "tiny", "--data.synthetic_n", "20", "--data.template", str(template),
            "--data.token_budget", "1024", "--optim.max_steps", str(STEPS), "--run.save_every", "1",
            "--run.evaluate", "false", "--run.eval_max_new_tokens", "24", "--run.output_dir", str(root / out)]


def run_cli(args: list[str], fault: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop(ENV_VAR, None)
    if fault is not None:
        env[ENV_VAR] = fault
    return subprocess.run([sys.executable, "-m", "pvfast.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


def adapter(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(out_dir / layout.ADAPTER_DIR / "adapter_model.safetensors")


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the sha256 of its bytes (and every folder, empty or not)."""
    return {p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "/")
            for p in sorted(folder.rglob("*"))}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def hidden_temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith((".tmp-", ".trash-"))]


FIGURES: dict[str, list[int]] = {}  # name -> [tried, passed], for the issue note


def count(name: str, ok: bool) -> None:
    tried, passed = FIGURES.setdefault(name, [0, 0])
    FIGURES[name] = [tried + 1, passed + int(ok)]


@pytest.fixture(scope="module", autouse=True)
def report_figures(request):
    """After the module: the figures of this session (shown with -s)."""
    yield
    print("".join(f"\nfault injection: {name}: {passed}/{tried}" for name, (tried, passed) in FIGURES.items()))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The pipeline (SFT then TAB-PO, pairs mined from the SFT model) without any fault."""
    root = tmp_path_factory.mktemp("uninterrupted")
    proc = run_cli(["pipeline", *base_args(root, "run")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


# --------------------------------------------------------------------------------------------------
# Kills: SIGKILL at named moments, resume, compare bitwise
# --------------------------------------------------------------------------------------------------

# Each kill is followed by a resume that is itself killed at the next moment, so one chain of short
# processes covers every moment at the cost of about one run. The counts are calls within that process.
KILLS = [
    ("sft.step@2:kill", "SFT, inside step 2 (after its backward, before the update)"),
    ("checkpoint.write@2:kill", "SFT, between the files and the manifest of the step-3 checkpoint"),
    ("adapter.write:kill", "SFT, writing the final adapter"),
    ("merge.write:kill", "PO, writing the SFT model merged into the base (sft_merged/)"),
    ("pairs.generate:kill", "PO, after the pair-mining generation, before any pair file"),
    ("po.step@2:kill", "PO, inside step 2"),
    ("checkpoint.write@2:kill", "PO, between the files and the manifest of the step-3 checkpoint"),
    ("adapter.write:kill", "PO, writing the final adapter"),
]


@pytest.mark.slow
def test_sigkill_at_every_named_moment_then_resume_ends_bitwise_equal(uninterrupted, tmp_path):
    args = ["pipeline", *base_args(tmp_path, "run"), "--run.resume"]
    out = tmp_path / "run"
    for fault, moment in KILLS:
        proc = run_cli(args, fault)
        killed = proc.returncode == -signal.SIGKILL
        count("kills tried / survived", killed)
        assert killed, f"{fault} ({moment}) did not kill the run: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    # A kill during a metrics append leaves a torn last line: the resume drops it with a warning.
    metrics = out / "po" / layout.METRICS_FILE
    with metrics.open("a", encoding="utf-8") as handle:
        handle.write('{"step": 9, "lo')
    assert hidden_temporaries(out)  # the kills left temporaries behind (the next start removes them)
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"warning: {metrics}: line" in proc.stderr and "dropped" in proc.stderr
    assert not hidden_temporaries(out)
    for stage in ("sft", "po"):
        equal = bitwise_equal(adapter(out / stage), adapter(uninterrupted / stage))
        count("kills bitwise-equal (per stage adapter)", equal)
        assert equal, stage
    # The logged PO steps are those of the uninterrupted run.
    steps = [json.loads(line) for line in metrics.read_text().splitlines()]
    reference = [json.loads(line) for line in (uninterrupted / "po" / layout.METRICS_FILE).read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in steps if "step" in r] == \
        [(r["step"], r["loss"]) for r in reference if "step" in r]
    assert (out / "po" / "preferences.jsonl").read_bytes() == (uninterrupted / "po" / "preferences.jsonl").read_bytes()


# --------------------------------------------------------------------------------------------------
# Damaged checkpoints through the trainer
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sft")
    assert train.main(["sft", *base_args(root, "run"), "--run.keep_last", "5"]) == 0
    return root / "run"


def test_damaged_newest_checkpoint_is_reported_and_resume_uses_the_previous_one(sft_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(sft_run, out)
    shutil.rmtree(out / layout.ADAPTER_DIR)  # as if the run had stopped after its last checkpoint
    newest = out / "checkpoints" / f"step-{STEPS:06d}"
    optimizer = newest / "optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the hash can tell
    optimizer.write_bytes(bytes(data))
    assert train.main(["sft", *base_args(tmp_path, "run"), "--run.resume", "--run.keep_last", "5"]) == 0
    said = capsys.readouterr().out
    assert f"warning: not resuming from {newest.name}: {optimizer}: sha256 differs" in said
    assert f"resuming from {newest.parent / f'step-{STEPS - 1:06d}'}" in said
    ok = bitwise_equal(adapter(out), adapter(sft_run))
    count("corruptions through the trainer handled as documented", ok)
    assert ok
    verify_checkpoint(newest)  # rewritten by the resumed run


def test_resume_refuses_to_start_over_when_every_checkpoint_is_damaged(sft_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(sft_run, out)
    for step_dir in (out / "checkpoints").iterdir():
        (step_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    before = snapshot(out)
    status = train.main(["sft", *base_args(tmp_path, "run"), "--run.resume"])
    err = capsys.readouterr().err
    ok = status == errors.EXIT_CHECKPOINT == 4 and len(error_lines(err)) == 1 and snapshot(out) == before
    count("corruptions through the trainer handled as documented", ok)
    assert status == errors.EXIT_CHECKPOINT
    [line] = error_lines(err)
    assert f"{out / 'checkpoints'}: --run.resume was asked but none of its {STEPS} checkpoints is usable" in line
    assert "--run.overwrite" in line
    assert snapshot(out) == before  # nothing written, nothing removed
    assert find_resume_checkpoint(out).path is None


def test_changed_lora_shape_on_resume_is_one_error_line_exit_4(sft_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(sft_run, out)
    status = train.main(["sft", *base_args(tmp_path, "run"), "--run.resume", "--model.lora_r", "4"])
    err = capsys.readouterr().err
    assert status == errors.EXIT_CHECKPOINT
    [line] = error_lines(err)
    assert "adapter_model.safetensors" in line and "shapes" in line and "model.lora_r" in line
    assert "Traceback" not in err


def test_moved_run_folder_resumes_without_a_changed_config_warning(sft_run, tmp_path, capsys, recwarn):
    moved = tmp_path / "moved"
    shutil.copytree(sft_run, moved)
    # The same settings as the run (its template file, its keep_last); only the folder moved.
    same = ["--run.keep_last", "5", "--data.template", str(sft_run.parent / "template.txt")]
    assert train.main(["sft", *base_args(tmp_path, "moved"), *same, "--run.resume"]) == 0
    said = capsys.readouterr()
    assert "changed config" not in said.out + said.err + " ".join(str(w.message) for w in recwarn)
    # A real change is still reported.
    assert train.main(["sft", *base_args(tmp_path, "moved"), *same, "--run.resume", "--optim.weight_decay",
                       "0.5"]) == 0
    assert "changed config: optim.weight_decay" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# A full disk, a permission problem: one line, earlier outputs intact
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault,advice", [("checkpoint.write@2:enospc", "No space left on device; free some space"),
                                          ("adapter.write:eacces", "Permission denied; make the folder writable")])
def test_write_failure_is_one_line_exit_5_and_earlier_checkpoints_are_intact(tmp_path, fault, advice):
    proc = run_cli(["sft", *base_args(tmp_path, "run")], fault)
    out = tmp_path / "run"
    lines = error_lines(proc.stderr)
    ok = proc.returncode == errors.EXIT_WRITE and len(lines) == 1 and "Traceback" not in proc.stderr
    count("write failures: one error line, exit 5", ok)
    assert proc.returncode == errors.EXIT_WRITE == 5, proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert advice in lines[0] and str(out) in lines[0]
    saved = [p for p in (out / "checkpoints").iterdir()]
    assert saved and all(verify_checkpoint(p) for p in saved)  # every checkpoint there verifies in full
    assert not hidden_temporaries(out)
    assert not (out / layout.ADAPTER_DIR).exists()


# --------------------------------------------------------------------------------------------------
# A huge learning rate: never a non-finite checkpoint (issue 10 item 1)
# --------------------------------------------------------------------------------------------------


def test_huge_learning_rate_stops_with_exit_3_and_no_checkpoint_holds_a_non_finite_value(tmp_path, capsys):
    args = ["sft", *base_args(tmp_path, "run"), "--optim.lr", "1e6", "--optim.max_steps", "6",
            "--optim.warmup_ratio", "0"]
    status = train.main(args)
    err = capsys.readouterr().err
    assert status == errors.EXIT_NON_FINITE, err[-2000:]
    [line] = error_lines(err)
    out = tmp_path / "run"
    saved = sorted((out / "checkpoints").iterdir())
    last = int(line.split("the last finite step is ")[1].split(",")[0])
    assert [p.name for p in saved][-1] == f"step-{last:06d}"
    for path in saved:
        weights = load_file(path / "adapter" / "adapter_model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values()), path
        optimizer = torch.load(path / "optimizer.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for s in optimizer["state"].values() for v in s.values()
                   if torch.is_tensor(v) and v.is_floating_point()), path
    assert not (out / layout.ADAPTER_DIR).exists()


# --------------------------------------------------------------------------------------------------
# Refusals leave the output folder exactly as it was (issue 10 item 2)
# --------------------------------------------------------------------------------------------------


def _bad_data(tmp_path: Path, kind: str) -> tuple[list[str], str]:
    """Extra arguments that make the run refuse, and what the one error line must contain."""
    from pvfast.data.synth import default_corpus, split_corpus

    good = split_corpus(default_corpus(20, 0), 0)["train"][0].to_dict()
    path = tmp_path / f"{kind}.jsonl"
    rows = {
        "malformed JSON": '{"id": "x", "direction": "N",, "message": "m"}',
        "unknown code": json.dumps(good | {"annotations": [{"Code": "Nope", "Sub-code": "None",
                                                            "Span": good["message"][:5]}]}),
        "span not in message": json.dumps(good | {"annotations": [{"Code": "SDOH", "Sub-code": "EconomicStability",
                                                                   "Span": "not in there at all"}]}),
        "wrong direction": json.dumps(good | {"direction": "Q"}),
        "missing field": json.dumps({k: v for k, v in good.items() if k != "message"}),
    }
    fields = {"malformed JSON": "malformed JSON", "unknown code": "annotations[0].Code: unknown code",
              "span not in message": "annotations[0].Span", "wrong direction": "direction: wrong direction",
              "missing field": "message: missing field"}
    if kind in rows:
        path.write_text(json.dumps(good) + "\n" + rows[kind] + "\n", encoding="utf-8")
        return ["--data.train", str(path)], f"{path}:2: {fields[kind]}"
    if kind == "prompt over budget":
        path.write_text(json.dumps(good) + "\n" + json.dumps(good | {"id": "long", "message": good["message"] * 80})
                        + "\n", encoding="utf-8")
        return ["--data.train", str(path)], f"{path}:2: prompt: "
    if kind == "completion over cap":
        return ["--data.max_completion_tokens", "8"], "completion: a completion has"
    raise ValueError(kind)


REFUSALS = ["malformed JSON", "unknown code", "span not in message", "wrong direction", "missing field",
            "prompt over budget", "completion over cap", "earlier checkpoints without --run.resume",
            "unknown config key"]


@pytest.mark.parametrize("kind", REFUSALS)
def test_every_refusal_leaves_the_output_folder_exactly_as_it_was(sft_run, tmp_path, kind, capsys):
    out = tmp_path / "run"
    shutil.copytree(sft_run, out)
    before = snapshot(out)
    args = ["sft", *base_args(tmp_path, "run"), "--run.overwrite", "false"]
    if kind == "earlier checkpoints without --run.resume":
        expected = f"{out / 'checkpoints'} holds checkpoints of an earlier run"
    elif kind == "unknown config key":
        args, expected = [*args, "--optim.lrr", "1"], "optim.lrr"
    else:
        extra, expected = _bad_data(tmp_path, kind)
        args = [*args, *extra, "--run.resume"]
    status = train.main(args)
    err = capsys.readouterr().err
    ok = status == errors.EXIT_BAD_INPUT and expected in err and snapshot(out) == before
    count("bad inputs refused (exit 2, file/line/field named, folder unchanged)", ok)
    assert status == errors.EXIT_BAD_INPUT, err[-2000:]
    assert expected in err
    assert snapshot(out) == before


# --------------------------------------------------------------------------------------------------
# metrics.jsonl: a torn last line is dropped with a warning, a bad line elsewhere refused (issue 10 item 3)
# --------------------------------------------------------------------------------------------------


def test_metrics_log_drops_a_torn_last_line_and_refuses_a_bad_line_elsewhere(tmp_path, capsys):
    from pvfast.train.metrics_log import MetricsLog

    lines = [json.dumps({"event": "packing"}), json.dumps({"step": 1, "loss": 2.0}),
             json.dumps({"step": 2, "loss": 1.5})]
    path = tmp_path / layout.METRICS_FILE
    path.write_text("\n".join(lines) + '\n{"step": 3, "lo', encoding="utf-8")  # killed mid-append
    log = MetricsLog(tmp_path, is_main=True)
    assert path.read_text(encoding="utf-8").endswith('"lo')  # creating the log writes nothing
    assert [r["step"] for r in log.steps()] == [1, 2]
    assert f"warning: {path}: line 4 is incomplete" in capsys.readouterr().err
    log.start(resume_step=1)  # keeps the steps the resumed run does not redo; the packing line is rewritten
    assert path.read_text(encoding="utf-8") == lines[1] + "\n"
    # A bad line that is not the last: refused, naming file and line; the file is left as it is.
    path.write_text("\n".join([lines[1], "{oops", lines[2]]) + "\n", encoding="utf-8")
    before = path.read_bytes()
    with pytest.raises(errors.BadInput, match=rf"{path}:2: not a JSON object; only the last line may be incomplete"):
        log.start(resume_step=2)
    assert path.read_bytes() == before
