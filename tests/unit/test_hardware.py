"""hardware.peak_flops_per_device: the one rule for the MFU peak (trainer log and benchmark)."""

from relora_ds import hardware


def test_peak_by_gpu_name_override_cpu_unlisted_and_fp32():
    h100 = "NVIDIA H100 80GB HBM3"
    assert hardware.peak_flops_per_device(None, h100, "bf16") == (989e12, "table: H100 dense bf16/fp16 989 TFLOP/s")
    assert hardware.peak_flops_per_device(None, h100, "fp32") == (
        None, "fp32 run: the table holds bf16/fp16 peaks (pass --peak-tflops)")
    assert hardware.peak_flops_per_device(2.5, h100, "fp32") == (2.5e12, "--peak-tflops")  # the user's value wins
    assert hardware.peak_flops_per_device(None, None, "bf16", option="log.peak_tflops") == (
        None, "CPU: no peak known (pass log.peak_tflops)")
    assert hardware.peak_flops_per_device(None, "Tesla V100", "bf16") == (
        None, "Tesla V100: not in the table (pass --peak-tflops)")


def test_host_and_package_versions_describe_this_machine():
    """One record of the machine for every benchmark (bench worker, data benchmark, study summary)."""
    import os

    from relora_ds.hardware import host, package_versions

    machine = host()
    assert machine["cpu_count"] == os.cpu_count() and 1 <= machine["cpu_usable"] <= machine["cpu_count"]
    assert machine["memory_bytes"] > 2**28 and machine["cpu_model"]
    import torch

    found = package_versions(("torch", "no-such-package-relora"))
    assert list(found) == ["torch", "no-such-package-relora"]
    assert found["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert found["no-such-package-relora"] is None
