"""A stage's data: every file read and validated before a model is loaded, then tokenized and packed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pvfast.config.sections import DataConfig
from pvfast.data.io import DataError, load_examples, load_preferences, read_jsonl
from pvfast.data.prompt import PromptTemplate, TemplateError
from pvfast.data.records import Example, PreferenceRecord
from pvfast.data.synth import default_corpus, split_corpus
from pvfast.packing.loss_batch import LossBatch, PackingStats, fit_to_budget, make_loss_batches
from pvfast.packing.tree import CompletionGroup
from pvfast.train.errors import BadInput
from pvfast.train.metrics_log import MetricsLog


@dataclass
class StageData:
    """The examples and records of a run; None where the stage does not need them."""

    train: list[Example] | None  # SFT targets, and the examples PO pairs are built from
    preferences: list[PreferenceRecord] | None  # ready preference records (po stage with a records file)
    validation: list[Example] | None  # where the SFT model's confusions are mined (SPEC §4)
    test: list[Example] | None  # final evaluation (SPEC §5)
    template: PromptTemplate | None


def _load(loader, path: str, skip_invalid: bool, what: str):
    try:
        items, problems = loader(path, skip_invalid=skip_invalid)
    except DataError as err:
        raise BadInput(f"data.{what} {path}: {err}") from None
    if problems:
        print(f"data.{what} {path}: skipped {len(problems)} invalid records (data.skip_invalid)")
    return items


def _is_preference_file(path: str) -> bool:
    """Whether a JSONL file's first object is a preference record (has "chosen") rather than an example."""
    if not Path(path).is_file():
        return False  # a saved dataset directory holds examples (the published layout)
    try:
        rows, _ = read_jsonl(path)
    except DataError:
        return False  # load_examples reports the problem
    return bool(rows) and "chosen" in rows[0][1]


def load_stage_data(stage: str, data: DataConfig, needs_test: bool) -> StageData:
    """Read and validate every file the stage uses; synthetic splits fill the unset ones."""
    template = None
    if data.template is not None:
        try:
            template = PromptTemplate.from_file(data.template)
        except (OSError, TemplateError) as err:
            raise BadInput(f"data.template {data.template}: {err}") from None
    synthetic = None
    if data.train is None or data.validation is None or (needs_test and data.test is None):
        synthetic = split_corpus(default_corpus(data.synthetic_n, data.synthetic_seed), data.synthetic_seed)

    def examples(split: str) -> list[Example]:
        path = getattr(data, split)
        return list(synthetic[split]) if path is None else _load(load_examples, path, data.skip_invalid, split)

    train = preferences = validation = None
    if stage == "po" and data.train is not None and _is_preference_file(data.train):
        preferences = _load(load_preferences, data.train, data.skip_invalid, "train")
    else:
        train = examples("train")
        if stage != "sft":
            validation = examples("validation")
    test = examples("test") if needs_test else None
    return StageData(train, preferences, validation, test, template)


# Batches: tokenize, check lengths against the budgets, pack


def _cap_completions(group: CompletionGroup, max_tokens: int, truncate: bool) -> CompletionGroup:
    longest = max(len(c) for c in group.completions)
    if longest <= max_tokens:
        return group
    if not truncate:
        raise BadInput(f"{group.key!r}: a completion has {longest} tokens, over data.max_completion_tokens "
                       f"{max_tokens}; raise it or allow cutting tails with --data.truncate")
    weights = None if group.weights is None else [w[:max_tokens] for w in group.weights]
    return CompletionGroup(group.prompt_ids, [c[:max_tokens] for c in group.completions], weights, group.key)


def fit_groups(groups: list[CompletionGroup], data: DataConfig) -> tuple[list[CompletionGroup], int]:
    """Groups within the completion cap and the token budget; over-long ones are an error unless
    ``data.truncate``. Returns the groups and how many were truncated (reported at start)."""
    fitted, truncated = [], 0
    for group in groups:
        capped = _cap_completions(group, data.max_completion_tokens, data.truncate)
        try:
            capped = fit_to_budget(capped, data.token_budget, data.truncate)
        except ValueError as err:
            raise BadInput(f"data.token_budget: {err}") from None
        truncated += any(len(a) != len(b) for a, b in zip(capped.completions, group.completions))
        fitted.append(capped)
    return fitted, truncated


def build_batches(groups, data: DataConfig, kind: str, tokenizer, log: "MetricsLog") -> list[LossBatch]:
    groups, truncated = fit_groups(groups, data)
    batches = make_loss_batches(groups, data.token_budget, kind, pad_id=tokenizer.pad_token_id or 0)
    stats = PackingStats.from_batches(batches, data.token_budget)
    log.write({"event": "packing", "kind": kind, "truncated_records": truncated, **stats.as_dict()})
    log.say(f"packing ({kind}): {len(groups)} records -> {stats.batches} packs of <= {data.token_budget} tokens, "
            f"fill {stats.fill:.0%}; {stats.tree_tokens} tokens run instead of {stats.unshared_tokens} unshared "
            f"({stats.savings:.0%} saved, {stats.compression:.1f}x)"
            + (f"; {truncated} records truncated (data.truncate)" if truncated else ""))
    return batches
