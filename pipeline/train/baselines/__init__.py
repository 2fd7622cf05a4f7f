"""Training baselines (docs/baselines.md): dense multi-task fine-tunes and the extra-steps control; entry point `stage.train_baseline`."""
