"""Test helpers: load the embedded tiny models (:mod:`pvfast.model.tiny`) and nudge LoRA adapters.

Imported by tests, benchmarks and examples only; production code uses :mod:`pvfast.model.tiny` directly.

    from pvfast.model.tiny import load_tiny_tokenizer
    from pvfast.testing import load_tiny_model
    tok = load_tiny_tokenizer("qwen2")
    model = load_tiny_model("llama", quant="nf4", lora=True)   # QLoRA on the CPU
"""

from __future__ import annotations

import torch

from pvfast.config.sections import LORA_TARGETS
from pvfast.model.tiny import DEFAULT_RECIPE, QUANTS, TinyRecipe, tiny_model_dir


def load_tiny_model(
    arch: str,
    quant: str = "none",
    lora: bool = False,
    dtype: torch.dtype = torch.float32,
    gradient_checkpointing: bool = False,
    attn_implementation: str = "sdpa",
    recipe: TinyRecipe = DEFAULT_RECIPE,
):
    """Load the tiny ``arch`` model on the CPU through ``AutoModelForCausalLM.from_pretrained``.

    ``quant="nf4"``: bitsandbytes 4-bit NF4 with double quantization and ``dtype`` compute, then
    ``prepare_model_for_kbit_training`` (the published QLoRA recipe, scaled down). ``lora=True``: a
    peft LoRA (r, alpha from the recipe) on q,k,v,o,gate,up,down; only the adapters train.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {QUANTS}, got {quant!r}")
    kwargs = dict(dtype=dtype, device_map="cpu", attn_implementation=attn_implementation)
    if quant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch, recipe), **kwargs)
    if quant == "nf4":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=recipe.lora_r,
            lora_alpha=recipe.lora_alpha,
            lora_dropout=recipe.lora_dropout,
            target_modules=list(LORA_TARGETS),
            task_type="CAUSAL_LM",
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed + 1)  # LoRA A matrices are random: keep them reproducible
            model = get_peft_model(model, config)
    return model


def activate_lora(model, seed: int = 0, std: float = 0.05):
    """Give every LoRA B matrix seeded N(0, std²) values, in place; returns ``model``.

    peft starts B at zero, so a fresh adapter changes nothing: policy equals reference and every A
    gradient is zero. Tests and benchmarks that compare the two, or check A gradients, call this first.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for the MASTER_PORT of a multi-process test."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
