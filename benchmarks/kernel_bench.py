"""Benchmark the fused ReLoRA linear against cuBLAS and the unfused torch reference (CUDA only).

    python benchmarks/kernel_bench.py                   # LLaMA-1.3B and 7B shapes, r ∈ {64,128,256}, bf16
    python benchmarks/kernel_bench.py --models 1.3b --ranks 128 --tokens 4096     # a quick subset

For each projection shape it measures the median time (triton.testing.do_bench) of the forward and
of forward+backward (dX, dA, dB; W frozen) for
    (a) cublas:    x·Wᵀ alone (F.linear) — the floor a fused kernel is compared with,
    (b) reference: the unfused torch ReLoRA linear (relora_ds.kernels.reference),
    (c) fused:     the Triton kernels (relora_ds.kernels.fused_relora_linear),
prints a markdown table and writes it, with a JSON file (GPU, versions, date, every row), under
benchmarks/results/. Targets on an H100: fused fwd+bwd ≥ 1.35× faster than the reference, fused
forward ≤ 1.08× the cuBLAS forward. Without CUDA it says so and exits 0, writing nothing.
"""

import argparse
import datetime
import json
import os
import platform
import re
import sys

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from relora_ds.files import atomic_write  # noqa: E402

# hidden, intermediate (paper Table 1 for 1.3B; LLaMA-7B)
MODELS = {"1.3b": (2048, 5461), "7b": (4096, 11008)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def projections(hidden: int, ffn: int) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of the distinct LLaMA projection shapes."""
    return [("attn d→d", hidden, hidden), ("mlp d→ffn", hidden, ffn), ("mlp ffn→d", ffn, hidden)]


def flops(tokens: int, in_f: int, out_f: int, rank: int) -> dict[str, float]:
    """Useful FLOPs of each variant (multiply-add = 2); W frozen, so backward has no dW."""
    base = 2.0 * tokens * in_f * out_f
    low_fwd = 2.0 * tokens * rank * (in_f + out_f)            # S = x·Aᵀ, S·Bᵀ
    low_bwd = 2.0 * tokens * rank * (2 * out_f + 2 * in_f)    # dS, dB, dA, dS·A
    return {"cublas_fwd": base, "cublas_fwdbwd": 2 * base,
            "relora_fwd": base + low_fwd, "relora_fwdbwd": 2 * base + low_fwd + low_bwd}


def bench_one(tokens, in_f, out_f, rank, dtype, scale=0.25):
    from triton.testing import do_bench

    from relora_ds.kernels import fused_relora_linear, reference_relora_linear

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, in_f, device="cuda", generator=g).to(dtype).requires_grad_()
    W = (torch.randn(out_f, in_f, device="cuda", generator=g) / in_f ** 0.5).to(dtype)
    A = (torch.randn(rank, in_f, device="cuda", generator=g) / in_f ** 0.5).to(dtype).requires_grad_()
    B = (torch.randn(out_f, rank, device="cuda", generator=g) / rank ** 0.5).to(dtype).requires_grad_()
    dy = torch.randn(tokens, out_f, device="cuda", generator=g).to(dtype)

    variants = {
        "cublas": (lambda: F.linear(x, W), (x,)),
        "reference": (lambda: reference_relora_linear(x, W, None, A, B, scale), (x, A, B)),
        "fused": (lambda: fused_relora_linear(x, W, None, A, B, scale), (x, A, B)),
    }
    times = {}
    for name, (fwd, wrt) in variants.items():
        with torch.no_grad():
            times[f"{name}_fwd_ms"] = do_bench(fwd, warmup=25, rep=100, return_mode="median")
        times[f"{name}_fwdbwd_ms"] = do_bench(lambda: torch.autograd.grad(fwd(), wrt, dy),
                                              warmup=25, rep=100, return_mode="median")
    # Accuracy of this very shape (fused and reference against an fp32 computation of the same inputs).
    with torch.no_grad():
        y32 = reference_relora_linear(x.float(), W.float(), None, A.float(), B.float(), scale)
        fused_err = float((variants["fused"][0]().float() - y32).norm() / y32.norm())
        ref_err = float((variants["reference"][0]().float() - y32).norm() / y32.norm())
    return times, {"fused_rel_err_fwd": fused_err, "reference_rel_err_fwd": ref_err}


def tflops(f: float, ms: float) -> float:
    return f / (ms * 1e-3) / 1e12


def environment() -> dict:
    import triton

    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(0),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "sm_count": props.multi_processor_count,
        "gpu_memory_gib": round(props.total_memory / 2 ** 30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def markdown(rows: list[dict], env: dict) -> str:
    lines = [f"# ReLoRA linear kernels on {env['gpu']} (sm{env['capability'].replace('.', '')})",
             "",
             f"torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, {env['date']}. "
             "Median ms (triton.testing.do_bench), TFLOP/s of useful work in brackets. "
             "fwd+bwd computes dX, dA, dB (W frozen).",
             "",
             "| model | proj | tokens | r | dtype | cuBLAS fwd | ref fwd | fused fwd | fused/cuBLAS fwd "
             "| cuBLAS fwd+bwd | ref fwd+bwd | fused fwd+bwd | ref/fused fwd+bwd |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def cell(variant, kind):
            return f"{r[f'{variant}_{kind}_ms']:.3f} ({r[f'{variant}_{kind}_tflops']:.0f})"
        lines.append(
            f"| {r['model']} | {r['proj']} | {r['tokens']} | {r['rank']} | {r['dtype']} "
            f"| {cell('cublas', 'fwd')} | {cell('reference', 'fwd')} | {cell('fused', 'fwd')} "
            f"| {r['fused_over_cublas_fwd']:.3f}× "
            f"| {cell('cublas', 'fwdbwd')} | {cell('reference', 'fwdbwd')} | {cell('fused', 'fwdbwd')} "
            f"| {r['speedup_fwdbwd_vs_reference']:.3f}× |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--ranks", nargs="+", type=int, default=[64, 128, 256])
    parser.add_argument("--tokens", nargs="+", type=int, default=[4096, 16384])
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"),
                        help="folder for the .md and .json results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernel_bench.py needs a CUDA GPU; none found, nothing measured, nothing written.")
        return 0
    from relora_ds.kernels import triton_available

    if not triton_available():
        print("benchmarks/kernel_bench.py needs triton on a GPU of compute capability >= 8.0; nothing written.")
        return 0

    env = environment()
    rows = []
    for model in args.models:
        for proj, in_f, out_f in projections(*MODELS[model]):
            for tokens in args.tokens:
                for rank in args.ranks:
                    times, errors = bench_one(tokens, in_f, out_f, rank, DTYPES[args.dtype])
                    row = {"model": model, "proj": proj, "in_features": in_f, "out_features": out_f,
                           "tokens": tokens, "rank": rank, "dtype": args.dtype, **times, **errors}
                    f = flops(tokens, in_f, out_f, rank)
                    for variant in ("cublas", "reference", "fused"):
                        for kind in ("fwd", "fwdbwd"):
                            key = f"{'cublas' if variant == 'cublas' else 'relora'}_{kind}"
                            row[f"{variant}_{kind}_tflops"] = tflops(f[key], row[f"{variant}_{kind}_ms"])
                    row["fused_over_cublas_fwd"] = row["fused_fwd_ms"] / row["cublas_fwd_ms"]
                    row["speedup_fwdbwd_vs_reference"] = row["reference_fwdbwd_ms"] / row["fused_fwdbwd_ms"]
                    rows.append(row)
                    print(f"{model} {proj} tokens={tokens} r={rank}: fused fwd {row['fused_fwd_ms']:.3f} ms "
                          f"({row['fused_over_cublas_fwd']:.3f}× cuBLAS), fwd+bwd "
                          f"{row['speedup_fwdbwd_vs_reference']:.3f}× faster than the reference", flush=True)

    table = markdown(rows, env)
    print("\n" + table)
    os.makedirs(args.out, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", env["gpu"].lower()).strip("-")
    stem = os.path.join(args.out, f"kernels_{slug}_{env['date'][:10]}")
    atomic_write(stem + ".md", table)
    atomic_write(stem + ".json", json.dumps({"environment": env, "args": vars(args), "rows": rows}, indent=2))
    print(f"wrote {stem}.md and {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
