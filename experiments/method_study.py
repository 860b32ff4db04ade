"""Does the method do what the paper says, on a real model? SFT alone vs DPO vs DPO-Positive vs TAB-PO.

SmolLM2-135M-Instruct (the default preset's model and recipe), the held-out-phrasing synthetic split, one SFT
model and one set of confusion-aware pairs shared by every preference run; each objective then trains from
that SFT model with the same budget (the preset's max_steps, lr and packing) for each seed. Reported: F1
(mean ± sample std over seeds) on held-out test messages, and the mean chosen / rejected log-probability per
token over the training steps ("likelihood squeezing": plain DPO tends to lower the chosen likelihood along
with the rejected one; TAB-PO's confidence gate should hold it up).

    python experiments/method_study.py --out experiments/results/method_study --seeds 0 1
    python experiments/method_study.py --out experiments/results/method_study --report-only   # table + plot

Every step runs the real entry point (``python -m pvfast.train``) in a subprocess; finished runs are skipped
when the script is started again (their ``eval_report.json`` exists), so it can be stopped and resumed.
Outputs in ``--out``: ``results.json``, ``results.md`` (the table) and ``trajectories.png``.
Objectives use their own defaults (DPO and DPO-Positive: β = 0.1 as TRL; TAB-PO: the "released" preset,
β = 0.5, τ = 0.66, λ = 0.5); that is the comparison the paper draws.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRESET = "smollm2-135m"
OBJECTIVES = {  # name -> extra command-line arguments of the po stage
    "dpo": ["--po.objective", "dpo"],
    "dpo_positive": ["--po.objective", "dpo_positive"],
    "tabpo": ["--po.objective", "tabpo", "--po.preset", "released"],
}
TEST_N = 200  # the test split of a 200-message corpus with the same seed: 20 messages, held-out phrasings


def _run(args: list[str], log: Path) -> None:
    started = time.perf_counter()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with open(log, "w", encoding="utf-8") as handle:
        done = subprocess.run([sys.executable, "-m", "pvfast.train", *args], stdout=handle, stderr=subprocess.STDOUT,
                              cwd=ROOT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): python -m pvfast.train {' '.join(args)}; see {log}")
    print(f"  done in {time.perf_counter() - started:.0f}s: {log.parent}", flush=True)


def _f1s(report_file: Path) -> dict:
    report = json.loads(report_file.read_text())["runs"][0]["report"]
    return {"code": report["code"]["f1"], "subcode": report["subcode"]["f1"], "span": report["span"]["f1"],
            "format_error_rate": report["format_error_rate"], "n_messages": report["n_messages"]}


def _trajectory(metrics_file: Path) -> dict:
    steps, chosen, rejected = [], [], []
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        if "chosen_logp_mean" in record and "step" in record:
            steps.append(record["step"])
            chosen.append(record["chosen_logp_mean"])
            rejected.append(record["rejected_logp_mean"])
    return {"step": steps, "chosen_logp_mean": chosen, "rejected_logp_mean": rejected}


def run_study(out: Path, seeds: list[int]) -> None:
    from pvfast.data.io import write_examples
    from pvfast.data.synth import synthetic_splits

    out.mkdir(parents=True, exist_ok=True)
    test_file = out / "test.jsonl"
    write_examples(test_file, synthetic_splits(TEST_N, 0)["test"])  # held-out phrasings of seed 0
    common = ["--preset", PRESET, "--data.test", str(test_file), "--run.eval_baselines", "false"]

    sft = out / "sft"
    if not (sft / "eval_report.json").is_file():
        print("SFT (shared by every preference run)", flush=True)
        sft.mkdir(exist_ok=True)
        _run(["sft", *common, "--run.output_dir", str(sft)], sft / "log.txt")
    adapter = sft / "adapter"
    pairs = out / "pairs"
    if not (pairs / "preferences.jsonl").is_file():
        # Mine the pairs once from the SFT model (SPEC §4), with a 1-step run whose model is discarded.
        print("pairs from the SFT model's validation predictions", flush=True)
        pairs.mkdir(exist_ok=True)
        _run(["po", *common, "--sft_adapter", str(adapter), "--optim.max_steps", "1", "--run.evaluate", "false",
              "--run.merge_adapter", "false", "--run.output_dir", str(pairs)], pairs / "log.txt")
    for seed in seeds:
        for name, extra in OBJECTIVES.items():
            run_dir = out / f"{name}-seed{seed}"
            if (run_dir / "eval_report.json").is_file():
                continue
            print(f"{name}, seed {seed}", flush=True)
            run_dir.mkdir(exist_ok=True)
            _run(["po", *common, *extra, "--sft_adapter", str(adapter), "--data.train",
                  str(pairs / "preferences.jsonl"), "--run.seed", str(seed), "--run.merge_adapter", "false",
                  "--run.output_dir", str(run_dir)], run_dir / "log.txt")


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def report(out: Path) -> dict:
    results = {"model": "SmolLM2-135M-Instruct", "preset": PRESET, "test_messages": None, "methods": {}}
    if (out / "sft" / "eval_report.json").is_file():
        sft = _f1s(out / "sft" / "eval_report.json")
        results["test_messages"] = sft["n_messages"]
        results["methods"]["sft"] = {"seeds": {"-": sft}}
    for name in OBJECTIVES:
        runs = {}
        for run_dir in sorted(out.glob(f"{name}-seed*")):
            if (run_dir / "eval_report.json").is_file():
                runs[run_dir.name.split("seed")[-1]] = {**_f1s(run_dir / "eval_report.json"),
                                                        "trajectory": _trajectory(run_dir / "po" / "metrics.jsonl")
                                                        if (run_dir / "po").is_dir()
                                                        else _trajectory(run_dir / "metrics.jsonl")}
        if runs:
            results["methods"][name] = {"seeds": runs}
    for method in results["methods"].values():
        for level in ("code", "subcode", "span", "format_error_rate"):
            method[level] = _mean_std([r[level] for r in method["seeds"].values()])
        trajectories = [r["trajectory"] for r in method["seeds"].values() if "trajectory" in r]
        if trajectories:
            method["chosen_logp_first_last"] = _mean_std([t["chosen_logp_mean"][-1] - t["chosen_logp_mean"][0]
                                                          for t in trajectories if t["step"]])
            method["rejected_logp_first_last"] = _mean_std([t["rejected_logp_mean"][-1] - t["rejected_logp_mean"][0]
                                                            for t in trajectories if t["step"]])
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    lines = [f"SmolLM2-135M-Instruct, held-out-phrasing test split ({results['test_messages']} messages); "
             "F1 and format errors in %, mean ± sample std over seeds (n = seeds)",
             "", "| method | n | Code F1 | Sub-code F1 | Span F1 | format errors | Δ chosen logp | Δ rejected logp |",
             "|---|---|---|---|---|---|---|---|"]
    for name, method in results["methods"].items():
        cells = [f"{100 * method[k][0]:.2f} ± {100 * method[k][1]:.2f}"
                 for k in ("code", "subcode", "span", "format_error_rate")]
        deltas = [f"{method[k][0]:+.3f} ± {method[k][1]:.3f}" if k in method else "-"
                  for k in ("chosen_logp_first_last", "rejected_logp_first_last")]
        lines.append(f"| {name} | {len(method['seeds'])} | " + " | ".join(cells + deltas) + " |")
    lines += ["", "Δ logp: mean log-probability per token on the training pairs, last logged step minus first."]
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _plot(results, out / "trajectories.png")
    print("\n".join(lines))
    return results


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    colors = {"dpo": "tab:red", "dpo_positive": "tab:orange", "tabpo": "tab:blue"}
    for name, method in results["methods"].items():
        for seed, run in method["seeds"].items():
            t = run.get("trajectory")
            if not t or not t["step"]:
                continue
            label = f"{name} (seed {seed})"
            axes[0].plot(t["step"], t["chosen_logp_mean"], color=colors.get(name), alpha=0.8, label=label)
            axes[1].plot(t["step"], t["rejected_logp_mean"], color=colors.get(name), alpha=0.8, label=label)
    axes[0].set_title("chosen: mean log-prob per token")
    axes[1].set_title("rejected: mean log-prob per token")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "method_study")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if not args.report_only:
        run_study(args.out, args.seeds)
    report(args.out)


if __name__ == "__main__":
    main()
