"""The per-model defaults the library ships (``recipes/models.yaml``): fine-tune lr, quick baseline, train."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODEL_RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "models.yaml"


def model_recipe(arch: str) -> dict[str, Any]:
    """The per-model defaults of ``recipes/models.yaml``: ``quick_baseline`` (dict) and ``finetune_lr``.

    An exact model name wins, then the longest matching prefix (``squeezenet`` covers 1.0 and
    1.1, their ImageNet variants too), then ``defaults``. ``torchvision:``/``module:`` models
    take the defaults.
    """
    table = model_table()
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in table["defaults"].items()}
    keys = [k for k in table if k != "defaults" and arch.startswith(k)]
    if keys:
        out.update(table[max(keys, key=len)])
    out["source"] = f"{MODEL_RECIPES.name}:{max(keys, key=len) if keys else 'defaults'}"
    return out


def finetune_warmup(arch: str) -> float:
    """Epochs of linear lr warm-up a fine-tune after pruning starts with (``finetune_warmup_epochs``)."""
    return float(model_recipe(arch)["finetune_warmup_epochs"])


def model_table() -> dict[str, Any]:
    """The whole packaged table (``defaults`` and one entry per model-name prefix)."""
    from compressor.storage import yaml_io

    return yaml_io.load_yaml(MODEL_RECIPES, kind="model recipes file")
