#!/usr/bin/env python
"""Collect the CPU-scale study (benchmarks/study/run.sh) into benchmarks/results/<date>-study-20m/.

    python benchmarks/study/summarize.py [--runs runs/study-20m] [--out benchmarks/results/<date>-study-20m]

Copies each comparison's compare.{json,md,png} and spectra.{json,png} (as <name>-compare.*, <name>-spectra.*),
and writes study.md: the main table (the paper's Table 2 and Table 6 variants) and one row per ablation variant
beside the base's row of the same variant, with the difference in held-out perplexity. Nothing is computed here
that compare did not already write; a comparison that has not finished shows as such.
"""

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
ORDER = ("main", "base-rerun", "lr-1.5x", "lr-2x", "cycle-100", "cycle-150", "no-pair-moments", "rank-32", "warm-150", "warm-600",
         "full-lr-0.5x")


def fmt(value, spec=".2f"):
    return "—" if value is None else format(value, spec)


def stats(values: list) -> dict:
    """n, mean and sample sd (None where there are too few values)."""
    return {"n": len(values), "mean": statistics.fmean(values) if values else None,
            "sd": statistics.stdev(values) if len(values) > 1 else None}


def parse_args(argv, doc: str, runs: str, results: str) -> argparse.Namespace:
    """A summarizer's two options: --runs (default runs/<runs>) and --out (default
    benchmarks/results/<today>-<results>)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", runs))
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                 f"{datetime.date.today().isoformat()}-{results}"))
    return p.parse_args(argv)


def row(name, v, base=None):
    delta = ""
    if base is not None and v.get("eval_perplexity") is not None and base.get("eval_perplexity") is not None:
        delta = f"{v['eval_perplexity'] - base['eval_perplexity']:+.2f}"
    status = v["status"] if v["status"] != "diverged" else f"diverged at {v.get('diverged_at')}"
    return (f"| {name} | `{v['variant']}` | {status} | {fmt(v.get('eval_loss'), '.4f')} | "
            f"{fmt(v.get('eval_perplexity'), '.2f')} | {delta} | {fmt(v.get('trainable_params'), ',')} | "
            f"{v.get('restarts', 0)} | {fmt(v.get('epochs'), '.2f')} | {fmt(v.get('num_above_0_1'), ',')} |")


def machine() -> str:
    """Where the summary was written: CPU, cores, memory, versions (the runs themselves ran on this machine)."""
    import platform

    from relora_ds.hardware import host, package_versions

    info = host()
    versions = package_versions(("torch", "deepspeed", "transformers", "tokenizers", "relora-ds"))
    return (f"Machine: {info['cpu_model']}, {info['cpu_count']} cores, {info['memory_bytes'] / 2**30:.1f} GiB; "
            f"python {platform.python_version()}, "
            + ", ".join(f"{k} {v}" for k, v in versions.items() if v)
            + f". Summarized {datetime.datetime.now().isoformat(timespec='seconds')}.")


def copy_compare_reports(runs_dir: str, out_dir: str, pattern: str) -> None:
    """Copy <runs_dir>/<name>/compare.{json,md,png} of every <name> matching `pattern` (a regular expression) to
    <out_dir>/<name>-compare.*."""
    for name in sorted(os.listdir(runs_dir)):
        for ext in ("json", "md", "png"):
            src = os.path.join(runs_dir, name, f"compare.{ext}")
            if re.fullmatch(pattern, name) and os.path.isfile(src):
                shutil.copy(src, os.path.join(out_dir, f"{name}-compare.{ext}"))


def write_summary(out_dir: str, stem: str, summary: dict, text: str) -> None:
    """<out_dir>/<stem>.json (the numbers) and <stem>.md (the table), printed."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write(text)
    print(text)


def main(argv=None) -> int:
    args = parse_args(argv, __doc__, "study-20m", "study-20m")
    reports = {}
    for name in ORDER:
        path = os.path.join(args.runs, name, "compare.json")
        if os.path.isfile(path):
            with open(path) as f:
                reports[name] = json.load(f)
    if "main" not in reports:
        print(f"error: {os.path.join(args.runs, 'main', 'compare.json')}: the main comparison has no report yet "
              f"(bash benchmarks/study/run.sh main)", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    for name in reports:
        for what, exts in (("compare", ("json", "md", "png")), ("spectra", ("json", "png"))):
            for ext in exts:
                src = os.path.join(args.runs, name, f"{what}.{ext}")
                if os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(args.out, f"{name}-{what}.{ext}"))
    head = ("| comparison | variant | status | eval loss | eval ppl | Δ ppl vs base | trainable params | restarts | "
            "epochs | σ>0.1 |", "|---|---|---|---|---|---|---|---|---|---|")
    base = {v["variant"]: v for v in reports["main"]["variants"]}
    lines = ["# CPU-scale study: 20m on SOTU (benchmarks/study/20m-sotu.yaml)", "",
             "Written by `python benchmarks/study/summarize.py` from the `relora-ds compare` reports of "
             "`bash benchmarks/study/run.sh`.", "", machine(), "", "## Main comparison (Table 2 and Table 6 variants)", "", *head]
    lines += [row("main", v) for v in reports["main"]["variants"]]
    ablations = [n for n in ORDER[1:] if n in reports]
    missing = [n for n in ORDER[1:] if n not in reports]
    lines += ["", "## One factor at a time (Δ ppl: against the same variant of the main comparison)", "", *head]
    for name in ablations:
        lines += [row(name, v, base.get(v["variant"])) for v in reports[name]["variants"]]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)}."]
    for name in reports:
        for note in reports[name].get("notes", []):
            lines.append(f"- {name}: {note}")
    with open(os.path.join(args.out, "study.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"written: {args.out}/study.md and {len(reports)} comparison report(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
