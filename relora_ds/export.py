"""Export a checkpoint (any ZeRO stage, wrapped or not) as a plain Hugging Face LlamaForCausalLM.

Merges any un-merged adapters (W + s·B·A), unwraps to nn.Linear and writes safetensors, config and the
tokenizer, so `AutoModelForCausalLM.from_pretrained(out)` gives the trained model's logits.
"""

import os

from relora_ds.config import RunConfig
from relora_ds.data.tokenize import load_tokenizer
from relora_ds.engine import checkpoint
from relora_ds.model.llama import model_from_config
from relora_ds.relora.wrap import unwrap, wrap_from_config


def load_checkpoint_model(path: str):
    """(model, cfg, state): the checkpoint's model on the CPU in fp32, adapters merged and unwrapped."""
    tag_dir = checkpoint.find_checkpoint(path)
    state = checkpoint.read_state(tag_dir)
    cfg = RunConfig.from_dict(state["config"])
    weights = checkpoint.load_fp32_state_dict(tag_dir)
    vocab_size = weights["model.embed_tokens.weight"].shape[0]
    model = model_from_config(cfg.model, vocab_size, attn_implementation="sdpa")
    if state["wrapped"]:
        wrap_from_config(model, cfg.relora, seed=cfg.train.seed, kernels="torch")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise checkpoint.CheckpointError(f"{tag_dir}: checkpoint does not match its config "
                                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    unwrap(model)
    model.eval()
    return model, cfg, state


def export(path: str, out_dir: str) -> str:
    """Write the merged model + tokenizer to `out_dir` (safetensors); returns out_dir."""
    model, cfg, _ = load_checkpoint_model(path)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(cfg.data.tokenizer).save_pretrained(out_dir)
    return out_dir
