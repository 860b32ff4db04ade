"""Canonical JSON, value character ranges and the tolerant output parser (pvfast.data.jsonfmt)."""

import json

import pytest

from pvfast.data.jsonfmt import STOP_TEXT, parse_output, serialize, value_spans
from pvfast.data.records import Annotation

TRICKY = [
    Annotation("SDOH", "EconomicStability", "can't pay the café bill — 200 €"),
    Annotation("PartnershipPatient", "Clinical Care", 'the "new" pills, path C:\\meds\\a'),
    Annotation("SocioEmotionalBehaviour", "None", "I'm scared {really} 😟"),
    Annotation("CareCoordinationPatient", "None", "tab\there\nnewline"),
]


def test_serialize_is_one_canonical_line():
    text = serialize(TRICKY)
    assert "\n" not in text
    # Field order and values as published; non-ASCII written as is (not \\u escapes).
    expected = {"results": [{"Code": a.code, "Sub-code": a.subcode, "Span": a.span} for a in TRICKY]}
    assert json.loads(text) == expected
    assert list(json.loads(text)["results"][0]) == ["Code", "Sub-code", "Span"]
    assert "café" in text and "😟" in text
    assert serialize([]) == '{"results": []}'


def test_round_trip_keeps_triples():
    result = parse_output(serialize(TRICKY))
    assert result.strict and result.errors == []
    assert result.annotations == TRICKY


def test_stop_text_ends_the_output():
    text = serialize(TRICKY[:2]) + " " + STOP_TEXT + ' {"Code": "SDOH"} garbage'
    result = parse_output(text)
    assert result.strict and result.errors == []
    assert result.annotations == TRICKY[:2]


def test_labels_match_case_and_whitespace_insensitively():
    text = json.dumps({"results": [
        {"Code": " sdoh ", "Sub-code": "economic  stability", "Span": "rent"},
        {"Code": "PARTNERSHIPPATIENT", "Sub-code": "clinical care", "Span": "pills"},
        {"Code": "socioemotional behaviour", "Sub-code": "none", "Span": "sad"},
    ]})
    result = parse_output(text)
    assert result.errors == []
    assert result.annotations == [
        Annotation("SDOH", "EconomicStability", "rent"),
        Annotation("PartnershipPatient", "Clinical Care", "pills"),
        Annotation("SocioEmotionalBehaviour", "None", "sad"),
    ]


def test_unknown_labels_and_invalid_pairs_are_dropped_and_reported():
    text = json.dumps({"results": [
        {"Code": "SDOH", "Sub-code": "EconomicStability", "Span": "keep me"},
        {"Code": "Feelings", "Sub-code": "None", "Span": "a"},
        {"Code": "SDOH", "Sub-code": "happiness", "Span": "b"},
        {"Code": "SDOH", "Sub-code": "signoff", "Span": "c"},  # a real sub-code, but of Partnership*
        {"Code": "SDOH", "Span": "d"},  # missing Sub-code -> "None", invalid for SDOH
        {"Code": "CareCoordinationPatient", "Sub-code": "None", "Span": 3},
    ]})
    result = parse_output(text)
    assert result.strict
    assert result.annotations == [Annotation("SDOH", "EconomicStability", "keep me")]
    assert len(result.errors) == result.n_format_errors == 5
    assert "results[1]" in result.errors[0] and "unknown Code" in result.errors[0]
    assert "results[2]" in result.errors[1] and "unknown Sub-code" in result.errors[1]
    assert "results[3]" in result.errors[2] and "'signoff'" in result.errors[2] and "'SDOH'" in result.errors[2]
    assert "results[4]" in result.errors[3] and "'None'" in result.errors[3]
    assert "results[5]" in result.errors[4] and "Span" in result.errors[4]


def test_codes_without_subcodes_may_omit_or_null_the_subcode():
    text = json.dumps({"results": [{"Code": "CareCoordinationProvider", "Span": "call"},
                                   {"Code": "SocioEmotionalBehaviour", "Sub-code": None, "Span": "oh"}]})
    result = parse_output(text)
    assert result.errors == []
    assert result.annotations == [Annotation("CareCoordinationProvider", "None", "call"),
                                  Annotation("SocioEmotionalBehaviour", "None", "oh")]


@pytest.mark.parametrize("cut_in_third", [1, 9, 12, 30, -2, -1])
def test_truncated_output_keeps_complete_triples(cut_in_third):
    text = serialize(TRICKY[:3])
    third = text.index('{"Code": "SocioEmotionalBehaviour"')
    end_third = text.index("}", third + len('{"Code"'))
    # The third triple's span contains "{really}", so its closing brace is the one after that.
    end_third = text.index("}", end_third + 1)
    cut = third + cut_in_third if cut_in_third > 0 else end_third + 1 + cut_in_third
    assert third < cut <= end_third
    result = parse_output(text[:cut])
    assert not result.strict
    assert result.annotations == TRICKY[:2]
    assert len(result.errors) == 1 and "truncated" in result.errors[0]


def test_truncated_between_triples_and_before_any():
    full = serialize(TRICKY[:2])
    between = full[: full.index('{"Code": "PartnershipPatient"')]
    result = parse_output(between)
    assert result.annotations == TRICKY[:1]
    assert len(result.errors) == 1 and "truncated" in result.errors[0]
    assert parse_output('{"results": [').annotations == []
    assert parse_output('{"results": [').n_format_errors == 1


def test_single_quoted_python_dict_output_is_recovered():
    # What a model imitating Python's repr writes: single quotes, and double quotes around an apostrophe.
    text = ("Here's the answer: {'results': [{'Code': 'SDOH', 'Sub-code': 'EconomicStability', "
            "'Span': \"can't pay\"}, {'Code': 'PartnershipPatient', 'Sub-code': 'salutation', "
            "'Span': 'Hi {doc}'}]}")
    result = parse_output(text)
    assert not result.strict
    assert result.errors == []
    assert result.annotations == [Annotation("SDOH", "EconomicStability", "can't pay"),
                                  Annotation("PartnershipPatient", "salutation", "Hi {doc}")]


def test_no_json_and_empty_results():
    assert parse_output("I cannot help with that.").errors == ["no JSON object found"]
    empty = parse_output('{"results": []}')
    assert empty.strict and empty.annotations == [] and empty.errors == []
    trailing = parse_output('{"results": []} and some chatter')
    assert not trailing.strict and trailing.annotations == [] and trailing.errors == []


def test_value_spans_on_hand_written_completion():
    text = ('{"results": [{"Code": "SDOH", "Sub-code": "EconomicStability", "Span": "say \\"hi\\""}, '
            '{"Code": "SocioEmotionalBehaviour", "Sub-code": "None", "Span": "été"}]}')
    spans = value_spans(text)
    pieces = [(text[s:e], role) for s, e, role in spans]
    assert pieces == [
        ("SDOH", "code"), ("EconomicStability", "subcode"), ('say \\"hi\\"', "span"),
        ("SocioEmotionalBehaviour", "code"), ("None", "subcode"), ("été", "span"),
    ]
    # Ranges sit strictly between the quotes.
    for start, end, _ in spans:
        assert text[start - 1] == '"' and text[end] == '"'


def test_value_spans_on_serialized_and_truncated_text():
    text = serialize(TRICKY)
    spans = value_spans(text)
    expected = [v for a in TRICKY for v in (a.code, a.subcode, a.span)]
    # Undo JSON escaping of each range and compare with the original values.
    assert [json.loads('"' + text[s:e] + '"') for s, e, _ in spans] == expected
    assert [r for _, _, r in spans] == ["code", "subcode", "span"] * len(TRICKY)
    cut = text.index("Clinical Care") + 4
    truncated = value_spans(text[:cut])
    assert truncated[-1] == (cut - 4, cut, "subcode")
    assert truncated[:-1] == spans[: len(truncated) - 1]


def test_long_unknown_labels_are_described_not_quoted():
    long_label = "I have been waiting three weeks for a callback"
    text = json.dumps({"results": [{"Code": long_label, "Sub-code": "None", "Span": "x"},
                                   {"Code": "SDOH", "Sub-code": long_label, "Span": "x"}]})
    result = parse_output(text)
    assert result.errors == [f"results[0]: unknown Code (a string of {len(long_label)} chars)",
                             f"results[1]: unknown Sub-code (a string of {len(long_label)} chars)"]


def test_unknown_labels_are_described_without_their_text():
    out = '{"results": [{"Code": "I hate my landlord", "Sub-code": "None", "Span": "x"},' \
          ' {"Code": "PartnershipPatient", "Sub-code": "Clinical Cair", "Span": "y"}]}'
    result = parse_output(out)
    errors = " | ".join(result.errors)
    assert result.annotations == []
    assert "landlord" not in errors and "Cair" not in errors
    assert "unknown Code (a string of 18 chars)" in errors
    assert "unknown Sub-code (a string of 13 chars; closest label: 'Clinical Care')" in errors
