"""The tokenizer stage: train the sentencepiece tokenizer or copy a given one; entry point `stage.run_tokenizer_stage`."""
