"""``python -m pvfast.pairs``: confusion-aware preference pairs from an SFT model's validation outputs.

The method (SPEC §4) lives in :mod:`pvfast.data.pairs`; this module is its command line.

Run commands::

    python -m pvfast.pairs --train data/pv-synth/train.jsonl --val data/pv-synth/validation.jsonl \\
        --predictions val-preds.jsonl --out data/prefs.jsonl
    python -m pvfast.pairs --train data/pv-synth/train.jsonl --val data/pv-synth/validation.jsonl \\
        --model runs/sft-merged --save-predictions val-preds.jsonl --out data/prefs.jsonl \\
        --strategies label label missing extra --seed 1

The options are the keys of :class:`pvfast.config.commands.PairsCommandConfig`, read like the trainer's:
defaults < ``--config FILE`` (YAML/JSON with the same keys; its ``pairs:`` block is the trainer's ``pairs``
section) < ``--key value``. The pair-mining keys are also top-level flags (``--seed``, ``--strategies``,
``--smoothing``, ``--no-include-empty``, ...); ``--help-keys`` lists every key with the value a command line
resolves to. Message and span text are never printed.

Exit status: 0 on success, 2 when the command line, a config, data or predictions file is refused.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter
from dataclasses import fields
from pathlib import Path
from typing import Sequence

from pvfast.config.cli import parse_command
from pvfast.config.commands import PAIRS_ALIASES, PairsCommandConfig
from pvfast.config.sections import STRATEGIES, PairConfig
from pvfast.data.io import DataError, load_examples, write_preferences
from pvfast.data.pairs import make_preference_records, tables_from_outputs, write_confusion_csv
from pvfast.data.records import Example

PROG = "python -m pvfast.pairs"
EXIT_INVALID_DATA = 2
EXIT_CODES = {0: "done: preference records and confusion tables written",
              EXIT_INVALID_DATA: "the command line, a config, data or predictions file was refused"}


def _validation_outputs(cfg: PairsCommandConfig, val_examples: list[Example]) -> list[str]:
    from pvfast.data.predictions import align_predictions, read_predictions, write_predictions

    if cfg.predictions is not None:
        return align_predictions(val_examples, read_predictions(cfg.predictions), predictions_path=cfg.predictions,
                                 data_path=cfg.val)
    from pvfast.model.generation import generate_completions, load_model_for_generation

    template = None
    if cfg.template is not None:
        from pvfast.data.prompt import PromptTemplate

        template = PromptTemplate.from_file(cfg.template)
    model, tokenizer = load_model_for_generation(cfg.model, cfg.adapter, dtype=cfg.dtype, device=cfg.device,
                                                 load_in_4bit=cfg.load_in_4bit)
    # GenerationConfig's fields are generate_completions' keyword arguments (one definition).
    outputs = generate_completions(model, tokenizer, val_examples, template=template,
                                   **dataclasses.asdict(cfg.generation))
    if cfg.save_predictions is not None:
        write_predictions(cfg.save_predictions, [ex.id for ex in val_examples], outputs)
    return outputs


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_command(argv, PairsCommandConfig, prog=PROG, description=__doc__, aliases=PAIRS_ALIASES,
                        exit_codes=EXIT_CODES, bad_config_exit=EXIT_INVALID_DATA)
    config = cfg.pairs
    print("config: " + ", ".join(f"{f.name}={getattr(config, f.name)}" for f in fields(PairConfig)))
    try:
        train_examples, _ = load_examples(cfg.train)
        val_examples, _ = load_examples(cfg.val)
        outputs = _validation_outputs(cfg, val_examples)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID_DATA

    code_table, sub_table = tables_from_outputs(val_examples, outputs)
    out = Path(cfg.out)
    tables_dir = Path(cfg.tables_dir) if cfg.tables_dir is not None else out.parent
    code_csv = write_confusion_csv(tables_dir / "confusion_code.csv", code_table, config.smoothing)
    sub_csv = write_confusion_csv(tables_dir / "confusion_subcode.csv", sub_table, config.smoothing)
    records = make_preference_records(train_examples, code_table, sub_table, config)
    write_preferences(out, records)

    per_strategy = Counter(s for r in records for s in r.strategies)
    print(f"confusions: {code_table.total} code, {sub_table.total} sub-code "
          f"from {len(val_examples)} validation messages -> {code_csv}, {sub_csv}")
    print(f"{len(records)} preference records from {len(train_examples)} training examples, "
          f"{sum(per_strategy.values())} pairs ("
          + ", ".join(f"{s} {per_strategy[s]}" for s in STRATEGIES) + f") -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
