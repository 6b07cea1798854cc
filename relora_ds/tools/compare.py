"""`relora-ds compare`: the ReLoRA paper's comparisons (Table 2 and the Table 6 ablations) in one command.

    relora-ds compare --config BASE.yaml --out DIR [--variants full,lora,lora_warm,relora] [--set key=value ...]
    relora-ds compare --config BASE.yaml --out DIR --variant lora     # one variant (e.g. one SLURM job each)
    relora-ds compare --config BASE.yaml --out DIR --report           # only the report, from what has finished
    relora-ds compare --config BASE.yaml --out DIR --seeds 1,2,3      # each variant once per train.seed

BASE.yaml is a ReLoRA run (method relora) with a full-rank warm start W = relora.warm_start_steps > 0 and
held-out evaluation (train.eval_every > 0). Each variant is that config with a few fields changed (VARIANTS below);
everything else — train.total_steps, data, seed, model, DeepSpeed config and so batch — is the base's, so every
variant trains the same number of steps on the same data:

    full       method full, relora.warm_start_steps 0, checkpoint.reference_step W
               (full-rank throughout; its ΔW is measured from step W, like the others' from the switch)
    lora       method lora, relora.warm_start_steps 0   (adapters from step 0, never merged)
    lora_warm  method lora                              (the base's warm start W, then adapters, never merged)
    relora     the base as it is                             (warm start, merges, optimizer resets, jagged LR)
    no_reset   relora.optimizer_reset none                   (merges and LR re-warm-ups, no moment pruning)
    no_jagged  schedule.kind cosine                          (merges and resets, no LR re-warm-up at the restarts)
    no_warm    relora.warm_start_steps 0                     (ReLoRA from step 0)

The LR at the switch (schedule.at_switch) is the base's for every variant that switches (lora_warm, relora,
no_reset, no_jagged): a new schedule for the low-rank phase (restart, the default) or the full-rank cosine going on
(continue); full never switches, so its schedule is the same under both.

`--set key=value` edits the base config, as if written into BASE.yaml: the variants are derived from the edited
base, so a --set changes every variant except where a variant defines that key (`--set relora.warm_start_steps=200`
moves the warm start of lora_warm and relora and full's reference step alike; `--set relora.optimizer_reset=random`
leaves no_reset at none: that key is what no_reset is). Compare itself sets train.output_dir (DIR/<variant>),
train.resume (auto), checkpoint.at_switch and checkpoint.save_final (true: the spectra need the reference and the
final weights) for every variant; a --set of one of those is refused.

Variants run one after another in this process (under a launcher every rank runs the same sequence), each in
DIR/<variant>. At its end DIR/<variant>/result.json is written (atomically): a later call skips that variant, and
continues an unfinished one from its newest checkpoint (train.resume auto). A result made with another config is
refused rather than reused. A variant whose loss goes non-finite (errors.NonFiniteError) is recorded as diverged
at that step and the others still run; any other error stops the command with its one-line message, and a stop
signal (checkpoint.stop_signals) stops it with exit code 75 and no result for the variant in training. Delete
DIR/<variant>/result.json to run a variant again.

`--seeds 1,2,3` runs every variant once per seed (train.seed; a --set of it is refused), each in
DIR/seed<k>/<variant>, and the report gives each variant's mean ± sample standard deviation over its finished seeds
above the table of the single runs.

The report (rank 0): DIR/compare.json and DIR/compare.md — per variant its status, final held-out loss and
perplexity, final train loss, trainable parameters, optimizer-state bytes, median tokens/s, restarts (merges), epochs of the training data
seen (one line on stderr when a variant passes one epoch), and the number of singular values of ΔW above 0.1
(relora_ds.tools.analyze) — and DIR/compare.png, the held-out and train losses of all variants overlaid.
"""

import argparse
import copy
import gc
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass
from typing import Callable

from relora_ds import dist
from relora_ds.config import SECTIONS, ConfigError, RunConfig, load_config, validate
from relora_ds.errors import NonFiniteError
from relora_ds.files import atomic_write
from relora_ds.methods import METHODS
from relora_ds.metrics import METRICS_FILE, read_records

RESULT_FILE = "result.json"
REPORT_JSON, REPORT_MD, REPORT_PNG = "compare.json", "compare.md", "compare.png"


class CompareError(ConfigError):
    """A compare command that cannot run as asked (base config, variant names, a stale result); one line."""


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    overrides: Callable[[RunConfig], dict]  # base config → {dotted key: value}: the keys that define the variant


# Every method's variants (Method.compare_variants), in the registry's order: a new method file brings its own.
VARIANTS = {name: Variant(name, description, overrides)
            for method in METHODS.values() for name, description, overrides in method.compare_variants()}
DEFAULT_VARIANTS = ("full", "lora", "lora_warm", "relora")  # the paper's Table 2

# What compare sets in every variant (so a --set of these is refused); train.output_dir is DIR/<variant>.
COMPARE_SETS = {"train.resume": "auto", "checkpoint.at_switch": True, "checkpoint.save_final": True}
COMPARE_KEYS = ("train.output_dir", *COMPARE_SETS)
SEED_KEY = "train.seed"  # set per run by --seeds
# Fields that do not change what a variant computes: a finished result is reused whatever they say. data.skip is
# among them because a rewind (train.nonfinite_rewinds) adds its entries to a variant's config.yaml.
NOT_COMPARED = ("log.", "checkpoint.every", "checkpoint.keep_last", "checkpoint.stop_signals", "train.output_dir",
                "train.resume", "data.skip")  # "checkpoint.every" covers checkpoint.every_minutes too (a prefix)


# --- configs ----------------------------------------------------------------------------------------------------

def parse_seeds(text: str) -> list[int]:
    """"1, 2,3" → [1, 2, 3] (in order, once each); anything but non-negative integers is a one-line error."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items or not all(item.isdigit() for item in items):
        raise CompareError(f"--seeds: a comma-separated list of non-negative integers (e.g. 1,2,3), got {text!r}")
    return list(dict.fromkeys(int(item) for item in items))


def run_key(name: str, seed: int | None) -> str:
    """A run's directory under --out: <variant>, or seed<k>/<variant> with --seeds."""
    return name if seed is None else f"seed{seed}/{name}"


def parse_variants(text: str) -> list[str]:
    """"full, lora,relora" → ["full", "lora", "relora"] (in order, once each); an unknown name is a one-line error."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        what = f"unknown variant {unknown[0]!r}" if unknown else "no variant named"
        raise CompareError(f"--variants: {what} (valid: {', '.join(VARIANTS)})")
    return names


def base_config(path: str | None, overrides=()) -> RunConfig:
    """BASE.yaml with the --set overrides, checked to be a ReLoRA run with a warm start and held-out eval."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in COMPARE_KEYS:
            raise CompareError(f"--set {key}: relora-ds compare sets it for every variant (train.output_dir: "
                               f"--out DIR/<variant>; {', '.join(f'{k} {_yaml(v)}' for k, v in COMPARE_SETS.items())})")
    cfg = load_config(path, overrides)
    if cfg.method != "relora":
        raise CompareError(f"method: the base config of relora-ds compare must be a ReLoRA run (relora), "
                           f"got {cfg.method!r}")
    if cfg.relora.warm_start_steps <= 0:
        raise CompareError(f"relora.warm_start_steps: the base config of relora-ds compare needs a full-rank warm "
                           f"start (> 0; lora_warm and full's reference step use it), got {cfg.relora.warm_start_steps}")
    if cfg.train.eval_every <= 0:
        raise CompareError(f"train.eval_every: relora-ds compare compares held-out losses, so it must be > 0, "
                           f"got {cfg.train.eval_every}")
    return cfg


def variant_overrides(base: RunConfig, name: str) -> dict:
    """The dotted fields that make `name` out of the base config."""
    return VARIANTS[name].overrides(base)


def variant_config(base: RunConfig, name: str, out_dir: str) -> RunConfig:
    """The base config with the variant's fields and compare's own (COMPARE_SETS, train.output_dir), validated."""
    cfg = copy.deepcopy(base)
    for key, value in {**variant_overrides(base, name), **COMPARE_SETS, "train.output_dir": out_dir}.items():
        section, _, field_name = key.rpartition(".")
        setattr(getattr(cfg, section) if section else cfg, field_name, value)
    errors = validate(cfg)
    if errors:
        raise CompareError(f"variant {name}: " + "; ".join(errors))
    return cfg.resolved()


def config_differences(saved: dict, cfg: RunConfig, limit: int = 3) -> list[str]:
    """'schedule.lr 0.002 there, 0.001 here' for the fields (NOT_COMPARED aside) where `saved` differs from `cfg`."""
    now = cfg.to_dict()
    found = []
    there = saved.get("method", (saved.get("relora") or {}).get("mode", cfg.method))  # relora.mode: the old name
    if there != cfg.method:
        found.append(f"method {_yaml(there)} there, {_yaml(cfg.method)} here")
    for section in SECTIONS:
        for key, value in now[section].items():
            dotted = f"{section}.{key}"
            if any(dotted.startswith(p) for p in NOT_COMPARED):
                continue
            there = (saved.get(section) or {}).get(key, value)
            if there != value:
                found.append(f"{dotted} {_yaml(there)} there, {_yaml(value)} here")
    return found[:limit]


# --- one variant --------------------------------------------------------------------------------------------------

def read_result(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, RESULT_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_same_config(name: str, cfg: RunConfig) -> None:
    """Refuse to reuse or continue a variant's directory made with another config (its result or config.yaml)."""
    out = cfg.train.output_dir
    result = read_result(out)
    saved = result.get("config") if result else None
    what = RESULT_FILE
    if saved is None and os.path.isfile(os.path.join(out, "config.yaml")):
        import yaml

        with open(os.path.join(out, "config.yaml")) as f:
            saved, what = yaml.safe_load(f) or {}, "config.yaml"
    differences = config_differences(saved, cfg) if saved else []
    if differences:
        raise CompareError(f"variant {name}: {os.path.join(out, what)} was made with another config "
                           f"({'; '.join(differences)}); use another --out, or delete {out} to run it again")


def run_variant(name: str, cfg: RunConfig, overrides: dict) -> dict:
    """Train one variant (or take its finished result.json); returns its result. Writes result.json on rank 0.
    `overrides`: the variant's own fields (variant_overrides), recorded in the result."""
    from relora_ds import trainer
    from relora_ds.memory import release_memory

    check_same_config(name, cfg)
    out = cfg.train.output_dir
    done = read_result(out)
    if done is not None:
        _say(f"compare: {name}: {done['status']} before ({os.path.join(out, RESULT_FILE)}); not run again")
        return done
    _say(f"compare: {name}: {VARIANTS[name].description} -> {out}")
    counts, error, diverged_at = {}, None, None
    try:  # a stop signal raises stop.Stopped: no result, so the next `compare` continues this variant
        summary = trainer.train_command(cfg, f"variant {name} of compare; run the same command again to continue")
    except NonFiniteError as e:
        error, diverged_at = str(e), e.step
    else:
        counts = {k: summary[k] for k in ("total_params", "trainable_params", "optimizer_state_bytes")}
    gc.collect()  # a diverged run's engine was never destroyed: drop it before the next variant builds its own
    release_memory()
    result = result_of_run(name, cfg, overrides, counts, error, diverged_at)
    if dist.is_rank_zero():
        atomic_write(os.path.join(out, RESULT_FILE), json.dumps(result, indent=2) + "\n")
    dist.barrier()
    _say(f"compare: {name}: {status_text(result)}")
    return result


def result_of_run(name: str, cfg: RunConfig, overrides: dict, counts: dict, error: str | None,
                  diverged_at: int | None = None) -> dict:
    """A variant's numbers, from its metrics.jsonl (the whole run, across resumes) and the engine's parameter
    counts; `overrides`: the variant's own fields; `error`, `diverged_at`: the NonFiniteError of a diverged run."""
    path = os.path.join(cfg.train.output_dir, METRICS_FILE)
    records = read_records(path) if os.path.isfile(path) else []
    steps = [r for r in records if "event" not in r]
    evals = [r for r in records if r.get("event") == "eval" and _finite(r.get("loss"))]
    data = [r for r in records if r.get("event") == "data" and r.get("train_tokens")]
    speeds = [r["tokens_per_s"] for r in steps if _finite(r.get("tokens_per_s"))]
    losses = [r for r in steps if _finite(r.get("loss"))]
    tokens_seen = steps[-1].get("tokens_seen") if steps else None
    train_tokens = data[-1]["train_tokens"] if data else None
    return {
        "variant": name,
        "description": VARIANTS[name].description,
        "overrides": overrides,
        "status": "diverged" if error else "finished",
        "diverged_at": diverged_at,
        "error": error,
        "steps": steps[-1]["step"] if steps else 0,
        "total_steps": cfg.train.total_steps,
        "eval_step": evals[-1]["step"] if evals else None,
        "eval_loss": evals[-1]["loss"] if evals else None,
        "eval_perplexity": evals[-1].get("perplexity") if evals else None,
        "train_loss": losses[-1]["loss"] if losses else None,
        "trainable_params": counts.get("trainable_params"),
        "total_params": counts.get("total_params"),
        "optimizer_state_bytes": counts.get("optimizer_state_bytes"),
        "tokens_per_s": statistics.median(speeds) if speeds else None,
        "restarts": sum(r.get("event") == "restart" for r in records),
        "tokens_seen": tokens_seen,
        "train_tokens": train_tokens,
        "epochs": tokens_seen / train_tokens if tokens_seen and train_tokens else None,
        "config": cfg.to_dict(),
    }


def not_run_result(name: str, cfg: RunConfig, overrides: dict) -> dict:
    """The report's entry of a variant without result.json: not run, or unfinished at its last logged step."""
    result = result_of_run(name, cfg, overrides, {}, None)
    result.update(status="unfinished" if result["steps"] else "not run", trainable_params=None, total_params=None,
                  optimizer_state_bytes=None)
    return result


def status_text(result: dict) -> str:
    status = result["status"]
    if status == "diverged":
        return f"diverged at step {result['diverged_at']}"
    if status == "unfinished":
        return f"unfinished (step {result['steps']} of {result['total_steps']})"
    return status


def epoch_warning(result: dict) -> str | None:
    epochs = result.get("epochs")
    if epochs is None or epochs <= 1:
        return None
    return (f"warning: compare: variant {result['variant']} passed one epoch of its training data ({epochs:.2f} "
            f"epochs of {result['train_tokens']:,} tokens): its losses are on repeated data")


# --- the whole comparison ------------------------------------------------------------------------------------------

def compare(base_path: str | None, names, out: str, overrides=(), *, only: str | None = None,
            report_only: bool = False, seeds: list[int] | None = None) -> dict:
    """Run the variants `names` (or just `only`) of the base config into `out`/<variant> (with `seeds`: once per
    seed, into `out`/seed<k>/<variant>), then (not with `only`) write the report. Every run's config is built and
    checked before anything runs. Returns {run_key: result}."""
    names = list(names)
    if only is not None and only not in names:
        raise CompareError(f"--variant {only!r}: not among --variants ({', '.join(names)})")
    if seeds is not None and any(item.partition("=")[0].strip() == SEED_KEY for item in overrides):
        raise CompareError(f"--set {SEED_KEY}: --seeds sets it for every run; give the seeds to --seeds only")
    base = base_config(base_path, overrides)
    runs = {}  # run key → (variant, its config)
    for seed in (seeds if seeds is not None else [None]):
        seeded = copy.deepcopy(base)
        if seed is not None:
            seeded.train.seed = seed
        for name in names:
            runs[run_key(name, seed)] = (name, variant_config(seeded, name, os.path.join(out, run_key(name, seed))))
    own = {name: variant_overrides(base, name) for name in names}
    if report_only:
        for name, cfg in runs.values():
            check_same_config(name, cfg)
        results = {key: read_result(cfg.train.output_dir) or not_run_result(name, cfg, own[name])
                   for key, (name, cfg) in runs.items()}
    else:
        results = {key: run_variant(name, cfg, own[name]) for key, (name, cfg) in runs.items()
                   if only is None or name == only}
    for result in results.values():
        warning = epoch_warning(result)
        if warning and dist.is_rank_zero():
            print(warning, file=sys.stderr, flush=True)
    if only is not None:
        _say(f"compare: run `relora-ds compare` without --variant (or with --report) to write the report of {out}")
        return results
    if dist.is_rank_zero():
        spectra = spectra_of(out, results)
        plot_compare(out, results)
        write_report(out, base_path, list(overrides), results, spectra, seeds)
        _say(f"compare: report in {os.path.join(out, REPORT_MD)} ({REPORT_JSON}, {REPORT_PNG})")
    dist.barrier()
    return results


def spectra_of(out: str, results: dict) -> dict:
    """σ>0.1 counts of each finished variant's ΔW (relora_ds.tools.analyze) and the spectra files: {"summaries":
    {name: summarize(...)}, "json", "png", "notes": [...]}."""
    finished = [name for name, r in results.items() if r["status"] == "finished"]
    spectra = {"summaries": {}, "json": None, "png": None, "notes": []}
    try:
        from relora_ds.tools import analyze
    except ImportError as e:
        spectra["notes"].append(f"no ΔW spectra: relora_ds.tools.analyze is not available ({e})")
        return spectra
    analyses = {}
    for name in finished:
        try:
            analyses[name] = analyze.analyze_run(os.path.join(out, name))
        except (ValueError, OSError) as e:  # the project's one-line errors (no reference checkpoint, ...)
            spectra["notes"].append(f"no ΔW spectra for {name}: {str(e).splitlines()[0] if str(e) else e!r}")
            continue
        spectra["summaries"][name] = analyze.summarize(analyses[name])
    if analyses:
        spectra["json"], spectra["png"] = analyze.write_spectra(analyses, out)
    return spectra


def plot_compare(out: str, results: dict) -> str:
    """DIR/compare.png: held-out loss (left) and train loss (right) of every variant, restarts marked (▼)."""
    from matplotlib.figure import Figure

    from relora_ds.plots import read_curves, save_figure, smooth

    fig = Figure(figsize=(13, 5.5), dpi=100)
    ax_eval, ax_train = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    restart_label = "restarts (merges)"  # in the legend once
    for i, (name, result) in enumerate(results.items()):
        path = os.path.join(out, name, METRICS_FILE)
        if not os.path.isfile(path):
            continue
        curves, color = read_curves(path), f"C{i % 10}"
        label = name if result["status"] == "finished" else f"{name} ({status_text(result)})"  # name: the run key
        if curves.eval_steps:
            ax_eval.plot(curves.eval_steps, curves.eval_losses, "o-", color=color, markersize=4, label=label)
        if curves.steps:
            window = max(1, len(curves.losses) // 50)
            losses = smooth(curves.losses, window)
            ax_train.plot(curves.steps, losses, color=color, linewidth=1.4, label=label)
            at = [min(range(len(curves.steps)), key=lambda k: abs(curves.steps[k] - s)) for s in curves.restart_steps]
            if at:
                ax_train.plot([curves.steps[k] for k in at], [losses[k] for k in at], "v", color=color, markersize=6,
                              linestyle="none", label=restart_label)
                restart_label = None
            if result["status"] == "diverged":
                ax_train.plot(curves.steps[-1:], losses[-1:], "x", color=color, markersize=9)
    for ax, title in ((ax_eval, "held-out loss"), (ax_train, "train loss")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, os.path.join(out, REPORT_PNG))


# --- the report ---------------------------------------------------------------------------------------------------

COLUMNS = ("variant", "status", "eval loss", "eval ppl", "train loss", "trainable params", "optimizer state MiB",
           "tokens/s", "restarts",
           "epochs", "σ>0.1")


def report_rows(results: dict, spectra: dict) -> list[dict]:
    """One dict per run: the report's numbers (compare.json) with its σ>0.1 count (and its seed, under --seeds)."""
    rows = []
    for name, result in results.items():
        summary = spectra["summaries"].get(name) or {}
        row = {k: v for k, v in result.items() if k != "config"}
        if result.get("config"):
            row["seed"] = result["config"]["train"]["seed"]
        row["num_above_0_1"] = summary.get("num_above_0_1")
        row["num_above_0_1_by_projection"] = summary.get("by_projection")
        rows.append(row)
    return rows


SEED_STATS = ("eval_loss", "eval_perplexity", "train_loss", "tokens_per_s", "num_above_0_1")  # mean ± sd per variant


def seed_rows(rows: list[dict]) -> list[dict]:
    """Per variant (in order), over its finished runs: {field: [mean, sample sd]} for SEED_STATS (sd None with one
    run), the seeds finished and those not."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        runs = [r for r in rows if r["variant"] == variant]
        done = [r for r in runs if r["status"] == "finished" and _finite(r.get("eval_loss"))]
        row = {"variant": variant, "seeds": [r["seed"] for r in done],
               "not_finished": [r.get("seed") for r in runs if r not in done],
               "trainable_params": done[0]["trainable_params"] if done else None,
               "optimizer_state_bytes": done[0].get("optimizer_state_bytes") if done else None,
               "restarts": done[0]["restarts"] if done else None}
        for field in SEED_STATS:
            values = [r[field] for r in done if _finite(r.get(field))]
            row[field] = [statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None] \
                if values else None
        out.append(row)
    return out


def seed_markdown(rows: list[dict], seeds: list[int]) -> list[str]:
    """The table of seed_rows: mean ± sd over the finished seeds."""
    def stat(value, spec):
        if value is None:
            return "—"
        mean, sd = value
        return format(mean, spec) + ("" if sd is None else " ± " + format(sd, spec))

    lines = [f"Mean ± sample standard deviation over seeds {', '.join(map(str, seeds))} (finished runs only):", "",
             "| variant | seeds finished | eval loss | eval ppl | train loss | trainable params | optimizer state MiB "
             "| tokens/s | restarts | σ>0.1 |", "|" + "---|" * 10]
    for r in rows:
        missing = f" (not: {', '.join(map(str, r['not_finished']))})" if r["not_finished"] else ""
        state = r["optimizer_state_bytes"]
        lines.append(f"| `{r['variant']}` | {len(r['seeds'])}{missing} | {stat(r['eval_loss'], '.4f')} | "
                     f"{stat(r['eval_perplexity'], '.2f')} | {stat(r['train_loss'], '.4f')} | "
                     f"{'—' if r['trainable_params'] is None else format(r['trainable_params'], ',')} | "
                     f"{'—' if state is None else format(state / 2**20, ',.1f')} | "
                     f"{stat(r['tokens_per_s'], ',.0f')} | {'—' if r['restarts'] is None else r['restarts']} | "
                     f"{stat(r['num_above_0_1'], ',.0f')} |")
    return lines + ["", "Each run:", ""]


def markdown(rows: list[dict], *, base_path: str | None, overrides: list[str], notes: list[str],
             spectra: dict, seeds: list[int] | None = None) -> str:
    def num(value, spec):
        return "—" if value is None else format(value, spec)

    total = rows[0]["total_steps"] if rows else None
    lines = ["# relora-ds compare", "",
             f"Base config `{base_path}`" + (f" with `--set {' '.join(overrides)}`" if overrides else "")
             + f"; every variant: {total} steps on the same data, " + ("seeds" if seeds else "seed") + " and batch.",
             ""]
    if seeds:
        lines += seed_markdown(seed_rows(rows), seeds)
    lines += ["| " + " | ".join(("run" if seeds else "variant", *COLUMNS[1:])) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        early = r["eval_step"] is not None and r["eval_step"] != r["total_steps"]  # a diverged or unfinished run
        cells = [f"`{r['variant']}`" + (f" seed {r['seed']}" if seeds else ""), status_text(r),
                 num(r["eval_loss"], ".4f") + (f" (step {r['eval_step']})" if early else ""),
                 num(r["eval_perplexity"], ".2f"),
                 num(r["train_loss"], ".4f"), num(r["trainable_params"], ","),
                 num(r.get("optimizer_state_bytes") and r["optimizer_state_bytes"] / 2**20, ",.1f"),
                 num(r["tokens_per_s"], ",.0f"),
                 str(r["restarts"]), num(r["epochs"], ".2f") + (" ⚠" if (r["epochs"] or 0) > 1 else ""),
                 num(r["num_above_0_1"], ",")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Variants (changes to the base config):", ""]
    for r in {r["variant"]: r for r in rows}.values():
        changes = ", ".join(f"{k}={_yaml(v)}" for k, v in r["overrides"].items()) or "none"
        lines.append(f"- `{r['variant']}`: {r['description']} ({changes})")
    lines += ["", "eval loss / ppl: the last held-out evaluation; train loss: the last logged step; optimizer state "
              "MiB: one rank's optimizer-state tensors at the end (moments, projections); tokens/s: the "
              "median of the logged values; restarts: merges; epochs: training tokens seen / tokens in one epoch "
              "of the training data (⚠: data repeated); σ>0.1: singular values of ΔW = W_final − W_reference above "
              "0.1, summed over the adapted layers (relora_ds.tools.analyze)."]
    if spectra.get("png"):
        lines.append(f"Spectra: `{os.path.basename(spectra['png'])}`, `{os.path.basename(spectra['json'])}`.")
    lines.append(f"Loss curves: `{REPORT_PNG}`.")
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def write_report(out: str, base_path: str | None, overrides: list[str], results: dict, spectra: dict,
                 seeds: list[int] | None = None) -> None:
    rows = report_rows(results, spectra)
    notes = [w.removeprefix("warning: compare: ") for w in map(epoch_warning, results.values()) if w]
    notes += [f"{r['variant']}: {r['error']}" for r in rows if r.get("error")] + spectra["notes"]
    report = {"base_config": base_path, "overrides": overrides, "variants": rows, "notes": notes,
              "spectra": {"json": spectra["json"], "png": spectra["png"]}, "plot": os.path.join(out, REPORT_PNG)}
    if seeds:
        report.update(seeds=seeds, by_variant=seed_rows(rows))
    atomic_write(os.path.join(out, REPORT_JSON), json.dumps(report, indent=2) + "\n")
    atomic_write(os.path.join(out, REPORT_MD), markdown(rows, base_path=base_path, overrides=overrides,
                                                          notes=notes, spectra=spectra, seeds=seeds))


# --- command line -------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="BASE.yaml", required=True,
                        help="the base run config: method relora with relora.warm_start_steps > 0 and "
                             "train.eval_every > 0")
    parser.add_argument("--out", required=True, metavar="DIR", help="one run directory per variant (DIR/<variant>) "
                        "and the report (compare.json, compare.md, compare.png)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), metavar="A,B,...",
                        help=f"comma-separated, of {', '.join(VARIANTS)} (default {','.join(DEFAULT_VARIANTS)}: the "
                             f"paper's Table 2)")
    parser.add_argument("--variant", default=None, metavar="NAME",
                        help="run only this one of --variants and write no report (one launch per variant)")
    parser.add_argument("--seeds", default=None, metavar="K,L,...",
                        help="run every variant once per train.seed, in DIR/seed<k>/<variant>; the report gives "
                             "each variant's mean ± sd over them")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: write the report from the variants that have finished")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", metavar="DS.json", default=None,
                        help="DeepSpeed JSON for every variant (overrides train.deepspeed_config)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="edit the base config (repeatable); a variant's own fields still win "
                             "(see `relora-ds compare --help`)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; the rank comes from the environment")


def run_from_args(args) -> int:
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    if args.variant is not None and args.report:
        raise CompareError("--variant and --report: choose one (--variant trains one variant, --report trains none)")
    names = parse_variants(args.variants)
    if args.variant is not None and args.variant not in VARIANTS:
        raise CompareError(f"--variant: unknown variant {args.variant!r} (valid: {', '.join(VARIANTS)})")
    overrides = list(args.overrides)
    if args.deepspeed_config:
        overrides.append(f"train.deepspeed_config={args.deepspeed_config}")
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    compare(args.config, names, args.out, overrides, only=args.variant, report_only=args.report, seeds=seeds)
    return 0


# --- helpers ------------------------------------------------------------------------------------------------------

def _say(line: str) -> None:
    if dist.is_rank_zero():
        print(line, flush=True)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _yaml(value) -> str:
    return "null" if value is None else json.dumps(value) if isinstance(value, bool) else str(value)


__all__ = ["VARIANTS", "DEFAULT_VARIANTS", "CompareError", "Variant", "base_config", "variant_config", "compare",
           "run_variant", "parse_variants", "parse_seeds", "seed_rows"]
