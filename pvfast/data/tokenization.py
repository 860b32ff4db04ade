"""Tokenize prompt + completion for training, with a role and a weight per completion token (SPEC §2).

What the model is trained on
----------------------------
``prompt_text`` is the exact text the model is given at generation time: the chat template already
applied, ending with the generation prompt (e.g. ``...<|im_start|>assistant\\n``). ``completion_text`` is
the canonical one-line JSON (:func:`pvfast.data.jsonfmt.serialize`). The trained sequence is::

    prompt_ids      = tokenize(prompt_text)                      (no special tokens added)
    completion_ids  = tokenize(completion_text) + [end_of_turn]  (no special tokens added)
    input_ids       = prompt_ids + completion_ids

* No special tokens are added by the tokenizer call: a chat template writes its own BOS / turn markers
  into the text, and adding them again would double them.
* The completion is tokenized on its own, not as part of ``prompt_text + completion_text``. At generation
  time the model is handed ``prompt_ids`` and emits completion tokens after them, so a BPE merge across
  the prompt/completion boundary can never happen there; tokenizing separately trains exactly the token
  sequence the model has to produce. (For ChatML-style templates the generation prompt ends in a newline
  and the JSON starts with ``{``; byte-level pre-tokenizers split there anyway, so both ways agree.)
* The end-of-turn token (default: ``tokenizer.eos_token``, e.g. ``<|im_end|>`` for Qwen2.5-Instruct,
  ``<|eot_id|>`` for Llama-3-Instruct) is appended as one id, so the model learns to stop. Text the chat
  template writes after it (a trailing newline) is not trained: generation has stopped by then.

Token roles
-----------
A completion token's role comes from the fast tokenizer's character offsets compared with
:func:`pvfast.data.jsonfmt.value_spans`: a token whose character range ``[s, e)`` overlaps a value range
``[vs, ve)`` (``s < ve and e > vs``) gets that value's role (code / subcode / span); otherwise it is
scaffold. So a token straddling a quote, such as ``"Cl`` covering the opening quote and the first value
characters, counts as a value token: it carries value content the model must get right, and it takes the
higher weight. A zero-width token (possible when a tokenizer trims whitespace from offsets) is a value
token if its position lies inside a value range. A token overlapping several value ranges takes the first
(leftmost) one. The end-of-turn token is scaffold.

Diff flags
----------
Chosen and rejected are aligned with :class:`difflib.SequenceMatcher` over token ids
(``autojunk=False``); tokens inside replace/delete/insert opcodes are marked as different on each side.
An inserted triple marks only its own tokens, not every token after it as a position-wise comparison
would. Roles and diff flags are what the tokens *are*; the weights they get are an objective setting
(:mod:`pvfast.objectives.weights`), applied at loss time.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pvfast.data.jsonfmt import value_spans
from pvfast.data.roles import ROLE_BY_NAME, ROLE_PROMPT, ROLE_SCAFFOLD


@dataclass
class TokenizedCompletion:
    """One prompt and one completion as token ids, with a role per completion token.

    Shapes: ``prompt_ids`` (P,) int64; ``completion_ids`` (C,) int64 (end-of-turn token last);
    ``roles`` (C,) int8 of ROLE_* ids. Prompt tokens are never scored, so only completion tokens carry roles.
    """

    prompt_ids: np.ndarray
    completion_ids: np.ndarray
    roles: np.ndarray

    @property
    def input_ids(self) -> np.ndarray:
        """(P + C,) int64: the sequence the model is trained on."""
        return np.concatenate([self.prompt_ids, self.completion_ids])

    @property
    def full_roles(self) -> np.ndarray:
        """(P + C,) int8: ROLE_PROMPT over the prompt, then the completion roles."""
        return np.concatenate([np.full(len(self.prompt_ids), ROLE_PROMPT, dtype=np.int8), self.roles])


@dataclass
class TokenizedPairGroup:
    """One prompt with its chosen completion and k rejected completions (k pairs sharing the prompt).

    Pair j aligns the chosen completion with rejected j: ``chosen_diff_masks[j]`` marks the chosen tokens that
    differ from rejected j, ``rejected_diff_masks[j]`` the rejected tokens that differ from the chosen. The
    released training code scores each pair on its own, so the chosen completion's diff flags (and hence its
    weights) differ per pair: a loss with exact per-pair parity scores the chosen once per pair, with that
    pair's mask (the packer gives each copy its own mask; identical tokens still share the trie).
    """

    chosen: TokenizedCompletion
    rejected: list[TokenizedCompletion]
    chosen_diff_masks: list[np.ndarray]  # per pair j: (C,) bool, chosen tokens differing from rejected j
    rejected_diff_masks: list[np.ndarray]  # per pair j: (C_j,) bool, rejected j tokens differing from chosen

    @property
    def prompt_ids(self) -> np.ndarray:
        return self.chosen.prompt_ids


def _require_fast(tokenizer) -> None:
    # Slow (pure-Python) tokenizers accept return_offsets_mapping but silently return no offsets.
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is a slow tokenizer: token roles need character offsets "
            "(return_offsets_mapping), which only fast tokenizers (PreTrainedTokenizerFast / "
            "TokenizersBackend) provide; load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )


def end_of_turn_id(tokenizer, end_of_turn: str | None = None) -> int:
    """Id of the token that ends an assistant turn: ``end_of_turn`` if given, else the EOS token."""
    token = end_of_turn if end_of_turn is not None else tokenizer.eos_token
    if token is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has no eos_token; pass end_of_turn= the token that ends an "
            "assistant turn in its chat template"
        )
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"end-of-turn text {token!r} is {len(ids)} tokens for {type(tokenizer).__name__}; "
            "it must be one (special) token"
        )
    return int(ids[0])


def _roles_from_offsets(offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int, str]]) -> np.ndarray:
    """(T,) int8 role per token from its (start, end) character offsets and the value ranges."""
    roles = np.full(len(offsets), ROLE_SCAFFOLD, dtype=np.int8)
    ranges = [(vs, ve, ROLE_BY_NAME[name]) for vs, ve, name in spans if ve > vs]
    if not ranges or not len(offsets):
        return roles
    tok = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    s, e = tok[:, :1], tok[:, 1:]  # (T, 1)
    vs, ve, role = (np.asarray(col, dtype=np.int64)[None, :] for col in zip(*ranges))  # (1, R)
    overlap = np.where(s == e, (vs <= s) & (s < ve), (s < ve) & (e > vs))  # (T, R)
    hit = overlap.any(axis=1)
    roles[hit] = role[0, overlap[hit].argmax(axis=1)]  # leftmost overlapping range
    return roles


def _tokenize_body(tokenizer, completion_text: str, eot: int) -> tuple[np.ndarray, np.ndarray]:
    """(C,) int64 ids of the completion plus end-of-turn, and their (C,) int8 roles."""
    enc = tokenizer(completion_text, add_special_tokens=False, return_offsets_mapping=True)
    roles = _roles_from_offsets(enc["offset_mapping"], value_spans(completion_text))
    ids = np.asarray(list(enc["input_ids"]) + [eot], dtype=np.int64)
    return ids, np.concatenate([roles, np.array([ROLE_SCAFFOLD], dtype=np.int8)])


def tokenize_completion(
    tokenizer, prompt_text: str, completion_text: str, end_of_turn: str | None = None
) -> TokenizedCompletion:
    """Token ids of prompt and completion, and a role per completion token (module docstring).

    ``prompt_text`` must already be chat-formatted with the generation prompt; ``completion_text`` is
    the JSON the model must produce, without the end-of-turn token (it is appended here).
    """
    _require_fast(tokenizer)
    eot = end_of_turn_id(tokenizer, end_of_turn)
    prompt_ids = np.asarray(tokenizer(prompt_text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    completion_ids, roles = _tokenize_body(tokenizer, completion_text, eot)
    return TokenizedCompletion(prompt_ids=prompt_ids, completion_ids=completion_ids, roles=roles)


def diff_masks(chosen_ids: Sequence[int], rejected_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(len(chosen),) and (len(rejected),) bool masks of tokens that differ on a token alignment.

    Alignment: ``difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()`` over token ids;
    replace/delete/insert opcodes mark their tokens on each side, ``equal`` marks none. autojunk is off
    because frequent JSON tokens (quotes, keys) would otherwise be treated as junk and misaligned.
    """
    a = [int(t) for t in chosen_ids]
    b = [int(t) for t in rejected_ids]
    chosen_mask = np.zeros(len(a), dtype=bool)
    rejected_mask = np.zeros(len(b), dtype=bool)
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag != "equal":
            chosen_mask[i1:i2] = True
            rejected_mask[j1:j2] = True
    return chosen_mask, rejected_mask


def tokenize_pair_group(
    tokenizer,
    prompt_text: str,
    chosen_text: str,
    rejected_texts: Sequence[str],
    end_of_turn: str | None = None,
) -> TokenizedPairGroup:
    """Tokenize one prompt with its chosen and k rejected completions, roles and diff masks included.

    Diff masks align each rejected completion with the chosen one (completion tokens only; the shared
    prompt is never compared). See :class:`TokenizedPairGroup` for how the k pairs score the chosen.
    """
    if not rejected_texts:
        raise ValueError("tokenize_pair_group: needs at least one rejected completion")
    chosen = tokenize_completion(tokenizer, prompt_text, chosen_text, end_of_turn)
    eot = end_of_turn_id(tokenizer, end_of_turn)
    rejected = []
    for text in rejected_texts:  # the prompt is tokenized once and shared
        ids, roles = _tokenize_body(tokenizer, text, eot)
        rejected.append(TokenizedCompletion(prompt_ids=chosen.prompt_ids, completion_ids=ids, roles=roles))
    chosen_masks, rejected_masks = [], []
    for rej in rejected:
        chosen_mask, rejected_mask = diff_masks(chosen.completion_ids, rej.completion_ids)
        chosen_masks.append(chosen_mask)
        rejected_masks.append(rejected_mask)
    return TokenizedPairGroup(chosen=chosen, rejected=rejected, chosen_diff_masks=chosen_masks,
                              rejected_diff_masks=rejected_masks)
