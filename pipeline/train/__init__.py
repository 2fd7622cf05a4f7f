"""Trainers, one package per training stage on the shared loop (`loop.TrainLoop`):
`base/` (tiny base pre-training, GGUF bases), `expert/` (stage 1), `fusion/` (stage 2: fuse, its
loop task, mixed data, metrics, losses), `baselines/` (multi-task and extra-steps baselines).
Shared pieces: `common`, `inputs`, `step_plan`, `mixed_precision`, `grad_checkpointing`, `signals`.
Each stage package's `stage.py` holds its entry point.
"""
