"""How much of ReLoRA's merged updates survive a stored W: K merges of low-rank updates into a W kept in bf16, int8 or
fp8, with round-to-nearest, stochastic rounding, and each with error feedback (the residual of every rounding carried
into the next merge), against the exact fp32 sum.

    python benchmarks/merge_rounding.py            # prints the table, writes results/<date>-merge-rounding.{json,md}

W is (1024 x 1024), normal with std 0.02 (transformers' init); each merge adds s·B·A of rank 64 whose Frobenius norm is
`ratio` × ||W||; the error is ||W_K - (W_0 + sum of updates)|| / ||sum of updates|| (0: every update kept exactly;
1: as if no update had been made). Error feedback needs a residual as large as W (fp32: 4 bytes per weight), which
is more than the bytes a stored W saves, so it would ship only if the error without it were unusable.
A benchmark, not a test: numbers, not assertions.
"""

import datetime
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from relora_ds.files import atomic_write  # noqa: E402
from relora_ds.relora import quant  # noqa: E402

SIZE, RANK, MERGES, SEEDS = 1024, 64, 20, 3
RATIOS = (1e-3, 1e-2, 5e-2)


def run(fmt: str, rounding: str, feedback: bool, ratio: float, seed: int) -> tuple[float, float]:
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(SIZE, SIZE, generator=g) * 0.02
    q, scale = quant.quantize(w0, fmt)
    start = quant.dequantize(q, scale)
    total = torch.zeros_like(w0)
    residual = torch.zeros_like(w0)
    for k in range(MERGES):
        delta = torch.randn(SIZE, RANK, generator=g) @ torch.randn(RANK, SIZE, generator=g)
        delta *= ratio * w0.norm() / delta.norm()
        total += delta
        merged = quant.dequantize(q, scale) + delta + residual
        q, scale = quant.quantize(merged, fmt, rounding=rounding, generator=torch.Generator().manual_seed(1000 + k))
        if feedback:
            residual = merged - quant.dequantize(q, scale)
    moved = quant.dequantize(q, scale) - start
    return float((moved - total).norm() / total.norm()), float((moved * total).sum() / total.square().sum())


def main() -> int:
    rows = []
    for fmt in ("bf16", "int8", "fp8"):
        for rounding in quant.MERGE_ROUNDINGS:
            for feedback in (False, True):
                row = {"format": fmt, "rounding": rounding, "error_feedback": feedback}
                for ratio in RATIOS:
                    runs = torch.tensor([run(fmt, rounding, feedback, ratio, s) for s in range(SEEDS)])
                    row[f"{ratio:g}"] = [float(runs[:, 0].mean()), float(runs[:, 0].std())]
                    row[f"kept {ratio:g}"] = [float(runs[:, 1].mean()), float(runs[:, 1].std())]
                rows.append(row)
    lines = ["# Merge rounding: the share of merged updates lost by a stored W", "",
             f"{datetime.date.today().isoformat()} · torch {torch.__version__} · W {SIZE}x{SIZE} (std 0.02), "
             f"{MERGES} merges of rank-{RANK} updates, {SEEDS} seeds (mean ± sd)", "",
             "Command: `python benchmarks/merge_rounding.py`", "",
             "Relative error of the accumulated update, ||W_K − (W_0 + ΣΔ)|| / ||ΣΔ||, by the size of one merge's "
             "update (||Δ|| / ||W||), and the share of the update kept, <W_K − W_0, ΣΔ> / ||ΣΔ||² (1: kept in expectation; "
             "0: lost):", "",
             "| W | rounding | error feedback | " + " | ".join(f"error at {r:g}" for r in RATIOS) + " | "
             + " | ".join(f"kept at {r:g}" for r in RATIOS) + " |",
             "|---|---|---|" + "---|" * (2 * len(RATIOS))]
    for row in rows:
        cells = [f"{row[f'{r:g}'][0]:.3f} ± {row[f'{r:g}'][1]:.3f}" for r in RATIOS]
        cells += [f"{row[f'kept {r:g}'][0]:.3f}" for r in RATIOS]
        lines.append(f"| {row['format']} | {row['rounding']} | {'yes' if row['error_feedback'] else 'no'} | "
                     + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    stem = os.path.join(ROOT, "benchmarks", "results", f"{datetime.date.today().isoformat()}-merge-rounding")
    atomic_write(stem + ".json", json.dumps({"rows": rows, "size": SIZE, "rank": RANK, "merges": MERGES,
                                             "seeds": SEEDS}, indent=1))
    atomic_write(stem + ".md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
