"""Model and tokenizer loading for the trainer: base model (optionally NF4), LoRA, checkpointing, attention.

``ModelConfig.name_or_path`` is a local directory, a hub id, or None for the embedded tiny model
(:func:`pvfast.model.tiny.tiny_model_dir`). Loading follows the published QLoRA recipe (SPEC §6)::

    base   AutoModelForCausalLM.from_pretrained(use_safetensors=True, trust_remote_code=False)
           quant "nf4": BitsAndBytesConfig(load_in_4bit, nf4, double quant, compute bf16 on GPU / fp32 on CPU)
                        + peft.prepare_model_for_kbit_training
    LoRA   peft LoraConfig(r, alpha, dropout, target modules), only the adapters train

Errors name what is wrong before any weights are read: a local directory that does not exist or has no
``config.json``, a tokenizer that is not a "fast" one (the packer needs offsets), NF4 on a machine
without bitsandbytes.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from pvfast.config.sections import TRUST_REMOTE_CODE, ModelConfig


class ModelLoadError(RuntimeError):
    """A model or tokenizer cannot be loaded; the message names the source and the reason."""


def compute_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """Weights/compute dtype: ``auto`` = bf16 on CUDA, fp32 on the CPU (bf16 matmuls are slow there)."""
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.dtype]


def model_source(cfg: ModelConfig) -> str:
    """The directory or hub id to load from; the tiny model's cache directory when ``name_or_path`` is None."""
    if cfg.name_or_path is None:
        from pvfast.model.tiny import tiny_model_dir

        return str(tiny_model_dir(cfg.tiny_arch))
    name = os.path.expanduser(cfg.name_or_path)
    path = Path(name)
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelLoadError(f"model.name_or_path {cfg.name_or_path!r}: not a model directory "
                                 f"(no config.json in it)")
        return str(path)
    # A hub id is "org/name"; anything that starts like a filesystem path was meant to be a directory.
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep == "\\" and "\\" in name:
        raise ModelLoadError(f"model.name_or_path {cfg.name_or_path!r}: directory not found")
    return name


def load_tokenizer(cfg: ModelConfig, source: str | None = None):
    """The model's fast tokenizer with a pad token (EOS when the model has none)."""
    from transformers import AutoTokenizer

    source = model_source(cfg) if source is None else source
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True, trust_remote_code=TRUST_REMOTE_CODE)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{source}: cannot load the tokenizer ({type(err).__name__}: {err})") from err
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(f"{source}: tokenizer {type(tokenizer).__name__} is not a fast tokenizer; pvfast "
                             f"needs a tokenizers-backed one (tokenizer.json) for token roles and offsets")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"{source}: tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out everywhere; any id serves
    return tokenizer


def _quantization_config(dtype: torch.dtype):
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError("model.quant is 'nf4' but bitsandbytes is not installed; install it "
                             "(pip install bitsandbytes) or pass --model.quant none")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def load_base_model(cfg: ModelConfig, device: torch.device, source: str | None = None):
    """The base causal LM on ``device``, quantized and prepared for k-bit training when ``cfg.quant`` is nf4.

    ``source`` overrides where the weights come from (e.g. the SFT model merged into its base for PO).
    """
    from transformers import AutoModelForCausalLM

    source = model_source(cfg) if source is None else source
    dtype = compute_dtype(cfg, device)
    kwargs = dict(dtype=dtype, use_safetensors=True, trust_remote_code=TRUST_REMOTE_CODE,
                  attn_implementation=cfg.attn_implementation)
    if cfg.quant == "nf4":
        kwargs["quantization_config"] = _quantization_config(dtype)
        # bitsandbytes quantizes while loading onto the target device
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else "cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{source}: cannot load the model ({type(err).__name__}: {err})") from err
    if cfg.quant == "nf4":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
        if device.type == "cpu":
            _keep_4bit_layout_trainable(model)
    else:
        model.to(device)
        if cfg.gradient_checkpointing:
            # Non-reentrant checkpointing: gradients reach the LoRA weights without input grads.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # training never reuses a KV cache; generation turns it on per call
    return model


def _keep_4bit_layout_trainable(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, a ``Linear4bit`` called in eval mode without grad (the reference pass,
    generation) converts its weight in place to a CPU-inference layout; a later training forward then
    fails in bitsandbytes ("a view of a leaf Variable that requires grad is being used in an in-place
    operation"). The trainer alternates both kinds of pass, so it keeps the trainable layout throughout.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def add_lora(model, cfg: ModelConfig):
    """Wrap ``model`` with a fresh LoRA adapter (A random from the global torch RNG, B = 0)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as err:  # e.g. target modules not in the model
        raise ModelLoadError(f"model.lora_targets {list(cfg.lora_targets)}: {err}") from err


def load_model(cfg: ModelConfig, device: torch.device, source: str | None = None):
    """Base model (from ``source`` or the config) with a fresh trainable LoRA adapter."""
    return add_lora(load_base_model(cfg, device, source), cfg)
