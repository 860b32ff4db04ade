"""Quick CPU check of the C++ linear log-prob op against naive torch: one run, time and peak memory.

Not a test and not the benchmark suite: a single forward+backward per provider, each in a fresh
subprocess so that peak resident memory is measured without interference. Naive torch is
``logits = hidden @ weight.T; log_softmax; gather; backward``; pvfast is ``pvfast._C``
``linear_token_logprobs_fwd`` + ``linear_token_logprobs_bwd`` (logits never stored).

    python bench/cpu_quick_check.py                       # N=2048, H=512, V=32000, fp32, 2 threads
    python bench/cpu_quick_check.py --tokens 512 --vocab 8000
    python bench/cpu_quick_check.py --repeats 3           # alternate providers, report medians

"Extra memory" is the peak resident set during forward+backward minus the resident set just before
it (inputs already allocated). On Linux the peak is reset through /proc/self/clear_refs first; the
required outputs (grad_hidden, grad_weight) are counted in both providers and reported separately.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

PROVIDERS = ("torch_naive", "pvfast_cpp")
MiB = 2**20


@dataclass
class QuickCheckConfig:
    tokens: int = 2048  # N
    hidden_size: int = 512  # H
    vocab: int = 32000  # V
    threads: int = 2  # torch.set_num_threads in each subprocess
    weight_grad: bool = True  # also compute grad_weight (False: frozen head, as with LoRA)
    seed: int = 0
    repeats: int = 1  # fresh subprocesses per provider, alternated; medians are reported


def _rss_kib(field: str) -> int:
    """VmRSS (current) or VmHWM (peak) of this process in KiB, from /proc/self/status."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # "5" resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def run_one(provider: str, cfg: QuickCheckConfig) -> dict:
    """One forward+backward of `provider` in this process; returns seconds and MiB."""
    import torch

    torch.set_num_threads(cfg.threads)
    gen = torch.Generator().manual_seed(cfg.seed)
    hidden = torch.randn(cfg.tokens, cfg.hidden_size, generator=gen)
    weight = torch.randn(cfg.vocab, cfg.hidden_size, generator=gen) / cfg.hidden_size**0.5
    targets = torch.randint(0, cfg.vocab, (cfg.tokens,), generator=gen)
    grad_logp = torch.randn(cfg.tokens, generator=gen)

    if provider == "torch_naive":
        def step():
            h = hidden.detach().requires_grad_()
            w = weight.detach().requires_grad_(cfg.weight_grad)
            logits = h @ w.T
            logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
            logp.backward(grad_logp)
            return logp.detach(), h.grad, w.grad
    elif provider == "pvfast_cpp":
        from pvfast import _C

        def step():
            logp, lse = _C.linear_token_logprobs_fwd(hidden, weight, targets, -100, 0.0)  # 0.0: no soft-cap
            grad_hidden, grad_weight = _C.linear_token_logprobs_bwd(
                hidden, weight, targets, lse, grad_logp, -100, 0.0, cfg.weight_grad)
            return logp, grad_hidden, grad_weight
    else:
        raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")

    # warm up libraries (MKL, thread pool) on a tiny slice so the timed run is not a cold start
    small = QuickCheckConfig(tokens=8, hidden_size=cfg.hidden_size, vocab=64)
    _ = torch.randn(8, small.vocab) @ torch.randn(small.vocab, 8)

    peak_reset = _reset_peak_rss()
    before_kib = _rss_kib("VmRSS")
    start = time.perf_counter()
    logp, grad_hidden, grad_weight = step()
    seconds = time.perf_counter() - start
    peak_kib = _rss_kib("VmHWM")
    outputs_bytes = sum(t.numel() * t.element_size() for t in (logp, grad_hidden, grad_weight)
                        if t is not None)
    extra = (peak_kib - before_kib) * 1024
    return {
        "provider": provider,
        "seconds": seconds,
        "extra_mib": extra / MiB,
        "extra_beyond_outputs_mib": (extra - outputs_bytes) / MiB,
        "outputs_mib": outputs_bytes / MiB,
        "peak_reset": peak_reset,
        "logp_checksum": float(logp.double().sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=QuickCheckConfig.tokens)
    parser.add_argument("--hidden-size", type=int, default=QuickCheckConfig.hidden_size)
    parser.add_argument("--vocab", type=int, default=QuickCheckConfig.vocab)
    parser.add_argument("--threads", type=int, default=QuickCheckConfig.threads)
    parser.add_argument("--no-weight-grad", action="store_true")
    parser.add_argument("--repeats", type=int, default=QuickCheckConfig.repeats)
    parser.add_argument("--provider", choices=PROVIDERS, help="internal: run one provider here")
    args = parser.parse_args()
    cfg = QuickCheckConfig(args.tokens, args.hidden_size, args.vocab, args.threads,
                           not args.no_weight_grad, repeats=args.repeats)

    if args.provider:
        print(json.dumps(run_one(args.provider, cfg)))
        return

    print(f"config: {json.dumps(asdict(cfg))}")
    runs = {provider: [] for provider in PROVIDERS}
    for _ in range(cfg.repeats):  # alternate so that a load spike on a shared machine hits both
        for provider in PROVIDERS:
            cmd = [sys.executable, __file__, "--provider", provider, "--tokens", str(cfg.tokens),
                   "--hidden-size", str(cfg.hidden_size), "--vocab", str(cfg.vocab),
                   "--threads", str(cfg.threads)] + (["--no-weight-grad"] if not cfg.weight_grad else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[provider].append(json.loads(out.strip().splitlines()[-1]))
    rows = [{key: (statistics.median(r[key] for r in runs[provider])
                   if isinstance(runs[provider][0][key], float) else runs[provider][0][key])
             for key in runs[provider][0]} for provider in PROVIDERS]
    if cfg.repeats > 1:
        for provider in PROVIDERS:
            print(f"{provider} seconds per run: {[round(r['seconds'], 3) for r in runs[provider]]}")
    print(f"{'provider':<12} {'fwd+bwd s':>10} {'extra MiB':>10} {'beyond outputs MiB':>19}")
    for row in rows:
        print(f"{row['provider']:<12} {row['seconds']:>10.3f} {row['extra_mib']:>10.1f} "
              f"{row['extra_beyond_outputs_mib']:>19.1f}")
    naive, fused = rows
    print(f"time ratio pvfast/naive: {fused['seconds'] / naive['seconds']:.2f}; "
          f"extra-memory ratio: {fused['extra_mib'] / naive['extra_mib']:.3f}; "
          f"logp checksums agree: {abs(naive['logp_checksum'] - fused['logp_checksum']) < 1e-2 * cfg.tokens}")


if __name__ == "__main__":
    main()
