"""`relora-ds plan` against the scale rehearsals: for each committed benchmarks/results/*-scale-*.json, the plan of
the same run (preset, stage, precision, ranks, rank, base_dtype, checkpointing, micro-batch, sequence) beside the
measured per-rank peak of each phase, and their ratio.

    python benchmarks/plan_check.py            # every scale result; writes results/<date>-plan-check.{json,md}
    python benchmarks/plan_check.py benchmarks/results/2026-12-07-scale-1b-zero2-bf16-int8.json

Measured phases map to the plan's: build and the steps before any step (the engine made) → build; steps up to the warm
start → full-rank steps; later steps, resumed ones too → low-rank steps; a checkpoint up to the warm start (the switch's
reference) → full-rank checkpoint; restart, checkpoint (resumed too), resume, export. The peak of a phase is the largest
measured over its rows. Records without their DeepSpeed JSON (written before scale.py kept it), "-before" records (a
bug's measurement, kept beside its fix) and resumes on another number of ranks are skipped. A benchmark, not a test.
"""

import datetime
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from relora_ds.config import RunConfig  # noqa: E402
from relora_ds.files import atomic_write  # noqa: E402
from relora_ds.memory import GIB  # noqa: E402
from relora_ds.plan import make_plan  # noqa: E402


def plan_phase(row: dict, warm_start: int) -> str | None:
    phase, step = row["phase"], row["step"]
    if phase == "build" or (phase == "steps" and step == 0):
        return "build"
    if phase == "steps":
        return "full-rank steps" if step <= warm_start else "low-rank steps"
    if phase == "steps (resumed)":
        return "low-rank steps"
    if phase.startswith("checkpoint"):
        return "full-rank checkpoint" if phase == "checkpoint" and step <= warm_start else "checkpoint"
    return phase if phase in ("restart", "resume") else None


def check(path: str) -> dict:
    with open(path) as f:
        record = json.load(f)
    a = record["args"]
    cfg = RunConfig.from_dict({
        "method": "relora", "model": {"preset": a["preset"], "vocab_size": record["vocab_size"]},
        "relora": {"rank": a["rank"], "warm_start_steps": a["warm_start"], "reset_every": 2,
                   "base_dtype": a.get("base_dtype", "auto")},
        "schedule": {"warmup_steps": 1, "restart_warmup_steps": 1}, "data": {"seq_len": a["seq_len"]},
        "train": {"total_steps": a["warm_start"] + a["steps_after"],
                  "activation_checkpointing": a.get("activation_checkpointing", "none")}})
    rows = []
    for world in record["worlds"]:
        plan = make_plan(cfg, record["ds_config"], world["ranks"], record["vocab_size"])
        measured = {}
        for row in world["phases"]:
            name = plan_phase(row, a["warm_start"])
            if name is not None:
                measured[name] = max(measured.get(name, 0.0), row["peak_gib"])
        measured["export"] = world["export"]["peak_gib"]
        for name, components in plan.phases.items():
            if name in measured:
                predicted = components.total / GIB
                rows.append({"run": os.path.basename(path)[:-5], "ranks": world["ranks"], "phase": name,
                             "measured_gib": measured[name], "plan_gib": predicted,
                             "ratio": predicted / measured[name]})
    return {"path": path, "rows": rows}


def comparable(record: dict) -> bool:
    return "ds_config" in record and all(w.get("resume_ranks", w["ranks"]) == w["ranks"] for w in record["worlds"])


def main(argv=None) -> int:
    paths = (argv if argv else None) or sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*-scale-*.json")))
    # Records without their DeepSpeed JSON are older than this check; "-before" records measured a bug since fixed;
    # a resume on another world size (--resume-ranks) mixes two worlds in one record.
    results = [check(p) for p in paths if comparable(json.load(open(p))) and "-before" not in os.path.basename(p)]
    rows = [r for result in results for r in result["rows"]]
    within = sum(abs(r["ratio"] - 1) <= 0.15 for r in rows)
    lines = ["# `relora-ds plan` against the scale rehearsals", "",
             f"{datetime.date.today().isoformat()} · command: `python benchmarks/plan_check.py`", "",
             f"{within} of {len(rows)} phase peaks within ±15%.", "",
             "| run | ranks | phase | measured GiB | plan GiB | plan / measured |", "|---|---|---|---|---|---|"]
    for r in rows:
        flag = "" if abs(r["ratio"] - 1) <= 0.15 else " **outside ±15%**"
        lines.append(f"| {r['run']} | {r['ranks']} | {r['phase']} | {r['measured_gib']:.2f} | {r['plan_gib']:.2f} | "
                     f"{r['ratio']:.2f}{flag} |")
    text = "\n".join(lines) + "\n"
    print(text)
    stem = os.path.join(ROOT, "benchmarks", "results", f"{datetime.date.today().isoformat()}-plan-check")
    atomic_write(stem + ".json", json.dumps(rows, indent=1))
    atomic_write(stem + ".md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
