#!/usr/bin/env python
"""Collect the switch study (benchmarks/study/switch.sh) into benchmarks/results/<date>-switch-20m/.

    python benchmarks/study/summarize_switch.py [--runs runs/study-switch] [--out benchmarks/results/<date>-switch-20m]

For each variant and schedule.at_switch mode: the final held-out perplexity (the in-distribution split) of every
seed, their mean ± sample standard deviation, and the mean of the final train loss; restart against continue per
seed (the paired difference, which removes the seed's share of the noise). Writes switch.md and switch.json and
copies each comparison's compare.{json,md,png} as <mode>-seed<k>-compare.* (full-seed<k>: the full-rank run). Nothing is computed here that compare
did not already write; a run that has not finished is left out of the mean and listed.
"""

import json
import os
import re
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from summarize import copy_compare_reports, fmt, machine, parse_args, stats, write_summary  # noqa: E402

ROWS = (("full", "restart"), ("lora_warm", "continue"), ("lora_warm", "restart"), ("relora", "continue"),
        ("relora", "restart"))  # full does not switch: it runs once (full-seed<k>), listed under the default


def read_runs(runs_dir: str) -> dict:
    """{(variant, mode): {seed: compare's record of that variant}} of every <mode>-seed<k>/compare.json."""
    found = {}
    for name in sorted(os.listdir(runs_dir)):
        match = re.fullmatch(r"(restart|continue|full)-seed(\d+)", name)
        path = os.path.join(runs_dir, name, "compare.json")
        if not match or not os.path.isfile(path):
            continue
        with open(path) as f:
            report = json.load(f)
        for record in report["variants"]:
            mode = "restart" if record["variant"] == "full" else match.group(1)  # full: the default's row
            found.setdefault((record["variant"], mode), {})[int(match.group(2))] = record
    return found


def summarize(runs: dict) -> dict:
    table = {}
    for variant, mode in ROWS:
        seeds = runs.get((variant, mode), {})
        done = {s: r for s, r in seeds.items() if r["status"] == "finished" and r.get("eval_perplexity") is not None}
        table[f"{variant}/{mode}"] = {
            "variant": variant, "at_switch": mode if variant != "full" else None,
            "perplexity": {str(s): r["eval_perplexity"] for s, r in sorted(done.items())},
            "train_loss": {str(s): r["train_loss"] for s, r in sorted(done.items())},
            "not_finished": sorted(s for s in seeds if s not in done),
            **{"ppl_" + k: v for k, v in stats(list(r["eval_perplexity"] for r in done.values())).items()},
            "train_loss_mean": statistics.fmean(r["train_loss"] for r in done.values()) if done else None}
    paired = {}
    for variant in ("lora_warm", "relora"):
        restart, continued = table[f"{variant}/restart"]["perplexity"], table[f"{variant}/continue"]["perplexity"]
        diffs = [restart[s] - continued[s] for s in restart if s in continued]
        paired[variant] = {"restart_minus_continue": dict(zip([s for s in restart if s in continued], diffs)),
                           **stats(diffs)}
    return {"rows": table, "paired": paired}


def markdown(summary: dict, runs_dir: str) -> str:
    seeds = sorted({s for row in summary["rows"].values() for s in row["perplexity"]}, key=int)
    lines = ["# The LR schedule at the warm-start switch, 20m on SOTU (in-distribution held-out split)", "",
             f"Runs: `bash benchmarks/study/switch.sh` (OUT={runs_dir}), then `python benchmarks/study/summarize_switch.py`.",
             "Base: benchmarks/study/20m-sotu.yaml (1 200 steps of 8 × 128 tokens, warm start 300, cycles of 300, "
             "r 16, α 32, peak LR 2e-3, warm-up 100, restart warm-up 50; lora_warm and relora start from full's "
             "step-300 checkpoint of the same seed); trained on 190 of SOTU's 211 training "
             "speeches, held-out perplexity on 100 × 8 × 128 tokens of the other 21 (every tenth: "
             "benchmarks/study/heldout_split.py).", "",
             "| variant | schedule.at_switch | " + " | ".join(f"seed {s}" for s in seeds)
             + " | mean ± sd | final train loss (mean) |",
             "|---|---|" + "---|" * len(seeds) + "---|---|"]
    for key, row in summary["rows"].items():
        cells = [fmt(row["perplexity"].get(s)) for s in seeds]
        sd = f" ± {fmt(row['ppl_sd'])}" if row["ppl_sd"] is not None else ""
        lines.append(f"| `{row['variant']}` | {row['at_switch'] or '(no switch)'} | " + " | ".join(cells)
                     + f" | {fmt(row['ppl_mean'])}{sd} (n={row['ppl_n']}) | {fmt(row['train_loss_mean'], '.4f')} |")
    lines += ["", "Restart minus continue, per seed (negative: restart is better):", ""]
    for variant, p in summary["paired"].items():
        per_seed = ", ".join(f"seed {s}: {d:+.2f}" for s, d in p["restart_minus_continue"].items())
        sd = f" ± {fmt(p['sd'])}" if p["sd"] is not None else ""
        lines.append(f"- `{variant}`: {per_seed or 'no pair yet'}; mean {fmt(p['mean'], '+.2f')}{sd} (n={p['n']})")
    unfinished = [f"{k} seed {s}" for k, row in summary["rows"].items() for s in row["not_finished"]]
    if unfinished:
        lines += ["", "Not finished: " + ", ".join(unfinished)]
    lines += ["", machine()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv, __doc__, "study-switch", "switch-20m")
    summary = summarize(read_runs(args.runs))
    write_summary(args.out, "switch", summary, markdown(summary, args.runs))
    copy_compare_reports(args.runs, args.out, r"(restart|continue|full)-seed\d+")
    return 0


if __name__ == "__main__":
    sys.exit(main())
