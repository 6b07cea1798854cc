"""The benchmark's report: aggregate the workers' results per mode, the ReLoRA / full-rank ratios, the
markdown table and the bar chart (relora_ds.bench.throughput writes them)."""

import os
import platform
import re
import statistics

import torch

from relora_ds.engine import ds_config as dsc
from relora_ds.hardware import package_versions


GIB = 2 ** 30


def checkpointing_note(args: dict) -> str:
    """", activation checkpointing MODE" (results written before the mode existed: their grad_checkpointing flag)."""
    mode = args.get("activation_checkpointing") or ("full" if args.get("grad_checkpointing") else "none")
    return "" if mode == "none" else f", activation checkpointing {mode}"


def spread(values: list[float]) -> dict:
    ordered = sorted(values)
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else ordered * 3
    return {"median": statistics.median(ordered), "q1": q1, "q3": q3, "min": ordered[0], "max": ordered[-1]}


def summarize(runs: list[dict], flops: dict, peak_flops: float | None) -> dict:
    """One mode's figures over its worker runs (step times pooled over repeats)."""
    if runs[0].get("oom"):
        return {"oom": True, "micro_batch": runs[0]["micro_batch"]}
    first = runs[0]
    times = spread([t for run in runs for t in run["step_seconds"]])
    per_device = first["tokens_per_step_per_device"] / times["median"]
    own_flops = flops["relora"] if first["kernels"] is not None else flops["full"]

    def worst(key):
        values = [run[key] for run in runs if run[key] is not None]
        return max(values) if values else None

    restarts = [run["restart"]["seconds"] for run in runs if run["restart"] is not None]
    return {
        "oom": False, "micro_batch": first["micro_batch"], "grad_accum": first["grad_accum"],
        "world_size": first["world_size"], "tokens_per_step_per_device": first["tokens_per_step_per_device"],
        "tokens_per_s_per_device": per_device, "tokens_per_s_total": per_device * first["world_size"],
        "tokens_per_s_per_repeat": [first["tokens_per_step_per_device"] / statistics.median(run["step_seconds"])
                                    for run in runs],
        "step_seconds": times, "measured_steps": sum(len(run["step_seconds"]) for run in runs),
        "flops_per_token_full": flops["full"], "flops_per_token_own": own_flops,
        "model_tflops_per_s_per_device": per_device * flops["full"] / 1e12,
        "mfu": per_device * flops["full"] / peak_flops if peak_flops else None,
        "mfu_own_flops": per_device * own_flops / peak_flops if peak_flops else None,
        "memory_kind": first["memory_kind"],
        "peak_memory_allocated_bytes": worst("peak_memory_allocated_bytes"),
        "peak_memory_reserved_bytes": worst("peak_memory_reserved_bytes"),
        "peak_rss_bytes": worst("peak_rss_bytes"),
        "optimizer_state_bytes": first["optimizer_state_bytes"],
        "optimizer_master_bytes": first["optimizer_master_bytes"],
        "trainable_params": first["trainable_params"], "total_params": first["total_params"],
        "restart_seconds": statistics.median(restarts) if restarts else None,
        "restart_record": first["restart"]["record"] if first["restart"] else None,
        "loss_first_last": [first["first_loss"], first["last_loss"]],
        "phase_seconds": phase_medians(runs),
    }


def phase_medians(runs: list[dict]) -> dict | None:
    """Seconds per phase of one optimizer step (median over the runs that timed phases; --profile)."""
    timed = [run["phases"] for run in runs if run.get("phases")]
    if not timed:
        return None
    return {phase: statistics.median(t[phase] for t in timed) for phase in timed[0]}


def ideal_phase_ratios(flops: dict) -> dict:
    """ReLoRA / full-rank FLOPs of the forward and the backward (the FLOP model's time ratio per phase).

    Forward: 2 FLOPs per linear weight (+ 2 per adapter weight with ReLoRA) and a third of the attention.
    Backward: 4 per linear weight (a frozen W skips its dW GEMM: 2; an adapter weight: 4) and two thirds.
    """
    n, attention = flops["n_linear"], flops["attention"]
    forward = (2 * n + 2 * flops["n_adapter"] + attention / 3) / (2 * n + attention / 3)
    backward = (4 * n - 2 * flops["n_wrapped"] + 4 * flops["n_adapter"] + 2 * attention / 3) / (4 * n + 2 * attention / 3)
    return {"forward": forward, "backward": backward}


def peak_memory_of(summary: dict) -> int | None:
    """The memory figure compared across modes: CUDA peak allocated, or the worker's peak RSS on CPU."""
    if summary["memory_kind"] == "cuda":
        return summary["peak_memory_allocated_bytes"]
    return summary["peak_rss_bytes"]


def ratios(summaries: dict, flops: dict) -> dict:
    """ReLoRA mode / full-rank for every ReLoRA mode that ran (None where either side ran out of memory)."""
    full = summaries.get("full")
    out = {}
    for mode, summary in summaries.items():
        if mode == "full" or full is None:
            continue
        if full["oom"] or summary["oom"]:
            out[mode] = None
            continue
        out[mode] = {
            "tokens_per_s": summary["tokens_per_s_per_device"] / full["tokens_per_s_per_device"],
            "step_time": summary["step_seconds"]["median"] / full["step_seconds"]["median"],
            "peak_memory": peak_memory_of(summary) / peak_memory_of(full),
            "optimizer_state": summary["optimizer_state_bytes"] / full["optimizer_state_bytes"],
            "trainable_params": summary["trainable_params"] / full["trainable_params"],
            "ideal_tokens_per_s": flops["full"] / flops["relora"],  # at equal MFU (the FLOP model's speed-up)
            "phase_seconds": phase_ratios(summary, full),
        }
    return out


def phase_ratios(summary: dict, full: dict) -> dict | None:
    if not summary.get("phase_seconds") or not full.get("phase_seconds"):
        return None
    return {phase: seconds / full["phase_seconds"][phase] for phase, seconds in summary["phase_seconds"].items()}


def versions() -> dict:
    return {"python": platform.python_version(), "cuda": torch.version.cuda,
            **package_versions(("torch", "deepspeed", "transformers", "triton"))}


def device_label(hw: dict) -> str:
    if hw["gpu_name"] is None:
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", hw["gpu_name"].lower().replace("nvidia", "")).strip("-")


# --- the report ----------------------------------------------------------------------------------------------

def _gib(value) -> str:
    return "—" if value is None else f"{value / GIB:.4g}"


def _ms(value) -> str:
    return f"{value * 1e3:.1f}"


def _ratio(value) -> str:
    return "—" if value is None else f"{value:.3f}×"


def config_label(path: str) -> str:
    """`ds_configs/NAME.json` for a shipped DeepSpeed JSON, else the path as given."""
    if os.path.dirname(os.path.abspath(path)) == os.path.abspath(dsc.shipped_dir()):
        return f"{dsc.SHIPPED_DIR}/{os.path.basename(path)}"
    return path


def params_text(summaries: dict) -> str:
    for summary in summaries.values():
        if not summary["oom"]:
            return f"{summary['total_params'] / 1e6:.2f}M params"
    return "params unknown (every mode ran out of memory)"


def markdown(report: dict) -> str:
    args, hw, summaries = report["args"], report["hardware"], report["modes"]
    modes = list(summaries)
    relora_modes = [m for m in modes if m != "full" and report["ratios"].get(m)]
    cpu = hw["gpu_name"] is None
    device = (f"{hw['cpu_model']} ({hw['cpu_usable']} of {hw['cpu_count']} cores usable, "
              f"{hw['memory_bytes'] / GIB:.0f} GiB)" if cpu else hw["gpu_name"])
    device += f", {report['world_size']} process(es) per mode"
    lines = [f"# Throughput: ReLoRA vs full-rank, preset {args['preset']}, {report['date']}", ""]
    if cpu:
        lines += ["**CPU run: the numbers are for trends only, not GPU performance.**", ""]
    lines += [f"Device: {device}, torch threads {hw['torch_threads']}. Versions: "
              + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v) + ".", "",
              f"Model {args['preset']} (vocab {args['vocab_size']}, {params_text(summaries)}), "
              f"seq {args['seq_len']}, "
              f"ReLoRA r={args['rank']} α={args['alpha']:g} dropout {args['lora_dropout']:g}; "
              f"DeepSpeed {config_label(args['ds_config'])} (ZeRO-{report['zero_stage']}, "
              f"{report['precision']}); data {args['data']}; attention {args['attn']}"
              f"{checkpointing_note(args)}"
              f"{', torch.compile' if args['compile'] else ''}; {args['warmup']} warm-up + {args['steps']} "
              f"measured steps × {args['repeats']} repeat(s), one process per mode, alternating order.", "",
              f"MFU peak: {report['peak_flops_source']}. FLOPs/token (model module): full-rank "
              f"{report['flops_per_token']['full'] / 1e9:.4g} GFLOP"
              + (f", ReLoRA {report['flops_per_token']['relora'] / 1e9:.4g} GFLOP"
                 if "relora" in report["flops_per_token"] else "") + ".", ""]
    memory_name = "peak RSS of the worker process (GiB)" if cpu else "peak memory allocated (GiB)"

    def row(label, cell, ratio_key=None):
        cells = [("OOM" if summaries[m]["oom"] else cell(summaries[m])) for m in modes]
        if ratio_key is not None:
            cells += [_ratio(report["ratios"][m][ratio_key]) for m in relora_modes]
        else:
            cells += [""] * len(relora_modes)
        return "| " + " | ".join([label] + cells) + " |"

    header = ["metric"] + modes + [f"{m} / full" for m in relora_modes]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [
        row("micro batch × grad accum", lambda s: f"{s['micro_batch']} × {s['grad_accum']}"),
        row("tokens/s per device", lambda s: f"{s['tokens_per_s_per_device']:,.0f}", "tokens_per_s"),
        row("tokens/s total", lambda s: f"{s['tokens_per_s_total']:,.0f}"),
        row("ideal tokens/s ratio (FLOP model)", lambda s: "", "ideal_tokens_per_s"),
        row("step time median (ms)", lambda s: _ms(s["step_seconds"]["median"]), "step_time"),
        row("step time IQR (ms)", lambda s: f"{_ms(s['step_seconds']['q1'])}–{_ms(s['step_seconds']['q3'])}"),
        row("step time min–max (ms)", lambda s: f"{_ms(s['step_seconds']['min'])}–{_ms(s['step_seconds']['max'])}"),
        row("model TFLOP/s per device (full-rank FLOPs)", lambda s: f"{s['model_tflops_per_s_per_device']:.4g}"),
        row("MFU (full-rank FLOPs)", lambda s: "—" if s["mfu"] is None else f"{s['mfu']:.1%}"),
        row("MFU (own FLOPs)", lambda s: "—" if s["mfu_own_flops"] is None else f"{s['mfu_own_flops']:.1%}"),
        row(memory_name, lambda s: _gib(peak_memory_of(s)), "peak_memory"),
    ]
    if not cpu:
        lines.append(row("peak memory reserved (GiB)", lambda s: _gib(s["peak_memory_reserved_bytes"])))
    lines += [
        row("optimizer state (GiB, per rank)", lambda s: _gib(s["optimizer_state_bytes"]), "optimizer_state"),
        row("fp32 master copies (GiB, per rank)", lambda s: _gib(s["optimizer_master_bytes"])),
        row("trainable params", lambda s: f"{s['trainable_params']:,}", "trainable_params"),
        row("restart (s)", lambda s: "—" if s["restart_seconds"] is None else f"{s['restart_seconds']:.3f}"),
    ]
    if report.get("max_microbatch"):
        lines += ["", "Largest micro batch that fits (each trial a fresh process; out of memory = does not fit):", "",
                  "| mode | largest micro batch | trials (size: fits) |", "|---|---|---|"]
        for mode, found in report["max_microbatch"].items():
            capped = f" (the --max-mb-cap {found['cap']})" if found["capped"] else ""
            trials = ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in found["trials"].items())
            lines.append(f"| {mode} | {found['micro_batch']}{capped} | {trials} |")
    lines += phase_table(report, modes, relora_modes)
    for mode in modes:
        profile = report["profile"].get(mode)
        if profile:
            lines += ["", f"Profile of one step, {mode} (top ops by self {'CPU' if cpu else 'device'} time):", "",
                      "| op | calls | self ms | share |", "|---|---|---|---|"]
            lines += [f"| `{p['op']}` | {p['calls']} | {p['self_ms']:.2f} | {p['share']:.1%} |" for p in profile]
    return "\n".join(lines) + "\n"


def phase_table(report: dict, modes: list[str], relora_modes: list[str]) -> list[str]:
    """Where one step's time goes: seconds per phase per mode, the ratios, and the FLOP model's ratios."""
    summaries = report["modes"]
    timed = [m for m in modes if not summaries[m]["oom"] and summaries[m].get("phase_seconds")]
    if not timed:
        return []
    compared = [m for m in relora_modes if m in timed and "full" in timed]
    ideal = ideal_phase_ratios(report["flops_per_token"]) if "relora" in report["flops_per_token"] else {}
    header = ["phase"] + [f"{m} (ms)" for m in timed] + [f"{m} / full" for m in compared]
    header += ["FLOP model relora / full"] if compared else []
    lines = ["", "Where one optimizer step's time goes (the device synchronized at every phase boundary, "
             "median of 3 extra steps; the FLOP model's ratio is ReLoRA FLOPs / full-rank FLOPs of the phase; "
             "for the optimizer step, compare the trainable-parameter ratio):", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    phases = list(summaries[timed[0]]["phase_seconds"])
    for phase in phases + ["total"]:
        def seconds(m):
            values = summaries[m]["phase_seconds"]
            return sum(values.values()) if phase == "total" else values[phase]
        cells = [_ms(seconds(m)) for m in timed]
        cells += [_ratio(seconds(m) / seconds("full")) for m in compared]
        if compared:
            model = ideal.get(phase)
            if phase == "optimizer step":
                model = report["ratios"][compared[0]]["trainable_params"]
            elif phase == "total":
                model = 1 / report["ratios"][compared[0]]["ideal_tokens_per_s"]
            cells.append(_ratio(model))
        lines.append("| " + " | ".join([phase] + cells) + " |")
    return lines


def plot(report: dict, path: str) -> None:
    """Bar chart: tokens/s per device and peak memory per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m, s in report["modes"].items() if not s["oom"]]
    cpu = report["hardware"]["gpu_name"] is None
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.bar(modes, [report["modes"][m]["tokens_per_s_per_device"] for m in modes], color="tab:blue")
    left.set_ylabel("tokens/s per device")
    right.bar(modes, [peak_memory_of(report["modes"][m]) / GIB for m in modes], color="tab:orange")
    right.set_ylabel("peak RSS of the worker (GiB)" if cpu else "peak memory allocated (GiB)")
    where = "CPU, trends only" if cpu else report["hardware"]["gpu_name"]
    fig.suptitle(f"{report['args']['preset']}, seq {report['args']['seq_len']}, {where}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
