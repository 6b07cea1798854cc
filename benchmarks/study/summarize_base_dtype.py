#!/usr/bin/env python
"""The table of benchmarks/study/base_dtype.sh: held-out perplexity by the frozen W's storage and merge rounding,
with what each merge lost, into benchmarks/results/<date>-base-dtype-20m/.

    python benchmarks/study/summarize_base_dtype.py [--runs runs/study-wdtype] [--out DIR]

Per W: the final held-out perplexity of every seed (<runs>/<W>/seed<k>/relora/result.json), mean ± sample sd, the
paired difference from the fp32 twin of the same seed (mean ± sd: the seed's share of the noise removed), and the
mean final train loss; per merge, from the restart records of metrics.jsonl, the rounding error ||e|| / ||s·B·A||,
the share of s·B·A that W took (<what W took, s·B·A> / ||s·B·A||²) and the drift ||deq(W) − W_exact|| / ||W_exact||
(relora.track_drift), each the mean over the seeds.
"""

import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
from summarize import fmt, machine, parse_args, stats, write_summary  # noqa: E402

from relora_ds.metrics import METRICS_FILE, read_records  # noqa: E402

WS = ("fp32", "bf16-nearest", "bf16-stochastic", "int8-nearest", "int8-stochastic", "fp8-stochastic")
TWIN = "fp32"
MERGE_FIELDS = ("merge_error", "merge_kept", "drift")


def mean_sd(values: list) -> list:
    s = stats(values)
    return [s["mean"], s["sd"]]


def seed_runs(runs_dir: str, w: str) -> dict:
    """{seed: {"result": result.json, "restarts": [restart records]}} of W's finished seeds."""
    found, base = {}, os.path.join(runs_dir, w)
    for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        run = os.path.join(base, name, "relora")
        path = os.path.join(run, "result.json")
        if not (name.startswith("seed") and os.path.isfile(path)):
            continue
        with open(path) as f:
            result = json.load(f)
        if result["status"] != "finished":
            continue
        restarts = [r for r in read_records(os.path.join(run, METRICS_FILE)) if r.get("event") == "restart"]
        found[int(name.removeprefix("seed"))] = {"result": result, "restarts": restarts}
    return found


def summarize(runs_dir: str) -> dict:
    runs = {w: seed_runs(runs_dir, w) for w in WS}
    twin = {s: r["result"]["eval_perplexity"] for s, r in runs[TWIN].items()}
    rows = {}
    for w, seeds in runs.items():
        ppl = {s: r["result"]["eval_perplexity"] for s, r in seeds.items()}
        paired = [ppl[s] - twin[s] for s in ppl if s in twin]
        merges = max((len(r["restarts"]) for r in seeds.values()), default=0)
        per_merge = [{field: mean_sd([r["restarts"][k][field] for r in seeds.values()
                                      if len(r["restarts"]) > k and r["restarts"][k].get(field) is not None])[0]
                      for field in MERGE_FIELDS} | {"step": next(iter(seeds.values()))["restarts"][k]["step"]}
                     for k in range(merges)]
        rows[w] = {"perplexity": ppl, "ppl": mean_sd(list(ppl.values())), "vs_twin": mean_sd(paired),
                   "train_loss": mean_sd([r["result"]["train_loss"] for r in seeds.values()])[0],
                   "tokens_per_s": mean_sd([r["result"]["tokens_per_s"] for r in seeds.values()])[0],
                   "merges": per_merge}
    return {"rows": rows, "seeds": sorted({s for r in rows.values() for s in r["perplexity"]})}


def pm(pair, spec=".2f", sign=False):
    mean, sd = pair
    if mean is None:
        return "—"
    return format(mean, ("+" if sign else "") + spec) + ("" if sd is None else " ± " + format(sd, spec))


def markdown(summary: dict, runs_dir: str) -> str:
    seeds, rows = summary["seeds"], summary["rows"]
    lines = ["# The frozen W's storage and merge rounding, 20m on SOTU (in-distribution held-out split)", "",
             f"Runs: `bash benchmarks/study/base_dtype.sh` (OUT={runs_dir}), then "
             "`python benchmarks/study/summarize_base_dtype.py`. Base: benchmarks/study/20m-sotu.yaml (8 × 128 tokens "
             "a step, peak LR 2e-3, r 16, α 32) for 800 steps: full-rank warm start 200, then ReLoRA with a merge, an "
             "optimizer reset and an LR re-warm-up every 100 steps (five merges, at 300 … 700), "
             "schedule.at_switch restart. Every run computes in fp32 on CPU: only W's storage differs. Held-out "
             "perplexity on 100 × 8 × 128 tokens of the 21 speeches the training split leaves out.", "",
             "| W | " + " | ".join(f"seed {s}" for s in seeds)
             + " | mean ± sd | − fp32 twin (paired) | vs bf16-nearest | final train loss |",
             "|---|" + "---|" * len(seeds) + "---|---|---|---|"]
    reference = rows["bf16-nearest"]["ppl"][0]
    for w, r in rows.items():
        versus = "—" if reference is None or r["ppl"][0] is None else f"{100 * (r['ppl'][0] / reference - 1):+.2f}%"
        lines.append(f"| {w} | " + " | ".join(fmt(r["perplexity"].get(s)) for s in seeds)
                     + f" | {pm(r['ppl'])} (n={len(r['perplexity'])}) | {pm(r['vs_twin'], sign=True)} | {versus} | "
                     f"{fmt(r['train_loss'], '.4f')} |")
    merges = max(len(r["merges"]) for r in rows.values())
    steps = next(r["merges"] for r in rows.values() if len(r["merges"]) == merges)
    header = " | ".join(f"merge at {m['step']}" for m in steps)
    for field, spec, title in (
            ("merge_error", ".2e", "Rounding error of each merge, ||deq(W') − (deq(W) + s·B·A)|| / ||s·B·A||"),
            ("merge_kept", ".4f", "Share of each merge's s·B·A that W took, <deq(W') − deq(W), s·B·A> / ||s·B·A||² "
                                  "(1: all of it, in expectation)"),
            ("drift", ".2e", "Drift after each merge, ||deq(W) − W_exact|| / ||W_exact|| (W_exact: deq(W) before the "
                             "first merge plus every merge's s·B·A unrounded)")):
        lines += ["", f"{title}, mean over the seeds:", "", f"| W | {header} |", "|---|" + "---|" * merges]
        for w, r in rows.items():
            cells = [fmt(m.get(field), spec) for m in r["merges"]] + ["—"] * (merges - len(r["merges"]))
            lines.append(f"| {w} | " + " | ".join(cells) + " |")
    lines += ["", "No speeds here: the runs ran two at a time, one thread each, while other work shared the 2 cores "
              "(their tokens/s are in base_dtype.json, not comparable with each other). " + machine()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv, __doc__, "study-wdtype", "base-dtype-20m")
    summary = summarize(args.runs)
    if not summary["rows"][TWIN]["perplexity"]:
        print(f"error: no finished fp32 twin under {os.path.join(args.runs, TWIN)} (run benchmarks/study/base_dtype.sh)",
              file=sys.stderr)
        return 2
    write_summary(args.out, "base_dtype", summary, markdown(summary, args.runs))
    for w in WS:
        for ext in ("json", "md", "png"):
            src = os.path.join(args.runs, w, f"compare.{ext}")
            if os.path.isfile(src):
                shutil.copy(src, os.path.join(args.out, f"{w}-compare.{ext}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
