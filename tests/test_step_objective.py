"""One optimizer step computes the stated objective over ALL its records, however they are split.

The trainer's step (:func:`pvfast.train.loop.accumulate_step`) backpropagates each micro-batch's loss sum
and divides by the step's total normaliser (over micro-batches and ranks). Checked here on the tiny LoRA
Llama: the step gradient from one pack, from the same records in three packs and from a 2-rank gloo run
agree to float32 rounding, and equal a float64 reference of the full-batch objective computed without the
fused op (plain log-softmax in float64, the torch statistics reference, the objective on all records).

Also: the reference and policy passes run under one precision, so with a fresh adapter (B = 0) the margin
is exactly 0 at step 0 under bf16 autocast on the CPU.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.multiprocessing as mp

from pvfast.config.sections import PairConfig
from pvfast.data.codebook import CODES, SUBCODES
from pvfast.data.pairs import ConfusionTable, make_preference_records
from pvfast.data.prompt import PromptTemplate
from pvfast.data.synth import generate_corpus
from pvfast.model.forward import packed_token_logprobs
from pvfast.model.reference import precompute_reference, reference_stats
from pvfast.model.tiny import load_tiny_tokenizer
from pvfast.objectives.class_balance import chosen_annotations, class_balance_table
from pvfast.objectives.config import ClassBalanceConfig, default_config
from pvfast.objectives.fused_loss import FusedTokenPOLoss
from pvfast.objectives.losses import compute_objective
from pvfast.objectives.stats import segment_stats_reference
from pvfast.objectives.weights import token_weights
from pvfast.packing.loss_batch import make_loss_batches, preference_groups, sft_groups
from pvfast.testing import activate_lora, free_port, load_tiny_model
from pvfast.train.distributed import DistContext, cleanup, setup_distributed, shard, shard_padding, unwrap, wrap_model
from pvfast.train.loop import accumulate_step

TEMPLATE = PromptTemplate("Extract patient-voice triples. TO_PAT_YN: {direction}\nContext: {message}\nOUTPUT:")
BUDGET = 1 << 16  # one pack holds every record
CB = ClassBalanceConfig(enabled=True, b=0.9)
# (objective, config): TAB-PO with class balance, the baselines, SFT token-weighted and per sequence.
CASES = {
    "tabpo_cb": ("tabpo", default_config("tabpo").__class__(class_balance=CB)),
    "dpo": ("dpo", default_config("dpo")),
    "ipo": ("ipo", default_config("ipo")),
    "cal_dpo": ("cal_dpo", default_config("cal_dpo")),
    "dpo_positive": ("dpo_positive", default_config("dpo_positive")),
    "simpo": ("simpo", default_config("simpo")),
    "sft_token_cb": ("sft", default_config("sft").__class__(class_balance=CB)),
    "sft_sequence": ("sft", default_config("sft").__class__(reduction="sequence")),
}
CPU = torch.device("cpu")
# The step logic is what is tested here; the torch backend keeps it fast (the fused ops have their own tests).
IMPL = "torch"
GRAD_RTOL = 5e-5  # relative L2 agreement of step gradients in float32 (see the pack-split test)


def _examples():
    # Varied label sets, so class-balance weights differ between records.
    return [e for e in generate_corpus(n=40, seed=3) if e.annotations][:5]


def _groups(tokenizer, objective, config):
    """(groups, kind, class-balance table by record id or None) of the test records."""
    examples = _examples()
    if objective == "sft":
        table = class_balance_table([e.id for e in examples], examples, config.class_balance)
        return sft_groups(examples, tokenizer, TEMPLATE), "sft", table
    records = make_preference_records(examples, ConfusionTable.empty(CODES), ConfusionTable.empty(SUBCODES),
                                      PairConfig(seed=1))
    table = class_balance_table([r.id for r in records], chosen_annotations(records), config.class_balance)
    return preference_groups(records, tokenizer, TEMPLATE), "po", table


def _packs(groups, kind, splits):
    """The groups as ``splits`` packs (contiguous slices of unequal sizes), or one pack."""
    if splits == 1:
        return make_loss_batches(groups, BUDGET, kind)
    bounds = {1: [0, len(groups)], 2: [0, 1, len(groups)], 3: [0, 1, 3, len(groups)]}[splits]
    packs = [b for lo, hi in zip(bounds, bounds[1:]) for b in make_loss_batches(groups[lo:hi], BUDGET, kind)]
    assert len(packs) == splits
    return packs


def _model():
    return activate_lora(load_tiny_model("llama", lora=True), seed=4)


def _reference_fn(model, loss_fn):
    if not loss_fn.needs_reference:
        return None
    return lambda cpu_batch, batch, mask: reference_stats(unwrap(model), batch, loss_fn, mask)


def _step_grads(model, packs, loss_fn, ctx, autocast_mode="off"):
    model.zero_grad(set_to_none=True)
    sums = accumulate_step(model, packs, loss_fn, _reference_fn(model, loss_fn), ctx, autocast_mode, 1)
    grads = {n: p.grad.detach().clone() for n, p in unwrap(model).named_parameters() if p.requires_grad}
    return grads, sums


def _plain_reference(model, groups, kind, objective, config, table, dtype=torch.float64):
    """Gradient and loss of the full-batch objective in ``dtype``, without the fused op or the loop."""
    model = copy.deepcopy(model).to(dtype)
    (batch,) = make_loss_batches(groups, BUDGET, kind)
    packed = batch.packed
    weights = token_weights(packed.score_roles, packed.score_diff, config).to(dtype)
    tau = config.gate_tau

    def stats(logp):
        return segment_stats_reference(logp, weights, packed.score_segments, packed.num_segments, tau)

    ref = None
    if config.needs_reference:
        with torch.no_grad(), model.disable_adapter():
            ref = stats(packed_token_logprobs(model, packed))
    policy = stats(packed_token_logprobs(model, packed))
    example_weights = None
    if table is not None:  # per pair (SFT: per completion), looked up by record id
        units = range(packed.num_segments) if batch.pairs is None else batch.pairs.chosen.tolist()
        example_weights = torch.tensor([table[batch.segment_records[m]] for m in units], dtype=dtype)
    out = compute_objective(objective, policy, ref, batch.pairs, example_weights, config)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, out.loss.item()


def _rel_l2(a: dict, b: dict) -> float:
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    den = sum(float(b[k].double().pow(2).sum()) for k in a)
    return (num / den) ** 0.5


@pytest.mark.parametrize("case", sorted(CASES))
def test_step_gradient_is_the_full_batch_objective_whatever_the_pack_split(case):
    objective, config = CASES[case]
    tokenizer = load_tiny_tokenizer("llama")
    groups, kind, table = _groups(tokenizer, objective, config)
    model = _model()
    loss_fn = FusedTokenPOLoss(objective, config, impl=IMPL, class_weights=table)
    ctx = DistContext(0, 1, 0, CPU, True)
    one, sums_one = _step_grads(model, _packs(groups, kind, 1), loss_fn, ctx)
    three, sums_three = _step_grads(model, _packs(groups, kind, 3), loss_fn, ctx)
    expected, loss64 = _plain_reference(model, groups, kind, objective, config, table)
    _, loss32 = _plain_reference(model, groups, kind, objective, config, table, torch.float32)

    assert sorted(one) == sorted(expected) and all(g.abs().sum() > 0 for g in expected.values())
    # "Agree to float32 rounding": summed log-probs of ~-800 carry ~1e-4 of float32 rounding, so gradients of
    # the same objective computed in other summation orders differ by ~1e-5 relative (the plain float32 path
    # is off float64 by 1e-6..1e-5 here). The bug this guards against, a mean of pack means, is off by ~1e-1.
    assert _rel_l2(three, one) <= GRAD_RTOL, "the pack split changed the step gradient"
    assert _rel_l2(one, expected) <= GRAD_RTOL, "the step gradient is not the full-batch objective's"
    loss_tol = 2 * abs(loss32 - loss64) + 1e-5 * abs(loss64)
    assert abs(sums_one["loss"] - loss64) <= loss_tol
    assert abs(sums_three["loss"] - loss64) <= loss_tol


def test_a_mean_of_pack_means_would_differ():
    """The split above is not vacuous: weighting each pack's mean loss by its pair count (the old trainer)
    gives another gradient when class balance is on."""
    objective, config = CASES["tabpo_cb"]
    tokenizer = load_tiny_tokenizer("llama")
    groups, kind, table = _groups(tokenizer, objective, config)
    model = _model()
    loss_fn = FusedTokenPOLoss(objective, config, impl=IMPL, class_weights=table)
    ctx = DistContext(0, 1, 0, CPU, True)
    exact, _ = _step_grads(model, _packs(groups, kind, 1), loss_fn, ctx)
    packs = _packs(groups, kind, 3)
    total_pairs = sum(b.num_pairs for b in packs)
    grads = None
    for batch in packs:  # each pack alone is its own mean; weight it by its share of the pairs
        pack_grads, _ = _step_grads(model, [batch], loss_fn, ctx)
        share = batch.num_pairs / total_pairs
        grads = {n: g * share + (0 if grads is None else grads[n]) for n, g in pack_grads.items()}
    assert _rel_l2(grads, exact) > 1e-3


# ------------------------------------------------------------------------------------------- 2-rank gloo
def _rank_worker(rank: int, port: int, case: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = setup_distributed("cpu")
    try:
        objective, config = CASES[case]
        groups, kind, table = _groups(load_tiny_tokenizer("llama"), objective, config)
        # 3 packs of unequal sizes over 2 ranks, as the trainer shards them: rank 0 runs packs 0 and 2, rank 1
        # runs pack 1 and a wrapped-around repeat of pack 0 (padding); two micro-batches each (no_sync path).
        packs = _packs(groups, kind, 3)
        local, padding = shard(packs, ctx), shard_padding(len(packs), ctx)
        model = wrap_model(_model(), ctx)
        loss_fn = FusedTokenPOLoss(objective, config, impl=IMPL, class_weights=table)
        model.zero_grad(set_to_none=True)
        sums = accumulate_step(model, local, loss_fn, _reference_fn(model, loss_fn), ctx, "off", 1, padding=padding)
        grads = {n: p.grad.detach().clone() for n, p in unwrap(model).named_parameters() if p.requires_grad}
        torch.save({"grads": grads, "loss": sums["loss"], "padding": padding}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        cleanup(ctx)


@pytest.mark.parametrize("case", ["tabpo_cb", "dpo", "simpo", "sft_token_cb", "sft_sequence"])
def test_two_rank_step_gradient_equals_the_single_process_step(case, tmp_path):
    objective, config = CASES[case]
    tokenizer = load_tiny_tokenizer("llama")
    groups, kind, table = _groups(tokenizer, objective, config)
    packs = _packs(groups, kind, 3)
    model = _model()
    loss_fn = FusedTokenPOLoss(objective, config, impl=IMPL, class_weights=table)
    single, sums = _step_grads(model, packs, loss_fn, DistContext(0, 1, 0, CPU, True))
    mp.spawn(_rank_worker, args=(free_port(), case, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert [r["padding"] for r in results] == [[False, False], [False, True]]  # the epoch-end repeat is in play
    for result in results:
        assert _rel_l2(result["grads"], single) <= GRAD_RTOL
        assert result["loss"] == pytest.approx(sums["loss"], rel=1e-5)


# ------------------------------------------------------------------------------------------- precision
def test_margin_is_exactly_zero_at_step_zero_under_bf16_autocast():
    """Reference (adapters off) and policy (fresh adapter, B = 0) under one bf16 autocast agree to the bit."""
    objective, config = "tabpo", default_config("tabpo")
    tokenizer = load_tiny_tokenizer("llama")
    groups, kind, table = _groups(tokenizer, objective, config)
    model = load_tiny_model("llama", lora=True)  # B = 0: the policy is the reference
    loss_fn = FusedTokenPOLoss(objective, config, class_weights=table)  # the trainer's backend (C++ on the CPU)
    ctx = DistContext(0, 1, 0, CPU, True)
    _, sums = _step_grads(model, _packs(groups, kind, 1), loss_fn, ctx, autocast_mode="bf16")
    assert sums["margin"] == 0.0 and sums["reward_chosen"] == 0.0 and sums["reward_rejected"] == 0.0
    # The autocast path is really a different precision: bf16 statistics differ from fp32 ones.
    (batch,) = _packs(groups, kind, 1)
    with torch.no_grad():
        fp32 = reference_stats(model, batch, loss_fn)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = reference_stats(model, batch, loss_fn)
    assert not torch.equal(fp32, bf16)


def test_shard_padding_marks_the_wrapped_repeats():
    # 5 packs over 2 ranks: rank 0 takes positions 0, 2, 4; rank 1 takes 1, 3 and the repeat of position 0.
    assert shard_padding(5, DistContext(0, 2, 0, CPU, True)) == [False, False, False]
    assert shard_padding(5, DistContext(1, 2, 1, CPU, False)) == [False, False, True]
    assert shard_padding(0, DistContext(0, 2, 0, CPU, True)) == []


def test_a_padding_micro_batch_adds_nothing_to_the_step():
    """At the end of an epoch a rank may hold a wrapped-around repeat (for DDP's equal step counts): it runs,
    but the step's gradient and loss are those of the real micro-batches alone."""
    objective, config = CASES["tabpo_cb"]
    groups, kind, table = _groups(load_tiny_tokenizer("llama"), objective, config)
    packs = _packs(groups, kind, 3)
    model = _model()
    loss_fn = FusedTokenPOLoss(objective, config, impl=IMPL, class_weights=table)
    ctx = DistContext(0, 1, 0, CPU, True)
    real, real_sums = _step_grads(model, packs, loss_fn, ctx)
    model.zero_grad(set_to_none=True)
    padded_sums = accumulate_step(model, [*packs, packs[0]], loss_fn, _reference_fn(model, loss_fn), ctx, "off", 1,
                                  padding=[False, False, False, True])
    padded = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert _rel_l2(padded, real) <= GRAD_RTOL
    assert padded_sums["loss"] == pytest.approx(real_sums["loss"], rel=1e-6)
    assert padded_sums["margin"] == pytest.approx(real_sums["margin"], rel=1e-6, abs=1e-9)


def test_margin_is_exactly_zero_at_step_zero_with_a_bf16_precomputed_reference(tmp_path):
    """The cached path too: --po.precompute_ref scores the reference under the run's precision."""
    objective, config = "tabpo", default_config("tabpo")
    groups, kind, table = _groups(load_tiny_tokenizer("llama"), objective, config)
    packs = _packs(groups, kind, 3)
    model = load_tiny_model("llama", lora=True)  # B = 0: the policy is the reference
    loss_fn = FusedTokenPOLoss(objective, config, class_weights=table)
    cache = precompute_reference(model, packs, loss_fn, tmp_path / "ref.safetensors", autocast_mode="bf16")
    ctx = DistContext(0, 1, 0, CPU, True)
    model.zero_grad(set_to_none=True)
    sums = accumulate_step(model, packs, loss_fn, lambda cpu_batch, batch, mask: cache.get(cpu_batch, loss_fn),
                           ctx, "bf16", 1)
    assert sums["margin"] == 0.0 and sums["reward_chosen"] == 0.0
    # ... and a reference scored in full precision is not the bf16 policy's: the margin would not be 0.
    fp32 = precompute_reference(model, packs, loss_fn, tmp_path / "fp32.safetensors", autocast_mode="off")
    model.zero_grad(set_to_none=True)
    sums = accumulate_step(model, packs, loss_fn, lambda cpu_batch, batch, mask: fp32.get(cpu_batch, loss_fn),
                           ctx, "bf16", 1)
    assert sums["margin"] != 0.0
