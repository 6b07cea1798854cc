"""Scale rehearsal: the trainer on N ranks through build → steps → switch → restart → checkpoint → resume →
steps → checkpoint → export, with each phase's per-rank peak memory and wall time beside the analytic bytes
per rank of the model states.

    python benchmarks/scale.py --preset 350m --vocab-size 8192 --seq-len 64 --ranks 1 2 \
        --stage 3 --precision fp32 --warm-start 2 --tag 350m-zero3-fp32
    python benchmarks/scale.py --preset 7b --seq-len 64 --ranks 2 --stage 3 --precision bf16 \
        --rank 64 --warm-start 0 --export-dtype bf16 --tag 7b-zero3-bf16
    python benchmarks/scale.py --preset 7b --ranks 1 --stage 2 --precision bf16 --rank 64 --warm-start 0 \
        --base-dtype int8 --activation-checkpointing full --export-dtype bf16 --tag 7b-zero2-bf16-int8
    python benchmarks/scale.py --preset 350m --ranks 2 --stage 2 --warm-start 2 --stop-signal USR1 --tag 350m-stop

Every run goes through the real `deepspeed` launcher with gloo CPU ranks here (GPUs elsewhere). Peaks come
from the run's "memory" events (relora_ds/memory.py: RSS high-water mark per rank on CPU, max_memory_allocated
on CUDA); export runs as its own process and its peak RSS is that process's. Results go to
benchmarks/results/<date>-scale-<tag>.{json,md}. A benchmark, not a test: numbers, not assertions.
"""

import argparse
import datetime
import gzip
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
sys.path.insert(0, ROOT)
from relora_ds.dist import free_port  # noqa: E402
from relora_ds.files import atomic_write  # noqa: E402
GIB = 2**30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="350m")
    p.add_argument("--vocab-size", type=int, default=None, help="default: the shipped tokenizer's (8192)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--ds-config", default="ds_configs/cpu_zero3.json",
                   help="DeepSpeed JSON whose zero_optimization knobs and optimizer are used (the rest is set here)")
    p.add_argument("--stage", type=int, default=3)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--rank", type=int, default=128, help="ReLoRA rank r")
    p.add_argument("--warm-start", type=int, default=2, help="full-rank steps before the switch (0: ReLoRA at once)")
    p.add_argument("--steps-after", type=int, default=3,
                   help="steps after the switch in the first run (a restart after 2 of them)")
    p.add_argument("--base-dtype", default="auto", help="relora.base_dtype: storage of the frozen W")
    p.add_argument("--merge-rounding", default="nearest", help="relora.merge_rounding")
    p.add_argument("--activation-checkpointing", default="none", help="train.activation_checkpointing")
    p.add_argument("--export-dtype", default=None, help="passed to `relora-ds export --dtype` when given")
    p.add_argument("--resume-ranks", type=int, default=None,
                   help="resume on this many ranks instead (the checkpoint converted to DeepSpeed's universal form; "
                        "the global batch kept through gradient accumulation when it divides)")
    p.add_argument("--stop-signal", choices=("USR1", "TERM"), default=None,
                   help="end the first run with this signal to every process of its launch (what SLURM does before "
                        "the time limit / on preemption) once it has taken --warm-start + --steps-after steps, "
                        "through launchers/single_node.sh; the stop's checkpoint is the one resumed")
    p.add_argument("--work-dir", default="/tmp/relora-scale")
    p.add_argument("--tag", default=None)
    p.add_argument("--keep", action="store_true", help="keep the run directories")
    p.add_argument("--timeout", type=int, default=7200, help="seconds per launched command")
    return p.parse_args(argv)


def ds_config(args, accumulation: int = 1) -> dict:
    """--ds-config with the benchmark's micro batch, `accumulation`, --precision and --stage."""
    with open(os.path.join(ROOT, args.ds_config) if not os.path.isabs(args.ds_config) else args.ds_config) as f:
        config = json.load(f)
    config.pop("train_batch_size", None)
    config.update(train_micro_batch_size_per_gpu=args.micro_batch, gradient_accumulation_steps=accumulation,
                  bf16={"enabled": args.precision == "bf16"})
    config.setdefault("zero_optimization", {})["stage"] = args.stage
    config.get("optimizer", {}).get("params", {}).pop("lr", None)
    return config


def write_corpus(directory: str, documents: int = 20) -> str:
    """The first documents of the shipped SOTU train split (enough windows for a few steps, fast to tokenize)."""
    src = os.path.join(ROOT, "relora_ds", "data", "sample", "sotu", "train.jsonl.gz")
    path = os.path.join(directory, "train.jsonl")
    with gzip.open(src, "rt") as f, open(path, "w") as out:
        for _, line in zip(range(documents), f):
            out.write(line)
    return path


def run_config(args, directory: str, total_steps: int, ds_path: str, corpus: str) -> dict:
    return {
        "model": {"preset": args.preset, "vocab_size": args.vocab_size, "attn_implementation": "sdpa"},
        "method": "relora",
        "relora": {"rank": args.rank, "alpha": 32, "warm_start_steps": args.warm_start,
                   "reset_every": 2, "kernels": "torch", "base_dtype": args.base_dtype,
                   "merge_rounding": args.merge_rounding},
        "schedule": {"lr": 1e-4, "warmup_steps": 1,
                     "restart_warmup_steps": 1},
        "data": {"source": corpus, "seq_len": args.seq_len},
        "train": {"total_steps": total_steps, "eval_every": 0, "deepspeed_config": ds_path,
                  "activation_checkpointing": args.activation_checkpointing,
                  "output_dir": os.path.join(directory, "run"), "seed": 0},
        "log": {"every": 1, "progress": False},
        "checkpoint": {"every": 0, "keep_last": 1},
    }


def env(ranks: int) -> dict:
    e = dict(os.environ)
    e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e.get("PATH", "")
    threads = str(max(1, (os.cpu_count() or 1) // ranks))
    e.update(OMP_NUM_THREADS=threads, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    e.setdefault("DS_ACCELERATOR", "cpu")
    return e


def launch(args, ranks: int, config_path: str, log_path: str, resume: bool) -> float:
    command = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(ranks),
               "--master_port", str(free_port()), "--module", "relora_ds.train", "--config", config_path]
    if resume:
        command += ["--resume"]
    started = time.perf_counter()
    with open(log_path, "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env(ranks), cwd=ROOT,
                                timeout=args.timeout)
    if result.returncode != 0:
        raise SystemExit(f"launch failed (exit {result.returncode}); see {log_path}")
    return time.perf_counter() - started


def launch_and_stop(args, ranks: int, config_path: str, log_path: str, metrics_path: str, at_step: int) -> dict:
    """Launch through launchers/single_node.sh, and once the run has logged step `at_step` send --stop-signal to
    every process of the launch; the seconds from the signal to the launcher's exit and its exit status."""
    import signal

    command = [os.path.join(ROOT, "launchers", "single_node.sh"), "--num_gpus", str(ranks), "--master_port",
               str(free_port()), "--config", config_path]
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env(ranks), cwd=ROOT,
                                start_new_session=True)
        try:
            while _newest_step(metrics_path) < at_step:
                if proc.poll() is not None or time.perf_counter() - started > args.timeout:
                    raise SystemExit(f"the run ended or timed out before step {at_step}; see {log_path}")
                time.sleep(0.5)
            signalled, logged = time.perf_counter(), _newest_step(metrics_path)
            os.killpg(proc.pid, getattr(signal, f"SIG{args.stop_signal}"))
            status = proc.wait(timeout=args.timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    with open(metrics_path) as f:
        stop = [r for r in map(json.loads, f) if r.get("event") == "stop"]
    if not stop:
        raise SystemExit(f"the run did not stop on SIG{args.stop_signal} (exit {status}); see {log_path}")
    return {"signal": stop[-1]["signal"], "step": stop[-1]["step"], "logged_step": logged, "exit_status": status,
            "seconds_to_exit": time.perf_counter() - signalled, "run_seconds": time.perf_counter() - started}


def _newest_step(metrics_path: str) -> int:
    """The newest step with a logged loss (0: none yet)."""
    try:
        with open(metrics_path) as f:
            return max([json.loads(line)["step"] for line in f if '"loss"' in line] or [0])
    except (OSError, ValueError):  # not written yet, or a line half written
        return 0


PEAK_OF_CHILD = """
import resource, subprocess, sys, time
t = time.perf_counter()
code = subprocess.run(sys.argv[1:]).returncode
print(f"@@ {code} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024} {time.perf_counter() - t}")
"""


def run_export(args, run_dir: str, out: str, log_path: str) -> dict:
    command = [sys.executable, "-m", "relora_ds", "export", run_dir, "--out", out]
    if args.export_dtype:
        command += ["--dtype", args.export_dtype]
    with open(log_path, "w") as log:
        result = subprocess.run([sys.executable, "-c", PEAK_OF_CHILD, *command], stdout=subprocess.PIPE,
                                stderr=log, text=True, env=env(1), cwd=ROOT, timeout=args.timeout)
        log.write(result.stdout)
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("@@ ")][-1].split()
    if int(line[1]) != 0:
        raise SystemExit(f"export failed (exit {line[1]}); see {log_path}")
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
    return {"peak_gib": int(line[2]) / GIB, "seconds": float(line[3]), "exported_gib": size / GIB}


def memory_phases(metrics_path: str, start_time: float) -> list[dict]:
    """The run's "memory" events in order, with the wall time since the previous one."""
    rows, previous = [], start_time
    with open(metrics_path) as f:
        for line in f:
            record = json.loads(line)
            if record.get("event") != "memory" or record["time"] < start_time:
                continue
            rows.append({"phase": record["phase"], "step": record["step"], "peak_gib": record["peak_gib"],
                         "rank_peak_gib": record["rank_peak_gib"], "seconds": record["time"] - previous,
                         "frozen_w_gib": record.get("frozen_w_gib")})
            previous = record["time"]
    return rows


def bare_process_gib() -> float:
    """RSS of a process that has only imported torch, deepspeed and transformers."""
    code = ("import os; os.environ.setdefault('DS_ACCELERATOR', 'cpu'); import torch, deepspeed, transformers; "
            "import re; print(int(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(1), check=True)
    return int(out.stdout.split()[-1]) / GIB


def model_state_bytes(args, vocab_size: int, ranks: int) -> dict:
    """Analytic bytes per rank of parameters, gradients, fp32 masters and Adam moments (activations aside; 20 bytes
    per trainable parameter in fp32 and in bf16 on ZeRO-1/2/3),
    in the full-rank phase and the ReLoRA phase. ZeRO-3 divides everything by the rank count; ZeRO-1/2
    divide optimizer states (and ZeRO-2 gradients); ZeRO-0 nothing. The ReLoRA phase's frozen W takes
    --base-dtype's bytes (int8/fp8: 1 per weight, its per-row scales aside)."""
    sys.path.insert(0, ROOT)
    from relora_ds.model.build import preset_meta_model
    from relora_ds.model.counts import param_count

    model = preset_meta_model(args.preset, vocab_size)
    total = param_count(model)
    trainable = param_count(model, relora_rank=args.rank, trainable_only=True)
    with_adapters = param_count(model, relora_rank=args.rank)
    p = 2 if args.precision == "bf16" else 4
    # An fp32 master besides the module's parameters everywhere but ZeRO-0 fp32 (where the torch optimizer steps the
    # parameters themselves): DeepSpeed's ZeRO optimizers keep their own fp32 partition even in fp32 runs.
    master = 0 if args.stage == 0 and args.precision == "fp32" else 4

    w_bytes = {"auto": p, "fp32": 4, "bf16": 2, "int8": 1, "fp8": 1}[args.base_dtype]

    def per_rank(params, trainable_params, frozen_bytes=p):
        frozen = params - trainable_params
        param_b = trainable_params * p + frozen * frozen_bytes
        grad_b, opt_b = trainable_params * p, trainable_params * (master + 8)
        if args.stage >= 3:
            param_b /= ranks
        if args.stage >= 2:
            grad_b /= ranks
        if args.stage >= 1:
            opt_b /= ranks
        return param_b + grad_b + opt_b

    return {"params_full": total, "params_relora": with_adapters, "trainable_relora": trainable,
            "full_rank_gib": per_rank(total, total) / GIB,
            "relora_gib": per_rank(with_adapters, trainable, w_bytes) / GIB,
            "model_states_16b_gib": total * 16 / GIB}


def one_world(args, ranks: int, vocab_size: int) -> dict:
    directory = os.path.join(args.work_dir, f"{args.tag}-{ranks}")
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    corpus = write_corpus(directory)
    ds_path = os.path.join(directory, "ds_config.json")
    with open(ds_path, "w") as f:
        json.dump(ds_config(args), f)
    first_steps = args.warm_start + args.steps_after
    import yaml

    config_path = os.path.join(directory, "run.yaml")
    with open(config_path, "w") as f:  # with --stop-signal a run meant to go on, ended by the signal after first_steps
        yaml.safe_dump(run_config(args, directory, first_steps + (1000 if args.stop_signal else 0), ds_path, corpus), f)
    run_dir = os.path.join(directory, "run")
    started = time.time()
    stop = None
    if args.stop_signal:
        stop = launch_and_stop(args, ranks, config_path, os.path.join(directory, "run1.log"),
                               os.path.join(run_dir, "metrics.jsonl"), first_steps)
        first_steps, first_seconds = stop["step"], stop["run_seconds"]
    else:
        first_seconds = launch(args, ranks, config_path, os.path.join(directory, "run1.log"), resume=False)
    phases = memory_phases(os.path.join(run_dir, "metrics.jsonl"), started)
    shutil.copy(os.path.join(run_dir, "metrics.jsonl"), os.path.join(directory, "metrics-run1.jsonl"))

    resume_ranks = args.resume_ranks or ranks
    if resume_ranks != ranks:
        ds_path = os.path.join(directory, "ds_config_resume.json")
        with open(ds_path, "w") as f:
            json.dump(ds_config(args, ranks // resume_ranks if ranks % resume_ranks == 0 else 1), f)
    with open(config_path, "w") as f:
        yaml.safe_dump(run_config(args, directory, first_steps + 1, ds_path, corpus), f)
    started = time.time()
    second_seconds = launch(args, resume_ranks, config_path, os.path.join(directory, "run2.log"), resume=True)
    resumed = memory_phases(os.path.join(run_dir, "metrics.jsonl"), started)
    conversion = universal_conversion(os.path.join(directory, "run2.log"))
    for row in resumed:
        row["phase"] = f"{row['phase']} (resumed)" if row["phase"] != "resume" else "resume"
    export = run_export(args, run_dir, os.path.join(directory, "export"), os.path.join(directory, "export.log"))
    if not args.keep:
        shutil.rmtree(directory, ignore_errors=True)
    return {"ranks": ranks, "resume_ranks": resume_ranks, "phases": phases + resumed, "export": export,
            "run_seconds": [first_seconds, second_seconds], "conversion": conversion, "stop": stop}


def universal_conversion(log_path: str) -> dict | None:
    """The seconds and the converter's peak RSS of a resume on another world size, from its log line."""
    with open(log_path) as f:
        found = re.search(r"resume: converted in ([\d.]+) s, the converter's peak RSS ([\d.]+) GiB", f.read())
    return {"seconds": float(found[1]), "peak_gib": float(found[2])} if found else None


def summarize(args, worlds: list[dict], model: dict, bare_gib: float) -> dict:
    by_ranks = {w["ranks"]: w for w in worlds}
    summary = {}
    for w in worlds:
        peaks = [row["peak_gib"] for row in w["phases"]]
        full = [row["peak_gib"] for row in w["phases"] if row["phase"] == "steps" and row["step"] <= args.warm_start]
        switch = [row["peak_gib"] for row in w["phases"] if row["phase"] == "switch"]
        summary[w["ranks"]] = {"peak_gib": max(peaks), "full_rank_steady_gib": max(full) if full else None,
                               "switch_gib": switch[0] if switch else None}
    result = {"per_world": summary}
    if 1 in by_ranks and len(by_ranks) > 1:
        for n in sorted(by_ranks):
            if n > 1:
                result[f"peak_ratio_{n}_to_1"] = summary[n]["peak_gib"] / summary[1]["peak_gib"]
        result["one_rank_peak_over_states_plus_bare"] = summary[1]["peak_gib"] / (model["model_states_16b_gib"] + bare_gib)
    for n, s in summary.items():
        if s["switch_gib"] and s["full_rank_steady_gib"]:
            result[f"switch_over_full_rank_steady_{n}"] = s["switch_gib"] / s["full_rank_steady_gib"]
    return result


def markdown(record: dict) -> str:
    a = record["args"]
    lines = [f"# Scale rehearsal: {a['preset']}, ZeRO-{a['stage']} {a['precision']}, r={a['rank']}, "
             f"seq {a['seq_len']}, micro batch {a['micro_batch']}, vocabulary {record['vocab_size']}, "
             f"base_dtype {a.get('base_dtype', 'auto')}, activation checkpointing {a.get('activation_checkpointing', 'none')}",
             "", f"{record['date']} · {record['host']['cpu']} · {record['host']['cores']} cores · "
             f"{record['host']['mem_gib']:.0f} GiB · commit {record['commit']} · torch {record['versions']['torch']}"
             f" · deepspeed {record['versions']['deepspeed']} · transformers {record['versions']['transformers']}",
             "", f"Command: `{record['command']}`", "",
             f"Model states: {record['model']['params_full'] / 1e6:.1f}M parameters "
             f"({record['model']['model_states_16b_gib']:.2f} GiB at 16 bytes each); a bare process "
             f"(torch + deepspeed + transformers imported) holds {record['bare_process_gib']:.2f} GiB.", "",
             "Peak memory per rank (GiB; max over ranks) and wall time (s) of each phase; the frozen W as stored on "
             "rank 0 (GiB) beside it:", ""]
    worlds = record["worlds"]
    header = "| phase | step | " + " | ".join(f"{w['ranks']} rank{'s' * (w['ranks'] > 1)}: peak GiB | s | W GiB"
                                             for w in worlds) + " |"
    lines += [header, "|" + "---|" * (2 + 3 * len(worlds))]
    for i, row in enumerate(worlds[0]["phases"]):
        cells = [row["phase"], str(row["step"])]
        for w in worlds:
            other = w["phases"][i] if i < len(w["phases"]) else None
            w_gib = other.get("frozen_w_gib") if other else None
            cells += ([f"{other['peak_gib']:.2f}", f"{other['seconds']:.0f}", "" if w_gib is None else f"{w_gib:.2f}"]
                      if other else ["", "", ""])
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["export (own process)", ""]
    for w in worlds:
        cells += [f"{w['export']['peak_gib']:.2f}", f"{w['export']['seconds']:.0f}", ""]
    lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Analytic model states per rank (GiB; parameters, gradients, masters, moments; no activations):", "",
              "| ranks | full-rank phase | ReLoRA phase |", "|---|---|---|"]
    for n, m in record["analytic_per_rank"].items():
        lines.append(f"| {n} | {m['full_rank_gib']:.2f} | {m['relora_gib']:.2f} |")
    lines += ["", "Summary: " + ", ".join(f"{k} = {v:.3f}" if isinstance(v, float) else f"{k} = {v}"
                                          for k, v in record["summary"].items() if k != "per_world")]
    for w in worlds:
        if w.get("resume_ranks", w["ranks"]) != w["ranks"]:
            c = w["conversion"]
            lines += [f"The {w['ranks']}-rank run resumed on {w['resume_ranks']} rank(s) (the resume and resumed rows): "
                      f"the checkpoint's conversion to DeepSpeed's universal form took {c['seconds']:.1f} s, the "
                      f"converter's peak RSS {c['peak_gib']:.2f} GiB (a process beside rank 0, before it builds)."]
        if w.get("stop"):
            st = w["stop"]
            lines += [f"The {w['ranks']}-rank run was sent {st['signal']} (every process of the launch, through "
                      f"launchers/single_node.sh) once step {st['logged_step']} was logged: it finished step "
                      f"{st['step']}, saved its checkpoint (the checkpoint row at step {st['step']}) and exited "
                      f"{st['seconds_to_exit']:.1f} s after the signal, with status {st['exit_status']}; the resume "
                      f"rows continue from that checkpoint."]
    exported = worlds[-1]["export"]
    lines += [f"Exported model: {exported['exported_gib']:.2f} GiB; export peak / exported size = "
              f"{exported['peak_gib'] / exported['exported_gib']:.2f}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, ROOT)
    if args.vocab_size is None:
        from relora_ds.data.tokenize import load_tokenizer

        args.vocab_size = len(load_tokenizer(None))
    args.tag = args.tag or f"{args.preset}-zero{args.stage}-{args.precision}"
    import deepspeed
    import torch
    import transformers

    bare = bare_process_gib()
    worlds = [one_world(args, n, args.vocab_size) for n in args.ranks]
    model = model_state_bytes(args, args.vocab_size, 1)
    record = {
        "date": datetime.date.today().isoformat(), "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]),
        "args": vars(args), "vocab_size": args.vocab_size,
        "commit": subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                 cwd=ROOT).stdout.strip(),
        "host": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                 "mem_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB},
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "bare_process_gib": bare, "model": model, "ds_config": ds_config(args),
        "analytic_per_rank": {n: model_state_bytes(args, args.vocab_size, n) for n in args.ranks},
        "worlds": worlds,
    }
    record["summary"] = summarize(args, worlds, model, bare)
    os.makedirs(RESULTS, exist_ok=True)
    stem = os.path.join(RESULTS, f"{record['date']}-scale-{args.tag}")
    atomic_write(stem + ".json", json.dumps(record, indent=1))
    text = markdown(record)
    atomic_write(stem + ".md", text)
    print(text)
    print(f"written: {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
