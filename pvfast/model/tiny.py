"""The embedded tiny models and their trained tokenizer: the `tiny` smoke preset and the unit tests' models.

Two causal LMs with the architectures of the published base models, Llama and Qwen2 (random, seeded
init; about 1.1M parameters for Llama, 0.7M for Qwen2 with tied embeddings), and one byte-level BPE
tokenizer trained with ``tokenizers`` on pvfast text: the instruction prompt, synthetic messages and
the canonical JSON completions of their annotations. The tokenizer has ChatML turn markers and a chat
template, so prompts, completions and token roles go through exactly the code paths real models use.

Both are saved with ``save_pretrained`` (safetensors) into a cache directory and loaded back through
``AutoModelForCausalLM`` / ``AutoTokenizer``::

    $PVFAST_CACHE_DIR (default ~/.cache/pvfast/tiny)/
        llama-<key>/   config.json  model.safetensors  tokenizer.json  tokenizer_config.json
        qwen2-<key>/   chat_template.jinja  recipe.json ...

``<key>`` hashes the build recipe, the tokenizer training text and the library versions, so a changed
recipe builds into a new directory and a stale one is never read. A directory is built under a temporary
name and renamed into place; when two processes race, the first rename wins and the loser discards its
copy (both copies are identical: the build is deterministic).

    from pvfast.model.tiny import tiny_model_dir
    AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))   # tests: pvfast.testing.load_tiny_model
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pvfast.atomic import atomic_dir

ARCHS = ("llama", "qwen2")
QUANTS = ("none", "nf4")

# ChatML special tokens; the first one is both BOS and padding (as GPT-2 does: the tiny tokenizer
# never adds BOS by itself, the chat template writes all turn markers).
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# ChatML-like template. An assistant turn ends with <|im_end|> (the EOS token: generation stops there);
# with add_generation_prompt the text ends with "<|im_start|>assistant\n" and the completion follows.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class TinyRecipe:
    """Everything that determines the tiny models and tokenizer; part of the cache key."""

    version: int = 1  # bump when the build code changes in a way the fields below do not capture
    seed: int = 0  # seeds weight init, LoRA init and the synthetic corpus
    vocab_size: int = 3072  # BPE vocabulary target, special tokens included
    vocab_multiple: int = 64  # embedding rows padded up to a multiple (real models pad too)
    corpus_size: int = 400  # synthetic messages the tokenizer is trained on
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4  # head_dim 32
    num_key_value_heads: int = 2  # grouped-query attention, as in the published base models
    max_position_embeddings: int = 8192  # the published max length
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0  # 0 keeps forward passes deterministic in tests


DEFAULT_RECIPE = TinyRecipe()


def cache_root() -> Path:
    """``$PVFAST_CACHE_DIR`` or ``~/.cache/pvfast/tiny``."""
    return Path(os.environ.get("PVFAST_CACHE_DIR") or Path.home() / ".cache" / "pvfast" / "tiny")


@functools.lru_cache(maxsize=None)
def tokenizer_training_text(seed: int = 0, corpus_size: int = 400) -> tuple[str, ...]:
    """The texts the tiny tokenizer is trained on: instruction text, messages, JSON completions."""
    from pvfast.data.jsonfmt import serialize
    from pvfast.data.prompt import instruction_text
    from pvfast.data.synth import generate_corpus

    examples = generate_corpus(n=corpus_size, seed=seed)
    texts = [instruction_text()]
    texts += [ex.message for ex in examples]
    texts += [serialize(ex.annotations) for ex in examples]
    texts += ["system", "user", "assistant"]  # role names written by the chat template
    return tuple(texts)


@functools.lru_cache(maxsize=None)
def _cache_key(recipe: TinyRecipe) -> str:
    import tokenizers
    import transformers

    h = hashlib.sha256()
    h.update(json.dumps(dataclasses.asdict(recipe), sort_keys=True).encode())
    h.update(CHAT_TEMPLATE.encode())
    h.update(f"transformers={transformers.__version__} tokenizers={tokenizers.__version__}".encode())
    for text in tokenizer_training_text(recipe.seed, recipe.corpus_size):
        h.update(text.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def build_tokenizer(recipe: TinyRecipe = DEFAULT_RECIPE):
    """Train the byte-level BPE tokenizer (deterministic) and wrap it in ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    # trim_offsets=False: offsets cover a token's leading space too, so every character of a
    # completion belongs to exactly one token (token roles come from these offsets).
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
        show_progress=False,
    )
    bpe.train_from_iterator(tokenizer_training_text(recipe.seed, recipe.corpus_size), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=ENDOFTEXT,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        chat_template=CHAT_TEMPLATE,
    )


def _model_config(arch: str, recipe: TinyRecipe, tokenizer):
    from transformers import LlamaConfig, Qwen2Config

    multiple = recipe.vocab_multiple
    shared = dict(
        vocab_size=(len(tokenizer) + multiple - 1) // multiple * multiple,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "llama":
        return LlamaConfig(tie_word_embeddings=False, **shared)  # as Llama-3.1-8B
    if arch == "qwen2":
        return Qwen2Config(tie_word_embeddings=True, **shared)  # as Qwen2.5-1.5B (q/k/v biases too)
    raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {ARCHS}")


def build_model(arch: str, tokenizer, recipe: TinyRecipe = DEFAULT_RECIPE):
    """A randomly initialised ``arch`` model; the init is seeded without touching the global RNG."""
    from transformers import AutoModelForCausalLM

    config = _model_config(arch, recipe, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def tiny_model_dir(arch: str, recipe: TinyRecipe = DEFAULT_RECIPE) -> Path:
    """Directory holding the ``arch`` model and the tokenizer; built on first use (a few seconds)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {ARCHS}")
    root = cache_root()
    final_dir = root / f"{arch}-{_cache_key(recipe)}"
    if final_dir.is_dir():
        return final_dir
    # Two processes may race to build it: identical builds, the first one published is kept.
    with atomic_dir(final_dir, exists="keep") as tmp_dir:
        tokenizer = build_tokenizer(recipe)
        build_model(arch, tokenizer, recipe).save_pretrained(tmp_dir, safe_serialization=True)
        tokenizer.save_pretrained(tmp_dir)
        (tmp_dir / "recipe.json").write_text(json.dumps({"arch": arch, **dataclasses.asdict(recipe)}, indent=1))
    return final_dir


def load_tiny_tokenizer(arch: str = "qwen2", recipe: TinyRecipe = DEFAULT_RECIPE):
    """The tiny tokenizer (the same for both architectures) via ``AutoTokenizer.from_pretrained``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir(arch, recipe))
