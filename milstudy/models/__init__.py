"""The model zoo: every aggregator behind ``build_model`` (see ``milstudy.models.base``)."""

from milstudy.models.base import MILOutput, build_model, list_models, register_model, register_preset

__all__ = ["MILOutput", "build_model", "list_models", "register_model", "register_preset"]
