"""Greedy generation: pvfast's shared-prefix path vs plain Hugging Face ``generate`` on the full prompts.

    OMP_WAIT_POLICY=PASSIVE python -m pytest bench/test_bench_generation.py -q

(``OMP_WAIT_POLICY=PASSIVE`` on a machine shared with other jobs: spinning OpenMP threads slow the many small
operations of decoding far more than a prefill's large matmuls; the policy is recorded in every row.)

Target (issue 11; a benchmark, not a test: the numbers are recorded, a miss is not a failure): ≥ 5× the
messages/s of ``generate`` on the CPU with the real ~3.5k-token instruction (pvfast's built-in template).

Workload: synthetic messages (seeded), the built-in instruction, batches of ``batch_size`` prompts sorted
by length (both providers batch the same way). Two models:

- ``tiny``: the embedded tiny Qwen2 (0.7M parameters, random init) with seeded N(0, 0.3²) noise added to its
  weight matrices, so that every step's argmax depends on the context (the plain random model repeats one
  token): the token-for-token check compares real sequences. Each row may generate ``max_new_tokens`` = the
  mean token length of the corpus's gold answers (+ end-of-turn), and does unless it happens to hit a stop
  token (``generate`` keeps computing such a row as padding until its batch ends; pvfast drops it). A model
  this small costs almost nothing per token, so per-step overhead (the same in both providers) weighs more
  than it does for any real model.
- ``smollm2``: SmolLM2-135M-Instruct, the default preset's model (real weights, not trained on the task;
  skipped unless ``python -m pvfast.model setup`` has been run), 64 new tokens at most per message.

Providers, measured side by side and interleaved in every round (the machine is shared: ratios are taken
per round and the median over rounds is recorded):

- ``hf_generate``: ``model.generate`` (greedy) on the left-padded full prompts of a batch;
- ``pvfast``: :func:`pvfast.model.generation.generate`, shared-prefix KV cache, unconstrained;
- ``pvfast_constrained``: the same with schema-constrained decoding (the default). Its answers end with
  the end-of-turn token as soon as they are complete, so it generates fewer tokens than the others; its
  tokens/s shows the per-token cost of the constraint.

The unconstrained pvfast tokens are asserted equal to ``generate``'s, row by row, in every round.
"""

from __future__ import annotations

import functools
import os
import statistics
import time

import pytest
import torch

SUBJECT = "generation_messages_per_s"
COLUMNS = ["device", "model", "provider", "messages", "batch_size", "prompt_tokens_mean", "shared_prefix_tokens",
           "max_new_tokens", "new_tokens", "rounds", "threads", "omp_wait_policy", "median_s", "min_s",
           "messages_per_s", "tokens_per_s", "speedup_vs_hf", "speedup_vs_hf_min", "same_tokens_as_hf", "target"]
TARGET = 5.0
NOISE_STD = 0.3
# (model, messages, batch size, rounds); 8 is GenerationConfig's default batch size
CASES = [("tiny", 16, 8, 3), ("tiny", 16, 16, 3), ("smollm2", 16, 8, 2)]
SMOLLM2_MAX_NEW_TOKENS = 64


def _tiny_model():
    from pvfast.model.tiny import load_tiny_tokenizer
    from pvfast.testing import load_tiny_model

    model = load_tiny_model("qwen2").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.add_(torch.randn(param.shape, generator=generator) * NOISE_STD)
    return model, load_tiny_tokenizer("qwen2"), f"tiny Qwen2 (0.7M, random + N(0,{NOISE_STD}²) noise, fp32)"


def _smollm2_model():
    from pvfast.model import smollm2
    from pvfast.model.generation import load_model_for_generation

    if not smollm2.is_set_up():
        pytest.skip("SmolLM2-135M-Instruct is not set up (python -m pvfast.model setup)")
    model, tokenizer = load_model_for_generation(str(smollm2.model_dir()), dtype="float32", device="cpu")
    return model, tokenizer, "SmolLM2-135M-Instruct (fp32, not trained on the task)"


@functools.lru_cache(maxsize=2)
def _workload(name: str, messages: int):
    from pvfast.data.jsonfmt import serialize
    from pvfast.data.prompt import build_prompt
    from pvfast.data.synth import generate_corpus

    model, tokenizer, label = _tiny_model() if name == "tiny" else _smollm2_model()
    if name == "tiny":
        corpus = generate_corpus(n=200, seed=0)
        max_new_tokens = round(statistics.mean(
            len(tokenizer(serialize(ex.annotations), add_special_tokens=False)["input_ids"]) + 1 for ex in corpus))
    else:
        max_new_tokens = SMOLLM2_MAX_NEW_TOKENS
    examples = generate_corpus(n=messages, seed=1)
    prompts = [tokenizer(build_prompt(tokenizer, ex.direction, ex.message), add_special_tokens=False)["input_ids"]
               for ex in examples]
    return model, tokenizer, label, examples, prompts, max_new_tokens


def _hf_generate(model, tokenizer, prompts, batch_size: int, max_new_tokens: int) -> list[list[int]]:
    from pvfast.model.generation import _left_pad, _pad_id, stop_token_ids

    stops = stop_token_ids(model, tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            input_ids, mask = _left_pad([prompts[i] for i in batch], _pad_id(tokenizer))
            generated = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, num_beams=1,
                                       max_new_tokens=max_new_tokens, pad_token_id=_pad_id(tokenizer),
                                       eos_token_id=stops, temperature=None, top_p=None, top_k=None)
            for i, row in zip(batch, generated[:, input_ids.shape[1]:].tolist()):
                end = next((k + 1 for k, t in enumerate(row) if t in stops), len(row))
                out[i] = row[:end]
    return out


@pytest.mark.parametrize("name,messages,batch_size,rounds", CASES,
                         ids=[f"{n}-{m}msg-batch{b}" for n, m, b, _ in CASES])
def test_generation_messages_per_s(result_sink, name, messages, batch_size, rounds):
    from pvfast.model.generation import generate
    from pvfast.model.prefix_cache import common_prefix_length

    model, tokenizer, label, examples, prompts, max_new_tokens = _workload(name, messages)
    runs = {
        "hf_generate": lambda: _hf_generate(model, tokenizer, prompts, batch_size, max_new_tokens),
        "pvfast": lambda: [g.tokens for g in generate(model, tokenizer, examples, batch_size=batch_size,
                                                      max_new_tokens=max_new_tokens, constrained=False,
                                                      progress=False)],
        "pvfast_constrained": lambda: [g.tokens for g in generate(model, tokenizer, examples, batch_size=batch_size,
                                                                  max_new_tokens=max_new_tokens, constrained=True,
                                                                  progress=False)],
    }
    runs["pvfast"]()  # warm-up (thread pools, the token table of the constraint)
    runs["pvfast_constrained"]()
    times = {provider: [] for provider in runs}
    tokens = {}
    for _ in range(rounds):
        for provider, run in runs.items():
            started = time.perf_counter()
            tokens[provider] = run()
            times[provider].append(time.perf_counter() - started)
        assert tokens["pvfast"] == tokens["hf_generate"]  # the same tokens, row by row, every round

    sink = result_sink(SUBJECT, "cpu", COLUMNS)
    base = dict(device="cpu", model=label, messages=len(examples), batch_size=batch_size,
                prompt_tokens_mean=statistics.mean(len(p) for p in prompts),
                shared_prefix_tokens=common_prefix_length(prompts), max_new_tokens=max_new_tokens, rounds=rounds,
                threads=torch.get_num_threads(), omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "unset"))
    for provider in runs:
        median = statistics.median(times[provider])
        new = sum(len(t) for t in tokens[provider])
        row = dict(base, provider=provider, new_tokens=new, median_s=median, min_s=min(times[provider]),
                   messages_per_s=len(examples) / median, tokens_per_s=new / median)
        if provider != "hf_generate":
            ratios = [h / t for h, t in zip(times["hf_generate"], times[provider])]
            row.update(speedup_vs_hf=statistics.median(ratios),
                       speedup_vs_hf_min=min(times["hf_generate"]) / min(times[provider]), target=f">= {TARGET:g}x")
        if provider == "pvfast":
            row["same_tokens_as_hf"] = True  # asserted above
        sink.add(**row)
