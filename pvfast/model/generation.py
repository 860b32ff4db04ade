"""Greedy generation of completions for evaluation and pair mining (SPEC §5), and prediction files.

:func:`generate_completions` runs a causal LM greedily over examples in batches:

- Prompt: :func:`pvfast.data.prompt.build_prompt` (the model's chat template with the generation prompt), then
  tokenized with ``add_special_tokens=False`` because chat templates write BOS and turn markers themselves
  (adding them again would double BOS on Llama 3).
- Batching: prompts are sorted by token length (less padding; a stable sort, so the order is
  deterministic) and left-padded by hand with the pad id (the tokenizer's pad token, else its EOS), so
  the tokenizer's ``padding_side`` is never touched. Outputs come back in the input order.
- Stopping: at any EOS / end-of-turn id (the generation config's and the tokenizer's EOS, plus the
  ChatML / Llama-3 end-of-turn tokens where the vocabulary has them) and at the text ``JSON_END``.
  ``JSON_END`` is passed to ``generate`` as a stop string (Hugging Face ``StopStringCriteria``: a row
  stops once its text ends with it) and the decoded text is also truncated after its first
  ``JSON_END`` (post-hoc, because a batch keeps generating padding for stopped rows and the stop string
  may end inside a token). The kept text includes ``JSON_END``; :func:`pvfast.data.jsonfmt.parse_output`
  ignores it.
- Decoding: only the new tokens, cut at the first stop id, special tokens skipped.
- The model runs in eval mode under ``torch.inference_mode``; its previous train/eval mode is restored.

Prediction files (``{"id", "output"}`` JSONL) are read and written by :mod:`pvfast.data.predictions`.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Sequence

import torch

from pvfast.config.sections import GenerationConfig
from pvfast.data.jsonfmt import STOP_TEXT
from pvfast.data.records import Example

#: End-of-turn tokens of common chat templates (ChatML / Qwen, Llama 3); used when in the vocabulary.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>")


def stop_token_ids(model, tokenizer) -> list[int]:
    """Token ids that end a completion: EOS of the generation config and tokenizer, and end-of-turn tokens."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.append(value)
        elif value is not None:
            ids.extend(int(v) for v in value)
    vocab = tokenizer.get_vocab()
    ids.extend(vocab[tok] for tok in END_OF_TURN_TOKENS if tok in vocab)
    return sorted(set(ids))


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("tokenizer has neither a pad token nor an EOS token to left-pad prompts with")


def _left_pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists: input_ids and attention_mask, both (B, L) int64."""
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, row in enumerate(rows):
        if row:
            input_ids[b, length - len(row):] = torch.tensor(row, dtype=torch.long)
            attention_mask[b, length - len(row):] = 1
    return input_ids, attention_mask


def truncate_at_stop_text(text: str, stop_text: str = STOP_TEXT) -> str:
    """``text`` up to and including the first ``stop_text`` (unchanged when it does not occur)."""
    cut = text.find(stop_text)
    return text if cut < 0 else text[:cut + len(stop_text)]


def _greedy_config(model, max_new_tokens: int, pad_id: int, eos_ids: list[int], stop_text: str):
    # A copy of the model's own config with sampling switched off; explicit None for the sampling
    # knobs avoids warnings from instruct models whose config sets temperature / top_p.
    config = copy.deepcopy(model.generation_config)
    config.do_sample = False
    config.num_beams = 1
    config.temperature = None
    config.top_p = None
    config.top_k = None
    config.max_new_tokens = max_new_tokens
    config.max_length = None
    config.pad_token_id = pad_id
    config.eos_token_id = eos_ids
    config.stop_strings = [stop_text]  # StopStringCriteria; generate() needs the tokenizer for it
    return config


def generate_completions(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int = GenerationConfig.batch_size,
    max_new_tokens: int = GenerationConfig.max_new_tokens,
    template=None,
    stop_text: str = STOP_TEXT,
) -> list[str]:
    """Greedy completions, one per example, in the order of ``examples`` (see the module docstring)."""
    from pvfast.data.prompt import build_prompt

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not examples:
        return []
    prompts = [build_prompt(tokenizer, ex.direction, ex.message, template) for ex in examples]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    pad_id = _pad_id(tokenizer)
    eos_ids = stop_token_ids(model, tokenizer)
    gen_config = _greedy_config(model, max_new_tokens, pad_id, eos_ids, stop_text)
    # Inputs go where the embeddings are (HF models expose it as .device, also under device_map).
    device = getattr(model, "device", None) or next(model.parameters()).device
    eos_set = set(eos_ids)

    outputs = [""] * len(examples)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                input_ids, attention_mask = _left_pad([encoded[i] for i in batch], pad_id)
                generated = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=gen_config,
                    tokenizer=tokenizer,  # StopStringCriteria maps stop_text onto tokens with it
                )
                new_tokens = generated[:, input_ids.shape[1]:].tolist()
                for i, tokens in zip(batch, new_tokens):
                    end = next((k for k, t in enumerate(tokens) if t in eos_set), len(tokens))
                    text = tokenizer.decode(tokens[:end], skip_special_tokens=True)
                    outputs[i] = truncate_at_stop_text(text, stop_text)
    finally:
        model.train(was_training)
    return outputs


# ----------------------------------------------------------------------------------------------------
# Loading a model for generation
# ----------------------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model_for_generation(model_dir: str | os.PathLike, adapter: str | os.PathLike | None = None, *,
                              dtype: str = "auto", device: str | None = None, load_in_4bit: bool = False):
    """``(model, tokenizer)`` from a saved model directory, with an optional peft adapter on top.

    ``dtype="auto"``: bfloat16 on a GPU, float32 on the CPU. ``load_in_4bit``: bitsandbytes NF4 with
    double quantization (the QLoRA base of the published recipe). The tokenizer is read from the
    adapter directory when it holds one (training may add tokens), else from ``model_dir``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    elif dtype in DTYPES:
        torch_dtype = DTYPES[dtype]
    else:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    kwargs = dict(dtype=torch_dtype, device_map=device)
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype)
    tokenizer_dir = adapter if adapter is not None and Path(adapter, "tokenizer_config.json").is_file() \
        else model_dir
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model, tokenizer


def add_generation_arguments(parser) -> None:
    """The generation flags shared by ``python -m pvfast.evaluate`` and ``python -m pvfast.pairs``."""
    parser.add_argument("--template", type=Path, help="prompt template file (pvfast.data.prompt.PromptTemplate)")
    parser.add_argument("--batch-size", type=int, default=GenerationConfig.batch_size)
    parser.add_argument("--max-new-tokens", type=int, default=GenerationConfig.max_new_tokens)
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--load-in-4bit", action="store_true", help="NF4 base model (bitsandbytes)")
