"""SPEC §5 scoring: Code / Sub-code / Span micro P/R/F1, per-class F1, format errors, mean ± std.

All three levels count true positives (TP), false positives (FP) and false negatives (FN) per message and
sum them over the corpus (micro averaging); P = TP/(TP+FP), R = TP/(TP+FN), F1 = 2PR/(P+R), each 0.0
when its denominator is 0. Scores are fractions in [0, 1]; the table renders them as percentages.

**Code and Sub-code** (set semantics). Per message, the *set* of labels predicted is compared with the set
of gold labels: TP = |P ∩ G|, FP = |P − G|, FN = |G − P|. Duplicates collapse. A sub-code label is the
sub-code string itself ("Clinical Care" under PartnershipPatient and under PartnershipProvider is one
label, as in the published counts); "None" is not a sub-code label and is ignored.

**Span** (label-agnostic, greedy one-to-one matching). Definitions:

- *words* of a text: ``re.findall(r"\\w+", text.lower())`` (Unicode letters, digits and underscore; so
  the rule is case-insensitive and ignores punctuation); a span's *word set* is the set of its words.
- Every predicted and every gold annotation contributes its span, as SPEC §5 states the rule: a span
  coded with two labels in gold is two gold spans, and a prediction must produce it twice to match both.
  ``dedup_spans=True`` (``--dedup-spans``) de-duplicates each side first (same lower-cased,
  whitespace-collapsed text), for comparison with evaluations that treat the span level as a set; it
  is off by default because SPEC §5 does not ask for it.
- A predicted span p and a gold span g *match* if both word sets are non-empty and
  ``W(p) ⊆ W(g)`` or ``W(g) ⊆ W(p)`` or ``|W(p) ∩ W(g)| / |W(p) ∪ W(g)| ≥ 0.6`` (compared exactly, as
  integers: ``5·|∩| ≥ 3·|∪|``). A span with no words (empty, or only punctuation) never matches: for a
  predicted span that is SPEC's "empty predicted spans never match"; an empty gold span would otherwise
  be contained in every prediction.
- Greedy order: all matching (p, g) candidates sorted by Jaccard descending (exact fractions), then
  predicted index, then gold index (first-appearance order in the message's output / gold list); walk
  the list and accept a candidate when neither span is taken yet.
- TP = accepted matches, FP = unmatched predicted spans, FN = unmatched gold spans.

**Format errors** come from :func:`pvfast.data.jsonfmt.parse_output` (unreadable objects, unknown labels,
invalid pairs, truncation). Two rates are reported: ``format_error_rate`` = messages with ≥ 1 format error
/ messages, and ``format_errors_per_message`` = total format errors / messages. ``strict_json_rate`` is the
fraction of outputs that were valid JSON of the expected shape.

:func:`aggregate` gives mean ± sample standard deviation (n − 1 in the denominator; 0.0 for one report)
over reports, e.g. one per training seed.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Sequence

from pvfast.data.codebook import CODES, SUBCODES
from pvfast.data.jsonfmt import ParseResult
from pvfast.data.matching import code_labels, greedy_span_matching, subcode_labels
from pvfast.data.records import Annotation

LEVELS = ("code", "subcode", "span")


def _unique_spans(spans: Iterable[str]) -> list[str]:
    """Spans de-duplicated by lower-cased, whitespace-collapsed text, first occurrence kept."""
    seen: dict[str, str] = {}
    for span in spans:
        seen.setdefault(" ".join(span.lower().split()), span)
    return list(seen.values())


# ----------------------------------------------------------------------------------------------------
# Counts and scores
# ----------------------------------------------------------------------------------------------------

def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


@dataclass
class Counts:
    """TP/FP/FN of one level (or one class) and the micro P/R/F1 they give."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, tp: int, fp: int, fn: int) -> None:
        self.tp += tp
        self.fp += fp
        self.fn += fn

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float:
        # 2TP / (2TP + FP + FN) is 2PR/(P+R) without the intermediate rounding.
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def support(self) -> int:
        """Number of gold items (TP + FN)."""
        return self.tp + self.fn

    def to_dict(self) -> dict:
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "support": self.support,
                "precision": self.precision, "recall": self.recall, "f1": self.f1}


def _add_set_counts(level: Counts, per_class: dict[str, Counts], predicted: set[str], gold: set[str]) -> None:
    level.add(len(predicted & gold), len(predicted - gold), len(gold - predicted))
    for label in predicted | gold:
        per_class.setdefault(label, Counts()).add(int(label in predicted and label in gold),
                                                 int(label in predicted and label not in gold),
                                                 int(label in gold and label not in predicted))


def span_counts(predicted: Iterable[Annotation], gold: Iterable[Annotation],
                dedup_spans: bool = False) -> tuple[int, int, int]:
    """(TP, FP, FN) of the span level for one message (``dedup_spans``: see the module docstring)."""
    pred_spans = [a.span for a in predicted]
    gold_spans = [a.span for a in gold]
    if dedup_spans:
        pred_spans, gold_spans = _unique_spans(pred_spans), _unique_spans(gold_spans)
    tp = len(greedy_span_matching(pred_spans, gold_spans))
    return tp, len(pred_spans) - tp, len(gold_spans) - tp


@dataclass
class Report:
    """Scores of one set of predictions against gold (one model / one seed)."""

    n_messages: int
    code: Counts
    subcode: Counts
    span: Counts
    per_class_code: dict[str, Counts] = field(default_factory=dict)  # labels seen in gold or predictions
    per_class_subcode: dict[str, Counts] = field(default_factory=dict)
    messages_with_format_errors: int = 0
    format_errors: int = 0
    strict_json: int = 0  # outputs that parsed as strict JSON of the expected shape

    @property
    def format_error_rate(self) -> float:
        """Messages with at least one format error / messages."""
        return _ratio(self.messages_with_format_errors, self.n_messages)

    @property
    def format_errors_per_message(self) -> float:
        """Total format errors / messages."""
        return _ratio(self.format_errors, self.n_messages)

    @property
    def strict_json_rate(self) -> float:
        return _ratio(self.strict_json, self.n_messages)

    def level(self, name: str) -> Counts:
        return {"code": self.code, "subcode": self.subcode, "span": self.span}[name]

    def to_dict(self) -> dict:
        return {
            "n_messages": self.n_messages,
            **{name: self.level(name).to_dict() for name in LEVELS},
            "per_class_code": {k: v.to_dict() for k, v in _codebook_order(self.per_class_code, CODES)},
            "per_class_subcode": {k: v.to_dict() for k, v in _codebook_order(self.per_class_subcode, SUBCODES)},
            "messages_with_format_errors": self.messages_with_format_errors,
            "format_errors": self.format_errors,
            "format_error_rate": self.format_error_rate,
            "format_errors_per_message": self.format_errors_per_message,
            "strict_json": self.strict_json,
            "strict_json_rate": self.strict_json_rate,
        }

    def scalars(self) -> dict[str, float]:
        """Flat ``name -> value`` view used by :func:`aggregate` (e.g. ``"code.f1"``, ``"per_class_code.SDOH.f1"``)."""
        out = {f"{name}.{m}": getattr(self.level(name), m) for name in LEVELS for m in ("precision", "recall", "f1")}
        for prefix, table in (("per_class_code", self.per_class_code), ("per_class_subcode", self.per_class_subcode)):
            for label, counts in table.items():
                out[f"{prefix}.{label}.f1"] = counts.f1
        out["format_error_rate"] = self.format_error_rate
        out["format_errors_per_message"] = self.format_errors_per_message
        out["strict_json_rate"] = self.strict_json_rate
        return out


def _codebook_order(table: dict[str, Counts], order: Sequence[str]) -> list[tuple[str, Counts]]:
    rank = {label: i for i, label in enumerate(order)}
    return sorted(table.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))


def score_corpus(golds: Sequence[Sequence[Annotation]], predictions: Sequence[ParseResult],
                 dedup_spans: bool = False) -> Report:
    """Score parsed predictions against gold annotations, message by message (same order, same length)."""
    if len(golds) != len(predictions):
        raise ValueError(f"score_corpus: {len(golds)} gold messages but {len(predictions)} predictions")
    report = Report(n_messages=len(golds), code=Counts(), subcode=Counts(), span=Counts())
    for gold, pred in zip(golds, predictions):
        _add_set_counts(report.code, report.per_class_code, code_labels(pred.annotations), code_labels(gold))
        _add_set_counts(report.subcode, report.per_class_subcode,
                        subcode_labels(pred.annotations), subcode_labels(gold))
        report.span.add(*span_counts(pred.annotations, gold, dedup_spans))
        report.format_errors += pred.n_format_errors
        report.messages_with_format_errors += int(pred.n_format_errors > 0)
        report.strict_json += int(pred.strict)
    return report


# ----------------------------------------------------------------------------------------------------
# Mean ± std over seeds, and the table
# ----------------------------------------------------------------------------------------------------

class MeanStd(NamedTuple):
    mean: float
    std: float  # sample standard deviation (n - 1); 0.0 when n == 1
    n: int  # number of reports that have this value

    def to_dict(self) -> dict:
        return self._asdict()


def aggregate(reports: Sequence[Report]) -> dict[str, MeanStd]:
    """Mean ± sample std of every scalar of :meth:`Report.scalars` over ``reports``.

    A per-class F1 is averaged over the reports in which the class occurs (in gold or predictions);
    ``n`` says how many that was.
    """
    if not reports:
        raise ValueError("aggregate needs at least one report")
    values: dict[str, list[float]] = {}
    for report in reports:
        for name, value in report.scalars().items():
            values.setdefault(name, []).append(value)
    return {name: MeanStd(statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
            for name, v in values.items()}


def _cell(agg: dict[str, MeanStd], name: str, multi: bool) -> str:
    if name not in agg:
        return "-"
    value = agg[name]
    return f"{100 * value.mean:6.2f} ± {100 * value.std:5.2f}" if multi else f"{100 * value.mean:6.2f}"


def render_table(reports: Sequence[Report]) -> str:
    """A plain-text table: P/R/F1 per level, per-class F1, format-error rates (mean ± std when > 1 report).

    Percentages; no message or span text.
    """
    agg = aggregate(reports)
    multi = len(reports) > 1
    width = 15 if multi else 7
    lines = [f"{len(reports)} run(s), {reports[0].n_messages} messages"
             + (" (mean ± sample std over runs)" if multi else "")]
    lines.append(f"{'level':<10}" + "".join(f"{h:>{width + 2}}" for h in ("P", "R", "F1")))
    for name in LEVELS:
        lines.append(f"{name:<10}" + "".join(f"{_cell(agg, f'{name}.{m}', multi):>{width + 2}}"
                                             for m in ("precision", "recall", "f1")))
    for title, prefix, order in (("Code", "per_class_code", CODES), ("Sub-code", "per_class_subcode", SUBCODES)):
        lines.append("")
        lines.append(f"{'per-class F1 (' + title + ')':<40}{'F1':>{width}}  support")
        for label in order:
            key = f"{prefix}.{label}.f1"
            if key not in agg:
                continue
            supports = [r.per_class_code if prefix == "per_class_code" else r.per_class_subcode for r in reports]
            support = max((table[label].support for table in supports if label in table), default=0)
            lines.append(f"  {label:<38}{_cell(agg, key, multi):>{width}}  {support:>7}")
    lines.append("")
    for key, title in (("format_error_rate", "messages with format errors"),
                       ("format_errors_per_message", "format errors per message"),
                       ("strict_json_rate", "strict JSON outputs")):
        value = agg[key]
        text = (f"{100 * value.mean:.2f}% ± {100 * value.std:.2f}" if key != "format_errors_per_message"
                else f"{value.mean:.3f} ± {value.std:.3f}")
        if not multi:
            text = text.split(" ± ")[0]
        lines.append(f"{title:<30}{text}")
    return "\n".join(lines)


def counts_from_dict(data: dict) -> Counts:
    """Inverse of :meth:`Counts.to_dict` (rates are recomputed from the counts)."""
    return Counts(int(data["tp"]), int(data["fp"]), int(data["fn"]))


def report_from_dict(data: dict) -> Report:
    """Inverse of :meth:`Report.to_dict`."""
    return Report(
        n_messages=int(data["n_messages"]),
        code=counts_from_dict(data["code"]),
        subcode=counts_from_dict(data["subcode"]),
        span=counts_from_dict(data["span"]),
        per_class_code={k: counts_from_dict(v) for k, v in data["per_class_code"].items()},
        per_class_subcode={k: counts_from_dict(v) for k, v in data["per_class_subcode"].items()},
        messages_with_format_errors=int(data["messages_with_format_errors"]),
        format_errors=int(data["format_errors"]),
        strict_json=int(data["strict_json"]),
    )


__all__ = ["Counts", "MeanStd", "Report", "aggregate", "render_table", "report_from_dict", "score_corpus",
           "span_counts"]


def render_comparison(named: Sequence[tuple[str, Report]]) -> str:
    """Models side by side, one row each: Code / Sub-code / Span F1 and the format-error rate (percent).

    For a pipeline's "untouched -> SFT -> PO" summary; every report must cover the same messages.
    """
    if not named:
        raise ValueError("render_comparison needs at least one report")
    width = max(12, *(len(name) for name, _ in named))
    lines = [f"{named[0][1].n_messages} test messages, F1 and format errors in %",
             f"{'model':<{width}}  {'Code F1':>8}  {'Sub-code F1':>11}  {'Span F1':>8}  {'format errors':>13}"]
    for name, report in named:
        lines.append(f"{name:<{width}}  {100 * report.code.f1:8.2f}  {100 * report.subcode.f1:11.2f}  "
                     f"{100 * report.span.f1:8.2f}  {100 * report.format_error_rate:13.2f}")
    return "\n".join(lines)
