"""H3Fusion: fuse helpful / harmless / honest aligned LLMs into one sparse MoE."""
__version__ = "0.1.0"
