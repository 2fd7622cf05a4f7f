"""Checkpoint surgery: build the fused MoE from dense experts and take it apart again.

Library functions, one module each: `build_moe`, `extract_expert`, `export_mixtral`,
`zero_to_hf` (DeepSpeed ZeRO -> HF dir), `lora` (the pure LoRA merge) and `merge_lora` (adapter
dir -> merged dir), `gguf` (GGUF -> plain Llama dir); the merging baselines are pipeline.merging.
`plan` holds the pure key/shape checks, `safetensors_io` the streaming I/O. Their command-line
options are in pipeline.commands.surgery (`h3fusion surgery <tool>`, tools/surgery/<tool>.py).
"""
