"""The data-pipeline demo: synthetic corpus → validated files → prompts → token roles and weights.

    python -m pvfast.data demo [--n 1137] [--seed 0] [--out DIR] [--arch qwen2]

It prints counts and token statistics only, never message or span text. It shows the shape of the
workload the trainer is built for: a long instruction shared by every example, a short message, a short
structured completion.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from pvfast.data import io
from pvfast.data.codebook import NONE_SUBCODE, PUBLISHED_N_MESSAGES, PUBLISHED_SUBCODE_COUNTS
from pvfast.data.jsonfmt import serialize
from pvfast.data.roles import ROLE_NAMES
from pvfast.data.synth import write_corpus
from pvfast.objectives.config import TabpoConfig


def _common_prefix_length(sequences: list[np.ndarray]) -> int:
    first = sequences[0]
    length = len(first)
    for seq in sequences[1:]:
        n = min(length, len(seq))
        mismatch = np.nonzero(first[:n] != seq[:n])[0]
        length = int(mismatch[0]) if mismatch.size else n
    return length


def run_demo(n: int = PUBLISHED_N_MESSAGES, seed: int = 0, out: Path | None = None, arch: str = "qwen2",
             sample: int = 200) -> dict:
    """Run the pipeline and return its statistics (also printed)."""
    import torch

    from pvfast.data.prompt import build_prompt
    from pvfast.data.tokenization import tokenize_completion
    from pvfast.model.tiny import load_tiny_tokenizer
    from pvfast.objectives.weights import token_weights

    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(out) if out is not None else Path(tmp)
        paths = write_corpus(out_dir, n=n, seed=seed)
        splits = {name: io.load_examples(path)[0] for name, path in paths.items()}  # validates every record
        print(f"corpus: {n} synthetic messages (seed {seed}) -> {out_dir if out is not None else 'a temporary dir'}")
        for name, examples in splits.items():
            directions = Counter(e.direction for e in examples)
            n_ann = sum(len(e.annotations) for e in examples)
            print(f"  {name:<11}{len(examples):>6} messages  {n_ann:>6} annotations  "
                  f"{directions['N']:>5} patient->provider  {directions['Y']:>5} provider->patient")

        everything = [e for examples in splits.values() for e in examples]
        counts = Counter(a.subcode for e in everything for a in e.annotations if a.subcode != NONE_SUBCODE)
        print("\nmost frequent sub-codes (synthetic vs published, per 1137 messages):")
        for label, published in sorted(PUBLISHED_SUBCODE_COUNTS.items(), key=lambda kv: -kv[1])[:8]:
            print(f"  {label:<36}{counts[label] * PUBLISHED_N_MESSAGES / len(everything):>8.1f}{published:>8}")

        tokenizer = load_tiny_tokenizer(arch)
        cfg = TabpoConfig()  # the released weights (roles only: no rejected completion here)
        train = splits["train"][:sample]
        tokenized = [tokenize_completion(tokenizer, build_prompt(tokenizer, e.direction, e.message),
                                         serialize(e.annotations)) for e in train]
        prompts = [t.prompt_ids for t in tokenized]
        shared = _common_prefix_length(prompts)
        prompt_len = np.array([len(p) for p in prompts])
        completion_len = np.array([len(t.completion_ids) for t in tokenized])
        roles = np.concatenate([t.roles for t in tokenized])
        weights = np.concatenate([token_weights(torch.as_tensor(t.roles), None, cfg).numpy() for t in tokenized])
        role_share = {ROLE_NAMES[r]: float(np.mean(roles == r)) for r in sorted(set(roles.tolist()))}

        print(f"\ntokens ({arch} tiny tokenizer, {len(train)} training examples):")
        print(f"  shared instruction prefix   {shared:>8} tokens (identical in every prompt)")
        print(f"  prompt                      {prompt_len.mean():>8.1f} tokens on average")
        print(f"  completion                  {completion_len.mean():>8.1f} tokens on average")
        print("  completion token roles      " + ", ".join(f"{k} {v:.1%}" for k, v in role_share.items()))
        print(f"  mean token weight           {weights.mean():>8.3f}")
        unshared = int(prompt_len.sum() + completion_len.sum())
        once = int(shared + (prompt_len - shared).sum() + completion_len.sum())
        print(f"  tokens computed: {unshared} run one by one vs {once} with the instruction computed once "
              f"({unshared / once:.1f}x fewer)")
        return {"splits": {k: len(v) for k, v in splits.items()}, "shared_prefix_tokens": shared,
                "mean_prompt_tokens": float(prompt_len.mean()),
                "mean_completion_tokens": float(completion_len.mean()), "role_share": role_share,
                "unshared_tokens": unshared, "shared_tokens": once}


if __name__ == "__main__":  # pragma: no cover - use `python -m pvfast.data demo`
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_demo()
