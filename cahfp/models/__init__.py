"""Model registry: every architecture is built by name with ``build_model``."""

from cahfp.models.registry import MODELS, build_model, model_names, register_model

__all__ = ["MODELS", "build_model", "model_names", "register_model"]
