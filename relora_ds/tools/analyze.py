"""Singular-value spectra of ΔW: how far from low rank did training move each projection (the ReLoRA paper's
Figs 3, 4 and 11).

    relora-ds analyze RUN_DIR --out DIR                  ΔW = W_final − W_reference of the run
    relora-ds analyze A B --out DIR                      ΔW = W_B − W_A
    relora-ds analyze RUN_DIR --compare RUN2 RUN3 --out DIR [--labels L1 L2 L3] [--targets q_proj,v_proj]

RUN_DIR's reference is its reference checkpoint (`engine.checkpoint.reference_checkpoint`: the full-rank model
saved at the warm-start switch by `checkpoint.at_switch`, or `checkpoint.reference_step` on full-rank runs), its
final W its newest complete checkpoint. A and B are each a run dir (its newest checkpoint), a checkpoints/ or
step_* dir (any ZeRO stage, fp32 or bf16), or an exported model dir (`relora-ds export`: `model.safetensors`, or
shards + `model.safetensors.index.json`), each read by tools/reader.py, as export reads a checkpoint: a checkpoint's
wrapped layers count merged, W + s·B·A.

Analysed: every linear weight (a 2-D `<module>.weight`) whose module matches the targets as `relora.wrap` matches
them (the module's last name, or a glob on its dotted name): `--targets`, else A's targets, else B's, else every
family's default projections (`model/families.py`). A side's targets: a checkpoint's run config's
`relora.target_modules`, or (null) its model family's defaults; an exported dir's family defaults by the model_type
of its config.json (exported dirs carry no relora-ds config).
For each, ΔW = W_B − W_A in fp32 and its singular values, `torch.linalg.svdvals` on the CPU.

Memory: both sides are streamed in lockstep in the model's order, one weight of each side at a time (checkpoint
files memory-mapped and read tensor by tensor, safetensors files opened lazily); a pair's names and shapes are
checked before any tensor is read, and again as each pair arrives. The analysis holds a few tensors the size of
the largest projection, never the model: a 1b checkpoint is analysable on a machine with less memory than its fp32
model (tests/e2e/test_analyze.py counts the peak of live tensor bytes; benchmarks/analyze_memory.py measures a 1b
pair inside a 4 GiB memory limit: 0.26 GiB of anonymous memory, the rest reclaimable page cache).

Outputs, in DIR (each written atomically, tmp + os.replace):
- `spectra.json`: `format`, `relora_ds_version`, `threshold` (0.1), `effective_rank` (the definition below),
  `delta`, and `runs` {label: {`a`, `b` (each: `path` given, `resolved` tag or model dir, `kind` checkpoint|export,
  `step`, null for an export), `run` (RUN_DIR, for that form), `targets`, `summary` (`summarize`), `entries`}}.
  One entry per analysed weight, in model order: `layer` (int; null outside model.layers), `projection` (the
  module's last name: q_proj, k_proj, ...), `name` (the full Hugging Face name), `shape` [out, in],
  `singular_values` (descending, 9 significant digits: float32 exactly), `num_above_0_1` (how many σ > 0.1, the
  paper's count) and `effective_rank`.
- `spectra.png`: one histogram panel per projection type, the singular values of all layers pooled, one step
  histogram per run overlaid (log counts), each run's σ > 0.1 count for that projection in the legend.

Effective rank: the entropy effective rank of Roy & Vetterli (2007), exp(H(p)) with p_i = σ_i / Σ_j σ_j and
H(p) = −Σ_i p_i ln p_i (0 ln 0 = 0): 1 for a rank-one ΔW, k for k equal singular values, at most min(out, in);
0 for an all-zero ΔW.

Python API (used by `relora-ds compare`): `analyze_pair`, `analyze_run`, `summarize`, `write_spectra`. Errors (a
bad path, models that do not match, a run without a reference) are one-line `AnalyzeError`s (a CheckpointError,
printed as one line with exit status 2 by the command line).
"""

import json
import math
import os
import re

import torch

from relora_ds.model.families import FAMILIES
from relora_ds.engine import checkpoint
from relora_ds.engine.checkpoint import CheckpointError
from relora_ds.files import atomic_write
from relora_ds.memory import trim_heap
from relora_ds.progress import Progress
from relora_ds.relora.wrap import _matches
from relora_ds.tools.reader import ReadError, open_model

THRESHOLD = 0.1
JSON_NAME = "spectra.json"
PNG_NAME = "spectra.png"
FORMAT = "relora-ds spectra v1"
EFFECTIVE_RANK_DEFINITION = ("entropy effective rank (Roy & Vetterli 2007): exp(H(p)), p_i = sigma_i / sum_j sigma_j, "
                             "H(p) = -sum_i p_i ln p_i (0 ln 0 = 0); 0 for an all-zero delta")
DELTA_DEFINITION = "delta W = W_b - W_a in fp32 (checkpoints: wrapped layers merged, W + s*B*A); torch.linalg.svdvals"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class AnalyzeError(CheckpointError):
    """An analysis that cannot be made (a path, models that do not match, a run without a reference); one line."""


# --- the numbers -----------------------------------------------------------------------------------------------

def effective_rank(singular_values) -> float:
    """exp(H(p)), p_i = σ_i / Σσ (Roy & Vetterli 2007); 0.0 when every σ is 0."""
    sv = torch.as_tensor(singular_values, dtype=torch.float64).flatten()
    total = float(sv.sum())
    if not total > 0:
        return 0.0
    p = sv / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def num_above(singular_values, threshold: float = THRESHOLD) -> int:
    """How many singular values exceed `threshold`."""
    return int((torch.as_tensor(singular_values) > threshold).sum())


def layer_index(name: str) -> int | None:
    """The decoder layer of a Hugging Face name (model.layers.3.mlp.up_proj.weight, gpt_neox.layers.3.mlp.dense_h_to_4h.
    weight → 3); None outside the layers."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def model_order_key(name: str, targets=()):
    """The model's order of its weights from their names: by layer, then by projection in its family's order (q, k,
    v, o, gate, up, down; GPT-NeoX: query_key_value, dense, dense_h_to_4h, dense_4h_to_h; then `targets`' own
    order), then by name; weights outside the layers last."""
    layer = layer_index(name)
    projection = name[:-len(".weight")].rsplit(".", 1)[-1] if name.endswith(".weight") else name
    return (layer is None, layer or 0, _projection_key(projection, targets), name)


def is_target(name: str, shape, targets) -> bool:
    """Whether `name` is the weight of a linear whose module matches `targets` (as relora.wrap matches them)."""
    return name.endswith(".weight") and len(shape) == 2 and _matches(name[:-len(".weight")], targets)


def entry(name: str, shape, singular_values: torch.Tensor) -> dict:
    """The spectra.json entry of one weight from its ΔW's singular values (descending)."""
    sv = singular_values.detach().to(torch.float32).flatten()
    return {"layer": layer_index(name), "projection": name[:-len(".weight")].rsplit(".", 1)[-1], "name": name,
            "shape": [int(d) for d in shape], "singular_values": [float(f"{v:.9g}") for v in sv.tolist()],
            "num_above_0_1": num_above(sv, THRESHOLD), "effective_rank": effective_rank(sv)}


# --- the two sides -----------------------------------------------------------------------------------------------

def open_side(path: str, which: str = "A"):
    """A path as one side of ΔW (tools/reader.py): an exported model dir (config.json + safetensors) or a relora-ds
    checkpoint; a path or model dir that cannot be read is an AnalyzeError naming the side."""
    try:
        return open_model(path)
    except ReadError as e:
        raise AnalyzeError(f"{which} {e}") from None


def _describe(side) -> dict:
    return {"path": side.path, "resolved": side.resolved, "kind": side.kind, "step": side.step}


def lockstep(stream_a, stream_b, names, what_a: str = "A", what_b: str = "B"):
    """(name, tensor_a, tensor_b) for each of `names`, one pair at a time, from two streams of (name, tensor) that
    must yield exactly `names`, in that order, with equal shapes; a one-line AnalyzeError at the first pair that
    does not."""
    done = object()
    for expected in names:
        got_a, got_b = next(stream_a, done), next(stream_b, done)
        for got, what in ((got_a, what_a), (got_b, what_b)):
            if got is done:
                raise AnalyzeError(f"{what} ended before {expected}: the two models do not match")
            if got[0] != expected:
                raise AnalyzeError(f"{what} gave {got[0]} where {expected} was expected: the two models do not "
                                   f"match (or hold their tensors in another order)")
        (_, a), (_, b) = got_a, got_b
        if tuple(a.shape) != tuple(b.shape):
            raise AnalyzeError(f"{expected}: shape {tuple(a.shape)} in {what_a}, {tuple(b.shape)} in {what_b}: the "
                               f"two models do not match")
        del got_a, got_b
        yield expected, a, b
        del a, b
    for stream, what in ((stream_a, what_a), (stream_b, what_b)):
        extra = next(stream, done)
        if extra is not done:
            raise AnalyzeError(f"{what} gave {extra[0]} after the last expected weight: the two models do not match")


def _target_names(side, targets, what: str) -> list[str]:
    names = [name for name, shape in side.shapes.items() if is_target(name, shape, targets)]
    if not names:
        linears = sorted({n[:-len(".weight")].rsplit(".", 1)[-1] for n, s in side.shapes.items()
                          if n.endswith(".weight") and len(s) == 2})
        raise AnalyzeError(f"{what} {side.path}: no linear weight matches the targets {list(targets)} (its 2-D "
                           f"weights: {', '.join(linears) or 'none'}); set --targets")
    return names


def _check_pair(names_a, names_b, a, b) -> None:
    only_a = sorted(set(names_a) - set(names_b), key=model_order_key)
    only_b = sorted(set(names_b) - set(names_a), key=model_order_key)
    for only, here, there in ((only_a, "A", "B"), (only_b, "B", "A")):
        if only:
            raise AnalyzeError(f"{only[0]} is in {here} but not in {there}"
                               f"{f' (and {len(only) - 1} more)' if len(only) > 1 else ''}: the two models do not "
                               f"match (A {a.path}, B {b.path})")
    for name in sorted(names_a, key=model_order_key):
        if a.shapes[name] != b.shapes[name]:
            raise AnalyzeError(f"{name}: shape {a.shapes[name]} in A, {b.shapes[name]} in B: the two models do not "
                               f"match (A {a.path}, B {b.path})")


def analyze_pair(a_path: str, b_path: str, *, targets=None, progress: bool = True) -> dict:
    """The singular values of ΔW = W_B − W_A for every target weight: {"a": {path, resolved, kind, step}, "b": ...,
    "targets": [...], "entries": [entry, ...]} (entries in model order; see the module docstring)."""
    a, b = open_side(a_path, "A"), open_side(b_path, "B")
    targets = list(targets) if targets else (a.targets or b.targets or list(ALL_PROJECTIONS))
    names_a, names_b = _target_names(a, targets, "A"), _target_names(b, targets, "B")
    _check_pair(names_a, names_b, a, b)
    if a.kind == "checkpoint":
        order = names_a  # the model's order: A streams in it
    elif b.kind == "checkpoint":
        order = names_b
    else:  # two safetensors dirs: random access, so the model's order as its names give it
        order = sorted(names_a, key=lambda name: model_order_key(name, targets))
    entries = []
    with Progress(len(order), f"svd {default_label(b_path)}", "weight", enabled=progress, leave=False) as bar:
        for name, wa, wb in lockstep(a.tensors(order), b.tensors(order), order):
            delta = torch.sub(wb, wa)
            del wa, wb
            if not bool(torch.isfinite(delta).all()):
                raise AnalyzeError(f"{name}: ΔW holds non-finite values (A {a.path}, B {b.path})")
            singular_values = torch.linalg.svdvals(delta)
            shape = tuple(delta.shape)
            del delta
            entries.append(entry(name, shape, singular_values))
            del singular_values
            trim_heap()
            bar.update(1)
    return {"a": _describe(a), "b": _describe(b), "targets": targets, "entries": entries}


def analyze_run(run_dir: str, *, targets=None, progress: bool = True) -> dict:
    """ΔW = W_final − W_reference of a run dir (its reference checkpoint, its newest complete checkpoint): the
    analyze_pair result plus "run"."""
    if not os.path.isdir(run_dir):
        raise AnalyzeError(f"{run_dir}: no such run directory")
    reference = checkpoint.reference_checkpoint(run_dir)
    if reference is None:
        raise AnalyzeError(f"{run_dir}: the run recorded no reference checkpoint (checkpoint.at_switch saves one at the "
                           f"warm-start switch, checkpoint.reference_step at a given step); give two checkpoints "
                           f"instead: relora-ds analyze A B")
    final = checkpoint.find_checkpoint(run_dir)
    result = analyze_pair(reference, final, targets=targets, progress=progress)
    return {"run": run_dir, **result}


def summarize(result: dict) -> dict:
    """Totals of one result: {"num_above_0_1", "num_singular_values", "by_projection": {projection:
    {"num_above_0_1", "num_singular_values", "num_weights", "mean_effective_rank"}}}."""
    by_projection = {}
    for e in result["entries"]:
        p = by_projection.setdefault(e["projection"], {"num_above_0_1": 0, "num_singular_values": 0, "num_weights": 0,
                                                       "mean_effective_rank": 0.0})
        p["num_above_0_1"] += e["num_above_0_1"]
        p["num_singular_values"] += len(e["singular_values"])
        p["num_weights"] += 1
        p["mean_effective_rank"] += e["effective_rank"]
    for p in by_projection.values():
        p["mean_effective_rank"] /= p["num_weights"]
    return {"num_above_0_1": sum(p["num_above_0_1"] for p in by_projection.values()),
            "num_singular_values": sum(p["num_singular_values"] for p in by_projection.values()),
            "by_projection": dict(sorted(by_projection.items(),
                                         key=lambda item: _projection_key(item[0], result.get("targets", ()))))}


# --- writing -------------------------------------------------------------------------------------------------------

# Every family's projections in its own order (each model has only its family's names, so one list orders them all).
ALL_PROJECTIONS = tuple(dict.fromkeys(name for family in FAMILIES.values() for name in family.target_modules))


def _projection_key(name: str, targets=()):
    """Sort key of a projection type: the families' order (ALL_PROJECTIONS), then the order of `targets` (other
    names a run wrapped), then by name."""
    order = list(ALL_PROJECTIONS) + [t for t in targets if t not in ALL_PROJECTIONS]
    return (order.index(name), "") if name in order else (len(order), name)


def projections(results: dict) -> list[str]:
    """The projection types of all results in their family's order (q, k, v, o, gate, up, down; GPT-NeoX's
    query_key_value, dense, dense_h_to_4h, dense_4h_to_h), then in the results' targets' order, then by name."""
    found = {e["projection"] for result in results.values() for e in result["entries"]}
    targets = [t for result in results.values() for t in result.get("targets", ())]
    return sorted(found, key=lambda name: _projection_key(name, targets))


def spectra_figure(results: dict, title: str | None = None):
    """A matplotlib Figure (not attached to pyplot): one histogram panel per projection type, runs overlaid."""
    from matplotlib.figure import Figure

    panels = projections(results)
    cols = max(1, min(4, len(panels)))
    rows = max(1, math.ceil(len(panels) / cols))
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows), dpi=100)
    colors = [f"C{i % 10}" for i in range(len(results))]
    for index, projection in enumerate(panels):
        ax = fig.add_subplot(rows, cols, index + 1)
        pooled = {label: [v for e in result["entries"] if e["projection"] == projection for v in e["singular_values"]]
                  for label, result in results.items()}
        top = max((max(values) for values in pooled.values() if values), default=0.0)
        bins = [top * 1.0001 * i / 50 for i in range(51)] if top > 0 else [0.0, 1.0]
        for (label, values), color in zip(pooled.items(), colors):
            if not values:
                continue
            count = sum(v > THRESHOLD for v in values)
            ax.hist(values, bins=bins, histtype="stepfilled", alpha=0.15, color=color, log=True)
            ax.hist(values, bins=bins, histtype="step", linewidth=1.4, color=color, log=True,
                    label=f"{label}: {count} σ>{THRESHOLD:g}")
        ax.axvline(THRESHOLD, color="tab:gray", linestyle="--", linewidth=0.8)
        ax.set_title(projection)
        ax.set_xlabel("singular value of ΔW")
        ax.set_ylabel("count (all layers)")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize=7)
    if not panels:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no weights analysed", transform=ax.transAxes, ha="center", va="center")
    fig.suptitle(title or "singular values of ΔW = W_B − W_A")
    fig.tight_layout()
    return fig


def spectra_document(results: dict) -> dict:
    """What spectra.json holds for `results` ({label: analyze_pair/analyze_run result})."""
    from relora_ds import __version__

    runs = {}
    for label, result in results.items():
        runs[str(label)] = {**{k: v for k, v in result.items() if k != "entries"}, "summary": summarize(result),
                            "entries": result["entries"]}
    return {"format": FORMAT, "relora_ds_version": __version__, "threshold": THRESHOLD,
            "effective_rank": EFFECTIVE_RANK_DEFINITION, "delta": DELTA_DEFINITION, "runs": runs}


def write_spectra(results: dict, out_dir: str) -> tuple[str, str]:
    """Write `results` ({label: result}) as DIR/spectra.json and DIR/spectra.png; returns their paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not results:
        raise AnalyzeError("nothing to write: no results")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise AnalyzeError(f"--out {out_dir}: exists and is not a directory")
    os.makedirs(out_dir, exist_ok=True)
    json_path, png_path = os.path.join(out_dir, JSON_NAME), os.path.join(out_dir, PNG_NAME)
    text = json.dumps(spectra_document(results), indent=1, allow_nan=False) + "\n"
    atomic_write(json_path, text)
    fig = spectra_figure(results)
    FigureCanvasAgg(fig)
    atomic_write(png_path, lambda f: fig.savefig(f, format="png"))
    return json_path, png_path


# --- the command ---------------------------------------------------------------------------------------------------

def default_label(path: str) -> str:
    """A run's label: its directory's name; for a step_* dir under checkpoints/, <run>/<step_*>."""
    path = os.path.normpath(os.path.abspath(path))
    base, parent = os.path.basename(path), os.path.dirname(path)
    if base.startswith("step_") and os.path.basename(parent) == "checkpoints":
        return f"{os.path.basename(os.path.dirname(parent))}/{base}"
    if base == "checkpoints":
        return os.path.basename(parent)
    return base


def unique_labels(labels: list[str]) -> list[str]:
    """`labels` with repeats made distinct: run, run (2), run (3)."""
    seen, out = {}, []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out


def parse_targets(text: str | None) -> list[str] | None:
    """--targets q_proj,v_proj → ["q_proj", "v_proj"]; None for none given."""
    if text is None:
        return None
    targets = [t.strip() for t in text.split(",") if t.strip()]
    if not targets:
        raise AnalyzeError(f"--targets {text!r}: name at least one module, e.g. q_proj,v_proj")
    return targets


def analyze(paths: list[str], out_dir: str, *, compare=(), labels=None, targets=None,
            progress: bool = True) -> tuple[dict, str, str]:
    """The `relora-ds analyze` command: `paths` is [RUN_DIR] or [A, B]; `compare`: more run dirs; returns (results,
    json path, png path)."""
    if len(paths) not in (1, 2):
        raise AnalyzeError(f"expected RUN_DIR or A B, got {len(paths)} paths")
    names = [default_label(paths[-1])] + [default_label(p) for p in compare]
    if labels:
        if len(labels) != len(names):
            raise AnalyzeError(f"--labels: {len(labels)} given for {len(names)} runs ({', '.join(names)})")
        names = list(labels)
    names = unique_labels(names)
    results = {}
    if len(paths) == 2:
        results[names[0]] = analyze_pair(paths[0], paths[1], targets=targets, progress=progress)
    else:
        results[names[0]] = analyze_run(paths[0], targets=targets, progress=progress)
    for label, run_dir in zip(names[1:], compare):
        results[label] = analyze_run(run_dir, targets=targets, progress=progress)
    json_path, png_path = write_spectra(results, out_dir)
    return results, json_path, png_path


__all__ = ["AnalyzeError", "THRESHOLD", "analyze", "analyze_pair", "analyze_run", "effective_rank", "entry",
           "is_target", "layer_index", "lockstep", "num_above", "open_side", "spectra_document", "spectra_figure",
           "summarize", "write_spectra"]
