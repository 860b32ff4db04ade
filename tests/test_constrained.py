"""Schema-constrained decoding (pvfast.model.constrained): the automaton accepts exactly the canonical answers
of a message, token tables map tokens onto bytes, and generation under the constraint on random tiny models
(which write garbage without it) always yields valid answers."""

from __future__ import annotations

import functools
import json
import random

import pytest
import torch

from pvfast.data.codebook import CODEBOOK, CODES, code_allowed, codes_for_direction, is_valid_pair, valid_subcodes
from pvfast.data.jsonfmt import parse_output, serialize
from pvfast.data.records import Annotation, Example
from pvfast.data.synth import generate_corpus
from pvfast.data.tokenization import end_of_turn_id
from pvfast.model.constrained import (
    AnswerAutomaton,
    ConstrainedAnswer,
    ConstraintError,
    TokenTable,
    scaffold,
    token_table,
)
from pvfast.model.generation import generate
from pvfast.model.tiny import load_tiny_tokenizer
from pvfast.testing import load_tiny_model

MESSAGES = [
    ("N", 'Hi Dr. "Lee", my sugar was 180 \\ today.\nThanks — Ann é 😀'),
    ("Y", "Dear Sam,\tplease take 5 mg {twice} a day. Call us if it's worse. - Nurse Kim"),
    ("N", "ok"),
]


@functools.lru_cache(maxsize=None)
def _tokenizer():
    return load_tiny_tokenizer("qwen2")


def _walk(automaton: AnswerAutomaton, text: str):
    """The state after the bytes of ``text``, or None where the automaton refuses a byte."""
    state = automaton.start
    for byte in text.encode():
        state = automaton.step(state, byte)
        if state is None:
            return None
    return state


def _check_valid(text: str, message: str, direction: str) -> None:
    result = parse_output(text)
    assert result.strict and not result.errors, text
    assert text == serialize(result.annotations)  # the canonical scaffold, exactly
    for a in result.annotations:
        assert code_allowed(a.code, direction) and is_valid_pair(a.code, a.subcode)
        assert a.span and a.span in message


def test_scaffold_rebuilds_serialize():
    s = scaffold()
    assert s.list_open + s.empty_close == serialize([]).encode()
    triples = [Annotation("SDOH", "EconomicStability", "rent"), Annotation("SocioEmotionalBehaviour", "None", "x")]
    body = [s.first_open + b"SDOH" + s.code_to_sub + b"EconomicStability" + s.sub_to_span + b"rent",
            s.next_open + b"SocioEmotionalBehaviour" + s.code_to_sub + b"None" + s.sub_to_span + b"x"]
    assert s.list_open + b"".join(body) + s.last_close == serialize(triples).encode()


@pytest.mark.parametrize("direction, message", MESSAGES)
def test_every_valid_answer_is_accepted(direction, message):
    """Every (code, sub-code) of the direction and spans at the message's edges, escapes and multi-byte
    characters: accepted byte by byte, complete at the end and not before."""
    automaton = AnswerAutomaton(message, direction, token_table(_tokenizer()))
    spans = [sp for sp in [message, message[:1], message[-1:], message[1:-1], *message.split()] if sp]
    pairs = [(c, s) for c in codes_for_direction(direction) for s in valid_subcodes(c)]
    answers = [[]] + [[Annotation(c, s, spans[k % len(spans)])] for k, (c, s) in enumerate(pairs)]
    answers.append([Annotation(c, s, sp) for (c, s), sp in zip(pairs, spans)])
    for triples in answers:
        text = serialize(triples)
        state = _walk(automaton, text)
        assert state is not None and automaton.complete(state), text
        assert automaton.distance(state) == 0
        assert not automaton.complete(_walk(automaton, text[:-1]))


def test_invalid_answers_are_refused():
    direction, message = MESSAGES[0]
    automaton = AnswerAutomaton(message, direction, token_table(_tokenizer()))

    def refused(annotations=None, text=None):
        return _walk(automaton, text if text is not None else serialize(annotations)) is None

    provider_only = next(c for c in CODES if not code_allowed(c, direction))
    assert refused([Annotation(provider_only, valid_subcodes(provider_only)[0], "sugar")])
    assert refused([Annotation("SDOH", "Clinical Care", "sugar")])  # sub-code of another code
    assert refused([Annotation("SocioEmotionalBehaviour", "salutation", "sugar")])  # must be "None"
    assert refused([Annotation("SDOH", "EconomicStability", "Sugar")])  # not verbatim (case)
    assert refused([Annotation("SDOH", "EconomicStability", "sugar was 181")])  # not in the message
    assert refused([Annotation("SDOH", "EconomicStability", "")])  # empty span
    assert refused(text='{"results":[]}')  # not the canonical spacing
    assert refused(text="{'results': []}")
    assert refused(text='{"results": [], "extra": 1}')
    assert refused(text='{"results": [{"Code": "sdoh"')  # labels are written canonically
    # a quote inside a span is written escaped; a raw one would end the span where the message does not
    assert refused(text='{"results": [{"Code": "SDOH", "Sub-code": "EconomicStability", "Span": "Dr. "Lee')
    ok = '{"results": [{"Code": "SDOH", "Sub-code": "EconomicStability", "Span": "Dr. \\"Lee\\""}]}'
    assert json.loads(ok)["results"][0]["Span"] in message and automaton.complete(_walk(automaton, ok))
    # a span cannot end inside a multi-byte character (the UTF-8 bytes of "é" are c3 a9)
    before = _walk(automaton, '{"results": [{"Code": "SDOH", "Sub-code": "EconomicStability", "Span": "Ann ')
    half = automaton.step(before, 0xC3)
    assert half is not None and automaton.step(half, ord('"')) is None
    assert automaton.step(automaton.step(half, 0xA9), ord('"')) is not None


@pytest.mark.parametrize("direction, message", MESSAGES)
def test_canonical_tokens_are_always_allowed(direction, message):
    """The tokenizer's own tokenization of a valid answer is allowed token by token, then end-of-turn."""
    tokenizer = _tokenizer()
    table, eot = token_table(tokenizer), end_of_turn_id(tokenizer)
    words = [w for w in message.split() if w]
    pairs = [(c, s) for c in codes_for_direction(direction) for s in valid_subcodes(c)]
    for k in range(0, len(pairs), 5):
        annotations = [Annotation(c, s, words[(k + j) % len(words)]) for j, (c, s) in enumerate(pairs[k:k + 3])]
        ids = tokenizer(serialize(annotations), add_special_tokens=False)["input_ids"]
        answer = ConstrainedAnswer(table, message, direction, eot)
        for i in ids:
            assert i in answer.allowed(1000)
            answer.advance(i)
        assert answer.allowed(1).tolist() == [eot]
        answer.advance(eot)
        assert answer.done and answer.text == serialize(annotations)


@pytest.mark.parametrize("seed", range(4))
def test_any_path_through_the_allowed_tokens_is_a_valid_answer(seed):
    """Random and adversarial walks (always the token that keeps the answer open longest) within random
    budgets: every walk ends with end-of-turn in a valid answer, within the budget."""
    tokenizer = _tokenizer()
    table, eot = token_table(tokenizer), end_of_turn_id(tokenizer)
    rng = random.Random(seed)
    for _ in range(40):
        direction, message = rng.choice(MESSAGES)
        budget = rng.choice([6, 12, 40, 100, 300])
        answer = ConstrainedAnswer(table, message, direction, eot)
        greedy_open = rng.random() < 0.5
        for used in range(budget):
            allowed = answer.allowed(budget - used)
            if greedy_open:  # the longest token that does not end the answer, whenever there is one
                choice = max(allowed.tolist(), key=lambda i: (i != eot, len(table.token_bytes[i] or b""), i))
            else:
                choice = int(rng.choice(allowed.tolist()))
            answer.advance(choice)
            if answer.done:
                break
        assert answer.done, (budget, answer.text)
        _check_valid(answer.text, message, direction)


def test_advancing_with_a_refused_token_raises():
    tokenizer = _tokenizer()
    answer = ConstrainedAnswer(token_table(tokenizer), "hello there", "N", end_of_turn_id(tokenizer))
    bad = tokenizer("hello", add_special_tokens=False)["input_ids"][0]
    assert bad not in answer.allowed(100)
    with pytest.raises(ValueError, match="does not continue a valid answer"):
        answer.advance(bad)


def test_token_table_maps_tokens_to_their_bytes():
    tokenizer = _tokenizer()
    table = token_table(tokenizer)
    assert token_table(tokenizer) is table  # built once per tokenizer
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert table.token_bytes[tokenizer.convert_tokens_to_ids(token)] is None
    text = 'Dr. "Lee" — café\n日本 😀 {"results": []}'
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert table.bytes_of(ids) == text.encode()
    for i in range(len(tokenizer)):
        piece = table.token_bytes[i]
        if piece is not None:
            try:
                assert tokenizer.decode([i]) == piece.decode("utf-8")
            except UnicodeDecodeError:  # part of a multi-byte character: decodes to a replacement mark
                assert "\ufffd" in tokenizer.decode([i])
    assert table.keys == sorted(set(table.keys))
    assert table.count_tokens(serialize([]).encode()) == len(tokenizer(serialize([]))["input_ids"])


def _sentencepiece_like():
    """A Llama-2-style tokenizer: Metaspace pieces, <0xNN> byte-fallback tokens, a decoder that strips the
    leading space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pvfast.model.tiny import tokenizer_training_text

    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    base.train_from_iterator(list(tokenizer_training_text())[:200],
                             trainers.BpeTrainer(vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>"],
                                                 show_progress=False))
    model = json.loads(base.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = base.pre_tokenizer
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_sentencepiece_style_tokenizer():
    tokenizer = _sentencepiece_like()
    table = TokenTable.from_tokenizer(tokenizer)
    assert table.token_bytes[tokenizer.convert_tokens_to_ids("<0xC3>")] == b"\xc3"
    eot = end_of_turn_id(tokenizer)
    rng = random.Random(0)
    for direction, message in MESSAGES:
        answer = ConstrainedAnswer(table, message, direction, eot)
        for used in range(200):
            answer.advance(int(rng.choice(answer.allowed(200 - used).tolist())))
            if answer.done:
                break
        assert answer.done
        _check_valid(answer.text, message, direction)


def test_unmappable_tokenizer_is_refused():
    tokenizer = _tokenizer()

    class Lying:
        """The tiny tokenizer, but it encodes every text as the tokens of a different text."""

        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __len__(self):
            return len(tokenizer)

        def __call__(self, text, **kwargs):
            return tokenizer("x" + text, **kwargs)

    with pytest.raises(ConstraintError, match="do not map onto the bytes"):
        TokenTable.from_tokenizer(Lying())


# ---------------------------------------------------------------------------------------------------
# Generation with the constraint on random tiny models


def _noisy(model, std: float):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.add_(torch.randn(param.shape, generator=g) * std)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_random_models_write_valid_answers(arch):
    """Random weights write garbage without the constraint; with it, every output is a canonical answer with
    labels valid for the message's direction and verbatim spans, ended by the end-of-turn token. The noisy
    variant (weights plus N(0, 0.3²) noise) writes triples, the plain one mostly the empty answer."""
    tokenizer = load_tiny_tokenizer(arch)
    examples = generate_corpus(n=4, seed=7) + [Example("q", "N", MESSAGES[0][1]), Example("p", "Y", MESSAGES[1][1])]
    plain = load_tiny_model(arch)
    garbage = generate(plain, tokenizer, examples[:2], max_new_tokens=40, constrained=False, progress=False)
    assert all(not parse_output(g.text).strict for g in garbage)
    n_triples = 0
    noisy = _noisy(load_tiny_model(arch), 0.3)
    for model, budget in ((plain, 40), (noisy, 100), (noisy, 30)):
        outputs = generate(model, tokenizer, examples, batch_size=6, max_new_tokens=budget, progress=False)
        for ex, out in zip(examples, outputs):
            assert out.stopped and out.tokens[-1] == end_of_turn_id(tokenizer) and len(out.tokens) <= budget
            _check_valid(out.text, ex.message, ex.direction)
            n_triples += len(parse_output(out.text).annotations)
    assert n_triples >= 5


def test_codebook_is_covered():
    """Every code is reachable from one of the two directions (the slot tables follow the codebook)."""
    table = token_table(_tokenizer())
    reachable = set()
    for direction in ("Y", "N"):
        automaton = AnswerAutomaton("x", direction, table)
        for code in CODEBOOK:
            if _walk(automaton, serialize([Annotation(code, valid_subcodes(code)[0], "x")])) is not None:
                reachable.add(code)
    assert reachable == set(CODES)
