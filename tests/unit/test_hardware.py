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
