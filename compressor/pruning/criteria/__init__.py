"""Registered pruning criteria (``get(name)``, ``list_criteria()``).

Every module in this package registers its criteria on import; adding a criterion is adding
one file with one ``@register_criterion`` class.
"""

import importlib
import pkgutil

from compressor.pruning.criteria.base import Criterion, get, list_criteria, register_criterion

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base" and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["Criterion", "get", "list_criteria", "register_criterion"]
