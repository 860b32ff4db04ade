"""Scoring raw model outputs against gold data (SPEC §5) and the JSON report of one or more runs."""

from __future__ import annotations

from typing import Sequence

from pvfast.data.jsonfmt import ParseResult, parse_output
from pvfast.data.records import Example
from pvfast.eval.metrics import Report, aggregate, score_corpus


def evaluate_outputs(examples: Sequence[Example], outputs: Sequence[str],
                     dedup_spans: bool = False) -> tuple[Report, list[ParseResult]]:
    """Parse raw outputs (aligned with ``examples``) and score them against the gold annotations."""
    parsed = [parse_output(text) for text in outputs]
    return score_corpus([ex.annotations for ex in examples], parsed, dedup_spans), parsed


def report_json(runs: Sequence[tuple[str, Report]], settings: dict) -> dict:
    """The JSON report: settings, one entry per run (source and scores), mean ± std over runs."""
    return {
        "settings": settings,
        "runs": [{"source": source, "report": report.to_dict()} for source, report in runs],
        "aggregate": {name: value.to_dict() for name, value in aggregate([r for _, r in runs]).items()},
    }
