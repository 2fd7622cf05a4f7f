from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# The lowest torch the pinned sets allow (requirements-gpu-megablocks.txt pins torch 2.7.0, what
# MegaBlocks 0.10 needs); `h3fusion` refuses an older one at start (pipeline.backends.MIN_TORCH).
TORCH_FLOOR = "torch>=2.7"


def pinned(name: str) -> list[str]:
    """The `name==version` lines of a pinned set (tools/install/resolve.sh writes them)."""
    lines = (HERE / name).read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line[:1].isalnum()]


setup(
    name="h3fusion-pipeline",
    version="0.1.0",
    description="H3Fusion: fuse helpful/harmless/honest aligned LLMs into a sparse MoE (DeepSpeed, MegaBlocks, SLURM)",
    packages=find_packages(include=["pipeline", "pipeline.*"]),
    # model_configs: published configs `h3fusion plan` falls back to offline (pipeline.memory_plan)
    package_data={"pipeline": ["presets/*.yaml", "presets/model_configs/*.json"]},
    python_requires=">=3.10",
    # torch is pinned in the install paths (requirements-cpu.txt / Makefile, and the GPU sets
    # below); an unpinned torch here would pull a multi-GB CUDA build on a fresh machine.
    install_requires=[
        TORCH_FLOOR,
        "deepspeed>=0.16",
        # pipeline/model/modeling.py needs transformers' slice_logits_to_keep: 5.17 lacks it
        # (tools/gpu found it on the GPU image); 5.23 is the version every pinned set holds
        "transformers>=5.23",
        "huggingface_hub",          # pipeline/checkpoint/hub.py: hf: ids through the HF cache
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
        # CUDA machines (Linux x86_64, Python 3.11/3.12), exact pins; README "Install" has the
        # commands. gpu-torch: `pip install -e ".[gpu-torch]"`. gpu-megablocks compiles
        # megablocks/grouped_gemm against the installed torch: torch and the build tools first,
        # then `--no-build-isolation` with CUDA_HOME and TORCH_CUDA_ARCH_LIST set.
        "gpu-torch": pinned("requirements-gpu-torch.txt"),
        "gpu-megablocks": pinned("requirements-gpu-megablocks.txt"),
        "gguf": ["gguf"],
        "test": ["pytest"],
    },
    entry_points={"console_scripts": ["h3fusion=pipeline.commands:main"]},
)
