"""Hugging Face files: saved model directories (exported relora-ds models or any causal LM checkpoint dir,
model.init_from and `relora-ds eval`: checked and their config read here, loaded by model.build.load_pretrained)
and config.json files to build from scratch (model.hf_config). Reads files only: it imports nothing of model.build,
which imports it."""

import json
import os


def check_model_dir(path: str) -> None:
    """A one-line ValueError unless `path` is a Hugging Face model directory (config.json and weights)."""
    import glob

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path}: not a Hugging Face model directory (no config.json); model.init_from and "
                         f"`relora-ds eval` take an exported model dir")
    if not glob.glob(os.path.join(path, "*.safetensors")) and not glob.glob(os.path.join(path, "*.bin")):
        raise ValueError(f"{path}: a config.json but no weights (*.safetensors or *.bin); model.init_from and "
                         f"`relora-ds eval` take an exported model dir")


def pretrained_config(path: str):
    """The transformers config of a saved model directory (model.init_from); one-line ValueErrors."""
    from transformers import AutoConfig

    check_model_dir(path)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"model.init_from {path}: unreadable config.json ({' '.join(str(e).split())[:200]})") from None


def load_hf_config(path: str, min_vocab_size: int = 1):
    """The transformers config in a config.json (model.hf_config: the file, or a directory holding one), to build a
    randomly initialised model from. Its vocab_size must hold `min_vocab_size` tokens (the tokenizer's, or
    model.vocab_size). One-line ValueErrors naming model.hf_config."""
    from transformers import AutoConfig

    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ValueError(f"model.hf_config {path}: no such file (expected a transformers config.json)")
    try:
        with open(file) as f:
            fields = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"model.hf_config {path}: not a JSON file ({' '.join(str(e).split())[:160]})") from None
    if not isinstance(fields, dict) or not isinstance(fields.get("model_type"), str):
        raise ValueError(f"model.hf_config {path}: not a transformers config.json (expected an object with a "
                         f"\"model_type\", e.g. \"llama\")")
    model_type = fields.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"model.hf_config {path}: transformers cannot read it ({' '.join(str(e).split())[:200]})") \
            from None
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int) or vocab < min_vocab_size:
        raise ValueError(f"model.hf_config {path}: vocab_size {vocab} is smaller than the {min_vocab_size} tokens "
                         f"of the tokenizer (or model.vocab_size); raise vocab_size in it")
    return config


def weights_index(path: str) -> dict:
    """{tensor name: its file} of a saved model directory: its safetensors (one model.safetensors, or the shards named
    in model.safetensors.index.json) or, without them, its *.bin saved by torch.save's zip format (one
    pytorch_model.bin, or the shards named in pytorch_model.bin.index.json), which can be memory-mapped; {} for
    neither (legacy *.bin files are loaded whole). One-line ValueError for a broken index."""
    import zipfile

    import torch

    for index_name, single_name in (("model.safetensors.index.json", "model.safetensors"),
                                    ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index, single = os.path.join(path, index_name), os.path.join(path, single_name)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    files = {name: os.path.join(path, file) for name, file in json.load(f)["weight_map"].items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{index}: unreadable ({' '.join(str(e).split())[:160]})") from None
        elif not os.path.isfile(single):
            continue
        elif single.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(single, framework="pt") as f:
                files = {name: single for name in f.keys()}
        elif zipfile.is_zipfile(single):
            files = {name: single for name in torch.load(single, map_location="cpu", mmap=True, weights_only=True)}
        else:
            return {}
        if single.endswith(".bin") and not all(zipfile.is_zipfile(file) for file in set(files.values())):
            return {}
        return files
    return {}
