"""The DeepSpeed versions relora-ds is tested with.

The ReLoRA restart (engine/restart.py) and the checkpoint export read DeepSpeed internals (fp32 master
fragments, optimizer state layout, zero_to_fp32) that were verified on DeepSpeed 0.19.8 only; another
version may train with silently wrong restarts. Outside TESTED_DEEPSPEED a run stops before DeepSpeed is
used, unless ALLOW_UNTESTED_ENV=1, which turns the error into a warning.
"""

import os
import warnings
from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

TESTED_DEEPSPEED = ">=0.19.8,<0.20"  # keep setup.py's install_requires pin equal to this
ALLOW_UNTESTED_ENV = "RELORA_DS_ALLOW_UNTESTED_DEEPSPEED"


class UnsupportedVersionError(ValueError):
    """The installed DeepSpeed is outside TESTED_DEEPSPEED and ALLOW_UNTESTED_ENV is not 1."""


def check_deepspeed_version(version: str | None = None) -> None:
    """Raise UnsupportedVersionError when `version` (default: the installed deepspeed's) is outside
    TESTED_DEEPSPEED; with ALLOW_UNTESTED_ENV=1 only warn. Reads package metadata; does not import deepspeed."""
    if version is None:
        try:
            version = metadata.version("deepspeed")
        except metadata.PackageNotFoundError:
            raise UnsupportedVersionError(f"deepspeed is not installed; relora-ds needs "
                                          f"pip install 'deepspeed{TESTED_DEEPSPEED}'") from None
    try:
        tested = Version(version) in SpecifierSet(TESTED_DEEPSPEED)
    except InvalidVersion:
        tested = False
    if tested:
        return
    untested = (f"deepspeed {version} is installed but relora-ds is tested with deepspeed{TESTED_DEEPSPEED} only "
                f"(the ReLoRA restart reads DeepSpeed internals)")
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        warnings.warn(f"{untested}; running anyway because {ALLOW_UNTESTED_ENV}=1", stacklevel=2)
        return
    raise UnsupportedVersionError(f"{untested}: pip install 'deepspeed{TESTED_DEEPSPEED}', or set "
                                  f"{ALLOW_UNTESTED_ENV}=1 to run anyway")
