#!/usr/bin/env python
"""Can `relora-ds analyze` run on a machine with less memory than the fp32 model?

    python benchmarks/analyze_memory.py [--preset 1b] [--limit-gib 4] [--workdir DIR] [--keep]

Writes two exported models of the preset (fp32 safetensors, the tokenizer's 8 192-token vocabulary): A random,
B = A + a rank-16 update of every projection (so ΔW's spectrum is known: 16 singular values per weight). Then
runs `relora-ds analyze A B` in a child process, once without a limit and once inside a cgroup-v1 memory limit
of --limit-gib (when /sys/fs/cgroup/memory is writable; root only; the page cache dropped first), sampling the child's anonymous memory
(RssAnon) every 0.2 s. The memory-mapped safetensors pages count in the RSS but are clean page cache, which the
kernel reclaims under the limit; what must fit is the anonymous memory. The models (2 × 4.6 GiB at 1b) go to a new
temporary directory (or --workdir), removed at the end unless --keep; the cgroup is named after this process, so
two runs side by side do not share one. Results: benchmarks/results/<date>-analyze-memory-<preset>-cpu.{json,md}.
"""

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CGROUP = f"/sys/fs/cgroup/memory/relora-ds-analyze-memory-{os.getpid()}"
# The checkout first (relora_ds importable from any working directory).
sys.path[:] = [ROOT] + [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
from relora_ds.files import atomic_write  # noqa: E402


def make_models(preset: str, workdir: str) -> int:
    """Save A and B; return the fp32 model's bytes."""
    import torch

    from relora_ds.model.build import build_model

    model = build_model(preset, 8192, seed=0)
    model.save_pretrained(os.path.join(workdir, "A"), max_shard_size="2GB")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                out, inp = p.shape
                p.add_(torch.randn(out, 16, generator=g) @ torch.randn(16, inp, generator=g) * 0.01)
    model.save_pretrained(os.path.join(workdir, "B"), max_shard_size="2GB")
    return sum(p.numel() * 4 for p in model.parameters())


def run_analyze(workdir: str, out: str, limit_bytes: int | None) -> dict:
    """One `relora-ds analyze A B` child; its peak RssAnon and VmHWM (sampled), wall time and exit code."""
    prefix = ""
    if limit_bytes is not None:
        # Cached pages of the models would stay charged to whoever read them first: start from an empty page cache,
        # so every page the child maps is charged to (and reclaimed within) its limit.
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        os.makedirs(CGROUP, exist_ok=True)
        with open(os.path.join(CGROUP, "memory.limit_in_bytes"), "w") as f:
            f.write(str(limit_bytes))
        prefix = f"echo $$ > {CGROUP}/cgroup.procs; "
    command = (f"{prefix}exec {sys.executable} -m relora_ds analyze {workdir}/A {workdir}/B --out {out} "
               f"--no-progress")
    started = time.perf_counter()
    child = subprocess.Popen(["sh", "-c", command], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    anon = hwm = 0
    while child.poll() is None:
        try:
            with open(f"/proc/{child.pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            anon = max(anon, int(fields.get("RssAnon", "0 kB").split()[0]) * 1024)
            hwm = max(hwm, int(fields.get("VmHWM", "0 kB").split()[0]) * 1024)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
        time.sleep(0.2)
    output = child.stdout.read()
    result = {"limit_bytes": limit_bytes, "exit_code": child.returncode, "seconds": time.perf_counter() - started,
              "peak_rss_anon_bytes": anon, "peak_rss_bytes": hwm,
              "summary_line": next((line for line in output.splitlines() if " singular values of ΔW above" in line),
                                   output.strip().splitlines()[-1:])}
    if limit_bytes is not None:  # what the cgroup charged (page cache included) and how often it hit the limit
        for key in ("max_usage_in_bytes", "failcnt"):
            with open(os.path.join(CGROUP, f"memory.{key}")) as f:
                result[f"cgroup_{key}"] = int(f.read())
        os.rmdir(CGROUP)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="1b")
    p.add_argument("--limit-gib", type=float, default=4.0, help="the cgroup memory limit of the limited run")
    p.add_argument("--workdir", default=None, help="where the two models go (default: a new temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the models and the analyses in the workdir")
    args = p.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="relora-ds-analyze-memory-")
    os.makedirs(workdir, exist_ok=True)
    try:
        model_bytes = make_models(args.preset, workdir)
        runs = [run_analyze(workdir, os.path.join(workdir, "out"), None)]
        if os.access(os.path.dirname(CGROUP), os.W_OK):
            runs.append(run_analyze(workdir, os.path.join(workdir, "out-limited"), int(args.limit_gib * 2**30)))
        else:
            print(f"{os.path.dirname(CGROUP)}: not writable; the limited run is left out", file=sys.stderr)
    finally:
        if not args.keep:
            for name in ("A", "B", "out", "out-limited"):
                shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
            if not args.workdir:
                shutil.rmtree(workdir, ignore_errors=True)

    from relora_ds.hardware import host, package_versions

    record = {"preset": args.preset, "vocab_size": 8192, "fp32_model_bytes": model_bytes, "runs": runs,
              "host": host(), "versions": package_versions(("torch", "transformers", "safetensors", "relora-ds")),
              "date": datetime.date.today().isoformat()}
    gib = lambda b: f"{b / 2**30:.2f}" if b is not None else "none"  # noqa: E731
    lines = [f"# relora-ds analyze memory, {args.preset} (fp32 model {gib(model_bytes)} GiB), CPU", "",
             f"`python benchmarks/analyze_memory.py --preset {args.preset} --limit-gib {args.limit_gib}`; "
             f"{record['host']['cpu_model']}, {record['host']['cpu_count']} cores; "
             + ", ".join(f"{k} {v}" for k, v in record["versions"].items() if v) + f"; {record['date']}.", "",
             "| memory limit (GiB) | exit | seconds | peak anonymous RSS (GiB) | peak RSS incl. mapped files (GiB) | "
             "cgroup peak charge (GiB) / times at the limit | result |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        charged = (f"{gib(r['cgroup_max_usage_in_bytes'])} / {r['cgroup_failcnt']:,}" if "cgroup_failcnt" in r
                   else "—")
        lines.append(f"| {gib(r['limit_bytes'])} | {r['exit_code']} | {r['seconds']:.0f} | "
                     f"{gib(r['peak_rss_anon_bytes'])} | {gib(r['peak_rss_bytes'])} | {charged} | {r['summary_line']} |")
    name = f"{record['date']}-analyze-memory-{args.preset}-cpu"
    out_dir = os.path.join(HERE, "results")
    atomic_write(os.path.join(out_dir, name + ".json"), json.dumps(record, indent=2))
    atomic_write(os.path.join(out_dir, name + ".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["exit_code"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
