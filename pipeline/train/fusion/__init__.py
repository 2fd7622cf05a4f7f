"""Stage 2: train the fused MoE. `stage` (entry point `train_fusion`), `loop` (the loop task), `data` (the mixed fusion data), `metrics`, `losses` (gating and drift losses)."""
