"""Shared by the examples: a few tokenized preference groups from the synthetic corpus."""

from __future__ import annotations

from pvfast.config.sections import PairConfig
from pvfast.data.codebook import CODES, SUBCODES
from pvfast.data.pairs import ConfusionTable, make_preference_records
from pvfast.data.prompt import PromptTemplate, build_prompt
from pvfast.data.synth import generate_corpus
from pvfast.data.tokenization import tokenize_pair_group

# A short user template keeps the CPU examples quick; real runs use pvfast's full instruction (the default).
SHORT_TEMPLATE = PromptTemplate("Extract the PV-Miner triples.\nINPUT: TO_PAT_YN: {direction}\nContext: {message}"
                                "\n\n\nOUTPUT:", source="examples/_pairs.py")


def pair_groups(tokenizer, n_examples: int = 2, seed: int = 0, template: PromptTemplate | None = SHORT_TEMPLATE):
    """Tokenized (prompt, chosen, k rejected) groups; rejected outputs from pvfast.data.pairs with empty
    confusion tables (uniform label confusions), as before any SFT model exists."""
    examples = [e for e in generate_corpus(n=50, seed=seed) if len(e.annotations) >= 2][:n_examples]
    records = make_preference_records(examples, ConfusionTable.empty(CODES), ConfusionTable.empty(SUBCODES),
                                      PairConfig(seed=seed))
    return [tokenize_pair_group(tokenizer, build_prompt(tokenizer, r.direction, r.message, template), r.chosen,
                                r.rejected) for r in records]
