"""Loading saved Hugging Face models (exported relora-ds models, or any LLaMA checkpoint dir)."""

from relora_ds.model.llama import resolve_attn_implementation, zero3_construction


def check_model_dir(path: str) -> None:
    """A one-line ValueError unless `path` is a Hugging Face model directory (config.json and weights)."""
    import glob
    import os

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path}: not a Hugging Face model directory (no config.json); model.init_from and "
                         f"`relora-ds eval` take an exported model dir")
    if not glob.glob(os.path.join(path, "*.safetensors")) and not glob.glob(os.path.join(path, "*.bin")):
        raise ValueError(f"{path}: a config.json but no weights (*.safetensors or *.bin); model.init_from and "
                         f"`relora-ds eval` take an exported model dir")


def load_pretrained(path: str, attn_implementation: str = "auto", zero3_config: dict | None = None):
    """AutoModelForCausalLM.from_pretrained(path) in fp32 with the chosen attention kernel; on ZeRO-3
    (zero3_config) built partitioned and filled parameter by parameter (model.llama.zero3_construction)."""
    from transformers import AutoModelForCausalLM

    check_model_dir(path)
    with zero3_construction(zero3_config):
        return AutoModelForCausalLM.from_pretrained(path, attn_implementation=resolve_attn_implementation(attn_implementation))
