"""Stage 1: fine-tune one aligned expert (FFN only) under DeepSpeed ZeRO; entry point `stage.train_expert`."""
