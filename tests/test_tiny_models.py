"""The tiny Llama / Qwen2 models and tokenizer: saved as safetensors, loadable, trainable, cached."""

import math
import multiprocessing
import os

import pytest
import torch

from pvfast.atomic import publish_dir
from pvfast.config.sections import LORA_TARGETS
from pvfast.model.tiny import ARCHS, TinyRecipe, build_model, build_tokenizer, load_tiny_tokenizer, tiny_model_dir
from pvfast.testing import load_tiny_model

# A cheaper recipe for the tests that must build into a fresh cache directory.
SMALL_RECIPE = TinyRecipe(seed=7, corpus_size=60, vocab_size=600)


def _batch(tokenizer):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "I cannot afford the copay."},
         {"role": "assistant", "content": '{"results": []}'}], tokenize=False)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_as_safetensors_and_loads(arch):
    path = tiny_model_dir(arch)
    names = set(os.listdir(path))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]  # no pickle
    model = load_tiny_model(arch)
    assert model.config.model_type == arch
    tok = load_tiny_tokenizer(arch)
    assert tok.is_fast and len(tok) <= model.config.vocab_size
    assert model.config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward_full_precision(arch):
    model = load_tiny_model(arch)
    ids = _batch(load_tiny_tokenizer(arch))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], model.config.vocab_size)
    logits = out.logits.detach().double()[0, :-1]
    reference = torch.nn.functional.cross_entropy(logits, ids[0, 1:])  # float64, shifted by hand
    assert abs(out.loss.item() - reference.item()) < 1e-5
    # Small-std init: logits are small, so the loss starts near that of a uniform distribution.
    assert logits.std() < 1.0
    assert abs(out.loss.item() - math.log(model.config.vocab_size)) < 0.5
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_nf4_lora_trains_only_the_adapters(arch):
    import bitsandbytes as bnb

    model = load_tiny_model(arch, quant="nf4", lora=True)
    quantized = {n.rsplit(".", 2)[-2] if n.endswith("base_layer") else n.rsplit(".", 1)[-1]
                 for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized == set(LORA_TARGETS)
    with torch.no_grad():  # LoRA B starts at zero, which would leave A without gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.02)
    ids = _batch(load_tiny_tokenizer(arch))
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * len(LORA_TARGETS) * model.config.num_hidden_layers
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    others = [n for n, p in model.named_parameters()
              if "lora_" not in n and (p.requires_grad or p.grad is not None)]
    assert others == []


def test_nf4_logits_track_full_precision():
    ids = _batch(load_tiny_tokenizer("llama"))
    with torch.no_grad():
        full = load_tiny_model("llama")(input_ids=ids).logits
        nf4 = load_tiny_model("llama", quant="nf4")(input_ids=ids).logits
    # 4-bit weights change the logits a little but keep them strongly correlated.
    centred = [(x - x.mean()).flatten().double() for x in (full, nf4)]
    corr = (centred[0] @ centred[1]) / (centred[0].norm() * centred[1].norm())
    assert 0.9 < corr.item() < 1.0


def test_chat_template_renders_chatml():
    tok = load_tiny_tokenizer("qwen2")
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    turn = tok.apply_chat_template(messages + [{"role": "assistant", "content": "A"}], tokenize=False)
    assert turn.endswith("<|im_start|>assistant\nA<|im_end|>\n")
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1
    assert tok.encode("hello", add_special_tokens=True) == tok.encode("hello", add_special_tokens=False)


def test_both_architectures_share_one_tokenizer():
    a, b = load_tiny_tokenizer("llama"), load_tiny_tokenizer("qwen2")
    assert a.get_vocab() == b.get_vocab()
    assert 2000 <= len(a) <= 4096


def test_build_is_seeded_and_leaves_global_rng_alone():
    tok = build_tokenizer(SMALL_RECIPE)
    assert tok.get_vocab() == build_tokenizer(SMALL_RECIPE).get_vocab()
    state = torch.random.get_rng_state()
    first = build_model("qwen2", tok, SMALL_RECIPE).state_dict()
    second = build_model("qwen2", tok, SMALL_RECIPE).state_dict()
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = build_model("qwen2", tok, TinyRecipe(seed=8, corpus_size=60, vocab_size=600)).state_dict()
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_cache_is_reused_and_keyed_by_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("PVFAST_CACHE_DIR", str(tmp_path))
    path = tiny_model_dir("llama", SMALL_RECIPE)
    assert path.parent == tmp_path
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert tiny_model_dir("llama", SMALL_RECIPE) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
    changed = tiny_model_dir("llama", TinyRecipe(seed=7, corpus_size=60, vocab_size=600, hidden_size=64))
    assert changed != path and changed.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, changed.name])  # no temp leftovers


def test_publish_keeps_the_first_finished_build(tmp_path):
    final, late = tmp_path / "final", tmp_path / ".late"
    final.mkdir()
    (final / "model.safetensors").write_text("first")
    late.mkdir()
    (late / "model.safetensors").write_text("second")
    publish_dir(late, final, exists="keep")
    assert not late.exists()
    assert (final / "model.safetensors").read_text() == "first"


def _race_worker(cache_dir, queue):
    os.environ["PVFAST_CACHE_DIR"] = cache_dir
    queue.put(str(tiny_model_dir("qwen2", SMALL_RECIPE)))


def test_two_processes_racing_to_build(tmp_path):
    ctx = multiprocessing.get_context("fork")  # the children inherit the imports: no start-up cost
    queue = ctx.Queue()
    workers = [ctx.Process(target=_race_worker, args=(str(tmp_path), queue)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    paths = {queue.get(timeout=5) for _ in workers}
    assert len(paths) == 1
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(paths.pop())]
