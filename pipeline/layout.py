"""Where each stage reads and writes inside a run directory (one definition for all launchers)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# the installed `pipeline` package and the repository holding it (tests/data, ds_configs, ...)
PACKAGE_DIR = Path(__file__).resolve().parent
REPOSITORY_DIR = PACKAGE_DIR.parent


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @classmethod
    def at(cls, root: str | Path) -> "RunLayout":
        return cls(Path(root))

    @property
    def data(self) -> Path:          # datasets (Arrow) + data_manifest.json
        return self.root / "data"

    @property
    def tokenizer(self) -> Path:     # HF tokenizer dir
        return self.root / "tokenizer"

    @property
    def base(self) -> Path:          # HF LlamaForCausalLM dir
        return self.root / "base"

    def expert(self, dimension: str) -> Path:       # consolidated HF expert model
        return self.root / "experts" / dimension

    def expert_ds(self, dimension: str) -> Path:    # raw DeepSpeed checkpoints (resume)
        return self.root / "experts_ds" / dimension

    @property
    def fused_init(self) -> Path:    # build_moe output (MoE before fusion training)
        return self.root / "fused_init"

    @property
    def fused(self) -> Path:         # MoE after fusion training
        return self.root / "fused"

    @property
    def fused_ds(self) -> Path:
        return self.root / "fused_ds"

    def merge(self, method: str) -> Path:
        return self.root / "merges" / method

    def ensemble(self, method: str) -> Path:       # LLM-ensemble baseline (pipeline.ensemble)
        return self.root / "ensembles" / method

    def baseline(self, name: str) -> Path:          # training baselines: "multitask_<variant>", "extra_steps/<dim>"
        return self.root / "baselines" / name

    def baseline_ds(self, name: str) -> Path:       # their DeepSpeed checkpoints (resume)
        return self.root / "baselines_ds" / name

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def profile(self) -> Path:
        return self.root / "profile"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"
