"""Data readers and writers with validation (pvfast.data.io): every bad input names file, line, field."""

import json
import math
from pathlib import Path

import pytest

from pvfast.data import io
from pvfast.data.jsonfmt import serialize
from pvfast.data.records import Annotation, Example, PreferenceRecord

# Distinctive message / span text: tests assert none of it ever reaches an error message.
MESSAGE_N = "Zephyr quartz: I cannot afford the copay. Thank you, doctor!"
SPAN_N1 = "cannot afford the copay"
SPAN_N2 = "Thank you, doctor!"
MESSAGE_Y = "Hello Maribel, let us review the xylophone dose together."
SPAN_Y = "let us review the xylophone dose together"
SECRETS = ("Zephyr", "quartz", "copay", "Maribel", "xylophone")


def good_rows():
    return [
        {"id": "m1", "direction": "N", "message": MESSAGE_N, "annotations": [
            {"Code": "SDOH", "Sub-code": "EconomicStability", "Span": SPAN_N1},
            {"Code": "PartnershipPatient", "Sub-code": "Appreciation/Gratitude", "Span": SPAN_N2}]},
        {"id": "m2", "direction": "Y", "message": MESSAGE_Y, "annotations": [
            {"Code": "PartnershipProvider", "Sub-code": "inviteCollabration", "Span": SPAN_Y}]},
        {"id": "m3", "direction": "Y", "message": MESSAGE_Y, "annotations": []},
    ]


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
                    encoding="utf-8")
    return path


def assert_no_secret_text(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


def refused(path, loader=io.load_examples) -> io.DataError:
    with pytest.raises(io.DataError) as info:
        loader(path)
    assert_no_secret_text(str(info.value))
    return info.value


# --- good files --------------------------------------------------------------------------------------


def test_round_trip_examples_and_utf8(tmp_path):
    examples = [
        Example("e1", "N", "J'ai payé 200 € — “merci”",
                (Annotation("SDOH", "EconomicStability", "payé 200 €"),)),
        Example("e2", "Y", 'Quote " and back\\slash', (Annotation("CareCoordinationProvider", "None", "back\\slash"),)),
    ]
    out = tmp_path / "deep" / "dir" / "train.jsonl"
    io.write_examples(out, examples)
    raw = out.read_text(encoding="utf-8")
    assert "payé 200 €" in raw and "\\u" not in raw  # ensure_ascii=False
    assert raw.count("\n") == 2
    loaded, problems = io.load_examples(out)
    assert loaded == examples and problems == []
    assert sorted(p.name for p in out.parent.iterdir()) == ["train.jsonl"]  # no temp file left


def test_labels_are_canonicalised_on_read(tmp_path):
    rows = good_rows()
    rows[0]["annotations"][0].update({"Code": " sdoh", "Sub-code": "economic  stability"})
    rows[1]["annotations"][0].update({"Code": "partnershipPROVIDER", "Sub-code": "Invite Collabration"})
    examples, _ = io.load_examples(write_lines(tmp_path / "a.jsonl", rows))
    assert examples[0].annotations[0] == Annotation("SDOH", "EconomicStability", SPAN_N1)
    assert examples[1].annotations[0] == Annotation("PartnershipProvider", "inviteCollabration", SPAN_Y)


def test_blank_lines_are_ignored_and_line_numbers_count_them(tmp_path):
    rows = good_rows()
    bad = dict(rows[1], direction="maybe")
    path = write_lines(tmp_path / "blank.jsonl", [rows[0], "", "   ", bad])
    err = refused(path)
    assert "blank.jsonl:4: direction: wrong direction value 'maybe'" in str(err)


# --- bad SFT records: one bad line 2 between good lines 1 and 3 ----------------------------------------

def _mutate(field_path, value):
    def apply(row):
        target = row
        for key in field_path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[field_path[-1]]
        else:
            target[field_path[-1]] = value
        return row
    return apply


_DELETE = object()

BAD_SFT_CASES = {
    # name: (mutation of good row m1, field in the problem, key phrase)
    "missing id": (_mutate(["id"], _DELETE), "id", "missing field"),
    "missing direction": (_mutate(["direction"], _DELETE), "direction", "missing field"),
    "missing message": (_mutate(["message"], _DELETE), "message", "missing field"),
    "missing annotations": (_mutate(["annotations"], _DELETE), "annotations", "missing field"),
    "missing span": (_mutate(["annotations", 1, "Span"], _DELETE), "annotations[1].Span", "missing field"),
    "id wrong type": (_mutate(["id"], ["x"]), "id", "wrong type: expected a string, got an array"),
    "message wrong type": (_mutate(["message"], 7), "message", "wrong type: expected a string, got a number"),
    "annotations wrong type": (_mutate(["annotations"], {"Code": "SDOH"}), "annotations",
                               "wrong type: expected an array"),
    "annotation not object": (_mutate(["annotations", 0], "SDOH"), "annotations[0]", "wrong type"),
    "code wrong type": (_mutate(["annotations", 0, "Code"], None), "annotations[0].Code",
                        "wrong type: expected a string, got null"),
    "unknown code": (_mutate(["annotations", 0, "Code"], "Finance"), "annotations[0].Code",
                     "unknown code (a string of 7 chars)"),
    "unknown sub-code": (_mutate(["annotations", 0, "Sub-code"], "Money"), "annotations[0].Sub-code",
                         "unknown sub-code (a string of 5 chars)"),
    "sub-code of another code": (_mutate(["annotations", 0, "Sub-code"], "signoff"), "annotations[0].Sub-code",
                                 "sub-code 'signoff' is not valid for code 'SDOH'"),
    "sub-code None for a code with sub-codes": (_mutate(["annotations", 0, "Sub-code"], "None"),
                                                "annotations[0].Sub-code",
                                                "sub-code 'None' is not valid for code 'SDOH'"),
    "code not for direction": (_mutate(["direction"], "Y"), "annotations[1].Code",
                               "code 'PartnershipPatient' is not allowed for direction 'Y'"),
    "span not in message": (_mutate(["annotations", 0, "Span"], "cannot  afford the copay"), "annotations[0].Span",
                            "span (24 chars) not found verbatim in the message"),
    "span case differs": (_mutate(["annotations", 1, "Span"], "thank you, doctor!"), "annotations[1].Span",
                          "span (18 chars) not found verbatim"),
    "empty span": (_mutate(["annotations", 0, "Span"], ""), "annotations[0].Span", "span is empty"),
    "empty message": (_mutate(["message"], "  \n"), "message", "is empty"),
    "wrong direction": (_mutate(["direction"], "yes"), "direction", "wrong direction value 'yes'"),
    "lower-case direction": (_mutate(["direction"], "n"), "direction", "wrong direction value 'n'"),
    "duplicate id": (_mutate(["id"], "m2"), "id", "duplicate id 'm2' (first on line 1)"),
}


def _bad_file(tmp_path, mutation):
    rows = good_rows()
    bad = mutation(json.loads(json.dumps(rows[0])))
    return write_lines(tmp_path / "bad.jsonl", [rows[1], bad, rows[2]])


@pytest.mark.parametrize("case", list(BAD_SFT_CASES))
def test_bad_sft_record_is_refused_with_location(tmp_path, case):
    mutation, field, phrase = BAD_SFT_CASES[case]
    path = _bad_file(tmp_path, mutation)
    err = refused(path)
    text = str(err)
    assert f"{path}:2: {field}: " in text
    assert phrase in text
    assert all(p.line == 2 and p.path == str(path) for p in err.problems)
    assert any(p.field == field and phrase in p.message for p in err.problems)


@pytest.mark.parametrize("case", list(BAD_SFT_CASES))
def test_skip_invalid_keeps_the_good_records(tmp_path, case):
    mutation, field, phrase = BAD_SFT_CASES[case]
    path = _bad_file(tmp_path, mutation)
    examples, problems = io.load_examples(path, skip_invalid=True)
    assert [e.id for e in examples] == ["m2", "m3"]
    assert problems and all(p.line == 2 for p in problems)
    assert any(p.field == field and phrase in p.message for p in problems)


def test_every_problem_of_a_record_is_reported(tmp_path):
    row = good_rows()[0]
    row.update(direction="Q", message="")
    row["annotations"][0]["Code"] = "Nope"
    err = refused(write_lines(tmp_path / "many.jsonl", [row]))
    fields = [p.field for p in err.problems]
    assert fields == ["direction", "message", "annotations[0].Code"]


def test_malformed_json_names_line_and_column(tmp_path):
    rows = good_rows()
    # Missing comma after the id value: the parser stops at column 13, where '"direction"' starts.
    broken = '{"id": "b2" "direction": "N", "message": "x", "annotations": []}'
    assert broken.index('"direction"') + 1 == 13
    path = write_lines(tmp_path / "broken.jsonl", [rows[0], broken, "[1, 2]", rows[2]])
    err = refused(path)
    assert f"{path}:2: malformed JSON: Expecting ',' delimiter at column 13" in str(err)
    assert f"{path}:3: expected a JSON object, got an array" in str(err)
    examples, problems = io.load_examples(path, skip_invalid=True)
    assert [e.id for e in examples] == ["m1", "m3"]
    assert [p.line for p in problems] == [2, 3]


def test_invalid_utf8_is_a_line_problem(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(good_rows()[0]).encode() + b"\n" + '{"id": "é"}'.encode("latin-1") + b"\n")
    err = refused(path)
    assert f"{path}:2: not valid UTF-8" in str(err)


def test_missing_and_empty_files(tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    err = refused(missing)
    assert str(missing) in str(err) and "no such file or directory" in str(err)
    for name, content in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n\n")):
        (tmp_path / name).write_text(content)
        err = refused(tmp_path / name)
        assert f"{tmp_path / name}: file is empty" in str(err)


def test_all_records_invalid_is_refused_even_when_skipping(tmp_path):
    bad = good_rows()[0]
    bad["direction"] = "?"
    path = write_lines(tmp_path / "allbad.jsonl", [bad])
    with pytest.raises(io.DataError) as info:
        io.load_examples(path, skip_invalid=True)
    assert "no valid record left" in str(info.value)


def test_error_listing_is_capped(tmp_path):
    n_bad = io.MAX_LISTED_PROBLEMS + 7
    rows = [dict(good_rows()[2], id=f"x{i}", direction="?") for i in range(n_bad)]
    err = refused(write_lines(tmp_path / "lots.jsonl", rows))
    lines = str(err).splitlines()
    assert lines[0] == f"{n_bad} problems:"
    assert len(lines) == 1 + io.MAX_LISTED_PROBLEMS + 1
    assert lines[-1] == "... and 7 more"
    assert len(err.problems) == n_bad


def test_problem_formatting():
    assert str(io.Problem("a.jsonl", 3, "annotations[0].Code", "unknown code")) == \
        "a.jsonl:3: annotations[0].Code: unknown code"
    assert str(io.Problem("a.jsonl", None, None, "file is empty")) == "a.jsonl: file is empty"
    assert str(io.Problem("a.jsonl", 5, None, "malformed JSON")) == "a.jsonl:5: malformed JSON"
    assert str(io.Problem("ds::train", 0, "answer", "bad", unit="row")) == "ds::train:row 0: answer: bad"
    assert isinstance(io.DataError([]), ValueError)


def test_long_label_values_are_not_quoted(tmp_path):
    # A column mix-up that puts message text into Code must not leak it.
    row = good_rows()[0]
    row["annotations"][0]["Code"] = MESSAGE_N
    err = refused(write_lines(tmp_path / "leak.jsonl", [row]))
    assert f"unknown code (a string of {len(MESSAGE_N)} chars)" in str(err)
    assert MESSAGE_N not in str(err)


def test_short_label_values_are_not_quoted_either(tmp_path):
    # Short text in a label field may still be patient text ("I hate my landlord"): never echoed. A near
    # miss of a real label gets the canonical label as a hint (which names our label, not the user's text).
    row = good_rows()[0]
    row["annotations"][0]["Code"] = "I hate my landlord"
    row["annotations"][0]["Sub-code"] = "EconomicStabilty"  # typo of a real sub-code
    err = str(refused(write_lines(tmp_path / "leak.jsonl", [row])))
    assert "landlord" not in err and "Stabilty" not in err
    assert "unknown code (a string of 18 chars)" in err


# --- published layout (saved Hugging Face dataset) --------------------------------------------------

INSTRUCTION = (
    "You are an annotator of patient-provider messages.\n"
    "Example:\nINPUT: TO_PAT_YN: Y  (Speaker: Provider speaking TO patient)\nContext: an example\n\n\n"
    "OUTPUT: {\"results\": []}\n\nNow annotate.\n"
)


def published_query(direction: str, message: str) -> str:
    speaker = ("Provider speaking TO patient" if direction == "Y" else "Patient speaking TO provider")
    return f"{INSTRUCTION}INPUT: TO_PAT_YN: {direction}  (Speaker: {speaker})\nContext: {message}\n\n\nOUTPUT:"


def published_rows(examples):
    return {"query": [published_query(e.direction, e.message) for e in examples],
            "answer": [serialize(e.annotations) for e in examples]}


PUBLISHED = [
    Example("x", "N", MESSAGE_N, (Annotation("SDOH", "EconomicStability", SPAN_N1),)),
    Example("x", "Y", "Line one.\nLine two,\n\nafter a blank line.",
            (Annotation("CareCoordinationProvider", "None", "Line two,\n\nafter"),)),
    Example("x", "Y", MESSAGE_Y, ()),
]


def test_published_dataset_is_read(tmp_path):
    datasets = pytest.importorskip("datasets")
    directory = tmp_path / "pv_published"
    datasets.Dataset.from_dict(published_rows(PUBLISHED)).save_to_disk(str(directory))
    examples, problems = io.load_examples(directory)
    assert problems == []
    assert [e.id for e in examples] == ["pv_published-0", "pv_published-1", "pv_published-2"]
    for got, want in zip(examples, PUBLISHED):
        assert (got.direction, got.message, got.annotations) == (want.direction, want.message, want.annotations)


def test_published_rows_in_jsonl_and_stop_text(tmp_path):
    cols = published_rows(PUBLISHED[:2])
    rows = [{"query": q, "answer": a} for q, a in zip(cols["query"], cols["answer"])]
    rows[1]["answer"] += " JSON_END"
    examples, _ = io.load_examples(write_lines(tmp_path / "pub.jsonl", rows))
    assert [(e.id, e.message) for e in examples] == [("pub-1", MESSAGE_N), ("pub-2", PUBLISHED[1].message)]


def test_published_dataset_bad_rows_name_the_row(tmp_path):
    datasets = pytest.importorskip("datasets")
    cols = published_rows(PUBLISHED)
    cols["answer"][0] = cols["answer"][0][:-2]  # truncated: not strict JSON
    cols["query"][1] = cols["query"][1].replace("TO_PAT_YN: Y", "TO_PAT_YN: N")  # speaker note says provider
    cols["answer"][2] = json.dumps({"results": [{"Code": "SharedDecisionPatient",
                                                 "Sub-code": "ExploreOptions", "Span": "review"}]})
    directory = tmp_path / "bad_pub"
    datasets.Dataset.from_dict(cols).save_to_disk(str(directory))
    err = refused(directory)
    text = str(err)
    assert f"{directory}:row 0: answer: malformed JSON" in text
    assert f"{directory}:row 1: query: TO_PAT_YN is 'N' but the speaker note says Provider speaking" in text
    assert (f"{directory}:row 2: answer.results[0].Code: code 'SharedDecisionPatient' is not allowed "
            f"for direction 'Y'") in text


def test_published_query_without_input_block(tmp_path):
    rows = [{"query": "Context: something\n\nOUTPUT:", "answer": '{"results": []}'},
            {"query": published_query("Y", "   "), "answer": '{"results": []}'},
            {"query": published_query("Y", "fine"), "answer": '{"data": []}'}]
    err = refused(write_lines(tmp_path / "q.jsonl", rows))
    text = str(err)
    assert "q.jsonl:1: query: no final 'INPUT: TO_PAT_YN: ...'" in text
    assert "q.jsonl:2: query: message (Context) is empty" in text
    assert 'q.jsonl:3: answer: expected a JSON object with a "results" array' in text


def test_dataset_dict_split_selection(tmp_path):
    datasets = pytest.importorskip("datasets")
    directory = tmp_path / "pv_dict"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(published_rows(PUBLISHED[:2])),
        "test": datasets.Dataset.from_dict(published_rows(PUBLISHED[2:])),
    }).save_to_disk(str(directory))
    err = refused(directory)
    assert "has splits train, test" in str(err) and "PATH::SPLIT" in str(err)
    train, _ = io.load_examples(f"{directory}::train")
    test, _ = io.load_examples(f"{directory}::test")
    assert [e.message for e in train] == [e.message for e in PUBLISHED[:2]]
    assert [e.id for e in test] == ["pv_dict-test-0"]
    err = refused(f"{directory}::validation")
    assert "no split 'validation'" in str(err)


def test_directory_that_is_not_a_dataset(tmp_path):
    err = refused(tmp_path)
    assert "not a dataset saved with save_to_disk" in str(err)
    (tmp_path / "f.jsonl").write_text(json.dumps(good_rows()[0]) + "\n")
    err = refused(f"{tmp_path / 'f.jsonl'}::train")
    assert "can only be chosen in a saved DatasetDict" in str(err)


# --- preferences --------------------------------------------------------------------------------------

CHOSEN_N = serialize([Annotation("SDOH", "EconomicStability", SPAN_N1)])
REJECTED_LABEL = serialize([Annotation("SDOH", "HealthCareAccessAndQuality", SPAN_N1)])
REJECTED_MISSING = serialize([])
TWO = [Annotation("SDOH", "EconomicStability", SPAN_N1),
       Annotation("PartnershipPatient", "Appreciation/Gratitude", SPAN_N2)]


def good_preference_rows():
    return [
        {"id": "p1", "direction": "N", "message": MESSAGE_N, "chosen": CHOSEN_N,
         "rejected": [REJECTED_LABEL, REJECTED_MISSING], "strategies": ["label", "missing"], "weight": 1.5},
        {"id": "p2", "prompt": "Annotate:\n" + MESSAGE_N, "chosen": serialize(TWO),
         "rejected": [serialize(TWO[:1])], "weight": 1},
    ]


def test_round_trip_preferences(tmp_path):
    records = [
        PreferenceRecord("p1", CHOSEN_N, (REJECTED_LABEL, REJECTED_MISSING), direction="N", message=MESSAGE_N,
                         strategies=("label", "missing")),
        PreferenceRecord("p2", serialize(TWO), (serialize(TWO[::-1][:1]),), prompt="Prompt ü"),
    ]
    out = tmp_path / "prefs" / "p.jsonl"
    io.write_preferences(out, records)
    loaded, problems = io.load_preferences(out)
    assert loaded == records and problems == []
    assert all("weight" not in line for line in out.read_text(encoding="utf-8").splitlines())


def test_a_legacy_record_weight_is_validated_and_reported_unused(tmp_path):
    """Files of earlier versions carried class balance as a per-record "weight": still read (and checked),
    never silently used: class-balance weights now come from the chosen annotations."""
    path = tmp_path / "legacy.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in good_preference_rows()), encoding="utf-8")
    with pytest.warns(UserWarning, match=r"legacy.jsonl: the 'weight' of 1 record\(s\) is not used"):
        loaded, problems = io.load_preferences(path)
    assert [r.id for r in loaded] == ["p1", "p2"] and problems == []


BAD_PREFERENCE_CASES = {
    "chosen truncated": ("chosen", CHOSEN_N[:-3], "chosen", "not a strict JSON completion"),
    "chosen unknown code": ("chosen", CHOSEN_N.replace('"SDOH"', '"Money"'), "chosen",
                            "format errors: results[0]: unknown Code (a string of 5 chars)"),
    "rejected single quotes": ("rejected", [REJECTED_LABEL.replace('"', "'")], "rejected[0]",
                               "not a strict JSON completion"),
    "rejected equals chosen": ("rejected", [REJECTED_LABEL, CHOSEN_N], "rejected[1]",
                               "rejected is identical to chosen"),
    "rejected not a list": ("rejected", REJECTED_LABEL + "x", "rejected", "wrong type: expected an array"),
    "rejected empty": ("rejected", [], "rejected", "is empty"),
    "rejected item not a string": ("rejected", [REJECTED_LABEL, 3], "rejected[1]", "wrong type"),
    "weight zero": ("weight", 0, "weight", "must be a finite number > 0, got 0"),
    "weight negative": ("weight", -1.5, "weight", "must be a finite number > 0"),
    "weight infinite": ("weight", math.inf, "weight", "must be a finite number > 0"),
    "weight string": ("weight", "2", "weight", "wrong type: expected a number, got a string"),
    "strategies mismatch": ("strategies", ["label"], "strategies", "1 strategies for 2 rejected"),
    "wrong direction": ("direction", "P", "direction", "wrong direction value 'P'"),
    "chosen span not in message": ("chosen", serialize([Annotation("SDOH", "EconomicStability", "copay!")]),
                                   "chosen.results[0].Span", "span (6 chars) not found verbatim"),
    "chosen code wrong direction": ("chosen", serialize([Annotation("CareCoordinationProvider", "None", SPAN_N1)]),
                                    "chosen.results[0].Code", "not allowed for direction 'N'"),
    "duplicate id": ("id", "p2", "id", "duplicate id 'p2'"),
}


@pytest.mark.parametrize("case", list(BAD_PREFERENCE_CASES))
def test_bad_preference_record(tmp_path, case):
    key, value, field, phrase = BAD_PREFERENCE_CASES[case]
    rows = good_preference_rows()
    bad = dict(rows[0], **{key: value})
    path = write_lines(tmp_path / "prefs.jsonl", [rows[1], bad])
    err = refused(path, io.load_preferences)
    assert f"{path}:2: {field}: " in str(err) and phrase in str(err)
    records, problems = io.load_preferences(path, skip_invalid=True)
    assert [r.id for r in records] == ["p2"]
    assert all(p.line == 2 for p in problems)


def test_preference_needs_prompt_or_direction_and_message(tmp_path):
    row = good_preference_rows()[0]
    del row["direction"], row["message"]
    err = refused(write_lines(tmp_path / "p.jsonl", [row]), io.load_preferences)
    assert "p.jsonl:1: direction: missing field (give direction and message, or prompt)" in str(err)
    assert "p.jsonl:1: message: missing field" in str(err)


def test_rejected_with_same_triples_in_another_order(tmp_path):
    row = good_preference_rows()[1]
    row["rejected"] = [serialize(TWO[::-1])]
    err = refused(write_lines(tmp_path / "p.jsonl", [row]), io.load_preferences)
    assert "p.jsonl:1: rejected[0]: rejected has the same triples as chosen" in str(err)


# --- TRL layout ---------------------------------------------------------------------------------------

def trl_rows():
    c1, c2 = CHOSEN_N, serialize(TWO)
    return [
        {"prompt": "P1", "chosen": c1, "rejected": REJECTED_LABEL},
        {"prompt": "P1", "chosen": c1, "rejected": REJECTED_MISSING},
        {"prompt": "P2", "chosen": c2, "rejected": serialize(TWO[:1])},
        {"prompt": "P2", "chosen": c1, "rejected": REJECTED_LABEL},  # same prompt, other chosen: new record
        {"prompt": "P1", "chosen": c1, "rejected": serialize(TWO)},  # not consecutive with rows 0-1
    ]


def expected_trl_records(name, first_rows):
    rows = trl_rows()
    groups = [[0, 1], [2], [3], [4]]
    return [PreferenceRecord(f"{name}-{first_rows[i]}", rows[g[0]]["chosen"],
                             tuple(rows[j]["rejected"] for j in g), prompt=rows[g[0]]["prompt"])
            for i, g in enumerate(groups)]


def test_trl_jsonl_groups_consecutive_pairs(tmp_path):
    path = write_lines(tmp_path / "trl.jsonl", trl_rows())
    records, problems = io.load_preferences(path)
    assert problems == []
    assert records == expected_trl_records("trl", [1, 3, 4, 5])  # JSONL: 1-based line of the first pair
    # Round trip through pvfast preference JSONL keeps the grouping.
    out = tmp_path / "converted.jsonl"
    io.write_preferences(out, records)
    assert io.load_preferences(out)[0] == records


def test_trl_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = trl_rows()
    directory = tmp_path / "trl_ds"
    datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in ("prompt", "chosen", "rejected")}
                               ).save_to_disk(str(directory))
    records, _ = io.load_preferences(directory)
    assert records == expected_trl_records("trl_ds", [0, 2, 3, 4])  # rows: 0-based index


def test_trl_invalid_row_breaks_the_group(tmp_path):
    rows = trl_rows()[:2]
    bad = dict(rows[0], rejected=rows[0]["chosen"])
    path = write_lines(tmp_path / "trl.jsonl", [rows[0], bad, rows[1]])
    err = refused(path, io.load_preferences)
    assert f"{path}:2: rejected: rejected is identical to chosen" in str(err)
    records, problems = io.load_preferences(path, skip_invalid=True)
    assert [(r.id, len(r.rejected)) for r in records] == [("trl-1", 1), ("trl-3", 1)]
    assert [p.line for p in problems] == [2]


# --- atomic writing -----------------------------------------------------------------------------------

def test_failed_write_leaves_no_file(tmp_path):
    def broken():
        yield good_example()
        raise RuntimeError("disk on fire")

    def good_example():
        return Example("e", "Y", "hi", ())

    target = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError):
        io.write_examples(target, broken())
    assert list(tmp_path.iterdir()) == []
    # An existing file stays as it was.
    io.write_examples(target, [good_example()])
    before = target.read_bytes()
    with pytest.raises(RuntimeError):
        io.write_examples(target, broken())
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_generic_jsonl_reader_and_writer(tmp_path):
    rows = [{"id": "1", "output": "ü"}, {"id": "2", "output": "{}"}]
    path = io.write_jsonl(tmp_path / "sub" / "p.jsonl", rows)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("\n[3]\n{bad\n")
    read, problems = io.read_jsonl(path)
    assert read == [(1, rows[0]), (2, rows[1])]
    assert [(p.line, p.message.split(":")[0]) for p in problems] == [(4, "expected a JSON object, got an array"),
                                                                     (5, "malformed JSON")]
    with pytest.raises(io.DataError, match="no such file"):
        io.read_jsonl(tmp_path / "none.jsonl")


# --- papercuts (issue 10 item 7): BOM, normalised labels counted, JSON error positions --------------


def test_utf8_bom_at_the_start_of_a_valid_file_is_accepted(tmp_path):
    path = write_lines(tmp_path / "excel.jsonl", good_rows())
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    examples, problems = io.load_examples(path)
    assert [e.id for e in examples] == ["m1", "m2", "m3"] and problems == []
    # Only at the start of the file: a BOM inside a later line is still an error naming that line.
    path.write_bytes(path.read_bytes() + b"\xef\xbb\xbf" + json.dumps(good_rows()[0] | {"id": "m4"}).encode() + b"\n")
    assert f"{path}:4: malformed JSON" in str(refused(path))


def test_normalised_labels_are_counted_per_field_without_their_text(tmp_path):
    rows = good_rows()
    rows[0]["annotations"][0].update({"Code": " sdoh", "Sub-code": "economic  stability"})
    rows[1]["annotations"][0].update({"Code": "partnershipPROVIDER"})  # its Sub-code is already canonical
    result = io.load_examples(write_lines(tmp_path / "a.jsonl", rows))
    assert result.normalized == {"Code": 2, "Sub-code": 1}
    summary = result.normalized_summary()
    assert summary == "normalised 3 labels to their canonical spelling (Code 2, Sub-code 1)"
    assert "sdoh" not in summary and "PROVIDER" not in summary
    examples, skipped = result  # still unpacks as (records, skipped)
    assert len(examples) == 3 and skipped == [] and result.records is examples
    assert io.load_examples(write_lines(tmp_path / "b.jsonl", good_rows())).normalized_summary() is None
    # A skipped record's labels are not counted: only what the run will use.
    rows[2]["annotations"] = [{"Code": "sdoh", "Sub-code": "Nope", "Span": "Hello"}]
    assert io.load_examples(write_lines(tmp_path / "c.jsonl", rows), skip_invalid=True).normalized == {
        "Code": 2, "Sub-code": 1}


def test_malformed_json_messages_read_once_and_point_at_the_character(tmp_path):
    rows = good_rows()
    unterminated = '{"id": "b2", "direction": "N", "message": "x'
    path = write_lines(tmp_path / "u.jsonl", [rows[0], unterminated])
    err = str(refused(path))
    # The string starts at the quote before x: 1-based column of that quote.
    column = unterminated.index('"x') + 1
    assert f"{path}:2: malformed JSON: Unterminated string starting at column {column}" in err
    assert "at at" not in err
    # Non-ASCII before the error: columns count characters (what an editor shows), not bytes.
    accented = '{"id": "é", "x": }'
    err = str(refused(write_lines(tmp_path / "e.jsonl", [accented])))
    assert f"Expecting value at column {accented.index('}') + 1}" in err


def test_malformed_published_answer_reports_line_and_column_in_the_answer_as_stored(tmp_path):
    cols = published_rows(PUBLISHED[:1])
    answer = '\n  {"results": [\n    {"Code": "SDOH", "Sub-code": "EconomicStability" "Span": "x"}\n]}'
    bad_at = answer.index('"Span"')  # the missing comma: the parser stops at the next key
    line = answer.count("\n", 0, bad_at) + 1
    column = bad_at - answer.rfind("\n", 0, bad_at)
    rows = [{"query": cols["query"][0], "answer": answer}]
    err = str(refused(write_lines(tmp_path / "pub.jsonl", rows)))
    assert f"pub.jsonl:1: answer: malformed JSON: Expecting ',' delimiter at line {line}, column {column}" in err
