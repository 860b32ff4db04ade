"""``python -m pvfast.train`` end to end on the tiny CPU model: stages, resume, faults.

Most runs call :func:`pvfast.train.recipe.main` in-process with small overrides (a short prompt template so a
pack holds many examples, a 20-message synthetic corpus, a few steps); the no-argument run is a real
subprocess with the bare command a user types.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pvfast.data.io import DataError, load_examples
from pvfast.data.synth import default_corpus, split_corpus
from pvfast.model.tiny import tiny_model_dir
from pvfast.objectives.fused_loss import FusedTokenPOLoss
from pvfast.train import errors, layout, loop
from pvfast.train import recipe as train

SYNTHETIC_N = 20
SHORT_TEMPLATE = "Direction: {direction}\nMessage: {message}"


@pytest.fixture(scope="module", autouse=True)
def tiny_built():
    tiny_model_dir("qwen2")  # build once, outside any timed run


def tiny_args(root: Path, out: str, steps: int = 4) -> list[str]:
    template = root / "template.txt"
    template.write_text(SHORT_TEMPLATE, encoding="utf-8")
    return ["--preset", "tiny", "--data.synthetic_n", str(SYNTHETIC_N), "--data.template", str(template),
            "--data.token_budget", "1024", "--optim.max_steps", str(steps), "--run.evaluate", "false",
            "--run.output_dir", str(root / out)]


def read_metrics(out_dir: Path) -> list[dict]:
    lines = (out_dir / layout.METRICS_FILE).read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if "step" in r]


def adapter_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(out_dir / layout.ADAPTER_DIR / "adapter_model.safetensors")


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------------------------------
# A reference SFT run, shared by the resume tests and the PO tests
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    """Uninterrupted SFT: 4 steps over 2 epochs (the epoch boundary falls inside the run)."""
    root = tmp_path_factory.mktemp("sft")
    assert train.main(["sft", *tiny_args(root, "full"), "--optim.epochs", "2"]) == 0
    return root / "full"


def test_sft_stage_writes_adapter_metrics_plot_and_follows_the_schedule(sft_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert (sft_run / layout.PLOT_FILE).stat().st_size > 0
    assert (sft_run / "config.json").is_file()
    records = read_metrics(sft_run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in records)
    # Warmup ceil(0.1 * 4) = 1 step at lr (0 + 1) / (1 + 1); then cosine over the 3 remaining steps:
    # 0.5 (1 + cos(pi k / 3)) for k = 0, 1, 2, times the tiny preset's peak lr 1e-3.
    expected_lr = [0.5e-3, 1e-3, 0.75e-3, 0.25e-3]
    assert [r["lr"] for r in records] == pytest.approx(expected_lr, rel=1e-12)
    packing = json.loads((sft_run / layout.METRICS_FILE).read_text().splitlines()[0])
    assert packing["event"] == "packing" and packing["tree_tokens"] < packing["unshared_tokens"]
    # PEFT format: loads with PeftModel.from_pretrained, and the trained B matrices moved off zero.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen2"))
    model = PeftModel.from_pretrained(base, sft_run / layout.ADAPTER_DIR)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
    # The final checkpoint holds the same adapter as the adapter directory.
    final = load_file(sft_run / "checkpoints" / "step-000004" / "adapter" / "adapter_model.safetensors")
    assert_bitwise_equal(final, adapter_weights(sft_run))


# --------------------------------------------------------------------------------------------------
# Resume: stopped runs continue to the same weights, bitwise on the CPU
# --------------------------------------------------------------------------------------------------


def test_stop_after_steps_then_resume_matches_uninterrupted_run_bitwise(sft_run, tmp_path):
    args = ["sft", *tiny_args(tmp_path, "split"), "--optim.epochs", "2"]
    assert train.main([*args, "--run.stop_after_steps", "2"]) == 0
    out = tmp_path / "split"
    assert not (out / layout.ADAPTER_DIR).exists()
    assert (out / "checkpoints" / "step-000002" / "COMPLETE").is_file()
    assert train.main([*args, "--run.resume"]) == 0
    assert_bitwise_equal(adapter_weights(out), adapter_weights(sft_run))
    # The resumed steps log the same losses as the uninterrupted run's steps 3 and 4.
    assert [r["loss"] for r in read_metrics(out)] == [r["loss"] for r in read_metrics(sft_run)]


def test_sigterm_saves_a_checkpoint_exits_143_and_resumes_bitwise(sft_run, tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = FusedTokenPOLoss.forward

    def forward_then_signal(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # inside step 3 (one micro-batch per step): the step finishes, then we stop
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, *args, **kwargs)

    args = ["sft", *tiny_args(tmp_path, "signal"), "--optim.epochs", "2"]
    monkeypatch.setattr(FusedTokenPOLoss, "forward", forward_then_signal)
    assert train.main(args) == 128 + signal.SIGTERM
    monkeypatch.setattr(FusedTokenPOLoss, "forward", forward)
    out = tmp_path / "signal"
    assert (out / "checkpoints" / "step-000003" / "COMPLETE").is_file()
    assert not (out / layout.ADAPTER_DIR).exists()
    assert train.main([*args, "--run.resume"]) == 0
    assert_bitwise_equal(adapter_weights(out), adapter_weights(sft_run))


def test_sigterm_outside_training_stops_at_once_with_143(tmp_path, monkeypatch, capsys):
    """A signal during evaluation (minutes of generation) stops the run at once, not after it: the adapter is
    complete, there is nothing to checkpoint, the exit status says which signal."""
    started = {}

    def slow_generation(*args, **kwargs):
        started["t"] = time.perf_counter()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)  # a long evaluation; the signal must cut it short
        raise AssertionError("generation was not interrupted")

    monkeypatch.setattr(train, "generate_completions", slow_generation)
    args = ["sft", *tiny_args(tmp_path, "eval_signal", steps=1), "--run.evaluate", "true"]
    assert train.main(args) == 128 + signal.SIGTERM
    assert time.perf_counter() - started["t"] < 30
    assert (tmp_path / "eval_signal" / layout.ADAPTER_DIR / "adapter_config.json").is_file()
    assert "interrupted: SIGTERM outside a training step" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------------


def test_bad_data_file_is_refused_with_the_data_layer_message_before_any_model(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "train.jsonl"
    good = split_corpus(default_corpus(SYNTHETIC_N, 0), 0)["train"][0]
    bad.write_text(json.dumps({"id": good.id, "direction": "Q", "message": "x", "annotations": []}) + "\n"
                   + "{not json\n", encoding="utf-8")
    with pytest.raises(DataError) as expected:
        load_examples(bad)

    def no_model(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded for a refused data file")

    monkeypatch.setattr(train, "load_model", no_model)
    monkeypatch.setattr(train, "load_tokenizer", no_model)
    status = train.main(["sft", *tiny_args(tmp_path, "bad"), "--data.train", str(bad)])
    assert status == errors.EXIT_BAD_INPUT == 2
    err = capsys.readouterr().err
    assert str(expected.value) in err and str(bad) in err


def test_over_budget_record_is_reported_unless_truncate(tmp_path, capsys):
    args = ["sft", *tiny_args(tmp_path, "long", steps=1), "--data.max_completion_tokens", "8"]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "data.max_completion_tokens 8" in err and "record 'syn-" in err
    assert train.main([*args, "--data.truncate"]) == 0
    packing = json.loads((tmp_path / "long" / layout.METRICS_FILE).read_text().splitlines()[0])
    assert packing["truncated_records"] > 0


def test_non_finite_loss_stops_with_exit_3_naming_step_and_records(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    forward = FusedTokenPOLoss.forward

    def nan_on_second_call(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            out.loss, out.loss_sum = out.loss * float("nan"), out.loss_sum * float("nan")
        return out

    monkeypatch.setattr(FusedTokenPOLoss, "forward", nan_on_second_call)
    args = ["sft", *tiny_args(tmp_path, "nan"), "--run.save_every", "1"]
    assert train.main(args) == errors.EXIT_NON_FINITE == 3
    err = capsys.readouterr().err
    assert "optimizer step 2" in err
    named = set(err.split("records [", 1)[1].split("]", 1)[0].replace("'", "").split(", "))
    train_ids = {ex.id for ex in split_corpus(default_corpus(SYNTHETIC_N, 0), 0)["train"]}
    assert named and named <= train_ids
    out = tmp_path / "nan"
    assert (out / "checkpoints" / "step-000001" / "COMPLETE").is_file()  # the last good step is kept
    assert not (out / "checkpoints" / "step-000002").exists() and not (out / layout.ADAPTER_DIR).exists()


# --------------------------------------------------------------------------------------------------
# Preference optimization
# --------------------------------------------------------------------------------------------------


def _po_args(root: Path, out: str, sft_adapter: Path) -> list[str]:
    return ["po", *tiny_args(root, out, steps=2), "--sft_adapter", str(sft_adapter / layout.ADAPTER_DIR),
            "--run.eval_max_new_tokens", "24"]


def test_po_stage_starts_at_the_sft_model_and_precomputed_reference_gives_the_same_loss(sft_run, tmp_path):
    assert train.main(_po_args(tmp_path, "po", sft_run)) == 0
    assert train.main([*_po_args(tmp_path, "po_cached", sft_run), "--po.precompute_ref"]) == 0
    on_the_fly, cached = read_metrics(tmp_path / "po"), read_metrics(tmp_path / "po_cached")
    # Step 1: the new LoRA has B = 0, so the policy is the merged SFT model and so is the reference (adapters
    # disabled): every margin is 0 and the preference term is -log sigmoid(0) = log 2.
    assert on_the_fly[0]["margin"] == pytest.approx(0.0, abs=1e-6)
    assert on_the_fly[0]["loss_pref"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert cached[0]["loss"] == pytest.approx(on_the_fly[0]["loss"], abs=1e-6)
    assert (tmp_path / "po_cached" / layout.REFERENCE_CACHE_FILE).is_file()
    for name in ("preferences.jsonl", "confusion_code.csv", "confusion_subcode.csv"):
        assert (tmp_path / "po" / name).is_file()
    assert (tmp_path / "po" / layout.ADAPTER_DIR / "adapter_config.json").is_file()


# --------------------------------------------------------------------------------------------------
# The bare command
# --------------------------------------------------------------------------------------------------


def test_no_arguments_runs_the_tiny_pipeline_and_writes_everything(tmp_path):
    started = time.perf_counter()
    # The default preset is the real SmolLM2 model (about 10 minutes); the smoke test pins the tiny one.
    proc = subprocess.run([sys.executable, "-m", "pvfast.train", "--preset", "tiny"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "runs" / "tiny"
    for stage in ("sft", "po"):
        assert (out / stage / layout.ADAPTER_DIR / "adapter_model.safetensors").is_file()
        assert read_metrics(out / stage)
        assert (out / stage / layout.PLOT_FILE).stat().st_size > 0
    report = json.loads((out / layout.REPORT_FILE).read_text())
    scores = report["runs"][0]["report"]
    for level in ("code", "subcode", "span"):
        assert 0.0 <= scores[level]["f1"] <= 1.0
    test_n = len(split_corpus(default_corpus(120, 0), 0)["test"])
    assert scores["n_messages"] == test_n
    assert "F1" in proc.stdout
    print(f"no-argument pipeline: {elapsed:.0f} s")


def test_po_with_nf4_alternates_reference_and_training_passes(sft_run, tmp_path):
    # On AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights during eval/no-grad passes; the trainer must
    # keep them trainable (pvfast.model.loading), or the training pass after the first reference pass fails.
    args = [*_po_args(tmp_path, "po_nf4", sft_run), "--model.quant", "nf4", "--optim.max_steps", "2"]
    assert train.main(args) == 0
    records = read_metrics(tmp_path / "po_nf4")
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)


# --------------------------------------------------------------------------------------------------
# Model loading (pvfast.model.loading)
# --------------------------------------------------------------------------------------------------


def test_model_source_errors_name_the_path(tmp_path):
    from pvfast.config.sections import ModelConfig
    from pvfast.model.loading import ModelLoadError, model_source

    with pytest.raises(ModelLoadError, match="no such file or directory"):
        model_source(ModelConfig(name_or_path=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        model_source(ModelConfig(name_or_path=str(tmp_path / "empty")))
    # A hub id that is neither cached nor reachable fails at once (tests/test_real_model.py covers the hub cases).


def test_an_architecture_the_packed_path_cannot_reproduce_is_refused_in_one_line(tmp_path, capsys):
    """A model whose positions depend on the row length (dynamic rope scaling) cannot run tree-packed: the
    trainer refuses it at load, naming the feature, with one error line and exit 1, before any step."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = tiny_model_dir("llama")
    model_dir = tmp_path / "dynamic-rope"
    with torch.random.fork_rng(devices=[]):
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source)).save_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    (model_dir / "config.json").write_text(json.dumps(config), encoding="utf-8")
    AutoTokenizer.from_pretrained(source).save_pretrained(model_dir)
    code = train.main(["sft", *tiny_args(tmp_path, "refused"), "--model.name_or_path", str(model_dir)])
    err = capsys.readouterr().err
    assert code == errors.EXIT_MODEL == 1
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "dynamic" in lines[0] and "rope" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "refused" / "checkpoints").exists()


def test_nf4_without_bitsandbytes_is_a_clear_error(monkeypatch):
    import importlib.util

    from pvfast.config.sections import ModelConfig
    from pvfast.model import loading as models

    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(models.ModelLoadError, match="bitsandbytes is not installed"):
        models.load_base_model(ModelConfig(quant="nf4"), torch.device("cpu"))


def test_local_directory_gets_lora_on_every_target_and_a_pad_token():
    from pvfast.config.sections import ModelConfig
    from pvfast.model.loading import load_base_model, load_model, load_tokenizer

    cfg = ModelConfig(name_or_path=str(tiny_model_dir("llama")), quant="none", lora_r=4,
                      gradient_checkpointing=False)
    base = load_base_model(cfg, torch.device("cpu"))
    # LoRA adds r * (in + out) weights per targeted Linear: A is (r, in), B is (out, r).
    expected = sum(cfg.lora_r * (m.in_features + m.out_features) for name, m in base.named_modules()
                   if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in cfg.lora_targets)
    model = load_model(cfg, torch.device("cpu"))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected > 0
    tokenizer = load_tokenizer(cfg)
    assert tokenizer.is_fast and tokenizer.pad_token is not None


# --------------------------------------------------------------------------------------------------
# Step planning (gradient accumulation by token budget) and config errors
# --------------------------------------------------------------------------------------------------


def _fake_batches(n: int, scored: int):
    from types import SimpleNamespace

    return [SimpleNamespace(packed=SimpleNamespace(num_scored=scored)) for _ in range(n)]


def test_plan_steps_accumulates_rounds_until_the_token_budget():
    from pvfast.config.sections import OptimConfig

    Step = loop.Step
    # 4 packs of 100 scored tokens, budget 250: rounds 0-2 reach 300 >= 250, round 3 closes the epoch.
    optim = OptimConfig(epochs=2, tokens_per_step=250)
    assert loop.plan_steps(_fake_batches(4, 100), optim, seed=0, world_size=1) == [
        Step(0, 0, 3), Step(0, 3, 1), Step(1, 0, 3), Step(1, 3, 1)]
    capped = OptimConfig(epochs=2, tokens_per_step=250, max_steps=3)
    assert len(loop.plan_steps(_fake_batches(4, 100), capped, seed=0, world_size=1)) == 3
    # Two ranks, 5 packs: 3 rounds per epoch (the last padded by wrapping around), 200 tokens per round.
    two_ranks = OptimConfig(epochs=1, tokens_per_step=250)
    assert loop.plan_steps(_fake_batches(5, 100), two_ranks, seed=0, world_size=2) == [Step(0, 0, 2), Step(0, 2, 1)]
    # No budget: one step per round.
    assert loop.plan_steps(_fake_batches(5, 100), OptimConfig(epochs=1), seed=0, world_size=2) == [
        Step(0, 0, 1), Step(0, 1, 1), Step(0, 2, 1)]


def test_accumulated_steps_reach_the_token_budget_and_cover_the_epoch(tmp_path):
    budget = 800  # above any single pack's scored tokens at this token budget (~700), below two packs
    args = ["sft", *tiny_args(tmp_path, "accum", steps=2), "--optim.tokens_per_step", str(budget)]
    assert train.main(args) == 0
    records = read_metrics(tmp_path / "accum")
    packing = json.loads((tmp_path / "accum" / layout.METRICS_FILE).read_text().splitlines()[0])
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    # Step 1 adds packs until the budget is reached: two of them. Step 2 takes what is left of the epoch,
    # less than the budget; together the two steps saw every scored token of the epoch once.
    assert records[0]["micro_batches"] == 2 and records[0]["scored_tokens"] >= budget
    assert records[1]["scored_tokens"] < budget
    assert records[0]["scored_tokens"] + records[1]["scored_tokens"] == packing["scored_tokens"]
    assert records[0]["micro_batches"] + records[1]["micro_batches"] == packing["batches"]


def test_config_errors_exit_2_naming_the_key(tmp_path, capsys):
    assert train.main(["sft", "--optim.lrr", "1e-3", "--run.output_dir", str(tmp_path / "x")]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_flex_attention_on_the_cpu_is_refused_before_anything_is_written(tmp_path, capsys):
    args = ["sft", "--run.device", "cpu", "--model.attn_implementation", "flex_attention",
            "--run.output_dir", str(tmp_path / "x")]
    assert train.main(args) == 2
    assert "model.attn_implementation: attn_implementation 'flex_attention' does not run on the CPU" in \
        capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_torchrun_two_cpu_processes_train_and_rank0_writes(tmp_path):
    # gloo DDP: every rank takes its share of each step's packs; only rank 0 logs and saves.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pvfast.train", "sft", *tiny_args(tmp_path, "ddp", steps=2)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "ddp"
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    # No token budget: each optimizer step is one round, one pack per rank.
    assert all(r["micro_batches"] == 1 for r in records)
    assert (out / layout.ADAPTER_DIR / "adapter_model.safetensors").is_file()


def test_fresh_run_never_deletes_earlier_checkpoints_without_overwrite(tmp_path, capsys):
    """A forgotten --run.resume must not delete a long run: refused (exit 2) unless --run.overwrite."""
    from pvfast.config.trainer import load_config
    from pvfast.train.distributed import setup_distributed

    old = tmp_path / "checkpoints" / "step-000007"
    old.mkdir(parents=True)
    (old / "COMPLETE").write_text("{}")
    ctx = setup_distributed("cpu")
    cfg = load_config("sft", None, ["--run.output_dir", str(tmp_path), "--run.overwrite", "false"], "tiny")
    with pytest.raises(errors.BadInput, match="--run.resume to continue it, --run.overwrite"):
        train.check_stage("sft", "sft", tmp_path, cfg, ctx, {})
    assert old.is_dir()
    cfg = load_config("sft", None, ["--run.output_dir", str(tmp_path), "--run.overwrite", "true"], "tiny")
    stage = train.check_stage("sft", "sft", tmp_path, cfg, ctx, {})
    assert old.is_dir()  # checking writes nothing; opening the accepted stage removes them
    train.open_stage(stage)
    assert not (tmp_path / "checkpoints").exists()
    # Through the entry point: the refusal is an input error, exit 2, before any model is loaded.
    old.mkdir(parents=True)
    (old / "COMPLETE").write_text("{}")
    code = train.main(["sft", "--preset", "tiny", "--run.overwrite", "false", "--run.output_dir",
                       str(tmp_path), "--optim.max_steps", "1"])
    assert code == errors.EXIT_BAD_INPUT and old.is_dir()


# --------------------------------------------------------------------------------------------------
# Bitwise reproducibility: PO on the CPU (issue 9 item 5), resume under torchrun (issue 9 item 4)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_po_is_bitwise_reproducible_uninterrupted_and_resumed(sft_run, tmp_path):
    # The PO step gathers branch-point hidden states several times (scoring rows); its backward must not add
    # them in a thread-scheduling order (it did: two runs differed by up to 4e-8 in a third of the values).
    # That order only varies with several threads: run with 2 whatever the machine's default.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check_po_bitwise(sft_run, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _check_po_bitwise(sft_run, tmp_path):
    args = [*_po_args(tmp_path, "po_a", sft_run), "--optim.max_steps", "3"]
    assert train.main(args) == 0
    assert train.main([*_po_args(tmp_path, "po_b", sft_run), "--optim.max_steps", "3"]) == 0
    assert_bitwise_equal(adapter_weights(tmp_path / "po_b"), adapter_weights(tmp_path / "po_a"))
    split = [*_po_args(tmp_path, "po_split", sft_run), "--optim.max_steps", "3"]
    assert train.main([*split, "--run.stop_after_steps", "1"]) == 0
    assert not (tmp_path / "po_split" / layout.ADAPTER_DIR).exists()
    assert train.main([*split, "--run.resume"]) == 0
    assert_bitwise_equal(adapter_weights(tmp_path / "po_split"), adapter_weights(tmp_path / "po_a"))
    losses = [r["loss"] for r in read_metrics(tmp_path / "po_split")]
    assert losses == [r["loss"] for r in read_metrics(tmp_path / "po_a")]


def _torchrun(tmp_path: Path, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pvfast.train", *args]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.mark.slow
def test_torchrun_stopped_and_resumed_ends_with_the_uninterrupted_adapter(tmp_path):
    # LoRA dropout draws from each rank's own generator, and the ranks' packs differ in size, so their RNG states
    # differ: a resume must give every rank its own state back (and must not crash on rank 1).
    full = ["sft", *tiny_args(tmp_path, "ddp_full", steps=3), "--optim.epochs", "2"]
    proc = _torchrun(tmp_path, full)
    assert proc.returncode == 0, proc.stderr[-3000:]
    split = ["sft", *tiny_args(tmp_path, "ddp_split", steps=3), "--optim.epochs", "2"]
    proc = _torchrun(tmp_path, [*split, "--run.stop_after_steps", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rng = torch.load(tmp_path / "ddp_split" / "checkpoints" / "step-000001" / "rng.pt", weights_only=False)
    assert len(rng) == 2 and not torch.equal(rng[0]["torch_cpu"], rng[1]["torch_cpu"])
    proc = _torchrun(tmp_path, [*split, "--run.resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_bitwise_equal(adapter_weights(tmp_path / "ddp_split"), adapter_weights(tmp_path / "ddp_full"))
