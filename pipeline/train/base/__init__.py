"""Stage 0 base model: pre-train the tiny Llama (`pretrain`) or convert / check a given base (`stage`)."""
