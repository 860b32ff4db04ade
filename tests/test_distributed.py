"""DDP over gloo on the CPU: 2 spawned ranks take one TAB-PO step on the tiny LoRA Llama; plus shard.

The DDP wiring (the packed forward through the wrapper, the broadcast of rank 0's adapters, the all-reduce) is
checked against a single process: both ranks hold one record with the same number of pairs, so the mean of
their losses is the objective over both. Unequal shares, several micro-batches per rank and epoch-end padding
go through the trainer's step in tests/test_step_objective.py.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from pvfast.data.jsonfmt import serialize
from pvfast.data.prompt import PromptTemplate
from pvfast.data.records import PreferenceRecord
from pvfast.data.synth import default_corpus
from pvfast.model.forward import lm_head_weight, packed_attention_mask, packed_forward
from pvfast.model.reference import reference_stats
from pvfast.model.tiny import load_tiny_tokenizer
from pvfast.objectives.fused_loss import FusedTokenPOLoss
from pvfast.packing.loss_batch import make_loss_batches, preference_groups
from pvfast.testing import activate_lora, free_port, load_tiny_model
from pvfast.train.distributed import (
    DistContext,
    all_reduce_mean,
    barrier,
    cleanup,
    packed_hidden,
    setup_distributed,
    shard,
    unwrap,
    wrap_model,
)

WORLD_SIZE = 2
LR = 1e-2
# Adam's first step is lr·g/(|g| + eps): near |g| ≈ eps it turns the fp32 rounding of a gradient into a weight
# change of up to lr/eps times that rounding. Gradients are compared directly; eps = 1e-6 (not 1e-8) keeps the
# weight comparison within fp32 tolerance for the few near-zero gradient entries.
ADAM_EPS = 1e-6
# A short user prompt keeps the rows small (the real 3.5k-token instruction is exercised in bench/).
SHORT_TEMPLATE = PromptTemplate("Extract patient-voice triples. TO_PAT_YN: {direction}\nContext: {message}\nOUTPUT:")


def _ctx(rank: int, world_size: int) -> DistContext:
    return DistContext(rank, world_size, rank, torch.device("cpu"), rank == 0)


# --------------------------------------------------------------------------------------------------- shard
def test_shard_worked_example():
    # 5 items over 2 ranks, padded by wrapping to 6: rank 0 takes positions 0, 2, 4; rank 1 takes 1, 3, 5 -> 0.
    items = ["a", "b", "c", "d", "e"]
    assert shard(items, _ctx(0, 2)) == ["a", "c", "e"]
    assert shard(items, _ctx(1, 2)) == ["b", "d", "a"]


@pytest.mark.parametrize("n,world_size", [(1, 3), (7, 3), (9, 3), (10, 4), (2, 8)])
def test_shard_equal_counts_coverage_and_determinism(n, world_size):
    items = list(range(100, 100 + n))
    shares = [shard(items, _ctx(r, world_size)) for r in range(world_size)]
    per_rank = -(-n // world_size)
    assert [len(s) for s in shares] == [per_rank] * world_size
    assert sorted({x for s in shares for x in s}) == items  # every item somewhere
    flat = [x for s in shares for x in s]
    assert len(flat) - len(set(flat)) == per_rank * world_size - n  # only the padding repeats
    assert shares == [shard(list(items), _ctx(r, world_size)) for r in range(world_size)]


def test_shard_empty_and_single_process():
    assert shard([], _ctx(1, 2)) == []
    assert shard((3, 1, 2), _ctx(0, 1)) == [3, 1, 2]


# ------------------------------------------------------------------------------------- single process
def test_setup_without_torchrun_initialises_nothing(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    ctx = setup_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.device, ctx.is_main) == (0, 1, 0, torch.device("cpu"),
                                                                                   True)
    assert not torch.distributed.is_initialized()
    model = torch.nn.Linear(2, 2)
    assert wrap_model(model, ctx) is model and unwrap(model) is model
    value = torch.tensor([1.5, -2.0])
    assert torch.equal(all_reduce_mean(value, ctx), value)
    barrier(ctx)
    cleanup(ctx)


def test_setup_refuses_bad_environment(monkeypatch):
    with pytest.raises(ValueError, match="device must be one of"):
        setup_distributed("tpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2, WORLD_SIZE=2"):
        setup_distributed("cpu")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        setup_distributed("cpu")


# ------------------------------------------------------------------------------------------- 2-rank DDP
def _micro_batches(tokenizer):
    """Two one-record packed rows (one per rank), from two synthetic examples with 2 rejected each."""
    records = []
    for example in [ex for ex in default_corpus() if len(ex.annotations) >= 2][:2]:
        annotations = list(example.annotations)
        rejected = (serialize(annotations[1:]), serialize(annotations[:1]))  # drop one / keep one
        records.append(PreferenceRecord(example.id, serialize(annotations), rejected, direction=example.direction,
                                        message=example.message))
    groups = preference_groups(records, tokenizer, SHORT_TEMPLATE)
    budget = max(sum(len(c) for c in g.completions) + len(g.prompt_ids) for g in groups)  # one group per row
    batches = make_loss_batches(groups, budget, "po")
    assert len(batches) == 2
    return batches


def _model(perturb_seed: int):
    """The tiny LoRA Llama with lora_B set from ``perturb_seed`` (peft starts B at zero, which would leave
    lora_A without a gradient in the first step)."""
    return activate_lora(load_tiny_model("llama", lora=True), seed=perturb_seed)


def _loss(model, batch, loss_fn):
    inner = unwrap(model)
    mask = packed_attention_mask(inner, batch.packed)
    ref = reference_stats(inner, batch, loss_fn, mask)
    hidden = packed_hidden(model, batch.packed, mask)
    return loss_fn(batch.scoring_rows(hidden), lm_head_weight(inner), batch.pairs, ref).loss


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in unwrap(model).named_parameters() if p.requires_grad}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = setup_distributed("cpu")
    try:
        tokenizer = load_tiny_tokenizer()
        (batch,) = shard(_micro_batches(tokenizer), ctx)
        # Rank 1 starts from other adapter values: DDP's construction must broadcast rank 0's.
        model = wrap_model(_model(perturb_seed=rank), ctx)
        loss_fn = FusedTokenPOLoss("tabpo", impl="torch")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, eps=ADAM_EPS)
        loss = _loss(model, batch, loss_fn)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in unwrap(model).named_parameters() if p.requires_grad}
        optimizer.step()
        torch.save({"rank": ctx.rank, "is_main": ctx.is_main, "world_size": ctx.world_size,
                    "backend": torch.distributed.get_backend(), "loss": loss.detach(),
                    "mean_loss": all_reduce_mean(loss.detach(), ctx), "record_ids": batch.record_ids,
                    "grads": grads, "weights": _trainable(model)}, os.path.join(out_dir, f"rank{rank}.pt"))
        barrier(ctx)
    finally:
        cleanup(ctx)


def test_two_rank_gloo_step_matches_the_single_process_gradient(tmp_path):
    tokenizer = load_tiny_tokenizer()
    load_tiny_model("llama")  # build the cache once here, not in both ranks at the same time
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]

    assert [(r["rank"], r["is_main"], r["world_size"], r["backend"]) for r in ranks] == [(0, True, 2, "gloo"),
                                                                                        (1, False, 2, "gloo")]
    batches = _micro_batches(tokenizer)
    assert [r["record_ids"] for r in ranks] == [b.record_ids for b in batches]  # each rank its own row

    # Every rank holds the same adapters after the step.
    names = sorted(ranks[0]["weights"])
    assert names and names == sorted(ranks[1]["weights"])
    for name in names:
        torch.testing.assert_close(ranks[1]["weights"][name], ranks[0]["weights"][name], rtol=0, atol=0)

    # A single process from rank 0's init, one AdamW step on the mean of both micro-batch losses.
    torch.manual_seed(0)
    model = _model(perturb_seed=0)
    loss_fn = FusedTokenPOLoss("tabpo", impl="torch")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, eps=ADAM_EPS)
    losses = [_loss(model, batch, loss_fn) for batch in batches]
    ((losses[0] + losses[1]) / 2).backward()
    # Every adapter has a gradient, and the two micro-batches' gradients differ (so a rank that stepped on
    # its own gradient alone would not match): the comparison below is not vacuous.
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(grads) == names and all(g.abs().sum() > 0 for g in grads.values())
    optimizer.step()
    expected = _trainable(model)
    for name in names:
        for r in ranks:  # DDP's all-reduced gradient is the mean gradient
            scale = grads[name].abs().max().item()
            torch.testing.assert_close(r["grads"][name], grads[name], rtol=1e-4, atol=1e-6 * scale)
        # Each entry moves by about lr in this step; agreeing to 0.1 % of that is agreement to rounding.
        torch.testing.assert_close(ranks[0]["weights"][name], expected[name], rtol=0, atol=1e-3 * LR)

    for r, loss in zip(ranks, losses):
        torch.testing.assert_close(r["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["mean_loss"], (losses[0] + losses[1]).detach() / 2, rtol=1e-5, atol=1e-6)


def test_packed_hidden_single_process_is_packed_forward():
    tokenizer = load_tiny_tokenizer()
    batch = _micro_batches(tokenizer)[0]
    model = load_tiny_model("llama", lora=True)
    with torch.no_grad():
        torch.testing.assert_close(packed_hidden(model, batch.packed), packed_forward(model, batch.packed),
                                   rtol=0, atol=0)
