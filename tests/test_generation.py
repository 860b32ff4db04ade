"""Greedy generation: the shared-prefix path against Hugging Face ``generate`` token for token, the plain
path, stopping and ordering, and the progress bar (pvfast.model.generation, pvfast.model.prefix_cache)."""

from __future__ import annotations

import functools

import pytest
import torch

from pvfast.data.prompt import build_prompt
from pvfast.data.records import Example
from pvfast.data.synth import generate_corpus
from pvfast.model import generation
from pvfast.model.generation import _left_pad, _pad_id, generate, generate_completions, stop_token_ids
from pvfast.model.prefix_cache import common_prefix_length
from pvfast.model.tiny import load_tiny_tokenizer
from pvfast.testing import load_tiny_model


def noisy(model, std: float = 0.3, seed: int = 0):
    """Add seeded N(0, std²) noise to every weight matrix, in place. The random tiny models repeat one token
    whatever the context; with the noise each step's argmax depends on the context, so a token-for-token
    comparison actually compares something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.add_(torch.randn(param.shape, generator=g) * std)
    return model.eval()


@functools.lru_cache(maxsize=None)
def _model(arch: str, std: float):
    model = load_tiny_model(arch)
    return noisy(model, std) if std else model.eval()


def _examples(n: int, seed: int) -> list[Example]:
    return generate_corpus(n=n, seed=seed)


def _prompt_ids(tokenizer, examples):
    return [tokenizer(build_prompt(tokenizer, ex.direction, ex.message), add_special_tokens=False)["input_ids"]
            for ex in examples]


def _until_stop(tokens: list[int], stop_ids) -> list[int]:
    """Tokens up to and including the first stop id (generate pads a finished row after it)."""
    for k, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[:k + 1]
    return tokens


def _hf_generate(model, tokenizer, rows: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Plain Hugging Face greedy ``generate`` on left-padded full prompts (one batch)."""
    input_ids, mask = _left_pad(rows, _pad_id(tokenizer))
    stops = stop_token_ids(model, tokenizer)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, num_beams=1,
                             max_new_tokens=max_new_tokens, pad_token_id=_pad_id(tokenizer), eos_token_id=stops,
                             temperature=None, top_p=None, top_k=None)
    return [_until_stop(r, set(stops)) for r in out[:, input_ids.shape[1]:].tolist()]


def test_common_prefix_length():
    assert common_prefix_length([]) == 0
    assert common_prefix_length([[1, 2, 3]]) == 3
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3], [1, 2, 5]]) == 2
    assert common_prefix_length([[1, 2], [3, 2]]) == 0
    assert common_prefix_length([[7, 7], [7, 7]]) == 2


def test_split_point_is_a_token_boundary():
    """Messages that share their first characters but not their first token: the split is the token LCP,
    which ends before the message even though the characters agree further."""
    tokenizer = load_tiny_tokenizer("qwen2")
    examples = [Example("a", "N", "Thanks for the call"), Example("b", "N", "Thank you, doctor")]
    ids = _prompt_ids(tokenizer, examples)
    texts = [build_prompt(tokenizer, ex.direction, ex.message) for ex in examples]
    char_lcp = next(i for i, (x, y) in enumerate(zip(*texts)) if x != y)
    split = common_prefix_length(ids)
    assert tokenizer.decode(ids[0][:split]) == tokenizer.decode(ids[1][:split])
    assert len(tokenizer.decode(ids[0][:split])) < char_lcp  # "Thank" is in both texts, not in the prefix
    assert split > 3000  # the instruction (~3.4k tokens) is shared


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_shared_prefix_equals_hf_generate(arch, monkeypatch):
    """Batched shared-prefix generation (different message lengths, left padding inside a batch) gives the
    tokens of plain ``generate`` on each full prompt alone, and of ``generate`` on the same left-padded batch."""
    model, tokenizer = _model(arch, 0.3), load_tiny_tokenizer(arch)
    examples = _examples(5, seed=3)
    ids = _prompt_ids(tokenizer, examples)
    assert len({len(r) for r in ids}) == 5
    n_new = 12
    starts = []
    original = generation.SharedPrefixRunner.start
    monkeypatch.setattr(generation.SharedPrefixRunner, "start",
                        lambda self, suffixes, n: starts.append((self.prefix.length, len(suffixes))) or
                        original(self, suffixes, n))
    got = generate(model, tokenizer, examples, batch_size=3, max_new_tokens=n_new, constrained=False, progress=False)
    # one prefix for the call: a one-row probe (every layer must run the shared-prefix attention), two batches
    assert starts == [(common_prefix_length(ids), 1), (common_prefix_length(ids), 3), (common_prefix_length(ids), 2)]
    alone = [_hf_generate(model, tokenizer, [r], n_new)[0] for r in ids]
    assert [g.tokens for g in got] == alone
    assert len({tuple(t) for t in alone}) == 5 and all(len(set(t)) > 3 for t in alone)  # not a repeated token
    order = sorted(range(5), key=lambda i: len(ids[i]))
    for batch in (order[:3], order[3:]):
        batched = _hf_generate(model, tokenizer, [ids[i] for i in batch], n_new)
        assert batched == [got[i].tokens for i in batch]
    plain = generate(model, tokenizer, examples, batch_size=3, max_new_tokens=n_new, constrained=False,
                     shared_prefix=False, progress=False)
    assert [g.tokens for g in plain] == alone
    texts = generate_completions(model, tokenizer, examples, batch_size=3, max_new_tokens=n_new, constrained=False,
                                 progress=False)
    assert texts == [tokenizer.decode(g.tokens, skip_special_tokens=True) for g in got]


@pytest.mark.slow
def test_rows_that_stop_leave_the_batch():
    """A row that reaches a stop token stops (and is dropped from the batch) while the others go on; all of
    them still match ``generate`` alone. The stop id here is whatever the first row generates at step 3."""
    model, tokenizer = _model("qwen2", 0.3), load_tiny_tokenizer("qwen2")
    examples = _examples(3, seed=11)
    ids = _prompt_ids(tokenizer, examples)
    first = generate(model, tokenizer, examples[:1], max_new_tokens=4, constrained=False, progress=False)[0]
    stop = first.tokens[3]
    model.generation_config.eos_token_id = stop
    try:
        got = generate(model, tokenizer, examples, batch_size=3, max_new_tokens=10, constrained=False,
                       progress=False)
        alone = [_hf_generate(model, tokenizer, [r], 10)[0] for r in ids]
    finally:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    assert [g.tokens for g in got] == alone
    assert got[0].stopped and got[0].tokens[-1] == stop and len(got[0].tokens) <= 4
    assert any(len(g.tokens) == 10 and not g.stopped for g in got)
    assert got[0].text == tokenizer.decode(got[0].tokens[:-1], skip_special_tokens=True)


def test_stop_text_ends_a_row_and_is_kept_once(monkeypatch):
    """``stop_text`` ends a row once its text holds it; the text is cut after its first occurrence."""
    tokenizer = load_tiny_tokenizer("qwen2")
    script = tokenizer('{"results": []} JSON_END and more JSON_END', add_special_tokens=False)["input_ids"]

    class Scripted:
        """A runner that makes the model 'say' ``script`` whatever the input (logits one-hot on the next token)."""

        def __init__(self, *args):
            self.steps = 0

        def _logits(self, rows):
            logits = torch.zeros(rows, len(tokenizer))
            logits[:, script[min(self.steps, len(script) - 1)]] = 1.0
            self.steps += 1
            return logits

        def start(self, prompts, n):
            return self._logits(len(prompts))

        def step(self, tokens):
            return self._logits(len(tokens))

        def keep(self, rows):
            pass

    monkeypatch.setattr(generation, "_runner", lambda model, pad, encoded, shared: (Scripted(), 0))
    model = torch.nn.Linear(1, 1)
    model.generation_config = None
    out = generate(model, tokenizer, _examples(1, seed=0), max_new_tokens=50, constrained=False, progress=False)[0]
    assert out.stopped and out.text == '{"results": []} JSON_END'
    assert len(out.tokens) < len(script)


def test_progress_bar_counts_messages_without_text(capsys):
    model, tokenizer = _model("qwen2", 0.0), load_tiny_tokenizer("qwen2")
    examples = _examples(3, seed=2)
    generate_completions(model, tokenizer, examples, batch_size=2, max_new_tokens=3, progress=True)
    err = capsys.readouterr().err
    assert "msg" in err and "3/3" in err
    for ex in examples:
        for word in ex.message.split():
            if len(word) > 6:
                assert word not in err


def test_generation_restores_training_mode_and_rejects_bad_sizes():
    model, tokenizer = load_tiny_model("qwen2"), load_tiny_tokenizer("qwen2")
    model.train()
    generate_completions(model, tokenizer, _examples(1, seed=0), max_new_tokens=2, progress=False)
    assert model.training
    with pytest.raises(ValueError, match="batch_size"):
        generate_completions(model, tokenizer, _examples(1, seed=0), batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_completions(model, tokenizer, _examples(1, seed=0), max_new_tokens=0)
    assert generate_completions(model, tokenizer, []) == []


def test_unsupported_models_fall_back_to_full_prompts(monkeypatch):
    """A model whose attention never reaches the shared-prefix function (here: the switch to it is disabled,
    as for a model that hard-codes its attention) is detected by the probe and generated from the full
    prompts, with a warning; the tokens are still those of ``generate``."""
    import contextlib

    from pvfast.model import prefix_cache

    model, tokenizer = _model("qwen2", 0.3), load_tiny_tokenizer("qwen2")
    examples = _examples(2, seed=5)
    expected = generate(model, tokenizer, examples, max_new_tokens=6, constrained=False, progress=False)
    monkeypatch.setattr(prefix_cache, "attention_implementation", lambda model, name: contextlib.nullcontext())
    with pytest.warns(UserWarning, match="ran in 0 of 2 layers"):
        got = generate(model, tokenizer, examples, max_new_tokens=6, constrained=False, progress=False)
    assert [g.tokens for g in got] == [g.tokens for g in expected]
    monkeypatch.setattr(prefix_cache, "unsupported_reason", lambda model: "a sliding attention window")
    with pytest.warns(UserWarning, match="sliding attention window"):
        got = generate(model, tokenizer, examples, max_new_tokens=6, constrained=False, progress=False)
    assert [g.tokens for g in got] == [g.tokens for g in expected]
