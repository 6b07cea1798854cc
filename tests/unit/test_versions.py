import os
import re
import warnings

import pytest

from relora_ds.engine import runtime, versions
from relora_ds.engine.versions import ALLOW_UNTESTED_ENV, TESTED_DEEPSPEED, UnsupportedVersionError
from tests.helpers import ROOT


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    monkeypatch.delenv(ALLOW_UNTESTED_ENV, raising=False)


@pytest.mark.parametrize("version", ["0.19.8", "0.19.8+cu124", "0.19.12"])
def test_tested_versions_pass(version):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        versions.check_deepspeed_version(version)


def test_installed_deepspeed_is_tested():
    versions.check_deepspeed_version()  # the venv's own DeepSpeed


@pytest.mark.parametrize("version", ["0.18.0", "0.19.7", "0.20.0rc1", "0.20.1", "not-a-version"])
def test_untested_versions_are_refused_in_one_line(version):
    with pytest.raises(UnsupportedVersionError) as info:
        versions.check_deepspeed_version(version)
    message = str(info.value)
    assert "\n" not in message
    assert f"deepspeed {version} is installed" in message
    assert f"deepspeed{TESTED_DEEPSPEED}" in message and f"{ALLOW_UNTESTED_ENV}=1" in message


def test_override_warns_instead(monkeypatch):
    monkeypatch.setenv(ALLOW_UNTESTED_ENV, "1")
    with pytest.warns(UserWarning, match=rf"deepspeed 0\.20\.1 is installed .*running anyway because "
                                         rf"{ALLOW_UNTESTED_ENV}=1") as record:
        versions.check_deepspeed_version("0.20.1")
    assert "\n" not in str(record[0].message)
    monkeypatch.setenv(ALLOW_UNTESTED_ENV, "yes")  # only 1 overrides
    with pytest.raises(UnsupportedVersionError):
        versions.check_deepspeed_version("0.20.1")


def test_prepare_deepspeed_checks_the_installed_version(monkeypatch):
    monkeypatch.setattr(versions.metadata, "version", lambda name: "0.18.0")
    with pytest.raises(UnsupportedVersionError, match="deepspeed 0.18.0 is installed"):
        runtime.prepare_deepspeed()


def test_setup_py_pins_the_tested_range():
    setup = open(os.path.join(ROOT, "setup.py")).read()
    assert f'"deepspeed{TESTED_DEEPSPEED}"' in setup
    assert re.search(r'"torch>=2\.5"', setup)  # safe_globals for the weights_only checkpoint reads


def test_cli_prints_one_line_and_exits_2(monkeypatch, capsys):
    from relora_ds import cli

    monkeypatch.setattr(versions.metadata, "version", lambda name: "0.20.1")
    assert cli.run_guarded(lambda args: runtime.prepare_deepspeed(), None) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: deepspeed 0.20.1 is installed") and err.count("\n") == 1
