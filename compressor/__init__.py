"""compressor: structured (channel) pruning of CNNs, HRank first.

The public API is the library (the CLI is a thin client of it)::

    rank -> prune -> recover -> evaluate / count / sensitivity -> export / save -> load

and, over what runs leave on disk, ``report`` and ``recovery_curves`` (``compressor.api_files``).

Each takes plain ``nn.Module``s and plain iterables of ``(images, labels)`` batches, and never
changes the model it is given. See ``compressor.api`` for a runnable notebook flow.
"""

__version__ = "0.1.0"

from compressor.api import (Description, ModelRecord, PruneInfo, RecoveryReport, UnitInfo, build_model,  # noqa: E402
                            count, describe, evaluate, export, list_models, load, prune, rank, rates_spec, recover,
                            save, sensitivity)
from compressor.api_files import (check_criteria, list_criteria, model_recipe, recovery_curves,  # noqa: E402
                                  report)
from compressor.deploy.latency import LatencyConfig  # noqa: E402
from compressor.reporting.report import ReportConfig  # noqa: E402
from compressor.training.train import TrainConfig  # noqa: E402

__all__ = ["Description", "LatencyConfig", "ModelRecord", "PruneInfo", "RecoveryReport", "ReportConfig", "TrainConfig",
           "UnitInfo", "build_model", "check_criteria", "count", "describe", "evaluate", "export", "list_criteria",
           "list_models", "load", "model_recipe", "prune", "rank", "rates_spec", "recover", "recovery_curves",
           "report", "save", "sensitivity", "__version__"]
