from setuptools import find_packages, setup

setup(
    name="relora-ds",
    version="0.1.0",
    description="ReLoRA pretraining of LLaMA-style models under DeepSpeed ZeRO 0-3",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # ds_configs/ ships inside the package as relora_ds/ds_configs/ (engine.ds_config.resolve_path finds it).
    packages=find_packages(include=["relora_ds", "relora_ds.*"]) + ["relora_ds.ds_configs"],
    package_dir={"relora_ds.ds_configs": "ds_configs"},
    package_data={"relora_ds": ["data/sample/*/*", "configs/*.yaml"], "relora_ds.ds_configs": ["*.json", "*.md"]},
    install_requires=[
        "torch>=2.5",  # torch.library.custom_op (relora_ds/kernels); torch.serialization.safe_globals (engine/zero_checkpoint.py)
        "deepspeed>=0.19.8,<0.20",  # = engine/versions.py TESTED_DEEPSPEED: the restart reads its internals
        "packaging",
        "transformers>=5.0",  # transformers.initialization (no_init_weights), used by model/build.py
        "accelerate>=1.1",  # transformers' HfDeepSpeedConfig (the ZeRO-3 build and from_pretrained) requires it
        "datasets>=2.18",
        "tokenizers>=0.15",
        "safetensors",
        "pyyaml",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "kernels": ["triton>=3.0"],
        "wandb": ["wandb"],
        "flash": ["flash-attn>=2.5"],
        "tensorboard": ["tensorboard"],
        "galore": ["galore-torch>=1.0", "bitsandbytes"],  # method: galore (galore-torch imports bitsandbytes)
        "dev": ["pytest>=7", "pytest-timeout", "triton>=3.0", "wandb", "galore-torch>=1.0", "bitsandbytes"],
    },
    entry_points={"console_scripts": ["relora-ds=relora_ds.cli:main"]},
)
