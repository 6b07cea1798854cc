"""Held-out loss and perplexity of a checkpoint or of a Hugging Face model dir, in this process.

    relora-ds eval CHECKPOINT_OR_MODEL_DIR [--source sotu --split validation] [--seq-len 256 --batch-size 8]

A relora-ds checkpoint (a run dir, its checkpoints/ dir or one step_* dir) is read as `relora-ds export` reads it
(tools/reader.py: its wrapped layers merged, filled into the plain model tensor by tensor) and evaluated with the
run's tokenizer; a model dir (config.json) is loaded by transformers and evaluated with its own tokenizer. The loss
is the trainer's held-out loss (`engine.train_module.evaluate`).
"""

import torch

from relora_ds.data import loader
from relora_ds.data.tokenize import load_tokenizer
from relora_ds.engine.checkpoint import CheckpointError
from relora_ds.model.build import load_pretrained, model_from_config
from relora_ds.tools.reader import is_model_dir, open_checkpoint
from relora_ds.engine.train_module import evaluate


def load_checkpoint_model(path: str):
    """(model, cfg, state): the checkpoint's plain model on the CPU, adapters merged, filled tensor by tensor."""
    source = open_checkpoint(path)
    model = model_from_config(source.cfg.model, source.vocab_size, attn_implementation="sdpa")
    targets = model.state_dict()
    with torch.no_grad():
        for name, tensor in source.tensors():
            if name not in targets or tuple(targets[name].shape) != tuple(tensor.shape):
                raise CheckpointError(f"{source.tag_dir}: {name} does not fit the model its config builds")
            targets[name].copy_(tensor)
    model.eval()
    return model, source.cfg, source.state


def load_any_model(path: str):
    """(model, tokenizer name) from a relora-ds checkpoint or an exported/HF model dir."""
    if is_model_dir(path):
        return load_pretrained(path, attn_implementation="sdpa"), path
    model, cfg, _ = load_checkpoint_model(path)
    return model, cfg.data.tokenizer


def evaluate_model(model, tokenizer_name, *, source, split, seq_len, batch_size, max_batches, fmt="auto",
                   text_column="text") -> dict:
    """Held-out loss and perplexity of a plain model on `source`/`split` (single process)."""
    tokenizer = load_tokenizer(tokenizer_name)
    dataset = loader.build_dataset(source, tokenizer=tokenizer, seq_len=seq_len, format=fmt,
                                   text_column=text_column, split=split)
    batches = loader.eval_batches(dataset, micro_batch_size=batch_size, max_batches=max_batches, rank=0,
                                  world_size=1)
    with torch.no_grad():
        return evaluate(model, batches)


def run_from_args(args) -> int:
    """The `relora-ds eval` command: evaluate args.model and print one line with its loss and perplexity."""
    model, tokenizer_name = load_any_model(args.model)
    result = evaluate_model(model, args.tokenizer or tokenizer_name, source=args.source, split=args.split,
                            seq_len=args.seq_len, batch_size=args.batch_size, max_batches=args.max_batches,
                            fmt=args.format, text_column=args.text_column)
    print(f"held-out loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  "
          f"({args.source}:{args.split}, {args.max_batches} batches of {args.batch_size}x{args.seq_len})")
    return 0
