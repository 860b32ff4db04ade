"""Checkpoints on the tiny Llama with LoRA (CPU): exact resume, PEFT-loadable adapter, atomic writes,
rotation, clear errors, merging, and an NF4 round trip."""

import dataclasses
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pvfast import atomic
from pvfast.config.serialize import config_differences, config_to_dict
from pvfast.model.tiny import load_tiny_tokenizer, tiny_model_dir
from pvfast.testing import load_tiny_model
from pvfast.train import checkpoint as ckpt
from pvfast.train.checkpoint import (
    CheckpointError,
    TrainState,
    collect_rng_state,
    latest_checkpoint,
    load_checkpoint,
    merge_adapter,
    read_checkpoint_config,
    restore_rng_state,
    save_checkpoint,
)

ARCH = "llama"
BATCH, MIN_LEN, MAX_LEN = 2, 6, 10


@dataclasses.dataclass
class RunConfig:
    lr: float = 1e-2
    lora_r: int = 8
    output_dir: Path = Path("/tmp/run")
    targets: tuple = ("q_proj", "v_proj")


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model):
    """AdamW on the trainable (LoRA) parameters and a warmup-then-decay LambdaLR."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 3) * 0.8**s)
    return optimizer, scheduler


def train_step(model, optimizer, scheduler, vocab_size: int) -> int:
    """One optimizer step on a random batch; draws from python random, numpy and torch, so the
    result depends on all three generators. Returns the number of tokens trained on."""
    model.train()
    length = random.randint(MIN_LEN, MAX_LEN)
    input_ids = torch.randint(0, vocab_size, (BATCH, length))
    loss_scale = float(np.random.uniform(0.5, 1.5))
    loss = model(input_ids=input_ids, labels=input_ids).loss * loss_scale
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return BATCH * length


def lora_weights(model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def eval_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def fixed_input_ids(vocab_size: int) -> torch.Tensor:
    return torch.arange(12).reshape(2, 6) * 97 % vocab_size


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA model trained 2 steps, its optimizer/scheduler, and a checkpoint of it."""
    seed_all(0)
    model = load_tiny_model(ARCH, lora=True)
    vocab = model.config.vocab_size
    optimizer, scheduler = make_optimizer(model)
    tokens = sum(train_step(model, optimizer, scheduler, vocab) for _ in range(2))
    state = TrainState(step=2, epoch=0, batch_cursor=2, tokens_seen=tokens)
    out = tmp_path_factory.mktemp("trained")
    path = save_checkpoint(out, state, model, optimizer, scheduler, RunConfig())
    model.eval()
    return dict(model=model, optimizer=optimizer, scheduler=scheduler, path=path, state=state, vocab=vocab)


# ------------------------------------------------------------------------------------------------
# Exact resume


def test_resume_is_bitwise_exact_and_needs_the_rng_states(tmp_path):
    k_steps, m_steps = 2, 3
    seed_all(0)
    model = load_tiny_model(ARCH, lora=True)
    vocab = model.config.vocab_size
    optimizer, scheduler = make_optimizer(model)
    tokens = sum(train_step(model, optimizer, scheduler, vocab) for _ in range(k_steps))
    state = TrainState(step=k_steps, epoch=1, batch_cursor=5, tokens_seen=tokens, extra={"best_f1": 0.25})
    path = save_checkpoint(tmp_path, state, model, optimizer, scheduler, RunConfig())
    assert path == tmp_path / "checkpoints" / "step-000002"
    for _ in range(m_steps):
        train_step(model, optimizer, scheduler, vocab)
    uninterrupted = lora_weights(model)
    uninterrupted_lr = scheduler.get_last_lr()

    def resume(restore_rng: bool) -> tuple[dict, TrainState, list]:
        seed_all(12345)  # a new process: its generators are anywhere but where the run left them
        fresh = load_tiny_model(ARCH, lora=True)
        fresh_opt, fresh_sched = make_optimizer(fresh)
        loaded = load_checkpoint(path, fresh, fresh_opt, fresh_sched, restore_rng=restore_rng)
        for _ in range(m_steps):
            train_step(fresh, fresh_opt, fresh_sched, vocab)
        return lora_weights(fresh), loaded, fresh_sched.get_last_lr()

    resumed, loaded_state, resumed_lr = resume(restore_rng=True)
    assert loaded_state == state
    assert resumed_lr == uninterrupted_lr
    assert resumed.keys() == uninterrupted.keys()
    for key in uninterrupted:
        assert torch.equal(resumed[key], uninterrupted[key]), key

    # Control: the same resume without the RNG states trains on other batches and ends elsewhere.
    unseeded, _, _ = resume(restore_rng=False)
    assert any(not torch.equal(unseeded[k], uninterrupted[k]) for k in uninterrupted)


def test_rng_state_round_trip_covers_python_numpy_torch():
    seed_all(7)
    saved = collect_rng_state()
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    seed_all(8)
    restore_rng_state(saved)
    again = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    assert again == expected


@pytest.mark.gpu
def test_rng_state_round_trip_covers_cuda():
    torch.cuda.manual_seed_all(7)
    saved = collect_rng_state()
    assert len(saved["torch_cuda"]) == torch.cuda.device_count()
    expected = torch.rand(3, device="cuda").cpu()
    torch.cuda.manual_seed_all(8)
    restore_rng_state(saved)
    assert torch.equal(torch.rand(3, device="cuda").cpu(), expected)


def test_per_rank_rng_states_restore_the_asked_rank(trained, tmp_path):
    seed_all(1)
    rank0 = collect_rng_state()
    seed_all(2)
    rank1 = collect_rng_state()
    rank1_draw = torch.rand(4)
    state = TrainState(step=9)
    path = save_checkpoint(
        tmp_path, state, trained["model"], trained["optimizer"], None, {}, rng_states=[rank0, rank1]
    )
    seed_all(3)
    load_checkpoint(path, trained["model"], None, None, rank=1)
    assert torch.equal(torch.rand(4), rank1_draw)
    with pytest.raises(CheckpointError, match="rng.pt.*2 ranks"):
        load_checkpoint(path, trained["model"], None, None, rank=2)


# ------------------------------------------------------------------------------------------------
# PEFT format and merging


def test_adapter_loads_with_peft_from_pretrained(trained):
    from peft import PeftModel

    ids = fixed_input_ids(trained["vocab"])
    base = load_tiny_model(ARCH)
    base_logits = eval_logits(base, ids)
    reloaded = PeftModel.from_pretrained(base, trained["path"] / "adapter")
    trained_logits = eval_logits(trained["model"], ids)
    assert not torch.equal(base_logits, trained_logits)  # the adapter changes the model
    assert torch.equal(eval_logits(reloaded, ids), trained_logits)


def test_merged_model_matches_peft_logits(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merge_adapter(tiny_model_dir(ARCH), trained["path"], tmp_path / "merged", dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not any("lora" in name for name in merged.state_dict())
    ids = fixed_input_ids(trained["vocab"])
    peft_logits = eval_logits(trained["model"], ids)
    merged_logits = eval_logits(merged, ids)
    base_logits = eval_logits(load_tiny_model(ARCH), ids)
    # fp32: W x + s B (A x) versus (W + s B A) x differ only by rounding order. Logits here are O(1)
    # (ulp ~1.2e-7); measured max difference 7e-7, so 1e-5 absolute leaves ~14x headroom, while the
    # adapter moves the logits by ~0.3 (checked below, so an unmerged model fails).
    atol = 1e-5
    torch.testing.assert_close(merged_logits, peft_logits, atol=atol, rtol=0)
    assert (peft_logits - base_logits).abs().max() > 100 * atol

    tokenizer = AutoTokenizer.from_pretrained(out)
    text = '{"code": "PartnershipPatient"}'
    assert tokenizer(text)["input_ids"] == load_tiny_tokenizer(ARCH)(text)["input_ids"]
    with pytest.raises(FileExistsError, match="merged"):
        merge_adapter(tiny_model_dir(ARCH), trained["path"], out)


def test_nf4_adapter_round_trip(tmp_path):
    seed_all(0)
    model = load_tiny_model(ARCH, quant="nf4", lora=True)
    vocab = model.config.vocab_size
    optimizer, scheduler = make_optimizer(model)
    train_step(model, optimizer, scheduler, vocab)
    path = save_checkpoint(tmp_path, TrainState(step=1), model, optimizer, scheduler, RunConfig())

    fresh = load_tiny_model(ARCH, quant="nf4", lora=True)
    fresh_opt, fresh_sched = make_optimizer(fresh)
    before = lora_weights(fresh)
    saved = lora_weights(model)
    assert any(not torch.equal(before[k], saved[k]) for k in saved)  # loading has something to do
    load_checkpoint(path, fresh, fresh_opt, fresh_sched)
    restored = lora_weights(fresh)
    for key in saved:
        assert torch.equal(restored[key], saved[key]), key
    ids = fixed_input_ids(vocab)
    assert torch.equal(eval_logits(fresh, ids), eval_logits(model, ids))


# ------------------------------------------------------------------------------------------------
# Atomicity, rotation, errors


def save_at(output_dir, trained, step: int, **kwargs) -> Path:
    return save_checkpoint(
        output_dir, TrainState(step=step), trained["model"], trained["optimizer"], trained["scheduler"],
        RunConfig(), **kwargs,
    )


def test_crash_mid_write_leaves_previous_checkpoint_latest(trained, tmp_path, monkeypatch):
    first = save_at(tmp_path, trained, 1)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)  # the adapter is written, the optimizer fails
    with pytest.raises(OSError, match="No space"):
        save_at(tmp_path, trained, 2)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == first
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]


def test_killed_save_leaves_no_valid_checkpoint_and_is_cleaned_up(trained, tmp_path, monkeypatch):
    first = save_at(tmp_path, trained, 1)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    # A kill leaves the temp directory behind: no cleanup, and death just before the manifest.
    monkeypatch.setattr(atomic, "discard", lambda path: None)
    monkeypatch.setattr(ckpt, "_write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        save_at(tmp_path, trained, 2)
    monkeypatch.undo()
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name != "step-000001"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-step-000002")
    assert latest_checkpoint(tmp_path) == first

    third = save_at(tmp_path, trained, 3)
    assert latest_checkpoint(tmp_path) == third
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001", "step-000003"]


def test_incomplete_or_truncated_step_dirs_are_not_trusted(trained, tmp_path):
    good = save_at(tmp_path, trained, 1)
    root = tmp_path / "checkpoints"
    no_manifest = root / "step-000007"
    shutil.copytree(good, no_manifest)
    (no_manifest / "COMPLETE").unlink()
    truncated = root / "step-000008"
    shutil.copytree(good, truncated)
    optimizer_file = truncated / "optimizer.pt"
    optimizer_file.write_bytes(optimizer_file.read_bytes()[:-10])
    assert latest_checkpoint(tmp_path) == good

    with pytest.raises(CheckpointError, match=r"step-000007.*no COMPLETE"):
        load_checkpoint(no_manifest, trained["model"], None, None)
    with pytest.raises(CheckpointError, match=r"step-000008/optimizer\.pt.*truncated"):
        load_checkpoint(truncated, trained["model"], None, None)


def test_corrupt_or_missing_checkpoint_error_names_the_path(trained, tmp_path):
    path = save_at(tmp_path, trained, 4)
    weights = path / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size: only the hash can tell
    weights.write_bytes(bytes(data))
    assert latest_checkpoint(tmp_path) == path  # the cheap size check passes
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors: sha256"):
        load_checkpoint(path, trained["model"], None, None)

    missing = tmp_path / "checkpoints" / "step-000099"
    with pytest.raises(CheckpointError, match=r"step-000099: checkpoint directory does not exist"):
        load_checkpoint(missing, trained["model"], None, None)
    assert latest_checkpoint(tmp_path / "nowhere") is None


def test_adapter_that_does_not_fit_the_model_is_refused(trained):
    from peft import LoraConfig, get_peft_model

    other = get_peft_model(
        load_tiny_model(ARCH), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors: .*(missing|shapes)"):
        load_checkpoint(trained["path"], other, None, None)


def test_rotation_keeps_newest_and_the_one_just_written(trained, tmp_path):
    def step_names():
        return sorted(p.name for p in (tmp_path / "checkpoints").iterdir())

    for step in (1, 2, 3, 4, 5):
        save_at(tmp_path, trained, step, keep_last=2)
    assert step_names() == ["step-000004", "step-000005"]
    # Saving an older step (a run resumed from an earlier checkpoint) keeps it even though it is not
    # among the two highest, and keeps the highest ones.
    save_at(tmp_path, trained, 3, keep_last=2)
    assert step_names() == ["step-000003", "step-000004", "step-000005"]
    # Re-saving an existing step replaces it.
    save_at(tmp_path, trained, 5, keep_last=None)
    assert step_names() == ["step-000003", "step-000004", "step-000005"]
    assert latest_checkpoint(tmp_path).name == "step-000005"
    with pytest.raises(ValueError, match="keep_last"):
        save_at(tmp_path, trained, 6, keep_last=0)


def test_only_the_main_process_writes(trained, tmp_path):
    path = save_at(tmp_path, trained, 1, is_main_process=False)
    assert path == tmp_path / "checkpoints" / "step-000001"
    assert not path.exists()


# ------------------------------------------------------------------------------------------------
# Configs


def test_config_saved_and_differences_reported(trained):
    saved = read_checkpoint_config(trained["path"])
    # Dataclass -> JSON by hand: the Path becomes a string and the tuple a list.
    assert saved == {"lr": 1e-2, "lora_r": 8, "output_dir": "/tmp/run", "targets": ["q_proj", "v_proj"]}
    assert config_differences(saved, RunConfig()) == []
    assert config_differences(saved, RunConfig(lr=2e-4, lora_r=16)) == ["lora_r", "lr"]

    a = {"lr": 1e-4, "lora": {"r": 8, "alpha": 16}, "targets": ("q", "v"), "out": Path("/x")}
    b = {"lr": 2e-4, "lora": {"r": 8, "alpha": 32}, "targets": ["q", "v"], "out": "/x", "new": 1}
    assert config_differences(a, b) == ["lora.alpha", "lr", "new"]


def test_unserialisable_config_fails_before_writing(trained, tmp_path):
    with pytest.raises(TypeError, match="object"):
        save_checkpoint(
            tmp_path, TrainState(step=1), trained["model"], trained["optimizer"], None, {"fn": object()}
        )
    assert not (tmp_path / "checkpoints").exists()
    assert config_to_dict({"dtype": torch.bfloat16}) == {"dtype": "bfloat16"}


# ------------------------------------------------------------------------------------------------
# Never a non-finite checkpoint; one rule for damaged checkpoints (issue 10 items 1 and 4)


def test_save_refuses_non_finite_weights_or_optimizer_state(trained, tmp_path):
    from pvfast.train.errors import NonFinite

    good = save_at(tmp_path, trained, 1)
    lora = next(p for n, p in trained["model"].named_parameters() if "lora_B" in n)
    kept = lora.detach().clone()
    try:
        with torch.no_grad():
            lora[0, 0] = float("nan")
        with pytest.raises(NonFinite, match=r"step-000002: not saved: 1 adapter weight tensors hold NaN"):
            save_at(tmp_path, trained, 2)
    finally:
        with torch.no_grad():
            lora.copy_(kept)
    state = next(iter(trained["optimizer"].state.values()))
    moment = state["exp_avg"]
    kept = moment.clone()
    try:
        moment.view(-1)[0] = float("inf")
        with pytest.raises(NonFinite, match=r"step-000003: not saved: 1 optimizer state tensors"):
            save_at(tmp_path, trained, 3)
    finally:
        moment.copy_(kept)
    # Nothing was written, not even a temporary; the good checkpoint is untouched and still the newest.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]
    assert ckpt.find_resume_checkpoint(tmp_path).path == good


@pytest.fixture(scope="module")
def two_checkpoints(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two")
    save_at(out, trained, 1)
    save_at(out, trained, 2)
    return out


CHECKPOINT_FILES = ("COMPLETE", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                    "adapter/README.md", "optimizer.pt", "scheduler.pt", "rng.pt", "train_state.json", "config.json")


def damage(path: Path, mode: str) -> None:
    if mode == "delete":
        path.unlink()
    elif mode == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # flip one byte in the middle: same size, only a hash (or the parser) can tell
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("mode", ["truncate", "flip", "delete"])
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_resume_rejects_any_damaged_file_names_it_and_uses_the_newest_good_checkpoint(two_checkpoints, tmp_path,
                                                                                       name, mode):
    shutil.copytree(two_checkpoints / "checkpoints", tmp_path / "checkpoints")
    newest = tmp_path / "checkpoints" / "step-000002"
    assert set(CHECKPOINT_FILES) == {p.relative_to(newest).as_posix() for p in newest.rglob("*") if p.is_file()}
    damage(newest / name, mode)
    found = ckpt.find_resume_checkpoint(tmp_path)
    assert found.path == tmp_path / "checkpoints" / "step-000001" and found.step == 1
    [(rejected, why)] = found.rejected
    assert rejected == newest
    # The reason names the damaged file (a damaged manifest names the manifest, or the folder lacking it).
    expected = newest / name if name != "COMPLETE" or mode != "delete" else newest
    assert why.startswith(f"{expected}:"), why
    # load_checkpoint applies the same verification: the damaged checkpoint is never loaded.
    with pytest.raises(CheckpointError):
        ckpt.verify_checkpoint(newest)


def test_every_checkpoint_damaged_leaves_nothing_to_resume_and_says_why(two_checkpoints, tmp_path):
    shutil.copytree(two_checkpoints / "checkpoints", tmp_path / "checkpoints")
    damage(tmp_path / "checkpoints" / "step-000002" / "optimizer.pt", "flip")
    damage(tmp_path / "checkpoints" / "step-000001" / "rng.pt", "truncate")
    found = ckpt.find_resume_checkpoint(tmp_path)
    assert found.path is None and found.step == 0
    assert [p.name for p, _ in found.rejected] == ["step-000002", "step-000001"]
    assert "optimizer.pt: sha256 differs" in found.rejected[0][1]
    assert "rng.pt" in found.rejected[1][1] and "truncated" in found.rejected[1][1]
    assert ckpt.find_resume_checkpoint(tmp_path / "fresh") == ckpt.ResumePoint(None, ())


def test_a_checkpoint_written_by_pvfast_0_1_0_still_resumes(tmp_path, capsys):
    """tests/fixtures/run-0.1.0-sft was written by the code before the restructure (commit 1f399c6:
    `python -m pvfast.train sft --preset tiny --optim.max_steps 3 --run.stop_after_steps 2 --run.save_every 1
    --run.evaluate false --data.synthetic_n 40`). The same command with --run.resume continues it at step 3."""
    from pvfast.train import recipe

    run = tmp_path / "run"
    shutil.copytree(Path(__file__).parent / "fixtures" / "run-0.1.0-sft", run)
    old_metrics = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    args = ["sft", "--preset", "tiny", "--run.output_dir", str(run), "--optim.max_steps", "3", "--run.save_every",
            "1", "--run.evaluate", "false", "--data.synthetic_n", "40", "--run.resume"]
    assert recipe.main(args) == 0
    assert "resuming from" in capsys.readouterr().out
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    steps = [s for s in steps if "step" in s]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert [json.dumps(s) for s in steps[:2]] == [line for line in old_metrics if '"step"' in line]  # kept as is
    assert ckpt.latest_checkpoint(run).name == "step-000003" and (run / "adapter" / "adapter_config.json").is_file()
    optimizer = torch.load(run / "checkpoints" / "step-000003" / "optimizer.pt", weights_only=True)
    assert {int(s["step"]) for s in optimizer["state"].values()} == {3}  # AdamW's state came from the old run
