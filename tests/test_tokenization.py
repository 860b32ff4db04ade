"""Token roles, diff masks and weights (SPEC §2) on the tiny real tokenizers."""

import json

import numpy as np
import pytest

from pvfast.data.jsonfmt import serialize, value_spans
from pvfast.data.prompt import build_prompt, render_user_prompt
from pvfast.data.records import Annotation
from pvfast.data.roles import ROLE_CODE, ROLE_PROMPT, ROLE_SCAFFOLD, ROLE_SPAN, ROLE_SUBCODE
from pvfast.data.synth import generate_corpus
from pvfast.data.tokenization import _roles_from_offsets, diff_masks, tokenize_completion, tokenize_pair_group
from pvfast.model.tiny import ARCHS, load_tiny_tokenizer

# Hand-written triples: a span ending in punctuation (its token may swallow the closing quote), one
# with escaped quotes, one with non-ASCII characters (several byte-level tokens per character).
TRIPLES = (
    Annotation("SDOH", "EconomicStability", "I can't afford the copay this month."),
    Annotation("SocioEmotionalBehaviour", "None", 'I am "really" worried about it'),
    Annotation("PartnershipPatient", "Appreciation/Gratitude", "Merci, café ☕ thank you!"),
)
INSERTED = Annotation("SDOH", "NeighborhoodAndBuiltEnvironment", "my landlord turned off the heating")

@pytest.fixture(scope="module", params=ARCHS)
def tokenizer(request):
    return load_tiny_tokenizer(request.param)


def _prompt(tokenizer, message="Please call me back about my bill."):
    messages = [{"role": "system", "content": "Extract the triples."}, {"role": "user", "content": message}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _char_roles(text, triples):
    """Per-character role of a canonical JSON text, found with str.find (independent of value_spans)."""
    roles = np.full(len(text), ROLE_SCAFFOLD, dtype=np.int8)
    pos = 0
    for a in triples:
        for key, value, role in (("Code", a.code, ROLE_CODE), ("Sub-code", a.subcode, ROLE_SUBCODE),
                                 ("Span", a.span, ROLE_SPAN)):
            written = f'"{key}": ' + json.dumps(value, ensure_ascii=False)
            start = text.index(written, pos) + len(f'"{key}": "')
            end = start + len(json.dumps(value, ensure_ascii=False)) - 2
            roles[start:end] = role
            pos = end
    return roles


def _byte_level_alphabet():
    """Byte -> printable character of byte-level BPE (GPT-2's table): printable bytes stand for
    themselves, the others map to 256, 257, ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in table.items()}


def _token_byte_ranges(tokenizer, ids):
    """(start, end) UTF-8 byte range of each token in the decoded text, from the tokens' byte strings."""
    to_byte = _byte_level_alphabet()
    ranges, pos = [], 0
    for piece in tokenizer.convert_ids_to_tokens(ids):
        n = len(bytes(to_byte[c] for c in piece))
        ranges.append((pos, pos + n))
        pos += n
    return ranges


def test_roles_follow_value_ranges(tokenizer):
    text = serialize(TRIPLES)
    tc = tokenize_completion(tokenizer, _prompt(tokenizer), text)
    body = [int(t) for t in tc.completion_ids[:-1]]
    assert tokenizer.decode(body) == text
    char_roles = _char_roles(text, TRIPLES)
    byte_roles = np.repeat(char_roles, [len(c.encode()) for c in text])
    # Expected token role: the value role of any byte it covers, else scaffold (a character split over
    # several byte-level tokens puts each piece inside the value).
    for t, (s, e) in enumerate(_token_byte_ranges(tokenizer, body)):
        inside = byte_roles[s:e][byte_roles[s:e] != ROLE_SCAFFOLD]
        expected = inside[0] if len(inside) else ROLE_SCAFFOLD
        assert tc.roles[t] == expected, f"token {t} {tokenizer.decode(body[t:t + 1])!r}"

    # Each run of value tokens decodes to exactly one value, plus at most JSON punctuation around it.
    runs, t = [], 0
    while t < len(body):
        if tc.roles[t] == ROLE_SCAFFOLD:
            t += 1
            continue
        u = t
        while u < len(body) and tc.roles[u] == tc.roles[t]:
            u += 1
        runs.append((int(tc.roles[t]), tokenizer.decode(body[t:u])))
        t = u
    expected_runs = []
    for a in TRIPLES:
        expected_runs += [(ROLE_CODE, a.code), (ROLE_SUBCODE, a.subcode), (ROLE_SPAN, a.span)]
    assert [(r, s.strip(' "{}[],:')) for r, s in runs] == [
        (r, json.dumps(v, ensure_ascii=False)[1:-1]) for r, v in expected_runs
    ]
    scaffold_text = tokenizer.decode([i for i, r in zip(body, tc.roles) if r == ROLE_SCAFFOLD])
    # Keys, quotes and braces are scaffold (a closing quote or brace may ride on a value's last token).
    assert scaffold_text.startswith('{"results": [{"Code": "')
    for key in ('"Code": "', '"Sub-code": "', '"Span": "'):
        assert scaffold_text.count(key) == len(TRIPLES)
    assert tc.roles[-1] == ROLE_SCAFFOLD
    assert tc.roles.dtype == np.int8


def test_role_rule_on_hand_written_offsets():
    text = '{"Code": "SDOH", "Span": "a b"}'
    spans = [(10, 14, "code"), (26, 29, "span")]  # counted by hand: S at 10, a at 26
    assert value_spans(text) == spans
    offsets = [(0, 9), (9, 11), (11, 14), (14, 16), (16, 26), (26, 26), (27, 27), (29, 29), (28, 31)]
    expected = [ROLE_SCAFFOLD,  # '{"Code": '
                ROLE_CODE,  # '"S' straddles the opening quote
                ROLE_CODE,  # 'DOH'
                ROLE_SCAFFOLD,  # '",'
                ROLE_SCAFFOLD,  # ' "Span": "'
                ROLE_SPAN, ROLE_SPAN,  # zero-width tokens inside the value
                ROLE_SCAFFOLD,  # zero-width token on the closing quote
                ROLE_SPAN]  # 'b"}' straddles the closing quote
    assert _roles_from_offsets(offsets, spans).tolist() == expected


def test_end_of_turn_token_closes_the_completion(tokenizer):
    tc = tokenize_completion(tokenizer, _prompt(tokenizer), serialize(TRIPLES[:1]))
    assert tc.completion_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    override = tokenize_completion(tokenizer, _prompt(tokenizer), serialize(TRIPLES[:1]),
                                   end_of_turn="<|endoftext|>")
    assert override.completion_ids[-1] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    with pytest.raises(ValueError, match="must be one"):
        tokenize_completion(tokenizer, _prompt(tokenizer), "{}", end_of_turn="JSON_END and more")


def test_concatenation_is_what_the_chat_template_produces(tokenizer):
    example = generate_corpus(n=5, seed=3)[4]
    prompt = build_prompt(tokenizer, example.direction, example.message)
    completion = serialize(example.annotations)
    tc = tokenize_completion(tokenizer, prompt, completion)
    assert tokenizer.decode(tc.input_ids.tolist()) == prompt + completion + "<|im_end|>"
    # The whole conversation through the chat template, tokenized in one go, starts with our ids.
    messages = [{"role": "user", "content": render_user_prompt(example.direction, example.message)},
                {"role": "assistant", "content": completion}]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    joint = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert joint[: len(tc.input_ids)] == tc.input_ids.tolist()
    assert len(joint) > len(tc.input_ids)  # the template's newline after <|im_end|> is not trained


def test_prompt_tokens_are_not_scored(tokenizer):
    tc = tokenize_completion(tokenizer, _prompt(tokenizer), serialize(TRIPLES))
    roles = tc.full_roles
    assert (roles[: len(tc.prompt_ids)] == ROLE_PROMPT).all()
    assert (roles[len(tc.prompt_ids):] != ROLE_PROMPT).all()
    assert set(np.unique(tc.roles).tolist()) <= {ROLE_SCAFFOLD, ROLE_CODE, ROLE_SUBCODE, ROLE_SPAN}


def test_diff_masks_hand_worked():
    # insertion: only the inserted id is marked; nothing on the chosen side
    c, r = diff_masks([1, 2, 3, 4, 5], [1, 2, 9, 3, 4, 5])
    assert c.tolist() == [False] * 5
    assert r.tolist() == [False, False, True, False, False, False]
    # replacement marks the replaced ids on both sides; deletion marks the deleted id
    c, r = diff_masks([1, 2, 3, 4], [1, 7, 3])
    assert c.tolist() == [False, True, False, True]
    assert r.tolist() == [False, True, False]


def test_inserted_triple_marks_only_its_tokens(tokenizer):
    chosen_text = serialize(TRIPLES)
    rejected_text = serialize((TRIPLES[0], INSERTED) + TRIPLES[1:])
    group = tokenize_pair_group(tokenizer, _prompt(tokenizer), chosen_text, [rejected_text])
    chosen, rejected = group.chosen, group.rejected[0]
    c_mask, r_mask = diff_masks(chosen.completion_ids, rejected.completion_ids)
    assert (c_mask == group.chosen_diff_masks[0]).all() and (r_mask == group.rejected_diff_masks[0]).all()
    assert not c_mask.any()
    n_inserted = len(rejected.completion_ids) - len(chosen.completion_ids)
    assert r_mask.sum() == n_inserted > 0
    marked = np.flatnonzero(r_mask)
    assert (np.diff(marked) == 1).all()  # one contiguous block
    assert rejected.completion_ids[~r_mask].tolist() == chosen.completion_ids.tolist()
    assert INSERTED.span in tokenizer.decode(rejected.completion_ids[r_mask].tolist())
    # Position-wise comparison would mark at least half the chosen tokens after the insertion point.
    n = len(chosen.completion_ids)
    positional = chosen.completion_ids != rejected.completion_ids[:n]
    after = positional[marked[0]:]
    assert after.sum() >= len(after) // 2 > 10


def test_label_swap_marks_only_subcode_tokens_per_pair(tokenizer):
    swapped = (Annotation("SDOH", "HealthCareAccessAndQuality", TRIPLES[0].span),) + TRIPLES[1:]
    missing = TRIPLES[:2]
    group = tokenize_pair_group(tokenizer, _prompt(tokenizer), serialize(TRIPLES),
                                [serialize(swapped), serialize(missing)])
    chosen = group.chosen
    swap_mask, miss_mask = group.chosen_diff_masks
    # the swap differs only inside the first Sub-code value
    assert swap_mask.any() and (chosen.roles[swap_mask] == ROLE_SUBCODE).all()
    swapped_text = tokenizer.decode(chosen.completion_ids[swap_mask].tolist())
    assert swapped_text in TRIPLES[0].subcode
    # the missing triple marks the chosen tokens of the dropped triple (its span included)
    assert TRIPLES[2].span in tokenizer.decode(chosen.completion_ids[miss_mask].tolist())
    assert not (swap_mask & miss_mask).any()  # each pair's mask is its own (the chosen is scored per pair)
    assert all(r.prompt_ids is chosen.prompt_ids for r in group.rejected)


def test_slow_tokenizer_is_refused_by_name(tmp_path):
    from transformers import BertTokenizerLegacy  # pure-Python tokenizer, no offsets

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "{", "}", "code", "[SEP]"]))
    slow = BertTokenizerLegacy(str(vocab), eos_token="[SEP]")
    assert not slow.is_fast
    with pytest.raises(TypeError, match="BertTokenizerLegacy is a slow tokenizer"):
        tokenize_completion(slow, "prompt", '{"results": []}')
