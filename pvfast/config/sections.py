"""The configuration sections shared by pvfast's commands: plain dataclasses, documented defaults, checks.

Nothing here imports the library it configures (no torch, no models, no data code): these are read by
:mod:`pvfast.config.stages` (the trainer's stage configs), :mod:`pvfast.config.commands` (evaluate, pairs),
the model loader, generation and pair mining. Every field is checked where it is constructed
(:mod:`pvfast.config.checks`: each refusal names its field), so a config that exists is valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pvfast.config.checks import check_choices, field_error, require
from pvfast.data.codebook import PUBLISHED_N_MESSAGES
from pvfast.data.jsonfmt import STOP_TEXT

#: Whether model loading may run code shipped with a checkpoint. Always False: pvfast loads only the
#: architectures transformers itself implements, from safetensors; this is deliberately not a field.
TRUST_REMOTE_CODE = False

#: Module names that get LoRA adapters by default: all 7 attention and MLP projections (SPEC §6).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

STRATEGIES = ("label", "missing", "extra")  # kinds of rejected output (SPEC §4)
AUTOCAST_MODES = ("auto", "off", "bf16")  # RunConfig.autocast


@dataclass(frozen=True)
class GenerationConfig:
    """Greedy decoding settings of evaluation (SPEC §5)."""

    batch_size: int = 8  # prompts per generate call
    max_new_tokens: int = 1024  # SPEC §5: max 1024 new tokens
    stop_text: str = STOP_TEXT  # generation also stops when the text ends with this
    # Schema-constrained decoding: every token keeps the output a prefix of a valid answer (canonical JSON,
    # codes of the message's direction, valid sub-codes, spans copied verbatim); greedy within that set.
    constrained: bool = True
    # Compute the KV cache of the prompts' common instruction prefix once and reuse it for every message.
    shared_prefix: bool = True

    def __post_init__(self) -> None:
        require(self, "batch_size", self.batch_size >= 1, ">= 1")
        require(self, "max_new_tokens", self.max_new_tokens >= 1, ">= 1")
        require(self, "stop_text", bool(self.stop_text), "a non-empty string")


_GENERATION_DEFAULTS = GenerationConfig()


@dataclass(frozen=True)
class ModelConfig:
    """The base model and its adapter; defaults are the published recipe (SPEC §6).

    ``trust_remote_code`` is not a field: it is always False (:data:`TRUST_REMOTE_CODE`).
    """

    name_or_path: str | None = None  # local directory or hub id; None = the embedded tiny model (pvfast.model.tiny)
    tiny_arch: Literal["qwen2", "llama"] = "qwen2"  # which embedded tiny model, used when name_or_path is None
    # nf4: 4-bit NF4 weights with double quantization, compute in bf16 on GPU and fp32 on CPU
    quant: Literal["none", "nf4"] = "nf4"
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # weights/compute dtype; auto = bf16 on CUDA, fp32 on CPU
    lora_r: int = 16  # LoRA rank r
    lora_alpha: int = 32  # LoRA scale α (the update is scaled by α / r)
    lora_dropout: float = 0.05  # dropout on the LoRA input
    lora_targets: tuple[str, ...] = LORA_TARGETS  # module names that get adapters: all 7 attention/MLP projections
    gradient_checkpointing: bool = True  # recompute activations in backward: memory for ~30 % more compute
    # Attention of the packed passes (pvfast.model.forward.resolve_attn_implementation): auto = the measured
    # default of the device (pvfast_tree on the CPU: SDPA run on the tree's parts, only the attended pairs;
    # sdpa on CUDA); sdpa = the same; sdpa_dense = SDPA with the dense (L, L) tree mask; flex_attention = block
    # masks (GPU only: refused on the CPU, where inductor cannot compile it for varying lengths); eager =
    # additive mask.
    attn_implementation: Literal["auto", "pvfast_tree", "sdpa", "sdpa_dense", "flex_attention", "eager"] = "auto"

    def __post_init__(self) -> None:
        check_choices(self)
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.name_or_path is not None and not self.name_or_path.strip():
            raise field_error(self, "name_or_path", "must be a directory or hub id, or None for the tiny model")
        require(self, "lora_r", self.lora_r >= 1, ">= 1")
        require(self, "lora_alpha", self.lora_alpha > 0, "> 0")
        require(self, "lora_dropout", 0.0 <= self.lora_dropout < 1.0, "in [0, 1)")
        require(self, "lora_targets", len(self.lora_targets) > 0 and all(self.lora_targets),
                "a non-empty list of module names")


@dataclass(frozen=True)
class DataConfig:
    """Where examples come from and how they are tokenized and packed."""

    train: str | None = None  # JSONL of examples (sft, pipeline) or preference records (po); None = synthetic
    validation: str | None = None  # JSONL of examples for pair generation (SPEC §4); None = synthetic split
    test: str | None = None  # JSONL of examples for the final evaluation; None = synthetic test split
    synthetic_n: int = PUBLISHED_N_MESSAGES  # messages in the embedded synthetic corpus (the published count)
    synthetic_seed: int = 0  # seed of the synthetic corpus and of its 80/10/10 train/validation/test split
    # Synthetic validation/test messages worded only from phrasings no training message uses (F1 measures
    # generalisation, not recall of memorised sentences; pvfast.data.synth.synthetic_splits); False = shared.
    synthetic_heldout_phrasing: bool = True
    template: str | None = None  # user-prompt template file; None = the built-in pvfast/data/templates/pvminer_user.txt
    skip_invalid: bool = False  # False: a malformed record stops the run before any compute; True: skip, count it
    token_budget: int = 16384  # tokens per micro-batch pack (prefix tree: shared instruction counted once)
    truncate: bool = False  # False: a completion over max_completion_tokens is an error; True: cut it there
    max_completion_tokens: int = 1024  # longest completion accepted (the generation cap of evaluation, SPEC §5)

    def __post_init__(self) -> None:
        require(self, "synthetic_n", self.synthetic_n >= 3, ">= 3 (one message per split at least)")
        require(self, "token_budget", self.token_budget >= 1, ">= 1")
        require(self, "max_completion_tokens", self.max_completion_tokens >= 1, ">= 1")
        for name in ("train", "validation", "test", "template"):
            value = getattr(self, name)
            require(self, name, value is None or bool(value.strip()), "a file path or None")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW, learning-rate schedule and steps; in the pipeline both the SFT and the PO stage use it."""

    lr: float = 2e-4  # peak learning rate (SPEC §6)
    weight_decay: float = 0.0  # AdamW decoupled weight decay on the LoRA weights
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW (β1, β2), torch's defaults
    eps: float = 1e-8  # AdamW ε, torch's default
    fused: bool = True  # torch's fused AdamW kernel when the parameters are on CUDA (ignored on the CPU)
    warmup_ratio: float = 0.1  # linear warmup over this fraction of the optimizer steps (SPEC §6: 10 %)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay to 0 after warmup (constant: none)
    epochs: int = 3  # passes over the training data (SPEC §6)
    max_steps: int | None = None  # stop after this many optimizer steps; None = run all epochs
    grad_clip: float | None = 1.0  # clip the global gradient norm to this; None = no clipping
    # Gradient accumulation by token budget: sum micro-batches until at least this many scored (completion)
    # tokens, then step; None = one optimizer step per micro-batch pack.
    tokens_per_step: int | None = None

    def __post_init__(self) -> None:
        check_choices(self)
        object.__setattr__(self, "betas", tuple(self.betas))
        require(self, "lr", self.lr > 0, "> 0")
        require(self, "weight_decay", self.weight_decay >= 0, ">= 0")
        require(self, "betas", len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
                "two numbers in [0, 1)")
        require(self, "eps", self.eps > 0, "> 0")
        require(self, "warmup_ratio", 0.0 <= self.warmup_ratio < 1.0, "in [0, 1)")
        require(self, "epochs", self.epochs >= 1, ">= 1")
        require(self, "max_steps", self.max_steps is None or self.max_steps >= 1, ">= 1 or None")
        require(self, "grad_clip", self.grad_clip is None or self.grad_clip > 0, "> 0 or None")
        require(self, "tokens_per_step", self.tokens_per_step is None or self.tokens_per_step >= 1, ">= 1 or None")


@dataclass(frozen=True)
class RunConfig:
    """Output, device, logging, checkpoints and evaluation."""

    output_dir: str = "runs/pvfast"  # adapters, checkpoints, metrics.jsonl, plots, config and eval report
    seed: int = 0  # seeds torch, Python and the data order; CPU runs are deterministic for a given seed
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when available, else the CPU
    log_every: int = 10  # optimizer steps between metric lines (metrics.jsonl and the progress bar)
    save_every: int = 500  # optimizer steps between checkpoints (one is always written at the end)
    keep_last: int = 2  # checkpoints kept on disk; older ones are deleted after a new one is complete
    resume: bool = False  # continue from the newest complete checkpoint in output_dir
    # A fresh (not --run.resume) run into a directory holding an earlier run's checkpoints is refused unless
    # overwrite is set, so a forgotten --run.resume never deletes a long run; the "tiny" demo preset sets it.
    overwrite: bool = False
    merge_adapter: bool = False  # also write the adapter merged into full-precision base weights at the end
    # Time-boxed runs: end this invocation after this many optimizer steps (counted from where it started),
    # with a checkpoint; --run.resume continues exactly. None = run to the end.
    stop_after_steps: int | None = None
    # Compute precision of every forward pass (reference and policy alike, pvfast.model.precision):
    # auto = bf16 autocast on CUDA, full precision on the CPU; bf16 = autocast on any device; off = weights' dtype.
    autocast: Literal["auto", "off", "bf16"] = "auto"
    evaluate: bool = True  # generate and score on the test split at the end (SPEC §5)
    # Pipeline: also score the untouched base model (before SFT) and the SFT model (before PO) on the test
    # split, and print the three side by side at the end.
    eval_baselines: bool = False
    eval_max_new_tokens: int = _GENERATION_DEFAULTS.max_new_tokens  # generation cap (SPEC §5: 1024)
    eval_batch_size: int = _GENERATION_DEFAULTS.batch_size  # prompts per generate call
    # Schema-constrained decoding in the run's generation (pair mining and evaluation); false shows the model's
    # own format errors (with it on they are 0 by construction).
    eval_constrained: bool = _GENERATION_DEFAULTS.constrained
    eval_max_examples: int | None = None  # evaluate the first N test examples; None = all of them

    def __post_init__(self) -> None:
        check_choices(self)
        require(self, "output_dir", bool(self.output_dir.strip()), "a directory path")
        for name in ("log_every", "save_every", "keep_last", "eval_max_new_tokens", "eval_batch_size"):
            require(self, name, getattr(self, name) >= 1, ">= 1")
        require(self, "stop_after_steps", self.stop_after_steps is None or self.stop_after_steps >= 1,
                ">= 1 or None")
        require(self, "eval_max_examples", self.eval_max_examples is None or self.eval_max_examples >= 1,
                ">= 1 or None")


@dataclass(frozen=True)
class PairConfig:
    """How rejected outputs are made (SPEC §4)."""

    seed: int = 0  # base seed; each (example, strategy, k) draw gets Random(f"{seed}:{id}:{strategy}:{k}")
    strategies: tuple[str, ...] = STRATEGIES  # one rejected output per entry; repeat a name for more draws
    subcode_confusion_prob: float = 0.5  # 'label': chance to change the Sub-code rather than the Code
    smoothing: float = 0.0  # add-α on every off-diagonal confusion count before normalising (0: none)
    extra_span_words: tuple[int, int] = (1, 6)  # 'extra': min and max words of the spurious span
    include_empty: bool = True  # examples with no gold triples get an 'extra' rejected (else skipped)
    max_redraws: int = 20  # 'extra': redraws when the new triple equals a gold one

    def __post_init__(self) -> None:
        object.__setattr__(self, "strategies", tuple(self.strategies))
        object.__setattr__(self, "extra_span_words", tuple(self.extra_span_words))
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        require(self, "strategies", bool(self.strategies) and not unknown, f"a non-empty list of {STRATEGIES}")
        require(self, "subcode_confusion_prob", 0.0 <= self.subcode_confusion_prob <= 1.0, "in [0, 1]")
        require(self, "smoothing", self.smoothing >= 0, ">= 0")
        lo, hi = self.extra_span_words
        require(self, "extra_span_words", 1 <= lo <= hi, "(min, max) with 1 <= min <= max")
        require(self, "max_redraws", self.max_redraws >= 1, ">= 1")
