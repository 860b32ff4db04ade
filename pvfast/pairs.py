"""``python -m pvfast.pairs``: confusion-aware preference pairs from an SFT model's validation outputs.

The method (SPEC §4) lives in :mod:`pvfast.data.pairs`; this module is its command line.

Run commands::

    python -m pvfast.pairs --train data/pv-synth/train.jsonl --val data/pv-synth/validation.jsonl \\
        --predictions val-preds.jsonl --out data/prefs.jsonl
    python -m pvfast.pairs --train data/pv-synth/train.jsonl --val data/pv-synth/validation.jsonl \\
        --model runs/sft-merged --save-predictions val-preds.jsonl --out data/prefs.jsonl \\
        --strategies label label missing extra --seed 1

Message and span text are never printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from dataclasses import fields
from pathlib import Path
from typing import Sequence

from pvfast.config.sections import STRATEGIES, PairConfig
from pvfast.data.io import DataError, load_examples, write_preferences
from pvfast.data.pairs import make_preference_records, tables_from_outputs, write_confusion_csv
from pvfast.data.records import Example
from pvfast.model.generation import add_generation_arguments

EXIT_INVALID_DATA = 2


_FIELD_HELP = {
    "seed": "base seed of every draw",
    "strategies": f"rejected outputs per example, from {', '.join(STRATEGIES)}; repeat a name for more",
    "subcode_confusion_prob": "label strategy: probability of changing the Sub-code instead of the Code",
    "smoothing": "add-alpha on off-diagonal confusion counts",
    "extra_span_words": "extra strategy: min and max words of the spurious span",
    "include_empty": "give examples without gold triples an extra-triple rejected output",
    "max_redraws": "extra strategy: redraws when the new triple equals a gold one",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pvfast.pairs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, required=True, help="training examples (chosen = gold)")
    parser.add_argument("--val", type=Path, required=True, help="validation examples the model is run on")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--predictions", type=Path, help="precomputed {id, output} JSONL for --val")
    source.add_argument("--model", help="SFT model directory to generate validation predictions with")
    parser.add_argument("--adapter", type=Path, help="peft adapter on top of --model")
    add_generation_arguments(parser)
    parser.add_argument("--save-predictions", type=Path, help="write generated validation outputs here")
    parser.add_argument("--out", type=Path, required=True, help="preference JSONL to write")
    parser.add_argument("--tables-dir", type=Path, default=None,
                        help="where confusion_code.csv and confusion_subcode.csv go (default: beside --out)")
    defaults = PairConfig()
    for f in fields(PairConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = f"{_FIELD_HELP[f.name]} (default: {default})"
        if f.name == "strategies":
            parser.add_argument(flag, nargs="+", choices=STRATEGIES, default=list(default), help=help_text)
        elif f.name == "extra_span_words":
            parser.add_argument(flag, nargs=2, type=int, metavar=("MIN", "MAX"), default=list(default),
                                help=help_text)
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=type(default), default=default, help=help_text)
    return parser


def config_from_args(args: argparse.Namespace) -> PairConfig:
    return PairConfig(**{f.name: getattr(args, f.name) for f in fields(PairConfig)})


def _validation_outputs(args: argparse.Namespace, val_examples: list[Example]) -> list[str]:
    from pvfast.data.predictions import align_predictions, read_predictions, write_predictions
    from pvfast.model.generation import generate_completions, load_model_for_generation

    if args.predictions is not None:
        return align_predictions(val_examples, read_predictions(args.predictions),
                                 predictions_path=os.fspath(args.predictions), data_path=os.fspath(args.val))
    template = None
    if args.template is not None:
        from pvfast.data.prompt import PromptTemplate

        template = PromptTemplate.from_file(args.template)
    model, tokenizer = load_model_for_generation(args.model, args.adapter, dtype=args.dtype, device=args.device,
                                                 load_in_4bit=args.load_in_4bit)
    outputs = generate_completions(model, tokenizer, val_examples, batch_size=args.batch_size,
                                   max_new_tokens=args.max_new_tokens, template=template)
    if args.save_predictions is not None:
        write_predictions(args.save_predictions, [ex.id for ex in val_examples], outputs)
    return outputs


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model is None and (args.adapter or args.save_predictions or args.template or args.load_in_4bit):
        parser.error("--adapter, --template, --load-in-4bit and --save-predictions need --model")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        parser.error("--batch-size and --max-new-tokens must be >= 1")
    try:
        config = config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    print("config: " + ", ".join(f"{f.name}={getattr(config, f.name)}" for f in fields(PairConfig)))
    try:
        train_examples, _ = load_examples(args.train)
        val_examples, _ = load_examples(args.val)
        outputs = _validation_outputs(args, val_examples)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID_DATA

    code_table, sub_table = tables_from_outputs(val_examples, outputs)
    tables_dir = args.tables_dir if args.tables_dir is not None else args.out.parent
    code_csv = write_confusion_csv(tables_dir / "confusion_code.csv", code_table, config.smoothing)
    sub_csv = write_confusion_csv(tables_dir / "confusion_subcode.csv", sub_table, config.smoothing)
    records = make_preference_records(train_examples, code_table, sub_table, config)
    write_preferences(args.out, records)

    per_strategy = Counter(s for r in records for s in r.strategies)
    print(f"confusions: {code_table.total} code, {sub_table.total} sub-code "
          f"from {len(val_examples)} validation messages -> {code_csv}, {sub_csv}")
    print(f"{len(records)} preference records from {len(train_examples)} training examples, "
          f"{sum(per_strategy.values())} pairs ("
          + ", ".join(f"{s} {per_strategy[s]}" for s in STRATEGIES) + f") -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
