"""compressor: structured (channel) pruning of CNNs, HRank first.

The public API is the library (the CLI is a thin client of it)::

    rank -> prune -> recover -> evaluate / count / sensitivity -> export / save -> load

Each takes plain ``nn.Module``s and plain iterables of ``(images, labels)`` batches, and never
changes the model it is given. See ``compressor.api`` for a runnable notebook flow.
"""

__version__ = "0.1.0"

from compressor.api import (ModelRecord, PruneInfo, RecoveryReport, count, evaluate, export,  # noqa: E402
                            list_models, load, prune, rank, rates_spec, recover, save, sensitivity)

__all__ = ["ModelRecord", "PruneInfo", "RecoveryReport", "count", "evaluate", "export", "list_models", "load",
           "prune", "rank", "rates_spec", "recover", "save", "sensitivity", "__version__"]
