"""Registered pruning criteria (``get(name)``, ``list_criteria()``)."""

from compressor.criteria.base import Criterion, get, list_criteria, register_criterion
from compressor.criteria import hrank, weight  # noqa: F401  (register)

__all__ = ["Criterion", "get", "list_criteria", "register_criterion"]
