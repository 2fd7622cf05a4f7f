"""Stage 3: judge-free HHH evaluation of several models and the report (see docs/evaluation.md)."""
from .stage import evaluate_models

__all__ = ["evaluate_models"]
