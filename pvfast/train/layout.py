"""The names of what a run writes into its output folder (one place, so nothing spells them twice).

    <output_dir>/
        config.json                 the resolved config
        metrics.jsonl               a packing line, then one line per logged step
        training_curves.png
        checkpoints/step-*/         see pvfast.train.checkpoint
        adapter/                    the trained LoRA adapter (PEFT format)
        merged/                     with run.merge_adapter: the adapter merged into full-precision weights
        sft_merged/                 (po) the SFT adapter folded into the base: the PO stage's base model
        reference_cache.safetensors (po, --po.precompute_ref) reference statistics
        eval_report.json            the final evaluation
"""

CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training_curves.png"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
REPORT_FILE = "eval_report.json"
REFERENCE_CACHE_FILE = "reference_cache.safetensors"
SFT_MERGED_DIR = "sft_merged"  # the PO stage's base: SFT adapter folded into the base weights
