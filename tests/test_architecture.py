"""The layering of pvfast, checked by parsing every module's imports (ast) rather than by convention.

The layers, lowest first (a module belongs to the layer of its longest matching prefix; a module may
import its own layer and the layers below it, never one above)::

    base           pvfast (the lazy package root), pvfast.atomic            importable by every layer
    configuration  pvfast.config.*, pvfast.objectives.config                importable by every layer
    data           pvfast.data.*          records, formats, readers, prompts, token roles, synthetic corpus,
                                          SPEC §5 matching rules, SPEC §4 pair mining
    objectives     pvfast.objectives.*, pvfast.ops.*, pvfast.kernels.*    statistics, losses, dispatch, Triton
    packing        pvfast.packing.*       the prefix-tree packer, loss and padded batches (never the model)
    model          pvfast.model.*         loading, the packed forward, reference, generation, tiny models
    eval           pvfast.eval.*          SPEC §5 metrics and scoring
    train / CLIs   pvfast.train.*, pvfast.evaluate, pvfast.pairs, pvfast.extract, pvfast.data.__main__ and
                   pvfast.data.demo (the ``python -m pvfast.data`` command and its demo, which tokenizes
                   with the tiny model's tokenizer)
    test helpers   pvfast.testing         imported by tests and benchmarks only

Configuration imports no library code: only other configuration modules, the base, and the plain data
constants it names (codebook, the JSON format's STOP_TEXT, token roles); no torch or other third-party
package except PyYAML, checked statically over everything it reaches and by importing it in a fresh
interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BASE = ("pvfast", "pvfast.atomic")  # exact module names
CONFIG = ("pvfast.config", "pvfast.objectives.config")  # prefixes
LAYERS = (  # lowest first: (name, prefixes)
    ("data", ("pvfast.data",)),
    ("objectives/ops/kernels", ("pvfast.objectives", "pvfast.ops", "pvfast.kernels")),
    ("packing", ("pvfast.packing",)),
    ("model", ("pvfast.model",)),
    ("eval", ("pvfast.eval",)),
    ("train/CLIs", ("pvfast.train", "pvfast.evaluate", "pvfast.pairs", "pvfast.extract", "pvfast.data.__main__",
                    "pvfast.data.demo")),
    ("test helpers", ("pvfast.testing",)),
)
#: What configuration may import besides itself and the base: plain data constants.
CONFIG_MAY_IMPORT = ("pvfast.data.codebook", "pvfast.data.jsonfmt", "pvfast.data.roles")
#: ...and what those reach in turn (the data package root, the record dataclasses).
CONFIG_MAY_REACH = CONFIG_MAY_IMPORT + ("pvfast.data", "pvfast.data.records")
CONFIG_THIRD_PARTY = ("yaml",)  # config files


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@cache
def modules() -> dict[str, Path]:
    """Every module of the installed package: pvfast/ and the top-level kernels/ folder (pvfast.kernels)."""
    found = {}
    for folder, package in ((ROOT / "pvfast", "pvfast"), (ROOT / "kernels", "pvfast.kernels")):
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


@cache
def imports_of(name: str) -> frozenset[str]:
    """Every module ``name`` imports anywhere in its source (function-level imports included)."""
    path = modules()[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            # ``from pvfast.data import codebook`` imports the module pvfast.data.codebook
            found.update(f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules())
    return frozenset(found)


def pvfast_imports(name: str) -> set[str]:
    """The pvfast modules ``name`` imports (a missing submodule counts as its package)."""
    result = set()
    for target in imports_of(name):
        if not _matches(target, "pvfast"):
            continue
        while target not in modules() and "." in target:
            target = target.rpartition(".")[0]
        result.add(target)
    return result


def third_party_imports(name: str) -> set[str]:
    tops = {target.split(".")[0] for target in imports_of(name) if not _matches(target, "pvfast")}
    return {top for top in tops if top not in sys.stdlib_module_names and top != "__future__"}


def is_config(name: str) -> bool:
    return any(_matches(name, p) for p in CONFIG)


def layer_of(name: str) -> int:
    """-1 for base and configuration (importable by all), else the index in LAYERS."""
    if name in BASE or is_config(name):
        return -1
    best = max(((len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes if _matches(name, p)),
               default=None)
    if best is None:
        raise AssertionError(f"{name} belongs to no layer: add it to LAYERS in {__file__}")
    return best[1]


def _layer_name(index: int) -> str:
    return "base/configuration" if index < 0 else LAYERS[index][0]


def test_every_module_has_a_layer_and_the_walk_sees_the_package():
    names = modules()
    assert {"pvfast.config.overrides", "pvfast.train.recipe", "pvfast.packing.tree", "pvfast.kernels"} <= set(names)
    for name in names:
        layer_of(name)
    # the parser resolves relative and from-imports (guard against a walk that sees nothing)
    assert "pvfast.config.checks" in pvfast_imports("pvfast.config.sections")
    assert "pvfast.data.codebook" in pvfast_imports("pvfast.data.records")


def test_lower_layers_never_import_upper_ones():
    violations = []
    for name in modules():
        if name in BASE or is_config(name):
            continue
        for target in sorted(pvfast_imports(name)):
            if layer_of(target) > layer_of(name):
                violations.append(f"{name} ({_layer_name(layer_of(name))}) imports {target} "
                                  f"({_layer_name(layer_of(target))})")
    assert not violations, "\n".join(violations)


def test_the_base_imports_nothing_of_pvfast():
    for name in BASE:
        assert pvfast_imports(name) <= {"pvfast"}, name


def test_packing_never_imports_the_model():
    for name in modules():
        if _matches(name, "pvfast.packing"):
            assert not [t for t in pvfast_imports(name) if _matches(t, "pvfast.model")], name


def test_production_code_never_imports_the_test_helpers():
    users = [name for name in modules() if name != "pvfast.testing" and "pvfast.testing" in pvfast_imports(name)]
    assert not users, f"production modules importing pvfast.testing: {users}"


def test_configuration_imports_only_configuration_and_plain_constants():
    config_modules = [name for name in modules() if is_config(name)]
    assert "pvfast.config.stages" in config_modules and "pvfast.objectives.config" in config_modules
    for name in config_modules:
        direct = {t for t in pvfast_imports(name) if not is_config(t)} - set(BASE)
        assert direct <= set(CONFIG_MAY_IMPORT), f"{name} imports library code: {sorted(direct)}"
        assert third_party_imports(name) <= set(CONFIG_THIRD_PARTY), f"{name}: {third_party_imports(name)}"
    # Everything configuration reaches, transitively, stays torch-free plain data.
    seen, todo = set(), list(config_modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(pvfast_imports(name))
    reached = {n for n in seen if not is_config(n)} - set(BASE)
    assert reached <= set(CONFIG_MAY_REACH), f"configuration reaches {sorted(reached - set(CONFIG_MAY_REACH))}"
    for name in seen:
        assert third_party_imports(name) <= set(CONFIG_THIRD_PARTY), f"{name}: {third_party_imports(name)}"


def test_importing_configuration_loads_no_torch():
    config_modules = sorted(name for name in modules() if is_config(name))
    code = ("import sys\n"
            + "".join(f"import {name}\n" for name in config_modules)
            + "heavy = sorted(m for m in ('torch', 'numpy', 'transformers', 'triton', 'peft') if m in sys.modules)\n"
            + "print(','.join(heavy))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"importing pvfast.config loaded {result.stdout.strip()}"


@pytest.mark.parametrize("command", ["pvfast.evaluate", "pvfast.pairs"])
def test_command_help_loads_no_torch(command):
    """``--help`` of the data commands answers from the config alone (the model code is imported lazily)."""
    code = (f"import sys\nfrom {command} import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("NO-TORCH")
