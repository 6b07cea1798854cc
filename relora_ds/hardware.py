"""Peak FLOP/s of an accelerator, for MFU (the trainer's log records and the throughput benchmark); and the host
and package versions every benchmark records with its results (`host`, `package_versions`).

    peak_tflops("NVIDIA H100 80GB HBM3")    # (989.0, "H100")
    peak_flops_per_device(None, gpu_name, "bf16")   # (9.89e14, "table: H100 dense bf16/fp16 989 TFLOP/s")

The table holds dense bf16/fp16 tensor-core peaks (no sparsity): an fp32 run has no peak from it.
No torch import: the caller reads the GPU name.
"""

import importlib.metadata
import os
import platform

# Dense bf16/fp16 tensor-core peak, TFLOP/s, matched in order against the GPU name (first hit wins).
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),   # SXM
    ("H200 NVL", 835.0),
    ("H200", 989.0),   # SXM
    ("A100", 312.0),
)


def peak_tflops(gpu_name: str | None) -> tuple[float, str] | None:
    """(dense bf16/fp16 TFLOP/s, the table's name for it) for a GPU name; None for CPU or an unlisted GPU."""
    if gpu_name is None:
        return None
    for name, tflops in PEAK_TFLOPS:
        if name.lower() in gpu_name.lower():
            return tflops, name
    return None


def peak_flops_per_device(override_tflops: float | None, gpu_name: str | None, precision: str,
                          option: str = "--peak-tflops") -> tuple[float | None, str]:
    """(peak FLOP/s per device, where it came from); None when unknown (CPU, unlisted GPU, an fp32 run).

    `override_tflops` (the user's setting, named `option` in the messages) wins over the table, which holds
    bf16/fp16 peaks only: an fp32 run (`precision` "fp32") gets none from it.
    """
    if override_tflops is not None:
        return override_tflops * 1e12, option
    if gpu_name is None:
        return None, f"CPU: no peak known (pass {option})"
    found = peak_tflops(gpu_name)
    if found is None:
        return None, f"{gpu_name}: not in the table (pass {option})"
    if precision == "fp32":
        return None, f"fp32 run: the table holds bf16/fp16 peaks (pass {option})"
    tflops, name = found
    return tflops * 1e12, f"table: {name} dense bf16/fp16 {tflops:g} TFLOP/s"


def host() -> dict:
    """The machine: CPU model (from /proc/cpuinfo where there is one), cores, cores this process may use, memory."""
    cpu_model = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu_model = names[0] if names else cpu_model
    return {"cpu_model": cpu_model, "cpu_count": os.cpu_count(),
            "cpu_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}


def package_versions(packages) -> dict:
    """{package: installed version, or None when it is not installed}, in the order given."""
    found = {}
    for package in packages:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found
