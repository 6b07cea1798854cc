"""relora-ds: ReLoRA pretraining of LLaMA-style models under DeepSpeed ZeRO 0-3."""

__version__ = "0.1.0"
