"""Checkpoint surgery: build the fused MoE from dense experts, take it apart, merge experts.

Library functions, one module each: `build_moe`, `extract_expert`, `export_mixtral`, `merging`
(the merging baselines: average, task arithmetic, TIES), `router_init`; `plan` holds the pure
key/shape checks. Checkpoint I/O (safetensors, GGUF, LoRA, HF dirs) is pipeline.checkpoint; the
ZeRO -> HF conversion is pipeline.backends.zero_to_hf. Command-line options are in
pipeline.commands.surgery (`h3fusion surgery <tool>`, tools/surgery/<tool>.py).
"""
