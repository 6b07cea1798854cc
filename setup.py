from setuptools import find_packages, setup

setup(
    name="relora-ds",
    version="0.1.0",
    description="ReLoRA pretraining of LLaMA-style models under DeepSpeed ZeRO 0-3",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["relora_ds", "relora_ds.*"]),
    package_data={"relora_ds": ["data/sample/*/*", "configs/*.yaml"]},
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.14",
        "transformers>=4.40",
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
        "dev": ["pytest>=7", "pytest-timeout", "triton>=3.0", "wandb"],
    },
    entry_points={"console_scripts": ["relora-ds=relora_ds.cli:main"]},
)
