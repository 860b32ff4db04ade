"""Greedy generation of completions for evaluation, pair mining and extraction (SPEC §5).

:func:`generate_completions` runs a causal LM greedily over examples in batches:

- Prompt: :func:`pvfast.data.prompt.build_prompt` (the model's chat template with the generation prompt), then
  tokenized with ``add_special_tokens=False`` because chat templates write BOS and turn markers themselves
  (adding them again would double BOS on Llama 3).
- Shared prefix (``shared_prefix=True``, the default): every prompt starts with the same instruction, so the
  prompts are split at their longest common token prefix; its KV cache is computed once per call and read by
  every message of every batch (:mod:`pvfast.model.prefix_cache`). Each batch then runs only its messages'
  suffixes and the generated tokens. Models whose attention the shared-prefix path cannot reproduce
  (sliding windows, soft-capping) and calls whose prompts share less than :data:`MIN_SHARED_PREFIX` tokens
  run the plain path: the full prompts, left-padded, through the model's own attention and KV cache, as
  Hugging Face ``generate`` does. Both give the tokens of ``generate`` with greedy decoding (tested token
  for token).
- Constrained decoding (``constrained=True``, the default): at every step only tokens that keep the output a
  prefix of a valid answer for that message may be chosen, and the answer ends with the end-of-turn token
  (:mod:`pvfast.model.constrained`). ``constrained=False`` is plain greedy decoding.
- Batching: prompts are sorted by token length (less padding; a stable sort, so the order is deterministic)
  and left-padded by hand with the pad id (the tokenizer's pad token, else its EOS), so the tokenizer's
  ``padding_side`` is never touched. A row that has finished leaves the batch (its cache rows are dropped).
  Outputs come back in the input order.
- Decoding is pure greedy (argmax over the logits, first index on ties), as ``generate`` with
  ``do_sample=False``; logits processors a model's generation config may name (repetition penalty, ...) are
  not applied.
- Stopping: at any EOS / end-of-turn id (the generation config's and the tokenizer's EOS, plus the ChatML /
  Llama-3 end-of-turn tokens where the vocabulary has them) and once the text holds ``stop_text``
  (``JSON_END``); the decoded text is truncated after its first ``JSON_END`` (the stop text may end inside a
  token). The kept text includes ``JSON_END``; :func:`pvfast.data.jsonfmt.parse_output` ignores it.
- Decoding text: only the new tokens, cut at the first stop id, special tokens skipped; a constrained answer
  is the exact bytes of its tokens.
- Progress: a bar on stderr with messages/s (tqdm); no text is ever shown.
- The model runs in eval mode under ``torch.inference_mode``; its previous train/eval mode is restored.

Prediction files (``{"id", "output"}`` JSONL) are read and written by :mod:`pvfast.data.predictions`.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from pvfast.config.sections import GenerationConfig
from pvfast.data.jsonfmt import STOP_TEXT
from pvfast.data.records import Example

#: End-of-turn tokens of common chat templates (ChatML / Qwen, Llama 3); used when in the vocabulary.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>")
#: Shorter common prefixes are not worth a separate pass: the plain path runs instead.
MIN_SHARED_PREFIX = 16


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


# ----------------------------------------------------------------------------------------------------
# Runners: one batch's forward passes (prefill, then one token per row per step)
# ----------------------------------------------------------------------------------------------------

def _model_device(model) -> torch.device:
    # Inputs go where the embeddings are (HF models expose it as .device, also under device_map).
    return getattr(model, "device", None) or next(model.parameters()).device


def _cache_argument(model) -> str:
    """The forward keyword of the KV cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _returned_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


class PlainRunner:
    """Full prompts, left-padded, through the model's own attention and KV cache (what ``generate`` does)."""

    def __init__(self, model, pad_id: int):
        self.model, self.pad_id = model, pad_id
        self.device = _model_device(model)
        self.cache_arg = _cache_argument(model)

    def start(self, prompts: Sequence[list[int]], max_new_tokens: int) -> torch.Tensor:
        """Prefill; returns the (B, V) logits of the next token."""
        input_ids, mask = _left_pad(prompts, self.pad_id)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # generate's position ids
        self.mask = mask.to(self.device)
        self.last_position = positions[:, -1].to(self.device)
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=self.mask,
                         position_ids=positions.to(self.device), use_cache=True, logits_to_keep=1)
        self.cache = _returned_cache(out)
        return out.logits[:, -1]

    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        """Feed one token per row; returns the (B, V) logits of the next one."""
        ones = torch.ones((len(tokens), 1), dtype=self.mask.dtype, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        self.last_position = self.last_position + 1
        out = self.model(input_ids=torch.tensor(tokens, device=self.device).unsqueeze(1), attention_mask=self.mask,
                         position_ids=self.last_position.unsqueeze(1), use_cache=True, logits_to_keep=1,
                         **{self.cache_arg: self.cache})
        self.cache = _returned_cache(out)
        return out.logits[:, -1]

    def keep(self, rows: Sequence[int]) -> None:
        """Drop every batch row not in ``rows`` (positions in the current batch)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.last_position = self.last_position[index]


class SharedPrefixRunner:
    """Suffixes after a shared prefix whose KV cache was computed once (:mod:`pvfast.model.prefix_cache`)."""

    def __init__(self, model, pad_id: int, prefix_ids: Sequence[int]):
        from pvfast.model.prefix_cache import PrefixKV, register_attention

        register_attention()
        self.model, self.pad_id = model, pad_id
        self.device = _model_device(model)
        self.cache_arg = _cache_argument(model)
        self.prefix = PrefixKV.compute(model, prefix_ids, self.device, self.cache_arg)
        self.n_layers = len(self.prefix.keys)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from pvfast.model.prefix_cache import ATTENTION_NAME, PREFIX_KWARG, attention_implementation

        with attention_implementation(self.model, ATTENTION_NAME):
            out = self.model(input_ids=input_ids, position_ids=positions, attention_mask=mask, use_cache=True,
                             logits_to_keep=1, **{self.cache_arg: self.cache, PREFIX_KWARG: self.prefix})
        return out.logits[:, -1]

    def start(self, suffixes: Sequence[list[int]], max_new_tokens: int) -> torch.Tensor:
        from pvfast.model.prefix_cache import SharedPrefixUnsupported, row_cache

        input_ids, mask = _left_pad(suffixes, self.pad_id)
        batch, length = input_ids.shape
        self.cache = row_cache(self.n_layers, length + max_new_tokens)
        # valid[b, j]: row position j holds a real token (not padding); filled in as tokens are generated
        self.valid = torch.zeros((batch, length + max_new_tokens), dtype=torch.bool, device=self.device)
        self.valid[:, :length] = mask.bool().to(self.device)
        self.length = length
        positions = self.prefix.length + (mask.cumsum(-1) - 1).clamp(min=0)
        self.next_position = (self.prefix.length + mask.sum(-1)).to(self.device)
        causal = torch.ones((length, length), dtype=torch.bool, device=self.device).tril()
        self.prefix.calls = 0
        logits = self._forward(input_ids.to(self.device), positions.to(self.device),
                               self.valid[:, None, None, :length] & causal)  # (B, 1, L, L); prefix always seen
        if self.prefix.calls != self.n_layers:  # an attention that bypasses transformers' interface
            raise SharedPrefixUnsupported(f"the shared-prefix attention ran in {self.prefix.calls} of "
                                          f"{self.n_layers} layers")
        return logits

    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        self.valid[:, self.length] = True
        self.length += 1
        logits = self._forward(torch.tensor(tokens, device=self.device).unsqueeze(1), self.next_position.unsqueeze(1),
                               self.valid[:, None, None, :self.length])
        self.next_position = self.next_position + 1
        return logits

    def keep(self, rows: Sequence[int]) -> None:
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        for layer in self.cache.layers:
            layer.batch_select_indices(index)
        self.valid = self.valid[index]
        self.next_position = self.next_position[index]


# ----------------------------------------------------------------------------------------------------
# The greedy loop
# ----------------------------------------------------------------------------------------------------

@dataclass
class Generation:
    """One example's generated tokens and text; ``stopped``: ended by a stop token, the stop text or the
    constraint (False: it ran into ``max_new_tokens``)."""

    tokens: list[int]
    text: str = ""
    stopped: bool = False


def _greedy_batch(runner, prompts: Sequence[list[int]], max_new_tokens: int, stop_ids: set[int], tokenizer,
                  stop_text: str, constraints: Sequence | None) -> list[Generation]:
    """Greedy decoding of one batch; ``constraints``: one :class:`ConstrainedAnswer` per row, or None."""
    rows = [Generation([]) for _ in prompts]
    logits = runner.start(prompts, max_new_tokens)
    active = list(range(len(rows)))  # rows still generating, in the runner's batch order
    tail = len(stop_text) + 2  # tokens decoded to look for the stop text (every token is >= 1 character)
    may_end = _tokens_with_char(tokenizer, stop_text[-1]) if stop_text else frozenset()
    for step in range(max_new_tokens):
        remaining = max_new_tokens - step
        if constraints is None:
            chosen = logits.argmax(-1).tolist()
        else:
            chosen = []
            for k, r in enumerate(active):
                allowed = torch.from_numpy(constraints[r].allowed(remaining)).to(logits.device)
                chosen.append(int(allowed[logits[k].index_select(0, allowed).argmax()]))
        still = []
        for k, (r, token) in enumerate(zip(active, chosen)):
            row = rows[r]
            row.tokens.append(token)
            if constraints is not None:
                constraints[r].advance(token)
                row.stopped = constraints[r].done
            else:
                # the text can only now end with the stop text if this token holds its last character
                row.stopped = token in stop_ids or (
                    token in may_end and stop_text in tokenizer.decode(row.tokens[-tail:]))
            if not row.stopped:
                still.append(k)
        if not still or step == max_new_tokens - 1:
            break
        if len(still) < len(active):
            runner.keep(still)
            active = [active[k] for k in still]
        logits = runner.step([rows[r].tokens[-1] for r in active])
    for r, row in enumerate(rows):
        if constraints is not None:
            row.text = constraints[r].text
        else:
            end = next((k for k, t in enumerate(row.tokens) if t in stop_ids), len(row.tokens))
            row.text = truncate_at_stop_text(tokenizer.decode(row.tokens[:end], skip_special_tokens=True), stop_text)
    return rows


@functools.lru_cache(maxsize=8)
def _tokens_with_char(tokenizer, char: str) -> frozenset[int]:
    """Ids of the tokens whose text contains ``char`` (or that decode to no fixed text on their own)."""
    found = set()
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        if char in text or "\ufffd" in text:
            found.add(i)
    return frozenset(found)


def generate(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int = GenerationConfig.batch_size,
    max_new_tokens: int = GenerationConfig.max_new_tokens,
    template=None,
    stop_text: str = STOP_TEXT,
    constrained: bool = GenerationConfig.constrained,
    shared_prefix: bool = GenerationConfig.shared_prefix,
    progress: bool = True,
    desc: str = "generate",
) -> list[Generation]:
    """Greedy generations, one per example, in the order of ``examples`` (see the module docstring)."""
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
    stop_ids = set(stop_token_ids(model, tokenizer))
    table = end_of_turn = None
    if constrained:
        from pvfast.data.tokenization import end_of_turn_id
        from pvfast.model.constrained import token_table

        table, end_of_turn = token_table(tokenizer), end_of_turn_id(tokenizer)
    outputs: list[Generation | None] = [None] * len(examples)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            runner, prefix = _runner(model, pad_id, encoded, shared_prefix)
            bar = _progress(len(examples), desc, progress)
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                constraints = None
                if constrained:
                    from pvfast.model.constrained import ConstrainedAnswer

                    constraints = [ConstrainedAnswer(table, examples[i].message, examples[i].direction, end_of_turn)
                                   for i in batch]
                rows = [encoded[i][prefix:] for i in batch]
                for i, row in zip(batch, _greedy_batch(runner, rows, max_new_tokens, stop_ids, tokenizer,
                                                       stop_text, constraints)):
                    outputs[i] = row
                bar.update(len(batch))
            bar.close()
    finally:
        model.train(was_training)
    return outputs


def _runner(model, pad_id: int, encoded: Sequence[list[int]], shared_prefix: bool):
    """``(runner, prefix length)``: the shared-prefix runner when it applies, else the plain one."""
    from pvfast.model.prefix_cache import SharedPrefixUnsupported, common_prefix_length, unsupported_reason

    # Every row keeps at least one token after the prefix: the prefill's last position gives the first logits.
    length = min(common_prefix_length(encoded), min(len(e) for e in encoded) - 1)
    if not shared_prefix or length < MIN_SHARED_PREFIX:
        return PlainRunner(model, pad_id), 0
    reason = unsupported_reason(model)
    if reason is None:
        try:
            runner = SharedPrefixRunner(model, pad_id, encoded[0][:length])
            runner.start([encoded[0][length:]], 1)  # probe: every layer must run the shared-prefix attention
            return runner, length
        except SharedPrefixUnsupported as err:
            reason = str(err)
    warnings.warn(f"shared-prefix generation does not support this model ({reason}); generating from the full "
                  "prompts", stacklevel=3)
    return PlainRunner(model, pad_id), 0


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    # Counts messages only: no text of any message or output is ever shown.
    return tqdm(total=total, desc=desc, unit="msg", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


def generate_completions(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int = GenerationConfig.batch_size,
    max_new_tokens: int = GenerationConfig.max_new_tokens,
    template=None,
    stop_text: str = STOP_TEXT,
    constrained: bool = GenerationConfig.constrained,
    shared_prefix: bool = GenerationConfig.shared_prefix,
    progress: bool = True,
) -> list[str]:
    """Greedy completions, one per example, in the order of ``examples`` (see the module docstring)."""
    return [g.text for g in generate(model, tokenizer, examples, batch_size=batch_size,
                                     max_new_tokens=max_new_tokens, template=template, stop_text=stop_text,
                                     constrained=constrained, shared_prefix=shared_prefix, progress=progress)]


# ----------------------------------------------------------------------------------------------------
# Loading a model for generation
# ----------------------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model_for_generation(model_dir: str | os.PathLike, adapter: str | os.PathLike | None = None, *,
                              dtype: str = "auto", device: str | None = None, load_in_4bit: bool = False,
                              merge: bool = False):
    """``(model, tokenizer)`` from a saved model directory, with an optional peft adapter on top.

    ``dtype="auto"``: bfloat16 on a GPU, float32 on the CPU. ``load_in_4bit``: bitsandbytes NF4 with
    double quantization (the QLoRA base of the published recipe). The tokenizer is read from the
    adapter directory when it holds one (training may add tokens), else from ``model_dir``. ``merge``
    folds the adapter into the weights (``merge_and_unload``: one matmul per projection instead of three;
    the logits change by rounding only); a 4-bit base keeps the adapter apart. A directory or adapter
    that cannot be loaded is a :class:`pvfast.model.loading.ModelLoadError` naming it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pvfast.config.sections import TRUST_REMOTE_CODE
    from pvfast.model.loading import ModelLoadError

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    elif dtype in DTYPES:
        torch_dtype = DTYPES[dtype]
    else:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    kwargs = dict(dtype=torch_dtype, device_map=device, trust_remote_code=TRUST_REMOTE_CODE)
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype)
    tokenizer_dir = adapter if adapter is not None and Path(adapter, "tokenizer_config.json").is_file() \
        else model_dir
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=TRUST_REMOTE_CODE)
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except Exception as err:  # OSError, ValueError, safetensors' own error, size mismatches: all "cannot load"
        raise ModelLoadError(f"{model_dir}: cannot load the model ({type(err).__name__}: {err})") from err
    if adapter is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, adapter)
        except Exception as err:
            raise ModelLoadError(f"{adapter}: cannot load the adapter ({type(err).__name__}: {err})") from err
        if merge and not load_in_4bit:
            model = model.merge_and_unload()
    model.eval()
    return model, tokenizer
