"""The benchmark scripts run as `python benchmarks/X.py`, which puts benchmarks/ first on sys.path: a script there
named like a package that transformers imports (benchmarks/kernels.py shadowed the `kernels` package, so building a
LLaMA config failed in benchmarks/scale.py) breaks every script that imports transformers. The data-order benchmark
runs in its smoke size and writes its table."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCHMARKS = os.path.join(ROOT, "benchmarks")


def test_no_benchmark_script_shadows_what_transformers_imports():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "import transformers.models.llama.configuration_llama, transformers.activations")
    result = subprocess.run([sys.executable, "-c", code, BENCHMARKS], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-600:]


@pytest.mark.slow
def test_data_order_benchmark_runs_and_writes_its_table(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "data_order.py"), "--quick", "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    table = next(tmp_path.glob("*-data-order-cpu.md")).read_text()
    assert "| mixture of 3 | 64 | 512 |" in table and "| 1,000,000 |" in table
