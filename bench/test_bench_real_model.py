"""Real model, real prompt: a TAB-PO step of pvfast vs the published layout on SmolLM2-135M-Instruct (CPU).

    python -m pvfast.model setup && python -m pytest bench/test_bench_real_model.py -q -s

The workload is what ``python -m pvfast.train po`` trains on: preference records of the synthetic corpus
(chosen + the three rejected outputs of SPEC §4) under pvfast's full instruction prompt (~3,700 SmolLM2
tokens), SmolLM2-135M-Instruct in fp32 with LoRA r 16 on all seven projections (random adapters, so the
margin, gate and barrier all carry gradient), the TAB-PO objective with its released constants.

- **pvfast**: the trainer's step (:meth:`bench.packing_cases.StepCase.tree_step`): records packed as prefix
  trees into *full* packs of ``TOKEN_BUDGET`` tokens, a reference forward over the same pack (adapters off),
  then forward + backward of the policy.
- **published** (the authors' layout, SPEC §6): every pair as two full sequences (prompt + chosen, prompt +
  rejected), padded into one batch, a reference forward of both, then forward + backward
  (:meth:`~bench.packing_cases.StepCase.unshared_step`).

Both layouts score the same pairs with the same objective: on the first pack's first record the two step-0
losses are asserted equal (fp32, no dropout). A published-layout pair always costs the same (two ~3.9k-token
sequences, whatever the other pairs are), so its pairs/s is measured on that record's three pairs; pvfast's
on the full pack. Peak memory is the step's peak resident memory above the loaded model, measured in a fresh
worker process (``bench.harness.peak_extra_in_worker``). Rows are measured side by side in one session; on a
shared 2-core machine only their ratio means much, and the load average at the time is recorded.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from bench.harness import peak_extra_in_worker
from bench.packing_cases import build_step_case, pvminer_records

SUBJECT = "real_model_po_step"
COLUMNS = ["model", "prompt", "layout", "records", "pairs", "token_budget", "loss", "step_s", "pairs_per_s",
           "peak_extra_MiB", "speedup_pairs_per_s", "memory_ratio", "load_avg_1min"]
TOKEN_BUDGET = 8192  # a full pack here holds ~6 records (18 pairs): one shared prompt, each message once
FULL_PACK_RECORDS = 12  # more than one pack's worth: the first pack is full, the rest is not timed
LORA = dict(r=16, alpha=32)



def _smollm2_ready() -> bool:
    from pvfast.model import smollm2

    return smollm2.is_set_up()


pytestmark = pytest.mark.skipif(not _smollm2_ready(), reason="SmolLM2 is not set up (python -m pvfast.model setup)")


def _model_and_tokenizer():
    from pvfast.config.sections import ModelConfig
    from pvfast.model.loading import add_lora, load_base_model, load_tokenizer
    from pvfast.model.smollm2 import NAME
    from pvfast.testing import activate_lora

    cfg = ModelConfig(name_or_path=NAME, quant="none", dtype="fp32", lora_r=LORA["r"], lora_alpha=LORA["alpha"],
                      lora_dropout=0.0, gradient_checkpointing=False)
    torch.manual_seed(0)
    model = activate_lora(add_lora(load_base_model(cfg, torch.device("cpu")), cfg))
    return model, load_tokenizer(cfg)


def build_case(spec: dict):
    """Worker entry (``bench.harness`` ``builder``): the step of one layout; every call appends its loss and
    wall time to ``spec["log"]`` (the worker runs it twice: a warm-up, then the call whose peak is measured)."""
    model, tokenizer = _model_and_tokenizer()
    case = build_step_case(model, tokenizer, pvminer_records(spec["records"]), TOKEN_BUDGET)
    case.batches = case.batches[:1]  # pvfast: the full first pack (published: one record, one pack)
    step = case.tree_step if spec["layout"] == "pvfast" else case.unshared_step
    pairs = case.batches[0].num_pairs if spec["layout"] == "pvfast" else case.num_pairs

    def timed() -> None:
        started = time.perf_counter()
        loss = step()
        with open(spec["log"], "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"loss": loss, "seconds": time.perf_counter() - started, "pairs": pairs,
                                     "records": len(case.batches[0].record_ids)}) + "\n")
    return timed


def _measure(layout: str, records: int, log) -> dict:
    load = os.getloadavg()[0]
    peak = peak_extra_in_worker({"builder": "bench.test_bench_real_model:build_case", "layout": layout,
                                 "records": records, "log": str(log)}, timeout=3 * 3600)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    seconds = min(c["seconds"] for c in calls)  # the call least disturbed by other processes
    return dict(layout=layout, records=calls[0]["records"], pairs=calls[0]["pairs"], loss=calls[0]["loss"],
                step_s=seconds, pairs_per_s=calls[0]["pairs"] / seconds, peak_extra_MiB=peak / 2**20,
                load_avg_1min=load, token_budget=TOKEN_BUDGET if layout == "pvfast" else "-")


def test_pairs_per_second_peak_memory_and_equal_losses(result_sink, tmp_path):
    """Published layout (one record, 3 pairs) and pvfast (a full pack), each in its own worker process."""
    published = _measure("published", 1, tmp_path / "published.jsonl")
    pvfast = _measure("pvfast", FULL_PACK_RECORDS, tmp_path / "pvfast.jsonl")
    # Step-0 losses on the same pairs: pvfast's tree step over the published row's record.
    model, tokenizer = _model_and_tokenizer()
    same = build_step_case(model, tokenizer, pvminer_records(1), TOKEN_BUDGET)
    assert same.tree_step() == pytest.approx(published["loss"], rel=1e-4, abs=1e-5)
    pvfast["speedup_pairs_per_s"] = pvfast["pairs_per_s"] / published["pairs_per_s"]
    pvfast["memory_ratio"] = published["peak_extra_MiB"] / pvfast["peak_extra_MiB"]
    sink = result_sink(SUBJECT, "cpu", COLUMNS)
    for row in (published, pvfast):
        sink.add(model="SmolLM2-135M-Instruct fp32, LoRA r16 (7 projections)",
                 prompt="full instruction (~3.7k tok)", **row)
