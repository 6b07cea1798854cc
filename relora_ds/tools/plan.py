"""`relora-ds plan`: the command over relora_ds/plan.py. Reads the run config (and --set overrides), the DeepSpeed JSON,
the tokenizer's vocabulary, and prints the plan and its verdict against --device-memory."""

from relora_ds.plan import PlanError, cheapest_fit, make_plan, model_counts, render


def run_plan(config_path: str, overrides, ds_path: str | None, ranks: int, device_memory: str | None,
             accelerator: str = "auto") -> str:
    """What `relora-ds plan` prints (`ds_path` None: the run config's train.deepspeed_config). One-line errors
    (PlanError, ConfigError, DSConfigError) for what cannot be planned."""
    import torch

    from relora_ds import methods
    from relora_ds.config import load_config
    from relora_ds.data.tokenize import load_tokenizer
    from relora_ds.engine import ds_config as dsc
    from relora_ds.files import parse_byte_size

    device_bytes = None
    if device_memory is not None:
        device_bytes = parse_byte_size(device_memory)
        if device_bytes <= 0:
            raise PlanError(f"--device-memory {device_memory!r}: not a size (e.g. 24GiB, 80GB)")
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = load_config(config_path, overrides)
    ds_path = ds_path or cfg.train.deepspeed_config
    ds_config = dsc.load_ds_config(ds_path)
    try:
        methods.from_config(cfg).check_ds_config(ds_config)
        vocab_size = cfg.model.vocab_size or len(load_tokenizer(cfg.data.tokenizer))
        counts = model_counts(cfg, vocab_size)
    except ValueError as e:
        raise PlanError(str(e)) from None
    plan = make_plan(cfg, ds_config, ranks, vocab_size, counts, accelerator)
    fix = None
    if device_bytes is not None and plan.peak > device_bytes:
        fix = cheapest_fit(cfg, ds_config, ranks, vocab_size, device_bytes, counts, accelerator)
    return render(plan, device_bytes, fix)
