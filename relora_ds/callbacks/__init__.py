"""The trainer's callbacks (base.py: the hooks): evaluation, checkpoints, memory events, metrics, plots and
data.skip. The warm-start switch and ReLoRA's restarts are the methods' own (relora_ds/methods/hooks.py)."""
