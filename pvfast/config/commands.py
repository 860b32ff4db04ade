"""The configs of ``python -m pvfast.evaluate`` and ``python -m pvfast.pairs``: one dataclass per command.

Both commands read their config like the trainer (:func:`pvfast.config.cli.parse_command`): defaults <
``--config FILE`` (YAML/JSON, the same keys) < ``--key value``, with ``--help`` and ``--help-keys``. The flags
they always had are keys or aliases here: ``--predictions a.jsonl b.jsonl`` fills a list,
``--batch-size 16`` is ``generation.batch_size``, ``--seed 1`` and ``--no-include-empty`` are
``pairs.seed`` and ``pairs.include_empty`` (the trainer's ``pairs`` section, so a trainer config file's
``pairs:`` block reads here unchanged).

Torch-free: ``--help`` and config errors never import the model code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Mapping

from pvfast.config.checks import FieldError, require
from pvfast.config.sections import GenerationConfig, PairConfig

#: Flags of the generation settings shared by both commands.
GENERATION_ALIASES: Mapping[str, str] = {
    "batch_size": "generation.batch_size",
    "max_new_tokens": "generation.max_new_tokens",
}


@dataclass(frozen=True)
class GenerationOptions:
    """How a command loads a model and generates greedily (evaluate, pairs): the shared keys."""

    template: str | None = None  # prompt template file (pvfast.data.prompt.PromptTemplate); None = built-in
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bfloat16 on a GPU, float32 on CPU
    device: str | None = None  # e.g. cpu, cuda, cuda:1; None = cuda if available, else cpu
    load_in_4bit: bool = False  # NF4 base model (bitsandbytes), the QLoRA base of the published recipe
    generation: GenerationConfig = GenerationConfig()  # greedy decoding (SPEC §5): batch size, new-token cap



def _default(cls: type, name: str):
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _check_source(config, extra_generation_only: tuple[str, ...] = ()) -> None:
    """Exactly one of ``predictions`` / ``model``; generation-only keys need ``model``."""
    if config.predictions_given() and config.model is not None:
        raise FieldError(type(config).__name__, "predictions", "cannot be combined with --model: score "
                                                               "precomputed outputs or generate them, not both")
    if not config.predictions_given() and config.model is None:
        raise FieldError(type(config).__name__, "predictions", "is required unless --model is given: the "
                                                               "outputs to score ({id, output} JSONL) or a model "
                                                               "to generate them")
    if config.model is None:
        for name in ("adapter", "save_predictions", "template", "load_in_4bit", *extra_generation_only):
            if getattr(config, name) != _default(type(config), name):
                raise FieldError(type(config).__name__, name, "needs --model (it only applies when generating)")


@dataclass(frozen=True)
class EvaluateCommandConfig(GenerationOptions):
    """``python -m pvfast.evaluate``: score outputs against gold data (SPEC §5), from files or a model."""

    data: str | None = None  # gold data (required): pvfast SFT JSONL or the published save_to_disk layout
    predictions: tuple[str, ...] = ()  # JSONL files of {id, output}, one per seed; scored without a model
    model: str | None = None  # model directory (or hub id) to generate with, instead of predictions
    adapter: tuple[str, ...] = ()  # peft adapter directories on top of model, one generation run per adapter
    save_predictions: tuple[str, ...] = ()  # write each run's generated outputs as {id, output} JSONL (one per run)
    limit: int | None = None  # generate for the first N messages of data only (a quick check); None = all
    out: str | None = None  # write the JSON report here
    dedup_spans: bool = False  # span level: collapse identical spans per message before matching (off: SPEC §5)
    show_text: bool = False  # print message, gold and predicted triples of wrong messages (patient text!)

    def __post_init__(self) -> None:
        require(self, "limit", self.limit is None or self.limit >= 1, ">= 1 or None")

    def predictions_given(self) -> bool:
        return bool(self.predictions)

    def runs(self) -> int:
        """Generation runs: one per adapter, or one on the bare model."""
        return len(self.adapter) or 1

    def check_complete(self) -> None:
        """Checks that need the whole command line and config file."""
        if self.data is None:
            raise FieldError(type(self).__name__, "data", "is required: the gold data file to score against "
                                                          "(make the synthetic one with python -m pvfast.data synth)")
        _check_source(self, ("limit",))
        if self.save_predictions and len(self.save_predictions) != self.runs():
            raise FieldError(type(self).__name__, "save_predictions",
                             f"needs one file per run ({self.runs()}), got {len(self.save_predictions)}")


EVALUATE_ALIASES: Mapping[str, str] = {**GENERATION_ALIASES}


@dataclass(frozen=True)
class PairsCommandConfig(GenerationOptions):
    """``python -m pvfast.pairs``: confusion-aware preference pairs (SPEC §4) from validation outputs."""

    train: str | None = None  # training examples (required); each one's gold completion is the chosen output
    val: str | None = None  # validation examples (required) whose outputs give the confusion tables
    predictions: str | None = None  # precomputed {id, output} JSONL for val; or generate them with model
    model: str | None = None  # SFT model directory to generate the validation outputs with
    adapter: str | None = None  # peft adapter on top of model
    save_predictions: str | None = None  # write the generated validation outputs here ({id, output} JSONL)
    out: str | None = None  # preference JSONL to write (required)
    tables_dir: str | None = None  # where confusion_code.csv and confusion_subcode.csv go; None = beside out
    pairs: PairConfig = PairConfig()  # how rejected outputs are made (strategies, seed, smoothing, ...)

    def predictions_given(self) -> bool:
        return self.predictions is not None

    def check_complete(self) -> None:
        """Checks that need the whole command line and config file."""
        for name, what in (("train", "the training examples (chosen = gold)"),
                           ("val", "the validation examples the model is run on"),
                           ("out", "the preference JSONL to write")):
            if getattr(self, name) is None:
                raise FieldError(type(self).__name__, name, f"is required: {what}")
        _check_source(self)


#: ``--seed``, ``--strategies``, ``--no-include-empty``, ...: every pair-mining key as a top-level flag.
PAIRS_ALIASES: Mapping[str, str] = {
    **GENERATION_ALIASES,
    **{f.name: f"pairs.{f.name}" for f in dataclasses.fields(PairConfig)},
}


@dataclass(frozen=True)
class ExtractCommandConfig(GenerationOptions):
    """``python -m pvfast.extract``: (Code, Sub-code, Span) triples for new messages from a trained model.

    ``template`` None means the run's template with ``run`` (the prompt the model was trained on), the
    built-in one with ``model``; a run trained with ``model.quant nf4`` loads its base in NF4 as training did.
    """

    input: str | None = None  # messages (required): JSONL of {id, direction, message}, or a .csv with those columns
    out: str | None = None  # output JSONL (required): {id, results, valid, problems} per message, in input order
    run: str | None = None  # a finished python -m pvfast.train output folder: its final model is used
    model: str | None = None  # instead of run: a model folder (or .gguf file / hub id) to generate with
    adapter: str | None = None  # a peft adapter folder on top of model
    merge_adapter: bool = True  # fold the adapter into the weights before generating (faster; kept apart in 4-bit)

    def check_complete(self) -> None:
        """Checks that need the whole command line and config file."""
        for name, what in (("input", "the messages to extract from (JSONL or CSV with id, direction, message)"),
                           ("out", "the JSONL file to write the extracted triples to")):
            if getattr(self, name) is None:
                raise FieldError(type(self).__name__, name, f"is required: {what}")
        if (self.run is None) == (self.model is None):
            raise FieldError(type(self).__name__, "run", "give exactly one of --run (a python -m pvfast.train "
                                                         "output folder) and --model (a model folder)")
        if self.adapter is not None and self.model is None:
            raise FieldError(type(self).__name__, "adapter", "needs --model (a run folder brings its own adapter)")


EXTRACT_ALIASES: Mapping[str, str] = {**GENERATION_ALIASES}
