"""Reference statistics: adapters disabled equals the base model; the precomputed cache round-trips and
refuses batches or settings it was not computed for."""

import dataclasses

import pytest
import torch

from pvfast.data.jsonfmt import serialize
from pvfast.data.prompt import PromptTemplate, build_prompt
from pvfast.data.records import PreferenceRecord
from pvfast.data.synth import generate_corpus
from pvfast.data.tokenization import tokenize_pair_group
from pvfast.model.forward import lm_head_weight, packed_forward
from pvfast.model.reference import ReferenceCache, batch_key, frozen_model_stats, precompute_reference, reference_stats
from pvfast.model.tiny import load_tiny_tokenizer
from pvfast.objectives.config import TabpoConfig, TokenWeightConfig
from pvfast.objectives.fused_loss import FusedTokenPOLoss
from pvfast.objectives.losses import stats_from_padded
from pvfast.objectives.weights import token_weights
from pvfast.packing.loss_batch import make_loss_batches, preference_groups
from pvfast.packing.tree import group_tree_tokens
from pvfast.testing import activate_lora, load_tiny_model

SHORT_TEMPLATE = PromptTemplate("Extract the PV-Miner triples.\nTO_PAT_YN: {direction}\n{message}\nOUTPUT:",
                                source="test template")


def _records(n, seed):
    records = []
    for ex in [e for e in generate_corpus(n=60, seed=seed) if len(e.annotations) >= 2][:n]:
        anns = list(ex.annotations)
        short = dataclasses.replace(anns[0], span=anns[0].span[: max(1, len(anns[0].span) // 2)])
        records.append(PreferenceRecord(ex.id, serialize(anns), (serialize(anns[:-1]), serialize([short] + anns[1:])),
                                        ex.direction, ex.message))
    return records


@pytest.fixture(scope="module")
def tokenizer():
    return load_tiny_tokenizer("llama")


@pytest.fixture(scope="module")
def model():
    return activate_lora(load_tiny_model("llama", lora=True).eval())


@pytest.fixture(scope="module")
def batches(tokenizer):
    groups = preference_groups(_records(4, seed=3), tokenizer, SHORT_TEMPLATE)
    batches = make_loss_batches(groups, token_budget=3 * max(group_tree_tokens(g) for g in groups) // 2)
    assert len(batches) > 1
    return batches


LOSS = FusedTokenPOLoss("tabpo", TabpoConfig())


def _unshared_base_stats(base_model, tokenizer, records):
    """(M, 7) float64 statistics of the plain base model, every completion a separate sequence, in the
    segment order [chosen@1, rejected_1, chosen@2, rejected_2] per record."""
    tau = LOSS.config.tau
    out = []
    for record in records:
        prompt = build_prompt(tokenizer, record.direction, record.message, SHORT_TEMPLATE)
        group = tokenize_pair_group(tokenizer, prompt, record.chosen, record.rejected)
        p = len(group.prompt_ids)
        for j, rejected in enumerate(group.rejected):
            for ids, roles, diff in ((group.chosen.input_ids, group.chosen.roles, group.chosen_diff_masks[j]),
                                     (rejected.input_ids, rejected.roles, group.rejected_diff_masks[j])):
                w = token_weights(torch.as_tensor(roles), torch.as_tensor(diff), LOSS.config)
                with torch.no_grad():
                    logits = base_model(input_ids=torch.as_tensor(ids)[None]).logits[0].double()
                logp = logits[p - 1:-1].log_softmax(-1).gather(-1, torch.as_tensor(ids[p:])[:, None])[:, 0]
                mask = torch.ones(1, logp.numel(), dtype=torch.bool)
                out.append(stats_from_padded(logp[None], w.double()[None], mask, tau))
    return torch.cat(out)


def test_disabled_adapters_equal_the_base_model_without_lora(tokenizer, model, batches):
    base = load_tiny_model("llama", lora=False).eval()  # the same saved weights, no adapters
    records = {r.id: r for r in _records(4, seed=3)}
    for batch in batches:
        ref = reference_stats(model, batch, LOSS)
        assert ref.shape == (batch.packed.num_segments, 7) and not ref.requires_grad
        # Same network, same row, same op (measured: bitwise equal); atol leaves room for another
        # accumulation order on another machine (sums reach ~2500 in fp32).
        torch.testing.assert_close(ref, frozen_model_stats(base, batch, LOSS), rtol=0, atol=1e-4)
        # And the base model run unshared into float64: the fp32 sums (|Σ ℓ| up to ~2700 over ~300 tokens)
        # differ by at most 1.3e-4 measured; atol 1e-3.
        unshared = _unshared_base_stats(base, tokenizer, [records[i] for i in batch.record_ids])
        torch.testing.assert_close(ref.double(), unshared, rtol=0, atol=1e-3)
        # the adapters are active in the policy: its statistics differ
        with torch.no_grad():
            policy = LOSS.statistics(batch.scoring_rows(packed_forward(model, batch.packed)), lm_head_weight(model))
        assert (policy[:, 0] - ref[:, 0]).abs().max() > 1e-2


def test_reference_pass_restores_training_flags(model, batches):
    model.train()
    try:
        reference_stats(model, batches[0], LOSS)
        assert all(m.training for m in model.modules())
    finally:
        model.eval()


def test_plain_model_and_reference_free_objective_are_refused(batches):
    plain = load_tiny_model("llama", lora=False)
    with pytest.raises(TypeError, match="needs a peft model.*precompute"):
        reference_stats(plain, batches[0], LOSS)
    with pytest.raises(ValueError, match="reference-free"):
        reference_stats(plain, batches[0], FusedTokenPOLoss("simpo"))


def test_precomputed_cache_round_trip_equals_on_the_fly(model, batches, tmp_path):
    path = tmp_path / "ref.safetensors"
    cache = precompute_reference(model, batches, LOSS, path)
    assert path.is_file() and len(cache) == len(batches)
    reloaded = ReferenceCache.load(path)
    for batch in batches:
        on_the_fly = reference_stats(model, batch, LOSS)
        torch.testing.assert_close(cache.get(batch, LOSS), on_the_fly, rtol=0, atol=1e-6)
        assert torch.equal(reloaded.get(batch, LOSS), cache.get(batch, LOSS))
        # the loss from cached statistics is the loss from the on-the-fly reference
        rows = batch.scoring_rows(packed_forward(model, batch.packed).detach())
        head = lm_head_weight(model)
        cached_loss = LOSS(rows, head, batch.pairs, reloaded.get(batch, LOSS)).loss
        torch.testing.assert_close(cached_loss, LOSS(rows, head, batch.pairs, on_the_fly).loss, rtol=0, atol=1e-6)
    # An existing cache that covers the batches, scored from this very reference, is reused as it is.
    written = path.stat().st_mtime_ns
    assert len(precompute_reference(model, batches, LOSS, path)) == len(batches)
    assert path.stat().st_mtime_ns == written


def test_cache_from_other_data_or_settings_is_refused(tokenizer, model, batches, tmp_path):
    path = tmp_path / "ref.safetensors"
    precompute_reference(model, batches[:1], LOSS, path)
    other_groups = preference_groups(_records(2, seed=11), tokenizer, SHORT_TEMPLATE)
    (other,) = make_loss_batches(other_groups, token_budget=4096)
    cache = ReferenceCache.load(path)
    assert cache.has(batches[0], LOSS)
    with pytest.raises(KeyError, match="other data"):
        cache.get(other, LOSS)
    with pytest.raises(KeyError, match="other data"):
        cache.get(batches[1], LOSS)  # same data set, but a batch the cache was not computed for
    with pytest.raises(ValueError, match="no entry for 1 of 1 batches"):
        precompute_reference(model, [other], LOSS, path)
    # Same tokens, other token roles: another content key.
    relabelled = dataclasses.replace(batches[0], content_key=None, packed=dataclasses.replace(
        batches[0].packed, score_roles=torch.zeros_like(batches[0].packed.score_roles)))
    assert batch_key(relabelled) != batch_key(batches[0])
    with pytest.raises(KeyError, match="other data"):
        cache.get(relabelled, LOSS)
    # Same batches, other objective settings that shape the statistics (gate τ, token weights, the TW
    # switch): no entry, the key follows from the settings. A setting they do not depend on (β) is served.
    for config in (TabpoConfig(tau=0.5), TabpoConfig(token_weighting=False),
                   TabpoConfig(token_weights=TokenWeightConfig(w_span=2.0))):
        with pytest.raises(KeyError, match="objective settings"):
            cache.get(batches[0], FusedTokenPOLoss("tabpo", config))
    assert torch.equal(cache.get(batches[0], FusedTokenPOLoss("tabpo", TabpoConfig(beta=0.1))),
                       cache.get(batches[0], LOSS))
    # overwrite=True replaces it with the new data's statistics.
    replaced = precompute_reference(model, [other], LOSS, path, overwrite=True)
    torch.testing.assert_close(replaced.get(other, LOSS), reference_stats(model, other, LOSS), rtol=0, atol=1e-6)


def test_an_older_or_damaged_cache_file_is_scored_again(model, batches, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "ref.safetensors"
    save_file({"stats/x": torch.zeros(2, 7)}, str(path), metadata={"format": "pvfast-reference-v1"})
    with pytest.warns(UserWarning, match="scoring the reference again"):
        cache = precompute_reference(model, batches[:1], LOSS, path)
    torch.testing.assert_close(cache.get(batches[0], LOSS), reference_stats(model, batches[0], LOSS),
                               rtol=0, atol=1e-6)


def test_not_a_cache_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a pvfast reference cache"):
        ReferenceCache.load(path)


def test_cache_lookup_hashes_each_cpu_batch_once(model, batches, tmp_path, monkeypatch):
    """A step looks its reference up by the CPU batch: its content is hashed once and kept (a device copy made
    by LossBatch.to keeps the key), never copied back and hashed again per micro-batch."""
    import pvfast.model.reference as reference

    cache = precompute_reference(model, batches[:1], LOSS, tmp_path / "ref.safetensors")
    calls = []
    real = reference._content_hash
    monkeypatch.setattr(reference, "_content_hash", lambda batch: calls.append(batch) or real(batch))
    fresh = dataclasses.replace(batches[0], content_key=None)  # as loaded from disk: never hashed
    for _ in range(3):  # three epochs over the same pack
        cache.get(fresh, LOSS)
    assert len(calls) == 1
    moved = fresh.to("cpu")
    assert moved.content_key == fresh.content_key
    cache.get(moved, LOSS)
    assert len(calls) == 1


def test_cache_from_another_reference_model_or_precision_is_refused(model, batches, tmp_path):
    """The key of an entry is the batch and the objective settings; the file also records the reference it
    was scored with (weights, precision, attention): another SFT model or --run.autocast is never served."""
    path = tmp_path / "ref.safetensors"
    precompute_reference(model, batches[:1], LOSS, path)
    other_sft = load_tiny_model("llama", lora=True).eval()
    with torch.no_grad():  # another SFT model: different base weights
        other_sft.get_base_model().model.layers[0].mlp.down_proj.weight.mul_(1.01)
    with pytest.raises(ValueError, match="another reference model, precision or attention"):
        precompute_reference(other_sft, batches[:1], LOSS, path)
    with pytest.raises(ValueError, match="another reference model, precision or attention"):
        precompute_reference(model, batches[:1], LOSS, path, autocast_mode="bf16")
    # Training the adapters does not change the reference (it is the network with them disabled).
    trained = activate_lora(load_tiny_model("llama", lora=True).eval(), seed=9)
    assert len(precompute_reference(trained, batches[:1], LOSS, path)) == 1
