"""compressor: structured (channel) pruning of CNNs, HRank first.

The flow: ``models.get_model`` -> ``capture.record`` -> ``criteria.get(...).score`` ->
``plan.make_plan`` -> ``surgery.apply`` -> ``train.finetune`` -> ``evaluate``/``report``.
"""

__version__ = "0.1.0"

from compressor.api import load, prune, rank, save  # noqa: E402  (the notebook API)

__all__ = ["load", "prune", "rank", "save", "__version__"]
