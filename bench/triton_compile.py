"""Compile every Triton entry kernel of pvfast for NVIDIA targets on a machine without a GPU, and check it.

    python -m bench.triton_compile                       # bf16 on sm_90 (all kernels) + the sm_80 check
    python -m bench.triton_compile --arch 90 --arch 80 --dtypes bf16,fp16,fp32 --json out.json

How: TRITON_INTERPRET is removed before ``import triton``; the launchers of ``pvfast.kernels`` are called the
way ``pvfast.ops`` calls them (through ``TritonBackend``: token log-probs, statistics, the fused linear op's
forward, gradient-in-forward and recomputing backward) on ``device="meta"`` tensors of a real shape, with
Triton's ``kernel[grid](...)`` intercepted to record each launch (argument types, constexprs, num_warps,
num_stages) instead of running it. Each distinct launch is compiled with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))``; the ptxas bundled with Triton assembles it, and its ``-v`` log gives
registers and spills. Every @triton.jit kernel that no other jit function calls must be launched by some
scenario (else NOT COVERED).

Checks (exit status 1 if any fails): every launch compiles; 16-bit launches that run a tl.dot use wgmma on
sm_90 (mma.sync on sm_80) and spill nothing; no launch needs more shared memory than the target has. fp32
inputs are the documented slow path (exact fp32 FMA loops unless TF32 is allowed): compiled and reported with
``--dtypes fp32``, not held to the tensor-core checks.
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # must precede `import triton`: real JITFunctions, not the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import pkgutil  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDAOptions  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction, KernelInterface  # noqa: E402

KERNEL_PACKAGE = "pvfast.kernels"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# A real head: Llama-3.1-8B (H = 4096, V = 128,256), N not a multiple of 16 (the general case), 64 completions.
SHAPE = dict(N=8191, H=4096, V=128_256, M=64)
MAX_SMEM = {90: 232_448, 80: 166_912}


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def scenarios(dtype: torch.dtype, s: dict):
    """(name, fn) pairs; each fn calls the Triton backend the way pvfast.ops does for one op."""
    from pvfast.ops.triton_backend import TritonBackend

    backend = TritonBackend()
    n, h, v, m = s["N"], s["H"], s["V"], s["M"]
    y, ids, w, g = _meta(n, dtype=torch.int64), _meta(n, dtype=torch.int64), _meta(n), _meta(n)

    def token_logprobs():
        logits = _meta(n, v, dtype=dtype)
        _, lse = backend.token_logprobs_fwd(logits, y, -100)
        backend.token_logprobs_bwd(logits, y, lse, g, -100)

    def segment_stats():  # fp32 whatever the model dtype
        stats = backend.segment_stats_fwd(w, w, ids, m, -0.5)
        backend.segment_stats_bwd(w, w, ids, stats, -0.5)

    def linear():
        hidden, weight = _meta(n, h, dtype=dtype), _meta(v, h, dtype=dtype)
        _, lse = backend.linear_token_logprobs_fwd(hidden, weight, y, -100, 0.0)            # reference pass
        backend.linear_token_logprobs_fwd_with_grad(hidden, weight, y, -100, 0.0)          # frozen lm_head
        backend.linear_segment_stats_fwd(hidden, weight, y, w, ids, m, -0.5, -100, 0.0, True)
        backend.linear_segment_stats_fwd(hidden, weight, y, w, ids, m, -0.5, -100, 0.0, False)
        backend.linear_token_logprobs_bwd(hidden, weight, y, lse, g, -100, 0.0, True)      # trainable lm_head
        backend.linear_token_logprobs_fwd_with_grad(hidden, weight, y, -100, 30.0)         # soft-capped

    return [("token_logprobs", token_logprobs), ("segment_stats", segment_stats), ("linear", linear)]


# ----------------------------------------------------------------------------------------------------
# Discovery and launch capture
# ----------------------------------------------------------------------------------------------------
def kernel_modules() -> dict:
    pkg = importlib.import_module(KERNEL_PACKAGE)
    return {info.name: importlib.import_module(f"{KERNEL_PACKAGE}.{info.name}")
            for info in pkgutil.iter_modules(pkg.__path__)}


def jit_functions(mods: dict) -> dict:
    """name → JITFunction defined in the kernel modules (helpers included)."""
    found = {}
    for mod in mods.values():
        for obj in vars(mod).values():
            if isinstance(obj, JITFunction) and obj.fn.__module__ == mod.__name__:
                found[obj.__name__] = obj
    return found


def entry_kernels(fns: dict) -> set:
    called = {n for n in fns for o, g in fns.items() if o != n and re.search(rf"\b{re.escape(n)}\s*\(", g.src)}
    return set(fns) - called


class Launch:
    def __init__(self, fn, bound: dict, options: dict):
        self.fn, self.bound, self.options = fn, bound, options


@contextlib.contextmanager
def capture_launches(sink: list):
    """Within the block, ``kernel[grid](...)`` records Launch objects instead of running."""
    original = KernelInterface.__getitem__

    def getitem(self, grid):
        def record(*args, **kwargs):
            if not isinstance(self, JITFunction):
                raise TypeError(f"unexpected launch wrapper {type(self).__name__} (autotuning is not used)")
            bound = dict(zip(self.arg_names, args))
            bound.update({k: v for k, v in kwargs.items() if k in self.arg_names})
            options = {k: v for k, v in kwargs.items() if k not in self.arg_names and v is not None}
            for k in ("num_warps", "num_stages"):
                options.setdefault(k, getattr(CUDAOptions, k))
            sink.append(Launch(self, bound, options))
        return record

    KernelInterface.__getitem__ = getitem
    try:
        yield
    finally:
        KernelInterface.__getitem__ = original


_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
                 torch.int32: "i32", torch.bool: "i1"}


def specialise(launch: Launch):
    """(signature, constexprs, attrs) as Triton's JIT builds them (16-byte aligned CUDA allocations)."""
    sig, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(launch.fn.params):
        if p.name in launch.bound:
            value = launch.bound[p.name]
        elif p.default is not inspect.Parameter.empty:
            value = p.default
        else:
            raise TypeError(f"{launch.fn.__name__}: argument {p.name} not passed")
        if p.is_constexpr:
            sig[p.name], constexprs[p.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            sig[p.name] = "*" + _TRITON_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            sig[p.name] = "i1"
        elif isinstance(value, int):
            if value == 1:  # the JIT turns an integer equal to 1 into a constant
                sig[p.name], constexprs[p.name] = "constexpr", 1
                continue
            sig[p.name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{launch.fn.__name__}: unsupported argument {p.name}={value!r}")
    return sig, constexprs, attrs


def collect(dtypes: list[str], shape: dict) -> list[dict]:
    """Distinct launches of every scenario, with the dtypes that produced them."""
    unique = {}
    for dname in dtypes:
        for scen, fn in scenarios(DTYPES[dname], shape):
            sink: list[Launch] = []
            with capture_launches(sink):
                fn()
            for launch in sink:
                sig, cx, attrs = specialise(launch)
                key = (launch.fn.__name__, repr(sorted(sig.items())), repr(sorted(cx.items())),
                       repr(sorted(attrs.items())), repr(sorted(launch.options.items())))
                entry = unique.setdefault(key, dict(launch=launch, sig=sig, cx=cx, dtypes=set(), scenario=scen))
                entry["dtypes"].add(dname)
    return list(unique.values())


# ----------------------------------------------------------------------------------------------------
# Compilation and resource usage
# ----------------------------------------------------------------------------------------------------
_PTXAS = {"regs": r"Used (\d+) registers", "spill_st": r"(\d+) bytes spill stores",
          "spill_ld": r"(\d+) bytes spill loads"}


def _mma_kind(asm: dict) -> str:
    if "tt.dot" not in asm.get("ttir", ""):
        return "-"
    ptx = asm.get("ptx", "")
    m = re.search(r"wgmma\.mma_async\.sync\.aligned\.\S+?\.f32\.(\w+)\.(\w+)", ptx)
    if m:
        return f"wgmma.{m.group(1)}"
    m = re.search(r"mma\.sync\.aligned\.m\d+n\d+k\d+\.row\.col\.f32\.(\w+)\.", ptx)
    return f"mma.{m.group(1)}" if m else "FMA"


def compile_one(launch: Launch, arch: int) -> dict:
    sig, constexprs, attrs = specialise(launch)
    triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v output: registers and spills
    triton.knobs.compilation.always_compile = True  # never a cache hit: the log is this compile's
    buf = io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stdout(buf):
        kernel = triton.compile(ASTSource(fn=launch.fn, signature=sig, constexprs=constexprs, attrs=attrs),
                                target=GPUTarget("cuda", arch, 32), options=dict(launch.options))
    log = buf.getvalue()
    res = dict(ok=True, secs=round(time.time() - t0, 1), smem=kernel.metadata.shared,
               num_warps=kernel.metadata.num_warps, num_stages=kernel.metadata.num_stages, mma=_mma_kind(kernel.asm))
    for key, rx in _PTXAS.items():
        m = re.search(rx, log)
        res[key] = int(m.group(1)) if m else None
    if res["regs"] is None:
        raise RuntimeError("no ptxas -v log captured (triton.knobs.nvidia.dump_ptxas_log had no effect)")
    return res


def problems(row: dict) -> list[str]:
    """The checks of the module docstring, for one compiled launch."""
    if not row["ok"]:
        return ["compile failed"]
    out = []
    if row["smem"] > MAX_SMEM.get(row["arch"], 101_376):
        out.append(f"shared memory {row['smem']} > {MAX_SMEM.get(row['arch'])}")
    if row["dtype"] in ("bf16", "fp16"):
        if (row["spill_st"] or 0) + (row["spill_ld"] or 0):
            out.append(f"spills {row['spill_st']}/{row['spill_ld']} bytes")
        if row["mma"] != "-":
            want = "wgmma" if row["arch"] >= 90 else "mma"
            if not row["mma"].startswith(want):
                out.append(f"{row['mma']} instead of {want}")
    return out


def config_str(entry: dict) -> str:
    cx, opt = entry["cx"], entry["launch"].options
    keep = [f"{k.removeprefix('BLOCK_')}{v}" for k, v in cx.items() if k.startswith("BLOCK")]
    keep += [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in cx.items()
             if k in ("MODE", "SCALED", "FINALIZE", "FIRST", "FINAL", "STORE_SCALES", "HAS_SEGMENTS", "SOFTCAP")]
    return " ".join(keep + [f"w{opt.get('num_warps')}", f"s{opt.get('num_stages')}"])


def run(archs: list[int], dtypes: list[str], only_sm80: str, shape: dict = SHAPE,
        only: str = "") -> tuple[list[dict], list[str]]:
    """Compile; returns (rows, uncovered entry kernels). ``only_sm80``: regex of the kernels compiled for archs
    other than 90 (all kernels are compiled for sm_90)."""
    fns = jit_functions(kernel_modules())
    entries = entry_kernels(fns)
    launches = collect(dtypes, shape)
    uncovered = sorted(entries - {e["launch"].fn.__name__ for e in launches})
    rows = []
    for arch in archs:
        for e in sorted(launches, key=lambda e: (e["launch"].fn.__name__, config_str(e))):
            name = e["launch"].fn.__name__
            if (arch != 90 and not re.search(only_sm80, name)) or (only and not re.search(only, name)):
                continue
            for dname in sorted(e["dtypes"]):
                try:
                    res = compile_one(e["launch"], arch)
                except Exception as exc:  # noqa: BLE001 - report every failure and keep going
                    res = dict(ok=False, error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[:4]}",
                               trace=traceback.format_exc())
                row = dict(arch=arch, kernel=name, dtype=dname, config=config_str(e), scenario=e["scenario"], **res)
                row["problems"] = problems(row)
                rows.append(row)
                break  # one compile per launch: the dtypes that share it share its code
    return rows, uncovered


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", help="compute capability (repeatable); default 90 and 80")
    ap.add_argument("--dtypes", default="bf16", help="comma-separated: bf16, fp16, fp32 (default bf16)")
    ap.add_argument("--sm80", default=r"_linear_(logits|prob_matmul|weight_grad)_kernel",
                    help="regex of the kernels compiled for archs other than 90 (default: the three GEMMs; '.' = all)")
    ap.add_argument("--only", default="", help="regex: compile only the kernels it matches")
    ap.add_argument("--json", default="", help="write the rows to this file")
    args = ap.parse_args(argv)
    archs = args.arch or [90, 80]
    dtypes = [d for d in args.dtypes.split(",") if d]
    t0 = time.time()
    rows, uncovered = run(archs, dtypes, args.sm80, only=args.only)
    if args.only:
        uncovered = []
    print(f"triton {triton.__version__}, torch {torch.__version__}; shape {SHAPE}; {len(rows)} compiles "
          f"in {time.time() - t0:.0f} s")
    print(f"{'arch':>4} {'kernel':<30} {'dtype':<5} {'config':<58} {'regs':>4} {'spill':>7} {'smem':>7} {'mma':<11} "
          f"problems")
    for r in rows:
        if r["ok"]:
            print(f"{r['arch']:>4} {r['kernel']:<30} {r['dtype']:<5} {r['config']:<58} {r['regs']:>4} "
                  f"{r['spill_st']}/{r['spill_ld']:<5} {r['smem']:>7} {r['mma']:<11} {', '.join(r['problems'])}")
        else:
            print(f"{r['arch']:>4} {r['kernel']:<30} {r['dtype']:<5} {r['config']:<58} FAILED {r['error']}")
    for name in uncovered:
        print(f"NOT COVERED: @triton.jit entry kernel {name} is launched by no scenario")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "shape": SHAPE, "rows": rows, "uncovered": uncovered}, f,
                      indent=1, default=str)
    bad = [r for r in rows if r["problems"]]
    print(f"{len(rows) - len(bad)}/{len(rows)} launches pass; {len(uncovered)} entry kernel(s) not covered")
    return 1 if bad or uncovered else 0


if __name__ == "__main__":
    sys.exit(main())
