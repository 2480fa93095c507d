"""zerotrain: DeepSpeed ZeRO 0-3 training of GPT-style language models: pretraining, SFT (full and
LoRA), preference tuning (DPO, IPO, ORPO, SimPO) and distillation, and the tools to ship the result."""

from setuptools import find_packages, setup

setup(
    name="zerotrain",
    version="0.1.0",
    description="DeepSpeed ZeRO 0-3 pretraining, SFT (full and LoRA), preference tuning and distillation of "
                "GPT-style language models",
    python_requires=">=3.10",
    packages=find_packages(include=["common", "engine", "engine.*", "model"]),
    package_data={"model": ["default_tokenizer/*"]},  # the tokenizer of runs from scratch
    # torch is installed first by `make install` (the CPU build here, CUDA on GPU machines);
    # a range it satisfies keeps pip from pulling another build.
    install_requires=[
        "torch>=2.5",  # torch.serialization.skip_data and safe_globals (engine.offline.pth_io) came in 2.5
        "deepspeed>=0.17,<0.20",
        "transformers>=5.0,<6",
        "peft>=0.17",
        "datasets>=3.0",
        "tokenizers>=0.21",
        "sentencepiece>=0.2",
        "protobuf",
        "safetensors>=0.4",
        "numpy",
        "pyarrow",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "fastapi",  # zerotrain serve
        "uvicorn",
    ],
    # gpu: liger-kernel's fused linear cross-entropy for --loss-chunk-size (a Triton kernel, CUDA only)
    extras_require={"test": ["pytest>=8", "pytest-timeout>=2.3", "ninja", "trl==1.16.0", "openai"],
                    "gpu": ["liger-kernel>=0.8"]},
    entry_points={"console_scripts": ["zerotrain = engine.apps.cli:main"]},
)
