"""Effective-number class balance (SPEC §3), against hand-worked arithmetic."""

import math

import pytest

from pvfast.data.jsonfmt import serialize
from pvfast.data.records import Annotation, Example, PreferenceRecord
from pvfast.objectives.class_balance import (
    chosen_annotations,
    class_balance_table,
    class_balance_weights,
    example_labels,
    label_weights,
)
from pvfast.objectives.config import ClassBalanceConfig

PP = "PartnershipPatient"


def _tiny_set():
    """Four examples. Codes: PP in 2, SDOH in 1, SEB in 1. Sub-codes: salutation 2, Clinical Care 1,
    EconomicStability 1 (SEB's "None" is not a label)."""
    return [
        [Annotation(PP, "salutation", "hi"), Annotation(PP, "Clinical Care", "meds"),
         Annotation(PP, "salutation", "hello")],  # salutation twice: counted once for this example
        Example("e2", "N", "msg", (Annotation(PP, "salutation", "hey"),)),
        [Annotation("SDOH", "EconomicStability", "rent")],
        [Annotation("SocioEmotionalBehaviour", "None", "worried")],
    ]


def _hand_level_weights(b):
    # Both levels have the same count structure: one label in 2 examples, two labels in 1 example each.
    a2 = (1 - b) / (1 - b ** 2)
    a1 = (1 - b) / (1 - b ** 1)
    mean = (a2 + a1 + a1) / 3
    return a2 / mean, a1 / mean  # (common, rare)


def test_label_weights_hand_worked():
    b = 0.5
    # a(n=2) = 0.5 / 0.75 = 2/3, a(n=1) = 0.5 / 0.5 = 1; mean over labels = (2/3 + 1 + 1) / 3 = 8/9
    common, rare = (2 / 3) / (8 / 9), 1 / (8 / 9)
    assert common == pytest.approx(0.75) and rare == pytest.approx(1.125)
    sets = [example_labels(a.annotations if isinstance(a, Example) else a, "subcode") for a in _tiny_set()]
    assert sets[3] == frozenset()
    weights = label_weights(sets, b)
    assert weights == pytest.approx({"salutation": common, "Clinical Care": rare, "EconomicStability": rare})
    codes = label_weights([example_labels(a.annotations if isinstance(a, Example) else a, "code")
                           for a in _tiny_set()], b)
    assert codes == pytest.approx({PP: common, "SDOH": rare, "SocioEmotionalBehaviour": rare})


def _renormalise(values, cap=3.0):
    capped = [min(v, cap) for v in values]
    mean = sum(capped) / len(capped)
    return [min(v / mean, cap) for v in capped]


@pytest.mark.parametrize("combine", ["mean", "max", "geometric"])
def test_example_weights_hand_worked_combine_modes(combine):
    b = 0.5
    common, rare = _hand_level_weights(b)
    comb = {"mean": lambda x, y: (x + y) / 2, "max": max, "geometric": lambda x, y: math.sqrt(x * y)}[combine]
    raw = [
        comb(common, rare),  # codes {PP}: max 0.75; sub-codes {salutation, Clinical Care}: max 1.125
        comb(common, common),  # PP / salutation
        comb(rare, rare),  # SDOH / EconomicStability
        rare,  # SEB has no sub-code label: only its code level counts
    ]
    expected = _renormalise(raw)
    got = class_balance_weights(_tiny_set(), ClassBalanceConfig(enabled=True, b=b, combine=combine))
    assert got == pytest.approx(expected, rel=1e-12)
    assert sum(got) / len(got) == pytest.approx(1.0)


def test_levels_switched_off():
    b = 0.5
    common, rare = _hand_level_weights(b)
    # Sub-codes only (the published sweeps): SEB has no sub-code label and gets the neutral 1.0.
    sub_only = class_balance_weights(_tiny_set(), ClassBalanceConfig(enabled=True, b=b, levels=("subcode",)))
    assert sub_only == pytest.approx(_renormalise([rare, common, rare, 1.0]))
    codes_only = class_balance_weights(_tiny_set(), ClassBalanceConfig(enabled=True, b=b, levels=("code",)))
    assert codes_only == pytest.approx(_renormalise([common, common, rare, rare]))


def test_example_without_any_label_gets_neutral_weight():
    examples = [[], [Annotation("SDOH", "EconomicStability", "rent")],
                [Annotation("SDOH", "EconomicStability", "bills")]]
    # One label per level, n = 2, normalised to 1.0; the empty example gets 1.0 as well.
    got = class_balance_weights(examples, ClassBalanceConfig(enabled=True, b=0.9))
    assert got == pytest.approx([1.0, 1.0, 1.0])


def test_cap_then_renormalise_then_cap_again():
    b = 0.999
    common_codes = ["SDOH", PP, "PartnershipProvider"]
    examples = [[Annotation(code, "None", "x")] for code in common_codes for _ in range(20)]
    examples.append([Annotation("CareCoordinationPatient", "None", "y")])
    a20 = (1 - b) / (1 - b ** 20)
    a1 = (1 - b) / (1 - b ** 1)
    mean_label = (3 * a20 + a1) / 4
    common, rare = a20 / mean_label, a1 / mean_label
    assert rare > 3.0  # the first cap binds
    capped = [common] * 60 + [3.0]
    mean_set = sum(capped) / 61
    expected = [min(v / mean_set, 3.0) for v in capped]
    assert capped[-1] / mean_set > 3.0  # and the second cap binds too
    got = class_balance_weights(examples, ClassBalanceConfig(enabled=True, b=b, levels=("code",)))
    assert got == pytest.approx(expected, rel=1e-12)
    assert max(got) == 3.0
    assert sum(got) / len(got) < 1.0  # the final cap removes mass: the mean ends below 1


def test_class_balance_off_gives_ones():
    assert class_balance_weights(_tiny_set(), ClassBalanceConfig()) == [1.0] * 4
    assert class_balance_weights(_tiny_set(), ClassBalanceConfig(enabled=False, b=0.5)) == [1.0] * 4


def test_b_zero_weights_every_label_equally():
    got = class_balance_weights(_tiny_set(), ClassBalanceConfig(enabled=True, b=0.0))
    assert got == pytest.approx([1.0] * 4)


def _record(i, annotations):
    return PreferenceRecord(id=f"r{i}", chosen=serialize(annotations), rejected=(serialize([]),),
                            direction="N", message="m")


def test_table_by_record_id_from_parsed_chosen_annotations():
    annotation_lists = [a.annotations if isinstance(a, Example) else a for a in _tiny_set()]
    records = [_record(i, a) for i, a in enumerate(annotation_lists)]
    cfg = ClassBalanceConfig(enabled=True, b=0.5)
    expected = class_balance_weights(annotation_lists, cfg)
    parsed = chosen_annotations(records)
    assert [list(a) for a in parsed] == [list(a) for a in annotation_lists]
    table = class_balance_table([r.id for r in records], parsed, cfg)
    assert table == pytest.approx(dict(zip(["r0", "r1", "r2", "r3"], expected)))
    assert class_balance_table([r.id for r in records], parsed, ClassBalanceConfig()) is None  # CB off: c = 1


def test_table_refuses_unparseable_chosen_repeated_ids_and_length_mismatch():
    bad = PreferenceRecord(id="bad", chosen='{"results": [{"Code": "Nope", "Sub-code": "None", "Span": "x"}]}',
                           rejected=("{}",), direction="N", message="m")
    with pytest.raises(ValueError, match="'bad'"):
        chosen_annotations([bad])
    with pytest.raises(ValueError, match="2 ids for 1 examples"):
        class_balance_table(["a", "b"], [[]], ClassBalanceConfig(enabled=True))
    with pytest.raises(ValueError, match="repeat"):
        class_balance_table(["a", "a"], [[], []], ClassBalanceConfig(enabled=True))


@pytest.mark.parametrize("kwargs, match", [
    ({"b": 1.0}, "b must be"),
    ({"b": -0.1}, "b must be"),
    ({"levels": ()}, "levels"),
    ({"levels": ("code", "span")}, "levels"),
    ({"levels": ("code", "code")}, "repeats"),
    ({"combine": "median"}, "combine"),
    ({"cap": 0.5}, "cap"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClassBalanceConfig(**kwargs)


def test_non_annotation_input_is_an_error():
    with pytest.raises(TypeError, match="example 0, annotation 0"):
        class_balance_weights([[("SDOH", "EconomicStability", "x")]], ClassBalanceConfig(enabled=True))
