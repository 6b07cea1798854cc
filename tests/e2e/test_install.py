"""A built wheel, installed into an empty folder, carries what a user needs outside the checkout:
the shipped DeepSpeed JSONs (resolved by name), run configs, corpus and tokenizer."""

import os
import subprocess
import sys

from tests.helpers import ROOT


def test_wheel_ships_ds_configs_configs_and_data(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(wheels), ROOT], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.iterdir()
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]

    probe = ("import os, relora_ds; from relora_ds.engine import ds_config as d; "
             "p = d.resolve_path('ds_configs/zero3.json'); "
             "print(os.path.dirname(relora_ds.__file__)); print(p); print(d.load_ds_config(p)['zero_optimization']['stage']); "
             "print(sorted(os.listdir(os.path.join(os.path.dirname(relora_ds.__file__), 'configs'))))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(target)}
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    package, resolved, stage, configs = proc.stdout.splitlines()
    assert package == str(target / "relora_ds")  # the installed copy, not the checkout
    assert resolved == str(target / "relora_ds" / "ds_configs" / "zero3.json") and stage == "3"
    assert "demo.yaml" in configs
    for shipped in ("data/sample/sotu/train.jsonl.gz", "data/sample/sotu-bpe-8k/tokenizer.json"):
        assert (target / "relora_ds" / shipped).is_file(), shipped
