"""SPEC §5 scoring against hand-worked cases: the span rule, set semantics, per-class F1, mean ± std."""

import json
import math

import pytest

from pvfast.data.jsonfmt import parse_output, serialize
from pvfast.data.matching import greedy_span_matching, span_words, spans_match
from pvfast.data.records import Annotation
from pvfast.eval.metrics import aggregate, render_table, report_from_dict, score_corpus, span_counts

PP, SDOH, SEB = "PartnershipPatient", "SDOH", "SocioEmotionalBehaviour"


def _match(a: str, b: str) -> bool:
    return spans_match(span_words(a), span_words(b))


def _spans(*texts: str) -> list[Annotation]:
    return [Annotation(SEB, "None", t) for t in texts]


# ---------------------------------------------------------------------------------------------------
# Span rule


def test_words_are_lowercased_word_runs():
    assert span_words("Hi, Dr. SMITH's  office!") == {"hi", "dr", "smith", "s", "office"}


def test_containment_both_ways():
    # predicted ⊂ gold: Jaccard 2/4 = 0.5 < 0.6, matches only through containment
    assert _match("pay rent", "I cannot pay rent")
    # gold ⊂ predicted: Jaccard 3/6
    assert _match("Hi Dr Smith how are you", "Hi Dr Smith")


def test_jaccard_at_and_below_threshold():
    # {a b c d} vs {a b c e}: |∩| = 3, |∪| = 5 -> exactly 0.6, no containment -> match
    assert _match("alpha beta gamma delta", "alpha beta gamma epsilon")
    # 8 shared of 14: 0.5714 < 0.6 -> no match
    shared = "w1 w2 w3 w4 w5 w6 w7 w8"
    assert not _match(shared + " p1 p2 p3", shared + " g1 g2 g3")
    # 9 shared of 15 = 0.6 exactly (float 9/15 == 0.6 too, but the rule compares fractions)
    shared9 = shared + " w9"
    assert _match(shared9 + " p1 p2 p3", shared9 + " g1 g2 g3")


def test_case_insensitive_and_punctuation():
    assert _match("HI DR SMITH", "hi dr. smith,")


def test_empty_predicted_span_never_matches():
    assert not _match("", "anything here")
    assert not _match("...", "anything here")  # no words at all
    # would be "contained" in the gold word set if empty sets counted
    tp, fp, fn = span_counts(_spans(""), _spans("I am worried"))
    assert (tp, fp, fn) == (0, 1, 1)


def test_greedy_prefers_highest_jaccard():
    gold = ["the rent is late"]
    # p0 ⊂ gold with Jaccard 3/4; p1 ⊃ gold with Jaccard 4/5 -> p1 wins, p0 stays unmatched
    pred = ["rent is late", "the rent is late today"]
    assert greedy_span_matching(pred, gold) == [(1, 0)]
    tp, fp, fn = span_counts(_spans(*pred), _spans(*gold))
    assert (tp, fp, fn) == (1, 1, 0)


def test_greedy_is_one_to_one_and_not_optimal():
    # Candidates: (p0, g0) J = 1; (p1, g0) J = 5/6 (g0 ⊂ p1); (p0, g1) J = 4/6. p1 vs g1: J = 4/7, no
    # containment -> no match. Greedy takes (p0, g0) first; then g0 and p0 are both used, so one match,
    # although (p0, g1) + (p1, g0) would give two.
    gold = ["a b c d e", "a b c d f"]
    pred = ["a b c d e", "a b c d e z"]
    assert _match(pred[0], gold[1]) and _match(pred[1], gold[0]) and not _match(pred[1], gold[1])
    assert greedy_span_matching(pred, gold) == [(0, 0)]
    assert span_counts(_spans(*pred), _spans(*gold)) == (1, 1, 1)


def test_greedy_ties_break_by_position():
    gold = ["my knee hurts", "my knee hurts"]  # two identical gold spans (as lists, before de-dup)
    pred = ["my knee hurts"]
    assert greedy_span_matching(pred, gold) == [(0, 0)]


def test_duplicate_spans_count_per_annotation_by_default():
    # SPEC §5: one-to-one matching of predicted to gold spans. The same span coded twice in gold is two
    # gold spans; predicted three times, two predictions match (one each) and the third is a FP.
    gold = [Annotation(PP, "salutation", "Hi there"), Annotation(SEB, "None", "hi  THERE")]
    pred = _spans("Hi there", "Hi there", "hi there")
    assert span_counts(pred, gold) == (2, 1, 0)
    assert span_counts(pred[:1], gold) == (1, 0, 1)


def test_duplicate_spans_collapse_when_asked():
    gold = [Annotation(PP, "salutation", "Hi there"), Annotation(SEB, "None", "hi  THERE")]
    pred = _spans("Hi there", "Hi there", "hi there")
    assert span_counts(pred, gold, dedup_spans=True) == (1, 0, 0)


# ---------------------------------------------------------------------------------------------------
# Corpus scores: a hand-worked 4-message case


def _hand_corpus():
    golds = [
        [Annotation(PP, "salutation", "Hi"), Annotation(PP, "Clinical Care", "meds"),
         Annotation(SEB, "None", "worried")],
        [Annotation(SDOH, "HealthCareAccessAndQuality", "clinic far")],
        [Annotation(SDOH, "EconomicStability", "rent")],
        [],
    ]
    outputs = [
        serialize([Annotation(PP, "salutation", "Hi"), Annotation(PP, "salutation", "Hello"),
                   Annotation(SDOH, "EconomicStability", "rent"), Annotation(SEB, "None", "worried")]),
        # strict JSON, two format errors: an unknown code and an invalid (code, sub-code) pair
        json.dumps({"results": [{"Code": "Bogus", "Sub-code": "None", "Span": "x"},
                                {"Code": "SDOH", "Sub-code": "salutation", "Span": "y"}]}),
        serialize([Annotation(SDOH, "EconomicStability", "rent")]),
        "I cannot answer that.",  # not JSON: one format error, nothing predicted
    ]
    return golds, [parse_output(o) for o in outputs]


def test_parser_errors_as_assumed():
    _, parsed = _hand_corpus()
    assert [p.n_format_errors for p in parsed] == [0, 2, 0, 1]
    assert [p.strict for p in parsed] == [True, True, True, False]


def _prf(tp, fp, fn):
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def test_code_level_set_semantics():
    report = score_corpus(*_hand_corpus())
    # msg1 gold {PP, SEB} pred {PP, SDOH, SEB}: TP 2 FP 1; msg2 gold {SDOH} pred {}: FN 1;
    # msg3 {SDOH} = {SDOH}: TP 1; msg4 empty both.
    assert (report.code.tp, report.code.fp, report.code.fn) == (3, 1, 1)
    p, r, f = _prf(3, 1, 1)
    assert (report.code.precision, report.code.recall) == pytest.approx((p, r))
    assert report.code.f1 == pytest.approx(f) and f == pytest.approx(0.75)


def test_subcode_level_set_semantics_none_is_not_a_label():
    report = score_corpus(*_hand_corpus())
    # msg1 gold {salutation, Clinical Care} (SEB's "None" ignored), pred {salutation (twice -> once),
    # EconomicStability}: TP 1 FP 1 FN 1; msg2 FN 1; msg3 TP 1.
    assert (report.subcode.tp, report.subcode.fp, report.subcode.fn) == (2, 1, 2)
    p, r, f = _prf(2, 1, 2)
    assert (p, r) == (2 / 3, 0.5)
    assert report.subcode.precision == pytest.approx(p)
    assert report.subcode.recall == pytest.approx(r)
    assert report.subcode.f1 == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert "None" not in report.per_class_subcode


def test_span_level_corpus():
    report = score_corpus(*_hand_corpus())
    # msg1 gold {Hi, meds, worried}, pred {Hi, Hello, rent, worried}: TP 2 FP 2 FN 1; msg2 FN 1; msg3 TP 1
    assert (report.span.tp, report.span.fp, report.span.fn) == (3, 2, 2)
    assert report.span.f1 == pytest.approx(_prf(3, 2, 2)[2])


def test_per_class_f1():
    report = score_corpus(*_hand_corpus())
    sdoh = report.per_class_code[SDOH]
    # SDOH: FP in msg1, FN in msg2, TP in msg3 -> P = R = F1 = 1/2
    assert (sdoh.tp, sdoh.fp, sdoh.fn) == (1, 1, 1)
    assert sdoh.f1 == pytest.approx(0.5)
    econ = report.per_class_subcode["EconomicStability"]
    # EconomicStability: FP in msg1, TP in msg3 -> P = 1/2, R = 1, F1 = 2/3
    assert (econ.tp, econ.fp, econ.fn) == (1, 1, 0)
    assert econ.f1 == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert report.per_class_subcode["Clinical Care"].f1 == 0.0  # only a miss
    assert report.per_class_code[PP].f1 == pytest.approx(1.0)
    assert "CareCoordinationPatient" not in report.per_class_code  # never in gold nor predicted


def test_format_error_rates():
    report = score_corpus(*_hand_corpus())
    assert report.format_error_rate == pytest.approx(2 / 4)  # msgs 2 and 4 have errors
    assert report.format_errors_per_message == pytest.approx(3 / 4)  # 2 + 1 errors over 4 messages
    assert report.strict_json_rate == pytest.approx(3 / 4)


def test_report_dict_round_trip():
    report = score_corpus(*_hand_corpus())
    data = json.loads(json.dumps(report.to_dict()))
    again = report_from_dict(data)
    assert again.to_dict() == report.to_dict()


def test_length_mismatch_is_an_error():
    golds, parsed = _hand_corpus()
    with pytest.raises(ValueError, match="4 gold messages but 3 predictions"):
        score_corpus(golds, parsed[:3])


# ---------------------------------------------------------------------------------------------------
# Mean ± std over seeds


def test_aggregate_mean_and_sample_std():
    golds, parsed = _hand_corpus()
    first = score_corpus(golds, parsed)  # code F1 3/4
    perfect = [parse_output(serialize(g)) for g in golds]
    second = score_corpus(golds, perfect)  # code F1 1
    agg = aggregate([first, second])
    values = [0.75, 1.0]
    mean = sum(values) / 2
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    assert agg["code.f1"].mean == pytest.approx(mean)
    assert agg["code.f1"].std == pytest.approx(std)
    assert agg["code.f1"].n == 2
    assert aggregate([first])["code.f1"].std == 0.0
    # a class predicted only in the first run is averaged over the one run it occurs in
    assert agg["per_class_subcode.EconomicStability.f1"].n == 2
    assert agg["format_error_rate"].mean == pytest.approx((0.5 + 0.0) / 2)


def test_render_table_has_no_span_text():
    golds, parsed = _hand_corpus()
    table = render_table([score_corpus(golds, parsed)] * 2)
    assert "F1" in table and "±" in table
    assert "75.00" in table  # code F1 as a percentage
    for span in ("worried", "meds", "clinic far", "Hello"):
        assert span not in table
