"""Loading saved Hugging Face models (exported relora-ds models, or any LLaMA checkpoint dir)."""

from relora_ds.model.llama import resolve_attn_implementation


def load_pretrained(path: str, attn_implementation: str = "auto"):
    """AutoModelForCausalLM.from_pretrained(path) in fp32 with the chosen attention kernel."""
    import os

    from transformers import AutoModelForCausalLM

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path}: not a Hugging Face model directory (no config.json); model.init_from and "
                         f"`relora-ds eval` take an exported model dir")
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=resolve_attn_implementation(attn_implementation))
