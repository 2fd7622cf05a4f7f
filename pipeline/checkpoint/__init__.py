"""The checkpoint floor: reading and writing model dirs, imported by training, surgery and eval.

`safetensors_io` (streaming reads, sharded writes, tokenizer files), `hf_model` (HF dir <-> state
dict), `tokenizer_check` (HF-dir tokenizer checks), `gguf` / `gguf_header` (GGUF -> plain Llama
dir), `lora` (the pure LoRA merge) and `merge_lora` (adapter dir -> merged dir), `hub` (Hub ids
-> local snapshots). Nothing here imports a stage package, the model or an engine; the DeepSpeed
ZeRO -> HF conversion, which needs the engine, is pipeline.backends.zero_to_hf.
"""
