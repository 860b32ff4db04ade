"""Configs: SPEC defaults, presets, precedence, overrides, validation errors, files and round trips; the engine's
declared mechanisms, the command API (--help, --help-keys, --config) and the one config-to-dict."""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import ClassVar, Literal

import pytest
import yaml

from pvfast.config.checks import FieldError, require
from pvfast.config.cli import parse_command
from pvfast.config.overrides import ConfigError, apply_updates
from pvfast.config.sections import PairConfig
from pvfast.config.serialize import config_differences, config_to_dict, save_config
from pvfast.config.stages import PipelineStageConfig, POStageConfig, SFTStageConfig, stage_of
from pvfast.config.trainer import config_from_dict, format_config, load_config, parse_cli
from pvfast.objectives.config import (
    ClassBalanceConfig,
    DpoConfig,
    IpoConfig,
    SftConfig,
    SimpoConfig,
    TabpoConfig,
    TokenWeightConfig,
)

SPEC6_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _error(stage: str, overrides=(), **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(stage, overrides=list(overrides), **kwargs)
    return str(info.value)


# --- defaults ---------------------------------------------------------------------------------------


def test_defaults_are_the_published_recipe():
    cfg = load_config("pipeline", preset="none")
    assert isinstance(cfg, PipelineStageConfig)
    m, o = cfg.model, cfg.optim
    # SPEC §6: QLoRA NF4, LoRA r 16, α 32, dropout 0.05 on q,k,v,o,gate,up,down; AdamW 2e-4, warmup 10 %,
    # 3 epochs, gradient checkpointing.
    assert (m.quant, m.lora_r, m.lora_alpha, m.lora_dropout) == ("nf4", 16, 32, 0.05)
    assert m.lora_targets == SPEC6_TARGETS
    assert m.gradient_checkpointing is True and m.name_or_path is None
    assert (o.lr, o.warmup_ratio, o.epochs, o.weight_decay, o.grad_clip) == (2e-4, 0.1, 3, 0.0, 1.0)
    assert (o.schedule, o.max_steps) == ("cosine", None)
    assert cfg.data.token_budget == 16384 and cfg.data.skip_invalid is False and cfg.data.truncate is False
    assert cfg.run.eval_max_new_tokens == 1024  # SPEC §5
    assert (cfg.run.seed, cfg.run.resume) == (0, False)


def test_default_objectives_are_spec3():
    cfg = load_config("pipeline", preset="none")
    tabpo = cfg.po.objective_config
    assert cfg.po.objective == "tabpo" and isinstance(tabpo, TabpoConfig)
    # SPEC §3 released defaults: β 0.5, τ 0.66, λ 0.5, w_diff 1.2, class balance off.
    assert (tabpo.beta, tabpo.tau, tabpo.barrier_weight) == (0.5, 0.66, 0.5)
    assert tabpo.token_weights.w_diff == 1.2 and tabpo.class_balance.enabled is False
    assert cfg.po.precompute_ref is False
    assert isinstance(cfg.sft.objective_config, SftConfig)
    assert cfg.pairs.strategies == ("label", "missing", "extra")  # SPEC §4: all three per example


def test_stage_classes_and_sections():
    assert isinstance(load_config("sft", preset="none"), SFTStageConfig)
    po = load_config("po", preset="none")
    assert isinstance(po, POStageConfig) and po.sft_adapter is None
    assert stage_of(po) == "po"
    assert not hasattr(load_config("sft", preset="none"), "po")


# --- presets ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset, model_id", [
    ("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B-Instruct"),
    ("llama-3.2-3b", "meta-llama/Llama-3.2-3B-Instruct"),
    ("llama-3.1-8b", "meta-llama/Llama-3.1-8B-Instruct"),
    ("llama-3.3-70b", "meta-llama/Llama-3.3-70B-Instruct"),
])
def test_published_presets(preset, model_id):
    cfg = load_config("sft", preset=preset)
    m, o = cfg.model, cfg.optim
    assert m.name_or_path == model_id
    assert (m.quant, m.dtype, m.lora_r, m.lora_alpha, m.lora_dropout) == ("nf4", "bf16", 16, 32, 0.05)
    assert m.lora_targets == SPEC6_TARGETS and m.gradient_checkpointing is True
    assert (o.lr, o.warmup_ratio, o.epochs) == (2e-4, 0.1, 3)


def test_tiny_preset_is_a_small_cpu_run():
    cfg = load_config("pipeline", preset="tiny")
    assert cfg.model.name_or_path is None and cfg.run.device == "cpu"
    assert cfg.data.train is None and cfg.data.synthetic_n <= 200
    assert cfg.optim.max_steps is not None and cfg.optim.max_steps <= 10
    assert cfg.run.eval_max_new_tokens <= 256


def test_tiny_preset_fits_its_corpus():
    """Every gold completion of the tiny corpus is accepted, and the longest prompt with it fits one pack."""
    from pvfast.data.jsonfmt import serialize
    from pvfast.data.prompt import build_prompt
    from pvfast.data.synth import generate_corpus
    from pvfast.model.tiny import load_tiny_tokenizer

    cfg = load_config("pipeline", preset="tiny")
    tokenizer = load_tiny_tokenizer(cfg.model.tiny_arch)
    corpus = generate_corpus(cfg.data.synthetic_n, cfg.data.synthetic_seed)
    prompt_tokens = max(len(tokenizer(build_prompt(tokenizer, ex.direction, ex.message))["input_ids"])
                        for ex in corpus)
    completion_tokens = max(len(tokenizer(serialize(ex.annotations))["input_ids"]) for ex in corpus)
    assert completion_tokens + 1 <= cfg.data.max_completion_tokens  # + the end-of-turn token
    assert prompt_tokens + cfg.data.max_completion_tokens <= cfg.data.token_budget


def test_unknown_preset_suggests():
    message = _error("sft", preset="qwen2.5-1.5")
    assert "qwen2.5-1.5" in message and "qwen2.5-1.5b" in message


# --- precedence and overrides ------------------------------------------------------------------------


def test_precedence_defaults_preset_file_cli(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 3.0e-4\n  epochs: 5\nrun:\n  seed: 7\n")
    cfg = load_config("sft", config_file=path, overrides=["--optim.lr", "1e-4"], preset="tiny")
    assert cfg.optim.lr == 1e-4  # CLI beats file
    assert cfg.optim.epochs == 5  # file beats preset (tiny: 2)
    assert cfg.run.seed == 7
    assert cfg.run.device == "cpu"  # preset beats defaults ("auto")
    assert cfg.model.lora_r == 16  # defaults where nobody says otherwise


def test_override_forms_and_nested_objective_config():
    cfg = load_config("pipeline", preset="none", overrides=[
        "--optim.lr=5e-5", "--model.quant", "none", "--po.objective", "dpo",
        "--po.objective_config.beta", "0.3", "--po.objective_config.class_balance.enabled", "yes",
        "--po.objective_config.class_balance.levels", "subcode", "--run.resume", "--precompute-ref",
        "--optim.max_steps", "null", "--model.lora_targets", "q_proj, v_proj", "--optim.betas", "0.8,0.95",
    ])
    assert cfg.optim.lr == 5e-5 and cfg.model.quant == "none"
    assert cfg.po.objective_config == DpoConfig(beta=0.3, class_balance=ClassBalanceConfig(
        enabled=True, levels=("subcode",)))
    assert cfg.run.resume is True and cfg.po.precompute_ref is True
    assert cfg.optim.max_steps is None
    assert cfg.model.lora_targets == ("q_proj", "v_proj") and cfg.optim.betas == (0.8, 0.95)


def test_token_weights_and_tabpo_presets():
    cfg = load_config("po", preset="none", overrides=["--po.preset", "paper",
                                                      "--po.objective_config.token_weights.w_span", "1.5"])
    # TabpoConfig "paper": w_diff 2 and λ 0.85 (SPEC §3), then the override on top.
    expected = TabpoConfig(token_weights=TokenWeightConfig(w_diff=2.0, w_span=1.5), barrier_weight=0.85)
    assert cfg.po.objective_config == expected


def test_changing_objective_restarts_its_config(tmp_path):
    path = tmp_path / "po.json"
    path.write_text(json.dumps({"po": {"objective_config": {"beta": 0.9}}}))
    tabpo = load_config("po", config_file=path, preset="none")
    assert tabpo.po.objective_config.beta == 0.9
    ipo = load_config("po", config_file=path, preset="none", overrides=["--po.objective", "ipo"])
    assert ipo.po.objective_config == IpoConfig()  # the file's TAB-PO β does not leak into IPO


def test_bool_parsing():
    for text, expected in [("true", True), ("False", False), ("1", True), ("0", False), ("yes", True),
                           ("no", False)]:
        assert load_config("sft", preset="none", overrides=["--data.truncate", text]).data.truncate is expected


# --- errors -----------------------------------------------------------------------------------------


def test_unknown_key_names_it_and_suggests():
    message = _error("sft", ["--optim.lrr", "1e-4"])
    assert "optim.lrr" in message and "'optim.lr'" in message
    message = _error("pipeline", ["--po.objective_config.betta", "0.1"])
    assert "po.objective_config.betta" in message and "'po.objective_config.beta'" in message
    assert "'optim.lr'" in _error("sft", ["--lr", "1e-4"])  # a bare leaf finds its section


def test_key_of_another_objective_is_unknown():
    message = _error("po", ["--po.objective", "dpo", "--po.objective_config.tau", "0.5"])
    assert "po.objective_config.tau" in message and "unknown key" in message


@pytest.mark.parametrize("override, key, type_word", [
    (["--optim.lr", "fast"], "optim.lr", "float"),
    (["--optim.epochs", "2.5"], "optim.epochs", "int"),
    (["--run.resume", "maybe"], "run.resume", "bool"),
    (["--model.quant", "nf8"], "model.quant", "'nf4'"),
    (["--run.device", "gpu"], "run.device", "'cuda'"),
    (["--optim.schedule", "cosin"], "optim.schedule", "'cosine'"),
    (["--optim.betas", "0.9"], "optim.betas", "comma"),
    (["--model.lora_r", "none"], "model.lora_r", "int"),
])
def test_bad_values_name_key_type_and_value(override, key, type_word):
    message = _error("pipeline", override)
    assert key in message and type_word in message and repr(override[1]) in message


def test_bad_objective_and_range_errors():
    message = _error("po", ["--po.objective", "dpoo"])
    assert "po.objective" in message and "'dpo'" in message
    message = _error("po", ["--po.objective", "sft"])  # SFT is not a preference objective
    assert "po.objective" in message
    message = _error("sft", ["--optim.warmup_ratio", "1.5"])
    assert "optim.warmup_ratio" in message and "1.5" in message
    message = _error("po", ["--po.objective_config.tau", "1.5"])
    assert "po.objective_config.tau" in message
    assert "po.preset" in _error("po", ["--po.objective", "dpo", "--po.preset", "paper"])


def test_malformed_command_line():
    assert "stray" in _error("sft", ["stray"])
    assert "optim" in _error("sft", ["--optim", "1"]) and "mapping" in _error("sft", ["--optim", "1"])
    assert "section" in _error("sft", ["--optim.lr", "1", "--optim.lr.x", "2"])


def test_file_keys_are_validated(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  lora_rank: 8\n")
    message = _error("sft", config_file=path)
    assert "model.lora_rank" in message and "model.lora_r" in message and str(path) in message
    path.write_text("optim:\n  lr: [1, 2]\n")
    message = _error("sft", config_file=path)
    assert "optim.lr" in message and "float" in message
    path.write_text("- just\n- a list\n")
    assert "mapping" in _error("sft", config_file=path)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"optim": {"lr": }}')
    assert f"{bad_json}:1:" in _error("sft", config_file=bad_json)
    assert "not found" in _error("sft", config_file=tmp_path / "missing.yaml")


# --- files, round trips, printing ---------------------------------------------------------------------


def test_yaml_and_json_files_agree(tmp_path):
    sections = {"model": {"quant": "none", "lora_targets": ["q_proj", "v_proj"]},
                "po": {"objective": "simpo", "objective_config": {"gamma": 0.7}},
                "pairs": {"strategies": ["label", "label"], "extra_span_words": [2, 4]}}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(sections))
    (tmp_path / "a.json").write_text(json.dumps(sections))
    from_yaml = load_config("pipeline", config_file=tmp_path / "a.yaml", preset="none")
    from_json = load_config("pipeline", config_file=tmp_path / "a.json", preset="none")
    assert from_yaml == from_json
    assert from_yaml.po.objective_config == SimpoConfig(gamma=0.7)
    assert from_yaml.pairs == PairConfig(strategies=("label", "label"), extra_span_words=(2, 4))


def test_yaml_reads_exponent_floats(tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text("optim:\n  lr: 1e-4\n")  # YAML 1.1 reads this as a string
    assert load_config("sft", config_file=path, preset="none").optim.lr == 1e-4


@pytest.mark.parametrize("stage", ["sft", "po", "pipeline"])
def test_dict_round_trip(stage):
    cfg = load_config(stage, preset="tiny", overrides=["--optim.lr", "3e-4", "--model.lora_targets", "q_proj"])
    if stage != "sft":
        cfg = load_config(stage, preset="tiny", overrides=[
            "--po.preset", "paper_b085", "--po.objective_config.beta", "0.25", "--pairs.smoothing", "0.5"])
    data = config_to_dict(cfg)
    assert json.loads(json.dumps(data)) == data  # JSON-serialisable as is
    back = config_from_dict(stage, data)
    assert back == cfg
    assert config_to_dict(back) == data


def test_save_and_reload(tmp_path):
    cfg = load_config("pipeline", preset="llama-3.1-8b", overrides=["--po.objective", "dpo_positive",
                                                                    "--po.objective_config.lambda_p", "2"])
    for name in ("config.json", "config.yaml"):
        path = save_config(cfg, tmp_path / "ckpt" / name)
        assert load_config("pipeline", config_file=path, preset="none") == cfg
    # the atomic write leaves no temporary file behind
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "config.yaml"]


def test_format_config_shows_resolved_values():
    cfg = load_config("po", preset="none", overrides=["--optim.lr", "7e-5", "--po.objective", "ipo"])
    text = format_config(cfg)
    assert text.splitlines()[0] == "# pvfast po config"
    assert yaml.safe_load(text) == config_to_dict(cfg)


# --- parse_cli ------------------------------------------------------------------------------------------


def test_parse_cli():
    assert parse_cli([]) == ("pipeline", None, "smollm2-135m", [])  # the default preset: the real model
    assert parse_cli(["sft", "--preset", "qwen2.5-1.5b", "--optim.lr", "1e-4"]) == \
        ("sft", None, "qwen2.5-1.5b", ["--optim.lr", "1e-4"])
    assert parse_cli(["po", "--config=run.yaml", "--po.objective=dpo"]) == \
        ("po", "run.yaml", None, ["--po.objective=dpo"])
    assert parse_cli(["--config", "c.json", "--preset=tiny", "--run.resume"]) == \
        ("pipeline", "c.json", "tiny", ["--run.resume"])
    with pytest.raises(ConfigError, match="unknown stage 'train'"):
        parse_cli(["train"])
    with pytest.raises(ConfigError, match="--config needs a value"):
        parse_cli(["sft", "--config"])


def test_parse_cli_feeds_load_config():
    stage, config_file, preset, overrides = parse_cli(["po", "--quant", "none", "--po.objective", "cal_dpo"])
    cfg = load_config(stage, config_file, overrides, preset)
    assert isinstance(cfg, POStageConfig) and cfg.model.quant == "none"
    assert cfg.po.objective == "cal_dpo" and cfg.run.device == "cpu"  # the tiny default preset


def test_help_exits(capsys):
    with pytest.raises(SystemExit) as info:
        parse_cli(["--help"])
    assert info.value.code == 0 and "usage" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parse_cli(["sft", "--help-keys"])
    assert "--optim.lr" in capsys.readouterr().out


# --- the command API (pvfast.config.cli.parse_command) ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Section:
    rate: float = 0.5  # a rate in [0, 1]
    names: tuple[str, ...] = ("a",)  # several names

    def __post_init__(self) -> None:
        require(self, "rate", 0.0 <= self.rate <= 1.0, "in [0, 1]")


@dataclasses.dataclass(frozen=True)
class _Command:
    """A made-up command: every kind of field the grammar handles."""

    inputs: tuple[str, ...] = ()  # input files
    out: str | None = None  # where the result goes (required)
    verbose: bool = False  # print more
    include_empty: bool = True  # keep empty records
    size: Literal["small", "large"] = "small"  # how big
    pair: tuple[int, int] = (1, 2)  # two ints
    section: _Section = _Section()

    def check_complete(self) -> None:
        if self.out is None:
            raise FieldError("_Command", "out", "is required: where the result goes")


_ALIASES = {"rate": "section.rate"}


def _parse(argv, **kwargs):
    return parse_command(argv, _Command, prog="python -m demo", aliases=_ALIASES, **kwargs)


def _refusal(argv, capsys, code=2) -> str:
    with pytest.raises(SystemExit) as info:
        _parse(argv)
    assert info.value.code == code
    return capsys.readouterr().err


def test_command_grammar():
    cfg = _parse(["--inputs", "a.jsonl", "b.jsonl", "c.jsonl", "--out=o.json", "--verbose", "--no-include-empty",
                  "--size", "large", "--pair", "3", "4", "--rate", "0.25", "--section.names", "x,y"])
    assert cfg == _Command(inputs=("a.jsonl", "b.jsonl", "c.jsonl"), out="o.json", verbose=True,
                           include_empty=False, size="large", pair=(3, 4), section=_Section(0.25, ("x", "y")))
    # one value fills a one-item list; --no- also reaches aliased and dotted bools; dashes read as underscores
    cfg = _parse(["--inputs", "a.jsonl", "--out", "o", "--include-empty", "false", "--no-verbose"])
    assert cfg.inputs == ("a.jsonl",) and cfg.include_empty is False and cfg.verbose is False


def test_command_errors_name_key_value_and_suggest(capsys):
    err = _refusal(["--out", "o", "--sise", "large"], capsys)
    assert "error: sise: unknown key; did you mean 'size'?" in err and "--help" in err
    err = _refusal(["--out", "o", "--size", "larg"], capsys)
    assert "size: expected one of 'small', 'large', got 'larg'; did you mean 'large'?" in err
    err = _refusal(["--out", "o", "--pair", "1", "2", "3"], capsys)
    assert "pair: expected 2 values (an int, an int), got ['1', '2', '3']" in err
    err = _refusal(["--out", "o", "--rate", "1.5"], capsys)  # the section's own check, named by its key
    assert "section.rate: must be in [0, 1], got 1.5 (from command line)" in err
    err = _refusal(["--out", "o", "--no-size"], capsys)
    assert "size" in err and "bool keys only" in err
    err = _refusal(["--out", "o", "--no-verbose", "yes"], capsys)
    assert "--no-verbose takes no value" in err
    err = _refusal(["--out", "o", "--size"], capsys)
    assert "size: needs a value" in err
    assert "out: is required" in _refusal(["--inputs", "a"], capsys)
    assert "expected --key value, got 'stray'" in _refusal(["stray"], capsys)


def test_command_config_file_then_command_line(tmp_path, capsys):
    path = tmp_path / "demo.yaml"
    path.write_text("inputs: [a.jsonl, b.jsonl]\nout: from-file\nsection:\n  rate: 0.75\n")
    cfg = _parse(["--config", str(path), "--out", "from-cli"])
    assert cfg == _Command(inputs=("a.jsonl", "b.jsonl"), out="from-cli", section=_Section(rate=0.75))
    path.write_text("section:\n  rat: 0.75\n")
    err = _refusal(["--config", str(path)], capsys)
    assert "section.rat: unknown key; did you mean 'section.rate'?" in err and str(path) in err


def test_command_help_lists_keys_docs_aliases_and_exit_codes(capsys):
    with pytest.raises(SystemExit) as info:
        _parse(["--out", "o", "--help"], description="Demo command.", exit_codes={0: "done", 2: "refused input"})
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m demo [--config FILE]") and "Demo command." in text
    assert "--size 'small'" in text and "one of 'small', 'large'. how big" in text  # type and inline doc
    assert "--section.rate 0.5" in text and "alias --rate" in text
    assert "exit status:" in text and "2    refused input" in text


def test_command_help_keys_shows_resolved_values(capsys):
    with pytest.raises(SystemExit) as info:
        _parse(["--rate", "0.125", "--help-keys"])  # no --out: completeness is not checked for a listing
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--section.rate 0.125  (default 0.5)" in text and "--out None" in text


def test_train_help_lists_presets_and_exit_codes(capsys):
    from pvfast.config.presets import PRESETS
    from pvfast.train.errors import EXIT_BAD_INPUT, EXIT_CODES, EXIT_NON_FINITE

    with pytest.raises(SystemExit):
        parse_cli(["--help"], EXIT_CODES)
    text = capsys.readouterr().out
    for name in PRESETS:
        assert f"\n  {name} " in text
    assert f"  {EXIT_BAD_INPUT}    {EXIT_CODES[EXIT_BAD_INPUT]}" in text
    assert f"  {EXIT_NON_FINITE}    {EXIT_CODES[EXIT_NON_FINITE]}" in text


def test_every_exit_code_of_the_trainer_is_documented():
    from pvfast.train import errors

    codes = {name: getattr(errors, name) for name in dir(errors)
             if name.startswith("EXIT_") and name not in ("EXIT_CODES", "EXIT_SIGNAL_BASE")}
    assert codes and all(code in errors.EXIT_CODES for code in codes.values()), codes


def test_train_help_keys_shows_the_preset_file_and_override_values(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_cli(["sft", "--preset", "tiny", "--help-keys"])
    text = capsys.readouterr().out
    tiny = load_config("sft", preset="tiny")
    assert f"--optim.lr {tiny.optim.lr!r}  (default 0.0002)" in text  # the preset's value, not the default
    assert f"--data.synthetic_n {tiny.data.synthetic_n!r}" in text
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  epochs: 5\n")
    with pytest.raises(SystemExit):
        parse_cli(["sft", "--preset", "tiny", "--config", str(path), "--optim.lr", "3e-5", "--help-keys"])
    text = capsys.readouterr().out
    assert "--optim.lr 3e-05  (default 0.0002)" in text and "--optim.epochs 5  (default 3)" in text
    assert f"preset 'tiny' < {path} < command line" in text


# --- the engine's declared mechanisms (generic: no pvfast section is special-cased) ------------------------


@dataclasses.dataclass(frozen=True)
class _Shape:
    kind: str = "circle"  # circle | square
    size: float = 1.0  # must be > 0
    extra: int = 0


@dataclasses.dataclass(frozen=True)
class _Drawing:
    config_restarts: ClassVar = {"shape": ("family",)}  # a new family starts its shape over

    family: str = "round"  # round | angular
    shape: _Shape = _Shape()
    label: str = "x"

    def __post_init__(self) -> None:
        if self.family not in ("round", "angular"):
            raise FieldError("_Drawing", "family", f"must be round or angular, got {self.family!r}")

    @classmethod
    def restart_field(cls, name, values):
        assert name == "shape"
        return _Shape(kind="circle" if values["family"] == "round" else "square", size=2.0)


@dataclasses.dataclass(frozen=True)
class _Plain:
    """Checks that raise plain ValueErrors naming no field (like a third-party config)."""

    low: int = 0
    high: int = 10
    step: int = 1

    def __post_init__(self) -> None:
        if self.step <= 0:
            raise ValueError("the stride is not positive")
        if self.low > self.high:
            raise ValueError("empty range")


@dataclasses.dataclass(frozen=True)
class _Outer:
    drawing: _Drawing = _Drawing()
    plain: _Plain = _Plain()


def test_declared_restarts():
    base = _Outer(drawing=_Drawing(shape=_Shape(kind="circle", size=5.0, extra=3)))
    # a changed source restarts the target, then the layer's own keys for it apply
    out = apply_updates(base, {"drawing": {"family": "angular", "shape": {"extra": 7}}}, "test")
    assert out.drawing == _Drawing(family="angular", shape=_Shape(kind="square", size=2.0, extra=7))
    # an unchanged source keeps the target; no source in the layer keeps it too
    assert apply_updates(base, {"drawing": {"family": "round"}}, "test").drawing.shape.size == 5.0
    assert apply_updates(base, {"drawing": {"label": "y"}}, "test").drawing.shape.extra == 3


def test_field_errors_and_undeclared_checks_name_the_key():
    message = str(_error_of(_Outer(), {"drawing": {"family": "oval"}}))
    assert message == "drawing.family: must be round or angular, got 'oval' (from test)"
    # a plain ValueError: the one changed field that fails on its own is named
    assert str(_error_of(_Outer(), {"plain": {"step": "0", "high": "5"}})).startswith(
        "plain.step: the stride is not positive")
    # a rule only the combination breaks: the section is named
    assert str(_error_of(_Outer(), {"plain": {"low": "8", "high": "5"}})).startswith("plain: empty range")


def _error_of(cfg, updates) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        apply_updates(cfg, updates, "test")
    return info.value


def test_tabpo_preset_does_not_carry_over_to_another_objective():
    paper = load_config("po", preset="none", overrides=["--po.preset", "paper"])
    assert paper.po.objective_config == TabpoConfig.from_preset("paper")
    dpo = apply_updates(paper, {"po": {"objective": "dpo"}}, "test")  # a later layer switches the objective
    assert dpo.po.preset is None and dpo.po.objective_config == DpoConfig()
    back = apply_updates(dpo, {"po": {"objective": "tabpo"}}, "test")
    assert back.po.preset is None and back.po.objective_config == TabpoConfig()
    # both in one layer: the explicit preset is kept, and refused for DPO
    assert "po.preset: names a TAB-PO preset" in _error("po", ["--po.preset", "paper", "--po.objective", "dpo"])


def test_trainer_grammar_extensions():
    cfg = load_config("pipeline", preset="none", overrides=[
        "--model.lora_targets", "q_proj", "v_proj", "--no-run.evaluate", "--no-resume", "--optim.betas", "0.8", "0.9"])
    assert cfg.model.lora_targets == ("q_proj", "v_proj") and cfg.optim.betas == (0.8, 0.9)
    assert cfg.run.evaluate is False and cfg.run.resume is False
    assert "optim.lr: needs a value (a float)" in _error("sft", ["--optim.lr"])
    assert "bool keys only" in _error("sft", ["--no-optim.lr"])
    assert "expected a float, got ['1', '2']" in _error("sft", ["--optim.lr", "1", "2"])


def test_help_keys_shows_inline_docs(capsys):
    with pytest.raises(SystemExit):
        parse_cli(["po", "--help-keys"])
    lines = capsys.readouterr().out.splitlines()
    lr = lines.index(next(line for line in lines if line.startswith("  --optim.lr ")))
    assert "a float. peak learning rate (SPEC §6)" in lines[lr + 1]
    tau = next(i for i, line in enumerate(lines) if line.startswith("  --po.objective_config.tau "))
    assert "confidence gate" in lines[tau + 1]
    # a comment block above a field documents it too
    tokens = next(i for i, line in enumerate(lines) if line.startswith("  --optim.tokens_per_step "))
    assert "Gradient accumulation by token budget" in lines[tokens + 1]
    # another objective's config: its own docs, no "default" from the TAB-PO config it replaced
    with pytest.raises(SystemExit):
        parse_cli(["po", "--po.objective", "dpo", "--help-keys"])
    text = capsys.readouterr().out
    assert "  --po.objective_config.beta 0.1\n      a float. β; 0.1 is TRL's DPOConfig default" in text


# --- one config-to-dict ----------------------------------------------------------------------------------


class _Color(enum.Enum):
    RED = "red"


class _FakeDtype:  # stands in for torch.dtype without importing torch
    __module__ = "torch"

    def __str__(self) -> str:
        return "torch.bfloat16"


_FakeDtype.__name__ = "dtype"


def test_config_to_dict_is_the_saved_json_form(tmp_path):
    data = config_to_dict({"path": tmp_path / "x", "color": _Color.RED, "tags": {"b", "a"}, "pair": (1, 2),
                           "nested": {3: TabpoConfig()}, "dtype": _FakeDtype()})
    assert data["path"] == str(tmp_path / "x") and data["color"] == "red" and data["tags"] == ["a", "b"]
    assert data["pair"] == [1, 2] and data["dtype"] == "bfloat16"
    tabpo = data["nested"]["3"]  # JSON keys are strings
    assert tabpo["beta"] == 0.5 and tabpo["token_weights"]["w_diff"] == 1.2 and "objective" not in tabpo
    with pytest.raises(TypeError, match="object"):
        config_to_dict({"fn": object()})
    with pytest.raises(TypeError, match="mapping or a dataclass"):
        config_to_dict([1, 2])
    assert config_differences({"a": (1, 2), "b": {"c": 1}}, {"a": [1, 2], "b": {"c": 2}}) == ["b.c"]
