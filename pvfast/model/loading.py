"""Model and tokenizer loading for the trainer: base model (optionally NF4), LoRA, checkpointing, attention.

``ModelConfig.name_or_path`` is a local directory, a ``.gguf`` file (converted once, :mod:`pvfast.model.gguf`),
a hub id, ``smollm2-135m-instruct`` for the embedded real model (:mod:`pvfast.model.smollm2`), or None for
the embedded tiny model (:func:`pvfast.model.tiny.tiny_model_dir`); :func:`model_source` resolves it to a
folder. Loading follows the published QLoRA recipe (SPEC §6)::

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
import logging
import os
import warnings
from pathlib import Path

import torch

from pvfast.config.sections import TRUST_REMOTE_CODE, ModelConfig
from pvfast.model.gguf import GGUFError, convert_gguf, find_gguf
from pvfast.model.smollm2 import NAME as SMOLLM2_NAME


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# bitsandbytes (on CPUs with AVX512-BF16) tries at import to fetch an optional CPU kernel through Hugging
# Face's `kernels` package and logs a warning when that package is absent ("Failed to load CPU
# gemm_4bit_forward from kernels-community ... `pip install kernels`"); run from the repository root, the
# import even finds pvfast's own top-level `kernels/` folder and names it. Nothing is broken: bitsandbytes
# falls back to its own CPU code, which pvfast uses (and must: pvfast.model.loading keeps the trainable 4-bit
# layout). Only that one message is dropped; every other bitsandbytes warning still shows.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMessage("Failed to load CPU gemm_4bit_forward"))
# transformers' own deprecation notice, raised from inside peft/transformers, not from pvfast code.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


class ModelLoadError(RuntimeError):
    """A model or tokenizer cannot be loaded; the message names the source and the reason."""


def compute_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """Weights/compute dtype: ``auto`` = bf16 on CUDA, fp32 on the CPU (bf16 matmuls are slow there)."""
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.dtype]


def model_source(cfg: ModelConfig) -> str:
    """The local folder (or hub id) to load from, for every kind of ``model.name_or_path``:

    - None: the embedded tiny model's cache folder (:mod:`pvfast.model.tiny`);
    - ``smollm2-135m-instruct`` (:data:`pvfast.model.smollm2.NAME`): the embedded SmolLM2-135M-Instruct,
      set up on first use (:mod:`pvfast.model.smollm2`);
    - a ``.gguf`` file, or a folder holding one and no ``config.json``: converted once into a cached
      safetensors folder (:mod:`pvfast.model.gguf`), which is returned;
    - a model folder (with ``config.json``);
    - a hub id ``org/name``: returned as is online; with ``HF_HUB_OFFLINE=1`` its cached snapshot folder,
      or an immediate error when it is not cached. Online, an unreachable hub or an unknown id is an
      immediate error too (instead of a minute of retries inside transformers).
    """
    if cfg.name_or_path is None:
        from pvfast.model.tiny import tiny_model_dir

        return str(tiny_model_dir(cfg.tiny_arch))
    name = os.path.expanduser(cfg.name_or_path)
    path = Path(name)
    if not path.exists() and cfg.name_or_path == SMOLLM2_NAME:
        from pvfast.model.smollm2 import SetupError, model_dir

        try:
            return str(model_dir())
        except SetupError as err:
            raise ModelLoadError(f"model.name_or_path {cfg.name_or_path!r}: {err}") from err
    if path.exists():
        try:
            gguf = find_gguf(path)
            if gguf is not None:
                return str(convert_gguf(gguf))
        except GGUFError as err:
            raise ModelLoadError(f"model.name_or_path {cfg.name_or_path!r}: {err}") from err
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelLoadError(f"model.name_or_path {cfg.name_or_path!r}: not a model directory "
                                 f"(no config.json in it) nor a .gguf file")
        return str(path)
    # A hub id is "org/name"; anything that starts like a filesystem path was meant to be a directory.
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep == "\\" and "\\" in name:
        raise ModelLoadError(f"model.name_or_path {cfg.name_or_path!r}: no such file or directory "
                             f"(a hub id has the form org/name)")
    return _hub_source(name)


def _hub_source(repo_id: str) -> str:
    """A hub id checked before transformers sees it (fail fast offline or when the hub is unreachable)."""
    import huggingface_hub

    cached = huggingface_hub.try_to_load_from_cache(repo_id, "config.json")
    offline = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
                  for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if offline:
        if isinstance(cached, str):
            return str(Path(cached).parent)  # the cached snapshot folder: an ordinary local model
        raise ModelLoadError(f"model.name_or_path {repo_id!r}: not in the local Hugging Face cache and "
                             f"HF_HUB_OFFLINE=1; download it first (huggingface-cli download {repo_id}) or "
                             f"pass a local model folder or .gguf file")
    try:
        huggingface_hub.HfApi().model_info(repo_id, timeout=10)
    except huggingface_hub.errors.RepositoryNotFoundError as err:
        raise ModelLoadError(f"model.name_or_path {repo_id!r}: no such model on the hub (nor a local "
                             f"folder of that name)") from err
    except huggingface_hub.errors.HfHubHTTPError:
        pass  # gated or rate-limited: transformers (with the user's token) decides
    except Exception as err:  # noqa: BLE001  connection/timeout errors (httpx's own classes): no hub
        return _unreachable(repo_id, cached, err)
    return repo_id


def _unreachable(repo_id: str, cached, err: Exception) -> str:
    if isinstance(cached, str):
        return str(Path(cached).parent)  # use the cached copy rather than retrying for a minute
    raise ModelLoadError(f"model.name_or_path {repo_id!r}: the Hugging Face hub cannot be reached "
                         f"({type(err).__name__}: {err}) and the model is not cached; pass a local model "
                         f"folder or .gguf file, or set HF_HUB_OFFLINE=1 to use only cached models") from err


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
    # Attention (the tree-attention helper's edit): "sdpa" resolves to the measured default of the device,
    # pvfast_tree on the CPU (pvfast.model.forward.resolve_attn_implementation, which also registers it).
    from pvfast.model.forward import resolve_attn_implementation

    try:
        attn_implementation = resolve_attn_implementation(cfg.attn_implementation, device)
    except ValueError as err:
        raise ModelLoadError(f"model.attn_implementation: {err}") from err
    kwargs = dict(dtype=dtype, use_safetensors=True, trust_remote_code=TRUST_REMOTE_CODE,
                  attn_implementation=attn_implementation)
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
        targets = list(cfg.lora_targets)
        shown = targets if len(targets) <= 8 else [*targets[:8], f"... {len(targets) - 8} more"]
        raise ModelLoadError(f"model.lora_targets {shown}: {str(err)[:500]}") from err


def load_model(cfg: ModelConfig, device: torch.device, source: str | None = None):
    """Base model (from ``source`` or the config) with a fresh trainable LoRA adapter, for the packed path.

    A model whose attention or head the packed path does not reproduce is refused here, by feature
    (:func:`pvfast.model.forward.check_packed_support`), before any step runs.
    """
    from pvfast.model.forward import UnsupportedModelError, check_packed_support

    base = load_base_model(cfg, device, source)
    try:
        check_packed_support(base)
    except UnsupportedModelError as err:
        raise ModelLoadError(f"{source or cfg.name_or_path}: {err}") from err
    return add_lora(base, cfg)
