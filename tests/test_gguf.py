"""GGUF as a model source: a tiny GGUF written here with the ``gguf`` package from the embedded tiny Llama
(no network), converted into a cached safetensors folder; and the real SmolLM2 file when it is set up.

The expected values are independent of the converter: the tiny model's own logits (F32 tensors: exact),
and for quantised tensors ``gguf.quants.dequantize`` applied to the bytes this test wrote.
"""

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from pvfast.config.sections import ModelConfig  # noqa: E402
from pvfast.model import gguf as pvgguf  # noqa: E402
from pvfast.model.loading import ModelLoadError, add_lora, load_base_model, load_tokenizer, model_source  # noqa: E402
from pvfast.model.tiny import tiny_model_dir  # noqa: E402

Q = gguf.GGMLQuantizationType
TEXT = 'Hi Dr. Patel, my A1c was 7.9 {"results": []} JSON_END'


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Every test converts into its own cache (the tiny model folder stays where it is)."""
    tiny_model_dir("llama")
    monkeypatch.setenv("PVFAST_CACHE_DIR", str(tmp_path / "cache"))
    pvgguf._content_hash.cache_clear()


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order for rotary halves (its converter does this; transformers undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, qtype=Q.F32, architecture="llama", bad_tensor_type=None):
    """The tiny Llama and its tokenizer as a GGUF file; 2-D weights stored as ``qtype``. Returns the
    (transformers-named) tensors as written, dequantised, for the assertions."""
    from transformers import AutoModelForCausalLM

    folder = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    cfg = model.config
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    specials = {a["content"]: a["id"] for a in tok["added_tokens"]}
    for content, i in specials.items():
        if i >= len(tokens):
            tokens.append(content)
    assert len(tokens) == cfg.vocab_size
    merges = [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("pvfast tiny llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in specials else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    writer.add_pad_token_id(cfg.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tok_cfg.get("chat_template") or (folder / "chat_template.jinja").read_text())

    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    written = {}
    for hf_name, gg_name in names.items():
        w = sd[hf_name].astype(np.float32)
        stored = w
        if ".attn_q." in gg_name:
            stored = _llama_permute(w, cfg.num_attention_heads)
        elif ".attn_k." in gg_name:
            stored = _llama_permute(w, cfg.num_key_value_heads)
        if w.ndim == 2 and qtype != Q.F32:
            data = gguf.quants.quantize(stored, qtype)
            writer.add_tensor(gg_name, data, raw_dtype=qtype)
            back = gguf.quants.dequantize(data, qtype).reshape(stored.shape)
        else:
            writer.add_tensor(gg_name, stored)
            back = stored
        # undo the permutation to get what the converted model must hold
        if ".attn_q." in gg_name or ".attn_k." in gg_name:
            heads = cfg.num_attention_heads if ".attn_q." in gg_name else cfg.num_key_value_heads
            back = back.reshape(heads, back.shape[0] // heads // 2, 2, *back.shape[1:]).swapaxes(1, 2)
            back = back.reshape(w.shape)
        written[hf_name] = torch.from_numpy(np.ascontiguousarray(back))
    if bad_tensor_type is not None:
        block, size = gguf.GGML_QUANT_SIZES[bad_tensor_type]
        writer.add_tensor("blk.0.extra.weight", np.zeros((4, 64 // block * size), dtype=np.uint8),
                          raw_dtype=bad_tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, written


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_f32_gguf_converts_to_the_same_model_and_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path / "tiny.gguf"
    original, _ = write_tiny_gguf(path)
    folder = pvgguf.convert_gguf(path, log=lambda _: None)
    assert folder.parent == tmp_path / "cache" / "gguf"
    for name in ("config.json", "model.safetensors", "tokenizer.json", pvgguf.SOURCE_FILE):
        assert (folder / name).is_file(), name
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    converted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    gguf_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert ids == gguf_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert tokenizer.chat_template == gguf_tokenizer.chat_template and tokenizer.chat_template
    torch.testing.assert_close(_logits(converted, ids), _logits(original, ids), atol=1e-5, rtol=1e-5)
    source = json.loads((folder / pvgguf.SOURCE_FILE).read_text())
    assert source["architecture"] == "llama" and source["tensor_types"]["F32"] > 0


def test_quantised_weights_equal_gguf_dequantisation(tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "tiny-q8.gguf"
    _, written = write_tiny_gguf(path, qtype=Q.Q8_0)
    folder = pvgguf.convert_gguf(path, log=lambda _: None)
    saved = load_file(folder / "model.safetensors")
    for name, expected in written.items():
        torch.testing.assert_close(saved[name], expected, atol=0, rtol=0, msg=name)
    assert json.loads((folder / pvgguf.SOURCE_FILE).read_text())["tensor_types"]["Q8_0"] > 0


def test_conversion_is_cached_by_content(tmp_path):
    path = tmp_path / "a.gguf"
    write_tiny_gguf(path)
    messages = []
    first = pvgguf.convert_gguf(path, log=messages.append)
    assert len(messages) == 1
    assert pvgguf.convert_gguf(path, log=messages.append) == first and len(messages) == 1  # no second conversion
    copy = tmp_path / "moved" / "a.gguf"
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    assert pvgguf.convert_gguf(copy, log=messages.append) == first and len(messages) == 1  # same bytes, same folder
    changed = tmp_path / "b" / "a.gguf"
    changed.parent.mkdir()
    write_tiny_gguf(changed, qtype=Q.Q8_0)
    assert pvgguf.convert_gguf(changed, log=messages.append) != first and len(messages) == 2


def test_gguf_path_is_an_ordinary_model_source_nf4_and_lora(tmp_path):
    pytest.importorskip("bitsandbytes")
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    for given in (str(path), str(tmp_path)):  # the file, or a folder holding exactly one
        cfg = ModelConfig(name_or_path=given, quant="nf4", dtype="fp32", lora_r=4, lora_alpha=8,
                          gradient_checkpointing=False)
        source = model_source(cfg)
        assert (pvgguf.cache_root() / source.split("/")[-1] / "config.json").is_file()
    tokenizer = load_tokenizer(cfg)
    model = add_lora(load_base_model(cfg, torch.device("cpu")), cfg)
    assert any("Linear4bit" in type(m).__name__ for m in model.modules())
    ids = torch.tensor([tokenizer(TEXT, add_special_tokens=False)["input_ids"]])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "odd.gguf"
    write_tiny_gguf(path, architecture="rwkv6")
    with pytest.raises(pvgguf.GGUFError, match=r"architecture 'rwkv6' cannot be loaded.*supported: .*llama"):
        pvgguf.convert_gguf(path, log=lambda _: None)
    with pytest.raises(ModelLoadError, match="rwkv6"):
        model_source(ModelConfig(name_or_path=str(path)))
    assert not pvgguf.cache_root().exists() or not any(pvgguf.cache_root().iterdir())  # nothing half-written


def test_unsupported_quant_type_is_a_clear_error(tmp_path):
    path = tmp_path / "q81.gguf"
    write_tiny_gguf(path, bad_tensor_type=Q.Q8_1)
    with pytest.raises(pvgguf.GGUFError, match=r"tensor 'blk.0.extra.weight' is stored as Q8_1.*cannot dequantise"):
        pvgguf.convert_gguf(path, log=lambda _: None)


def test_folder_with_several_gguf_files_asks_for_one(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="holds 2 GGUF files"):
        model_source(ModelConfig(name_or_path=str(tmp_path)))


def test_not_a_gguf_file_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not gguf at all" * 10)
    with pytest.raises(ModelLoadError, match="broken.gguf: not a readable GGUF file"):
        model_source(ModelConfig(name_or_path=str(path)))


@pytest.mark.slow
def test_real_smollm2_converts_to_the_gguf_loaded_model(monkeypatch):
    """SmolLM2-135M-Instruct from the wheel (skipped unless `python -m pvfast.model setup` was run)."""
    from pvfast.model import smollm2

    monkeypatch.delenv("PVFAST_CACHE_DIR")
    path = smollm2.gguf_path()
    if not smollm2.is_set_up():
        pytest.skip("SmolLM2 is not set up here (python -m pvfast.model setup)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_source(ModelConfig(name_or_path=smollm2.NAME))
    converted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = list(ids["input_ids"])
    torch.testing.assert_close(_logits(converted, ids), _logits(reference, ids), atol=1e-4, rtol=1e-4)
    assert converted.config.model_type == "llama" and converted.config.vocab_size == 49152
    out = converted.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, len(ids):])
