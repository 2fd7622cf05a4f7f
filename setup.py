from setuptools import find_packages, setup

setup(
    name="h3fusion-pipeline",
    version="0.1.0",
    description="H3Fusion: fuse helpful/harmless/honest aligned LLMs into a sparse MoE (DeepSpeed, MegaBlocks, SLURM)",
    packages=find_packages(include=["pipeline", "pipeline.*"]),
    package_data={"pipeline": ["presets/*.yaml"]},
    python_requires=">=3.10",
    # torch is pinned in the CPU install path (requirements-cpu.txt / Makefile); an unpinned
    # torch here would pull a multi-GB CUDA build on a fresh machine.
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.50",
        "datasets>=3.0",
        "sentencepiece",
        "tensorboard",
        "safetensors",
        "pyyaml",
        "tqdm",
        "peft>=0.13",
        "matplotlib",
        "numpy",
    ],
    extras_require={
        # MegaBlocks 0.10 pins torch 2.7.0 and builds CUDA code: on a CUDA machine install these
        # with --no-deps --no-build-isolation (docs/moe_design.md, "megablocks" backend).
        "gpu": ["megablocks", "stanford-stk", "grouped_gemm"],
        "gguf": ["gguf"],
        "test": ["pytest"],
    },
    entry_points={"console_scripts": ["h3fusion=pipeline.commands:main"]},
)
