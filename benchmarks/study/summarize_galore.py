#!/usr/bin/env python
"""The study table with GaLore (benchmarks/study/galore.sh) beside the switch study's full, lora_warm and relora
(benchmarks/results/2026-12-07-switch-20m/switch.json: the default handover, schedule.at_switch restart), into
benchmarks/results/<date>-galore-20m/.

    python benchmarks/study/summarize_galore.py [--runs runs/study-galore] [--out benchmarks/results/<date>-galore-20m]

Per row: the final held-out perplexity of every seed (the in-distribution split), mean ± sample sd, the mean final
train loss, and one rank's optimizer-state bytes (optimizer_state.py). GaLore's seeds come from its compare runs
(galore-seed<k>/compare.json), copied beside the table; the other rows are the switch study's, as committed.
"""

import json
import os
import re
import shutil
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from summarize import copy_compare_reports, fmt, machine, parse_args, stats, write_summary  # noqa: E402

SWITCH = os.path.join(ROOT, "benchmarks", "results", "2026-12-07-switch-20m", "switch.json")
ROWS = ("full", "lora_warm", "relora", "galore")


def galore_seeds(runs_dir: str) -> dict:
    """{seed: compare's record of the galore variant} of every finished galore-seed<k>/compare.json."""
    found = {}
    for name in sorted(os.listdir(runs_dir)):
        match = re.fullmatch(r"galore-seed(\d+)", name)
        path = os.path.join(runs_dir, name, "compare.json")
        if match and os.path.isfile(path):
            with open(path) as f:
                for record in json.load(f)["variants"]:
                    if record["variant"] == "galore" and record["status"] == "finished":
                        found[match.group(1)] = record
    return found


def row(perplexity: dict, train_loss: dict, state_bytes) -> dict:
    return {"perplexity": perplexity, **{"ppl_" + k: v for k, v in stats(list(perplexity.values())).items()},
            "train_loss_mean": statistics.fmean(train_loss.values()) if train_loss else None,
            "optimizer_state_bytes": state_bytes}


def summarize(runs_dir: str) -> dict:
    with open(SWITCH) as f:
        switch = json.load(f)["rows"]
    with open(os.path.join(runs_dir, "optimizer_state.json")) as f:
        state = json.load(f)
    rows = {name: row(switch[f"{name}/restart"]["perplexity"], switch[f"{name}/restart"]["train_loss"], state[name])
            for name in ROWS if name != "galore"}
    galore = galore_seeds(runs_dir)
    rows["galore"] = row({s: r["eval_perplexity"] for s, r in galore.items()},
                         {s: r["train_loss"] for s, r in galore.items()}, state["galore"])
    checks = {}
    for name in ("full-lr5e-4-seed1", "full-lr4e-3-seed1", "full-seed1"):
        path = os.path.join(runs_dir, name, "compare.json")
        if os.path.isfile(path):
            with open(path) as f:
                report = json.load(f)
            [record] = [r for r in report["variants"] if r["variant"] == "full"]
            sets = [s for s in report["overrides"] if s.startswith("schedule.lr=")]  # compare's --set of the base
            checks[name] = {"eval_perplexity": record["eval_perplexity"], "train_loss": record["train_loss"],
                            "overrides": dict(s.split("=", 1) for s in sets)}
    return {"rows": rows, "checks": checks}


def markdown(summary: dict, runs_dir: str) -> str:
    seeds = sorted({s for r in summary["rows"].values() for s in r["perplexity"]}, key=int)
    lines = ["# GaLore beside full-rank, LoRA and ReLoRA, 20m on SOTU (in-distribution held-out split)", "",
             f"Runs: `bash benchmarks/study/galore.sh` (OUT={runs_dir}), then "
             "`python benchmarks/study/summarize_galore.py`; full, lora_warm and relora are the switch study's "
             "runs (benchmarks/results/2026-12-07-switch-20m/, schedule.at_switch restart, the default).",
             "Base: benchmarks/study/20m-sotu.yaml (1 200 steps of 8 × 128 tokens, peak LR 2e-3, warm-up 100; "
             "lora_warm and relora: warm start 300, r 16, α 32, relora cycles of 300). GaLore from step 0 with the "
             "GaLore paper's settings: rank 64 (d/4), projection recomputed every 200 steps, scale 0.25, the same "
             "peak LR and schedule as full. Held-out perplexity on 100 × 8 × 128 tokens of the 21 speeches the "
             "training split leaves out (benchmarks/study/heldout_split.py). Optimizer state: one rank's optimizer "
             "tensors (Adam moments, GaLore's projections and low-rank moments; fp32), "
             "benchmarks/study/optimizer_state.py.", "",
             "| method | " + " | ".join(f"seed {s}" for s in seeds)
             + " | mean ± sd | final train loss (mean) | optimizer state |",
             "|---|" + "---|" * len(seeds) + "---|---|---|"]
    for name, r in summary["rows"].items():
        sd = f" ± {fmt(r['ppl_sd'])}" if r["ppl_sd"] is not None else ""
        lines.append(f"| `{name}` | " + " | ".join(fmt(r["perplexity"].get(s)) for s in seeds)
                     + f" | {fmt(r['ppl_mean'])}{sd} (n={r['ppl_n']}) | {fmt(r['train_loss_mean'], '.4f')} | "
                     f"{fmt(r['optimizer_state_bytes'] / 2**20, '.1f')} MiB |")
    if summary["checks"]:
        lines += ["", "Checks (seed 1, full-rank, galore.sh):", ""]
        for name, r in summary["checks"].items():
            lines.append(f"- `{name}`: held-out ppl {fmt(r['eval_perplexity'])}, final train loss "
                         f"{fmt(r['train_loss'], '.4f')} "
                         f"({', '.join(f'{k}={v}' for k, v in r['overrides'].items()) or 'the base config'})")
    lines += ["", machine()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv, __doc__, "study-galore", "galore-20m")
    summary = summarize(args.runs)
    write_summary(args.out, "galore", summary, markdown(summary, args.runs))
    shutil.copy(os.path.join(args.runs, "optimizer_state.json"), os.path.join(args.out, "optimizer_state.json"))
    copy_compare_reports(args.runs, args.out, r"galore-seed\d+|full-lr(5e-4|4e-3)-seed1|full-seed1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
