"""``python -m pvfast.extract``: (Code, Sub-code, Span) triples for new messages, from a trained model.

Run commands (the default run writes ``runs/smollm2-135m``; any ``python -m pvfast.train`` output folder works)::

    python -m pvfast.extract --run runs/smollm2-135m --input messages.jsonl --out extracted.jsonl
    python -m pvfast.extract --run runs/smollm2-135m --input messages.csv --out extracted.jsonl --batch-size 16
    python -m pvfast.extract --model path/to/model-folder --input messages.jsonl --out extracted.jsonl
    python -m pvfast.extract --model path/to/base --adapter runs/x/sft/adapter --input m.jsonl --out e.jsonl

Input (``--input``): JSONL, one ``{"id": ..., "direction": "Y" | "N", "message": ...}`` object per line
(other fields, such as gold ``annotations``, are ignored), or a ``.csv`` file with a header row holding the
columns ``id``, ``direction``, ``message``. ``direction`` is ``Y`` when the provider writes to the patient
and ``N`` when the patient writes to the provider. A file with any bad record is refused before a model is
loaded; the error names the file, the line and the field of every problem (never message text).

Output (``--out``, written atomically): JSONL in input order, one line per message::

    {"id": "m1", "results": [{"Code": "SDOH", "Sub-code": "EconomicStability", "Span": "..."}],
     "valid": true, "problems": []}

``results`` holds the triples read from the model's answer whose labels are valid for the message's
direction and whose span occurs verbatim in the message; ``valid`` is true when the answer was exactly
the canonical JSON and every triple in it was kept; ``problems`` says what was wrong otherwise (format
errors, dropped triples, an answer cut off by ``generation.max_new_tokens``) without any message or span
text. With constrained decoding (``generation.constrained``, on by default) every answer is valid by
construction; ``--no-generation.constrained`` lets the model write freely (and shows how often it errs).

Model: ``--run FOLDER`` resolves a finished ``python -m pvfast.train`` output folder to its final model
(:func:`resolve_run`) and uses the prompt template the run was trained with; ``--model`` takes a model
folder (or ``.gguf`` file, hub id), optionally with ``--adapter``. Generation is the evaluation's greedy
path (:func:`pvfast.model.generation.generate`: shared instruction prefix, constrained decoding), with a
progress bar in messages/s on stderr. Message and span text are never printed: the output file is the only
place they are written.

Exit status: 0 done, 1 the model cannot be loaded, 2 the command line, a config, the input or the run folder
was refused.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pvfast.config.cli import parse_command
from pvfast.config.commands import EXTRACT_ALIASES, ExtractCommandConfig
from pvfast.config.sections import GenerationConfig
from pvfast.data.codebook import DIRECTIONS, code_allowed
from pvfast.data.io import DataError, Problem, read_jsonl, write_jsonl
from pvfast.data.jsonfmt import STOP_TEXT, parse_output, serialize
from pvfast.data.records import Example
from pvfast.train.layout import ADAPTER_DIR, CONFIG_FILE, MERGED_DIR, SFT_MERGED_DIR

PROG = "python -m pvfast.extract"
EXIT_OK, EXIT_MODEL, EXIT_BAD_INPUT = 0, 1, 2
EXIT_CODES = {EXIT_OK: "done: the output file is written",
              EXIT_MODEL: "the model cannot be loaded",
              EXIT_BAD_INPUT: "the command line, a config, the input file or the run folder was refused"}

INPUT_FIELDS = ("id", "direction", "message")
MAX_QUOTED = 8  # longest direction value quoted in a problem (a column mix-up must not leak message text)
PO_STAGE_DIR = "po"  # the pipeline's preference-optimisation stage (python -m pvfast.train pipeline)


# ----------------------------------------------------------------------------------------------------
# Input
# ----------------------------------------------------------------------------------------------------

def _check_row(path: str, line: int, row: dict, seen: dict[str, int], problems: list[Problem]) -> Example | None:
    before = len(problems)

    def problem(field: str, message: str) -> None:
        problems.append(Problem(path, line, field, message))

    record_id = row.get("id")
    if record_id is None or (isinstance(record_id, str) and not record_id.strip()):
        problem("id", "missing or empty")
    elif isinstance(record_id, bool) or not isinstance(record_id, (str, int)):
        problem("id", f"wrong type: expected a string, got {type(record_id).__name__}")
    elif str(record_id) in seen:
        problem("id", f"duplicate id (first on line {seen[str(record_id)]})")
    else:
        seen[str(record_id)] = line
    direction = row.get("direction")
    if direction not in DIRECTIONS:
        shown = repr(direction) if isinstance(direction, str) and len(direction) <= MAX_QUOTED else \
            f"a string of {len(direction)} chars" if isinstance(direction, str) else \
            "missing" if direction is None else type(direction).__name__
        problem("direction", f"wrong direction value {shown}: expected 'Y' (provider to patient) or 'N' "
                             f"(patient to provider)")
    message = row.get("message")
    if not isinstance(message, str):
        problem("message", "missing" if message is None else f"wrong type: expected a string, got "
                                                             f"{type(message).__name__}")
    elif not message.strip():
        problem("message", "is empty")
    if len(problems) > before:
        return None
    return Example(str(record_id), direction, message)


def _csv_rows(path: str) -> tuple[list[tuple[int, dict]], list[Problem]]:
    """``(line, row)`` of a CSV file with a header (line = where the record starts, 1-based)."""
    rows, problems = [], []
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            missing = [f for f in INPUT_FIELDS if f not in header]
            if missing:
                raise DataError([Problem(path, 1, None, f"the header has no column(s) {', '.join(missing)} "
                                                        f"(it needs {', '.join(INPUT_FIELDS)})")])
            start = reader.line_num + 1
            for row in reader:
                if None in row:
                    problems.append(Problem(path, start, None, f"{len(row[None])} more value(s) than header columns"))
                elif any(v is None for v in row.values()):
                    problems.append(Problem(path, start, None, "fewer values than header columns"))
                elif any(v.strip() for v in row.values()):
                    rows.append((start, row))
                start = reader.line_num + 1
    except UnicodeDecodeError as err:
        raise DataError([Problem(path, None, None, f"not valid UTF-8 (byte {err.start})")]) from None
    except csv.Error as err:
        raise DataError([Problem(path, reader.line_num, None, f"malformed CSV: {err}")]) from None
    return rows, problems


def read_messages(path: str | os.PathLike) -> list[Example]:
    """The messages of a JSONL or CSV file (module docstring), in file order; every bad record is a
    :class:`pvfast.data.io.DataError` problem naming the file, the line and the field."""
    shown = os.fspath(path)
    if not Path(shown).is_file():
        raise DataError([Problem(shown, None, None, "no such file" if not Path(shown).exists() else "not a file")])
    if Path(shown).suffix.lower() == ".csv":
        rows, problems = _csv_rows(shown)
    else:
        rows, problems = read_jsonl(shown)  # the data layer's reader: UTF-8, JSON and object checks per line
    seen: dict[str, int] = {}
    examples = [ex for line, row in rows if (ex := _check_row(shown, line, row, seen, problems)) is not None]
    if problems:
        raise DataError(sorted(problems, key=lambda p: p.line or 0))
    if not examples:
        raise DataError([Problem(shown, None, None, "file is empty (no messages)")])
    return examples


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------

class RunFolderError(ValueError):
    """A ``--run`` folder is not a finished ``python -m pvfast.train`` output folder (the message says why)."""


@dataclass(frozen=True)
class ModelSpec:
    """What to load: a full model folder, optionally with a peft adapter on top, plus how the run trained."""

    base: str
    adapter: str | None = None
    load_in_4bit: bool = False  # the run trained on an NF4 base (model.quant nf4)
    template: str | None = None  # the run's prompt template file (None: the built-in one)
    description: str = ""


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RunFolderError(f"{path}: cannot be read as JSON ({err})") from None
    return data if isinstance(data, dict) else {}


def _base_model(model_section: dict, where: Path) -> str:
    """The base model folder of a run config's ``model`` section (tiny model, local folder, GGUF, hub id)."""
    from pvfast.config.sections import ModelConfig
    from pvfast.model.loading import model_source

    try:
        cfg = ModelConfig(name_or_path=model_section.get("name_or_path"),
                          tiny_arch=model_section.get("tiny_arch", ModelConfig.tiny_arch))
    except ValueError as err:
        raise RunFolderError(f"{where}: model section: {err}") from None
    return model_source(cfg)


def resolve_run(folder: str | os.PathLike) -> ModelSpec:
    """The final model of a finished ``python -m pvfast.train`` output folder.

    A stage folder holds ``adapter/`` (and ``merged/`` with ``run.merge_adapter``); a PO stage also holds
    ``sft_merged/``, its base (the SFT adapter folded in). The final model, first match wins::

        pipeline   <run>/po/merged       or  <run>/po/sft_merged + <run>/po/adapter
        po         <run>/merged          or  <run>/sft_merged + <run>/adapter   (or base model + adapter)
        sft        <run>/merged          or  the base model in <run>/config.json + <run>/adapter

    The prompt template and the base's quantisation come from ``<run>/config.json``. A model folder (an
    ``config.json`` with ``model_type``) or a peft adapter folder given here is used as it is.
    """
    root = Path(folder)
    if not root.is_dir():
        raise RunFolderError(f"{root}: no such directory")
    config = _read_json(root / CONFIG_FILE) if (root / CONFIG_FILE).is_file() else {}
    if "model_type" in config or "architectures" in config:
        return ModelSpec(str(root), description=f"model folder {root}")
    if (root / "adapter_config.json").is_file():
        base = _read_json(root / "adapter_config.json").get("base_model_name_or_path")
        if not base:
            raise RunFolderError(f"{root}/adapter_config.json: no base_model_name_or_path")
        return ModelSpec(str(base), str(root), description=f"adapter {root} on {base}")
    if not isinstance(config.get("model"), dict) or not isinstance(config.get("run"), dict):
        raise RunFolderError(f"{root}: not a python -m pvfast.train output folder (no {CONFIG_FILE} with model and "
                             f"run sections), a model folder or an adapter folder")
    model_section, data_section = config["model"], config.get("data") or {}
    stage = root / PO_STAGE_DIR if (root / PO_STAGE_DIR).is_dir() else root
    merged, adapter, sft_merged = stage / MERGED_DIR, stage / ADAPTER_DIR, stage / SFT_MERGED_DIR
    template = data_section.get("template")
    load_in_4bit = model_section.get("quant") == "nf4"
    if (merged / "config.json").is_file():
        return ModelSpec(str(merged), None, load_in_4bit, template, f"run {root}: {merged}")
    if not (adapter / "adapter_config.json").is_file():
        hint = ""
        sft = root / "sft"
        if stage != root and (sft / ADAPTER_DIR / "adapter_config.json").is_file():
            use = f"--model {sft / MERGED_DIR}" if (sft / MERGED_DIR / "config.json").is_file() else \
                f"--model <base model> --adapter {sft / ADAPTER_DIR}"
            hint = f"; its SFT stage finished: use that model with {use}"
            hint += f" --template {template}" if template else ""
        raise RunFolderError(f"{root}: the run has not finished: no trained adapter in {adapter} (continue it with "
                             f"python -m pvfast.train ... --run.resume{hint})")
    if (sft_merged / "config.json").is_file():
        base = str(sft_merged)
    else:
        base = _base_model(model_section, root / CONFIG_FILE)
    return ModelSpec(base, str(adapter), load_in_4bit, template, f"run {root}: {base} + {adapter}")


def resolve_model(run: str | None = None, model: str | None = None, adapter: str | None = None) -> ModelSpec:
    """``--run`` through :func:`resolve_run`; ``--model`` (folder, ``.gguf``, hub id) through the trainer's
    model resolution, with ``--adapter`` on top."""
    if (run is None) == (model is None):
        raise ValueError("give exactly one of run and model")
    if run is not None:
        return resolve_run(run)
    from pvfast.config.sections import ModelConfig
    from pvfast.model.loading import model_source

    base = model_source(ModelConfig(name_or_path=model))
    return ModelSpec(base, adapter, description=base + (f" + {adapter}" if adapter else ""))


# ----------------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------------

def check_answer(text: str, example: Example, stopped: bool = True) -> dict:
    """The output record of one message: the triples of ``text`` that are valid for ``example``, whether the
    answer was valid as a whole, and its problems (labels and lengths only, never message or span text)."""
    parsed = parse_output(text)
    problems = list(parsed.errors)
    results = []
    for index, annotation in enumerate(parsed.annotations):
        if not code_allowed(annotation.code, example.direction):
            problems.append(f"triple {index}: code {annotation.code!r} is not used for direction "
                            f"{example.direction!r} (dropped)")
        elif not annotation.span:
            problems.append(f"triple {index}: empty span (dropped)")
        elif annotation.span not in example.message:
            problems.append(f"triple {index}: span ({len(annotation.span)} chars) does not occur verbatim in the "
                            f"message (dropped)")
        else:
            results.append(annotation)
    if not stopped:
        problems.append("the answer was cut off at generation.max_new_tokens")
    body = text.split(STOP_TEXT, 1)[0].strip()  # the published models end their answer with JSON_END
    valid = parsed.strict and not problems and body == serialize(parsed.annotations)
    if parsed.strict and not problems and not valid:
        problems.append("not the canonical JSON layout (spacing, key order or escapes differ)")
    return {"id": example.id, "results": [a.to_dict() for a in results], "valid": valid, "problems": problems}


def extract(model, tokenizer, examples: Sequence[Example], *, template=None,
            generation: GenerationConfig = GenerationConfig(), progress: bool = True) -> list[dict]:
    """Output records (:func:`check_answer`) for ``examples``, in their order."""
    import dataclasses

    from pvfast.model.generation import generate

    outputs = generate(model, tokenizer, examples, template=template, progress=progress, desc="extract",
                       **dataclasses.asdict(generation))
    return [check_answer(out.text, example, out.stopped) for example, out in zip(examples, outputs)]


def summary(records: Sequence[dict]) -> str:
    """One line of counts (no text)."""
    n = len(records)
    valid = sum(r["valid"] for r in records)
    triples = sum(len(r["results"]) for r in records)
    return f"{n} messages, {triples} triples, {valid} valid answers ({valid / n:.1%}), {n - valid} with problems"


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_command(argv, ExtractCommandConfig, prog=PROG, description=__doc__, aliases=EXTRACT_ALIASES,
                        exit_codes=EXIT_CODES, bad_config_exit=EXIT_BAD_INPUT)
    from pvfast.data.prompt import PromptTemplate, TemplateError
    from pvfast.model.loading import ModelLoadError

    try:
        examples = read_messages(cfg.input)  # a bad input file stops here, before any model is loaded
        spec = resolve_model(cfg.run, cfg.model, cfg.adapter)
        template_file = cfg.template if cfg.template is not None else spec.template
        template = PromptTemplate.from_file(template_file) if template_file is not None else None
    except (DataError, RunFolderError, TemplateError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ModelLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_MODEL
    from pvfast.model.generation import load_model_for_generation

    print(f"model: {spec.description}" + (f"; template {template_file}" if template_file else ""), file=sys.stderr)
    try:
        model, tokenizer = load_model_for_generation(spec.base, spec.adapter, dtype=cfg.dtype, device=cfg.device,
                                                     load_in_4bit=cfg.load_in_4bit or spec.load_in_4bit,
                                                     merge=cfg.merge_adapter)
    except ModelLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_MODEL
    records = extract(model, tokenizer, examples, template=template, generation=cfg.generation)
    path = write_jsonl(cfg.out, records)
    print(f"{summary(records)} -> {path}", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
