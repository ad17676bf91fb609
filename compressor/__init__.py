"""compressor: structured (channel) pruning of CNNs, HRank first.

The flow: ``models.get_model`` -> ``capture.record`` -> ``criteria.get(...).score`` ->
``plan.make_plan`` -> ``surgery.apply`` -> ``train.finetune`` -> ``evaluate``/``report``.
"""

__version__ = "0.1.0"
