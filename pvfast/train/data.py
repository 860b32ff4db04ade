"""A stage's data: every file read and validated before a model is loaded, then tokenized, checked against the
token budget and packed.

Length problems name the record's file and line and say what can fix them: a completion over
``data.max_completion_tokens`` or a record whose tree is over ``data.token_budget`` can be cut by
``--data.truncate`` (completion tails only); a prompt that leaves no room for its completions cannot (the prompt
is never cut): only a shorter message or template, or a larger ``data.token_budget`` can.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pvfast.config.sections import DataConfig
from pvfast.data.io import DataError, LoadResult, Problem, load_examples, load_preferences, read_jsonl
from pvfast.data.prompt import PromptTemplate, TemplateError
from pvfast.data.records import Example, PreferenceRecord
from pvfast.data.synth import synthetic_splits
from pvfast.packing.loss_batch import LossBatch, PackingStats, fit_to_budget, make_loss_batches
from pvfast.packing.tree import CompletionGroup, group_tree_tokens
from pvfast.train.errors import BadInput
from pvfast.train.metrics_log import MetricsLog

#: Length problems listed in the error before "... and K more".
MAX_LISTED = 10


@dataclass
class StageData:
    """The examples and records of a run; None where the stage does not need them."""

    train: list[Example] | None  # SFT targets, and the examples PO pairs are built from
    preferences: list[PreferenceRecord] | None  # ready preference records (po stage with a records file)
    validation: list[Example] | None  # where the SFT model's confusions are mined (SPEC §4)
    test: list[Example] | None  # final evaluation (SPEC §5)
    template: PromptTemplate | None
    sources: dict[str, LoadResult] = field(default_factory=dict)  # split -> where its records came from


def _load(loader, path: str, skip_invalid: bool, what: str) -> LoadResult:
    try:
        result = loader(path, skip_invalid=skip_invalid)
    except DataError as err:
        raise BadInput(f"data.{what} {path}: {err}") from None
    if result.skipped:
        print(f"data.{what} {path}: skipped {len(result.skipped)} invalid records (data.skip_invalid)")
    if result.normalized_summary():
        print(f"data.{what} {path}: {result.normalized_summary()}")
    return result


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
        synthetic = synthetic_splits(data.synthetic_n, data.synthetic_seed, data.synthetic_heldout_phrasing)

    sources: dict[str, LoadResult] = {}

    def examples(split: str) -> list[Example]:
        path = getattr(data, split)
        if path is None:
            return list(synthetic[split])
        sources[split] = _load(load_examples, path, data.skip_invalid, split)
        return sources[split].records

    train = preferences = validation = None
    if stage == "po" and data.train is not None and _is_preference_file(data.train):
        sources["train"] = _load(load_preferences, data.train, data.skip_invalid, "train")
        preferences = sources["train"].records
    else:
        train = examples("train")
        if stage != "sft":
            validation = examples("validation")
    test = examples("test") if needs_test else None
    return StageData(train, preferences, validation, test, template, sources)


# Batches: tokenize, check lengths against the budgets, pack


def length_problem(group: CompletionGroup, data: DataConfig) -> tuple[str, str, bool] | None:
    """What is too long in ``group`` for ``data``'s budgets: ``(field, message, truncation_helps)``, or None.

    The message says what fixes it; ``truncation_helps`` is False when only the prompt is at fault (a prompt is
    never cut, so --data.truncate cannot help it).
    """
    prompt = len(group.prompt_ids)
    lengths = [len(c) for c in group.completions]
    try:
        fit_to_budget(group, data.token_budget, truncate=True)
    except ValueError:
        return ("prompt", f"the prompt has {prompt} tokens and leaves no room for its {len(lengths)} "
                          f"completion{'s' if len(lengths) != 1 else ''} "
                          f"within data.token_budget {data.token_budget}; --data.truncate cannot help (it cuts "
                          f"completion tails, never prompts): shorten the message or the prompt template "
                          f"(data.template), or raise data.token_budget", False)
    if max(lengths) > data.max_completion_tokens:
        return ("completion", f"a completion has {max(lengths)} tokens, over data.max_completion_tokens "
                              f"{data.max_completion_tokens}; raise it, or pass --data.truncate to cut completion "
                              f"tails", True)
    cost = group_tree_tokens(group)
    if cost > data.token_budget:
        return ("completion", f"prompt {prompt} tokens and completions of {min(lengths)}-{max(lengths)} tokens need "
                              f"{cost} tree tokens, over data.token_budget {data.token_budget}; raise it, or pass "
                              f"--data.truncate to cut completion tails", True)
    return None


def length_problems(groups: list[CompletionGroup], data: DataConfig, source: LoadResult | None = None
                    ) -> list[Problem]:
    """Every group that ``fit_groups`` would refuse under ``data``, as problems at their records' lines
    (``source``: where the records were read; None for records made in the run, named by id)."""
    problems = []
    for group in groups:
        found = length_problem(group, data)
        if found is None or (data.truncate and found[2]):
            continue
        record_id = getattr(group.key, "record_id", str(group.key))
        field_name, message, _ = found
        problems.append(source.problem(record_id, field_name, message) if source is not None
                        else Problem(f"record {record_id!r}", None, field_name, message))
    return problems


def fit_groups(groups: list[CompletionGroup], data: DataConfig, source: LoadResult | None = None
               ) -> tuple[list[CompletionGroup], int]:
    """Groups within the completion cap and the token budget, truncated where ``data.truncate`` allows it;
    anything else too long is a :class:`BadInput` naming every such record. Returns the groups and how many
    were truncated (reported at start)."""
    problems = length_problems(groups, data, source)
    if problems:
        listed = [str(p) for p in problems[:MAX_LISTED]]
        more = [f"... and {len(problems) - MAX_LISTED} more"] if len(problems) > MAX_LISTED else []
        raise BadInput(f"{len(problems)} record{'s' if len(problems) != 1 else ''} too long for the token "
                       f"budgets:\n" + "\n".join(listed + more))
    fitted, truncated = [], 0
    for group in groups:
        capped = group
        if max(len(c) for c in group.completions) > data.max_completion_tokens:
            capped = group.truncated(data.max_completion_tokens)
        capped = fit_to_budget(capped, data.token_budget, data.truncate)
        truncated += any(len(a) != len(b) for a, b in zip(capped.completions, group.completions))
        fitted.append(capped)
    return fitted, truncated


@dataclass
class Packed:
    """A stage's packs and what to report about them (written to the metrics log once the run may write)."""

    batches: list[LossBatch]
    kind: str
    stats: PackingStats
    records: int
    truncated: int
    # Class-balance weight by record id (pvfast.objectives.class_balance.class_balance_table); None when off.
    class_weights: dict[str, float] | None = None

    def report(self, log: MetricsLog, token_budget: int) -> None:
        stats = self.stats
        log.write({"event": "packing", "kind": self.kind, "truncated_records": self.truncated, **stats.as_dict()})
        log.say(f"packing ({self.kind}): {self.records} records -> {stats.batches} packs of <= {token_budget} "
                f"tokens, fill {stats.fill:.0%}; {stats.tree_tokens} tokens run instead of {stats.unshared_tokens} "
                f"unshared ({stats.savings:.0%} saved, {stats.compression:.1f}x)"
                + (f"; {self.truncated} records truncated (data.truncate)" if self.truncated else ""))


def build_batches(groups, data: DataConfig, kind: str, tokenizer, source: LoadResult | None = None) -> Packed:
    """Fit (or refuse) and pack ``groups``; writes nothing."""
    groups, truncated = fit_groups(groups, data, source)
    batches = make_loss_batches(groups, data.token_budget, kind, pad_id=tokenizer.pad_token_id or 0)
    return Packed(batches, kind, PackingStats.from_batches(batches, data.token_budget), len(groups), truncated)
