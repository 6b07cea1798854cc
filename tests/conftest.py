import os

# Triton's interpreter must be chosen before any triton kernel module is imported.
# On a machine without CUDA the kernels run under the interpreter (docs/deepspeed.md, "Triton without a GPU").
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# DeepSpeed: CPU accelerator, no shared-memory comm op compile, per-venv extension dir.
if not _HAS_CUDA:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402


SLOW_DIRS = ("e2e", "distributed")  # every test there runs the trainer, a CLI run or spawns ranks


def pytest_collection_modifyitems(config, items):
    """Tiers: `slow` on every test under tests/e2e and tests/distributed (`make test-fast` leaves them out);
    `gpu` tests skipped without CUDA."""
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if os.path.basename(os.path.dirname(str(item.path))) in SLOW_DIRS:
            item.add_marker(pytest.mark.slow)
        if not _HAS_CUDA and "gpu" in item.keywords:
            item.add_marker(skip_gpu)
