"""Data command line: make the synthetic corpus, validate a data file, convert layouts.

    python -m pvfast.data synth --n 1137 --seed 0 --out data/pv-synth
    python -m pvfast.data validate data/pv-synth/train.jsonl
    python -m pvfast.data validate prefs.jsonl --kind preference
    python -m pvfast.data validate train.jsonl --preset qwen2.5-1.5b            # + lengths, as that run sees them
    python -m pvfast.data validate train.jsonl --model Qwen/Qwen2.5-1.5B-Instruct --token-budget 4096
    python -m pvfast.data convert published_dataset_dir/ train.jsonl [--skip-invalid]
    python -m pvfast.data demo [--n 1137] [--seed 0] [--out DIR]

``validate`` and ``convert`` refuse a file with any invalid record (exit code 2, one line per problem
naming file, line and field) unless ``--skip-invalid`` is given, which reports what was skipped and why.
``convert`` writes nothing when it refuses. Message and span text are never printed; labels given in another
case or spacing are stored canonical and counted ("normalised 3 labels ...", never their text).

``validate`` with a tokenizer (``--model``, or a trainer ``--preset`` / ``--config`` file, whose model, prompt
template and budgets are used; ``--model``, ``--template``, ``--token-budget``, ``--max-completion-tokens`` and
``--truncate`` override them) also tokenizes every record as the trainer will and refuses the file when a record
can never fit: each one is named by file, line and field with the fix that applies (``prompt``: shorten the
message or template, or raise the budget, since truncation never cuts prompts; ``completion``: raise the cap or
budget, or pass --data.truncate). This is the same check the trainer makes before loading a model
(:func:`pvfast.train.data.length_problems`).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from pvfast.data import io

EXIT_INVALID_DATA = 2


def _report_skipped(problems: list) -> None:
    for problem in problems:
        print(f"skipped: {problem}", file=sys.stderr)
    if problems:
        records = {(p.path, p.line) for p in problems}
        print(f"skipped {len(records)} invalid record(s) ({len(problems)} problem(s))", file=sys.stderr)


def _load(path: Path, kind: str, skip_invalid: bool):
    loader = io.load_examples if kind == "sft" else io.load_preferences
    return loader(path, skip_invalid=skip_invalid)


def cmd_synth(args: argparse.Namespace) -> int:
    from pvfast.data.synth import write_corpus

    paths = write_corpus(args.out, n=args.n, seed=args.seed)
    for split, path in paths.items():
        examples, _ = io.load_examples(path)
        n_ann = sum(len(e.annotations) for e in examples)
        print(f"{split:<11} {len(examples):>5} messages {n_ann:>6} annotations -> {path}")
    return 0


def _trainer_settings(args: argparse.Namespace):
    """The model and data sections the trainer would use (preset < config file < the flags), or None."""
    if args.model is None and args.preset is None and args.config is None:
        return None
    from pvfast.config.trainer import load_config

    overrides = []
    for key, value in (("model.name_or_path", args.model), ("data.template", args.template),
                       ("data.token_budget", args.token_budget),
                       ("data.max_completion_tokens", args.max_completion_tokens)):
        if value is not None:
            overrides += [f"--{key}", str(value)]
    if args.truncate:
        overrides += ["--data.truncate", "true"]
    cfg = load_config("sft", args.config, overrides, args.preset or "none")
    return cfg.model, cfg.data, cfg.sft.objective_config


def _length_problems(result, kind: str, settings) -> list:
    from pvfast.data.prompt import PromptTemplate
    from pvfast.model.loading import load_tokenizer
    from pvfast.packing.loss_batch import preference_groups, sft_groups
    from pvfast.train.data import length_problems

    model, data, objective = settings
    tokenizer = load_tokenizer(model)
    template = PromptTemplate.from_file(data.template) if data.template is not None else None
    make = sft_groups if kind == "sft" else preference_groups
    groups = make(result.records, tokenizer, template)
    return length_problems(groups, data, result)


def cmd_validate(args: argparse.Namespace) -> int:
    settings = _trainer_settings(args)  # a bad preset or key is refused before the file is read
    result = _load(args.path, args.kind, args.skip_invalid)
    records, skipped = result
    _report_skipped(skipped)
    if result.normalized_summary():
        print(f"{args.path}: {result.normalized_summary()}")
    if settings is not None:
        too_long = _length_problems(result, args.kind, settings)
        if too_long:
            raise io.DataError(too_long)
        _, data, _ = settings
        print(f"{args.path}: every record fits data.token_budget {data.token_budget} and "
              f"data.max_completion_tokens {data.max_completion_tokens}"
              + (" (with --data.truncate)" if data.truncate else ""))
    if args.kind == "sft":
        directions = Counter(r.direction for r in records)
        n_ann = sum(len(r.annotations) for r in records)
        print(f"{args.path}: {len(records)} valid examples ({directions['Y']} provider->patient, "
              f"{directions['N']} patient->provider), {n_ann} annotations")
    else:
        n_pairs = sum(len(r.rejected) for r in records)
        print(f"{args.path}: {len(records)} valid preference records, {n_pairs} pairs")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    records, skipped = _load(args.src, args.kind, args.skip_invalid)
    _report_skipped(skipped)
    write = io.write_examples if args.kind == "sft" else io.write_preferences
    write(args.dst, records)
    print(f"wrote {len(records)} records -> {args.dst}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pvfast.data.demo import run_demo

    run_demo(n=args.n, seed=args.seed, out=args.out, arch=args.arch)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pvfast.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write the synthetic PV-Miner corpus (train/validation/test JSONL)")
    p.add_argument("--n", type=int, default=1137, help="number of messages (default: 1137, the published size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("demo", help="run the data pipeline on the synthetic corpus and print statistics")
    p.add_argument("--n", type=int, default=1137, help="number of messages (default: 1137)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="keep the corpus files here (default: a temp dir)")
    p.add_argument("--arch", choices=("llama", "qwen2"), default="qwen2", help="tiny tokenizer to use")
    p.set_defaults(func=cmd_demo)

    for name, func, help_text in (("validate", cmd_validate, "check a data file and summarise it"),
                                  ("convert", cmd_convert, "read any supported layout, write pvfast JSONL")):
        p = sub.add_parser(name, help=help_text)
        if name == "validate":
            p.add_argument("path", type=Path)
        else:
            p.add_argument("src", type=Path)
            p.add_argument("dst", type=Path)
        p.add_argument("--kind", choices=("sft", "preference"), default="sft")
        p.add_argument("--skip-invalid", action="store_true",
                       help="skip invalid records (reported) instead of refusing the file")
        if name == "validate":
            lengths = p.add_argument_group("lengths, as the trainer sees them (any of these turns the check on)")
            lengths.add_argument("--preset", help="the trainer preset the data will be trained with")
            lengths.add_argument("--config", help="the trainer config file (YAML/JSON, or a run's config.json)")
            lengths.add_argument("--model", help="model name or path: its tokenizer (overrides the preset's)")
            lengths.add_argument("--template", help="prompt template file (data.template)")
            lengths.add_argument("--token-budget", type=int, help="data.token_budget")
            lengths.add_argument("--max-completion-tokens", type=int, help="data.max_completion_tokens")
            lengths.add_argument("--truncate", action="store_true", help="data.truncate: completion tails may be cut")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except io.DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID_DATA
    except Exception as err:  # a bad preset/key/template or tokenizer: one line, same exit code as bad data
        from pvfast.config.overrides import ConfigError
        from pvfast.data.prompt import TemplateError
        from pvfast.model.loading import ModelLoadError

        if not isinstance(err, (ConfigError, TemplateError, ModelLoadError, OSError)):
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID_DATA


if __name__ == "__main__":
    sys.exit(main())
