"""The data contract: what a model expects of its inputs, carried by every checkpoint.

A contract is set once, when a model is first trained or imported, from the data it met
then: the class names in label order, the input size and channels, the normalisation, the
eval resize policy, and (as provenance) the dataset kind and root. It travels with the
model (``attach``/``of``) through prune, fine-tune and sweep, is written into every
checkpoint (``"data"``) and into ONNX metadata, and every command loads its data from it
unless told otherwise (``load_data``). Data that disagrees with it (class names, class
count, channels) is a one-line error.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

from torch import nn

from compressor.errors import UserError

ATTR = "_compressor_data"
MAX_CLASSES = 100_000
MAX_NAME = 200


@dataclass(frozen=True)
class DataContract:
    dataset: str
    root: str | None
    classes: tuple[str, ...]
    input_size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "root": self.root, "classes": list(self.classes),
                "input_size": list(self.input_size), "channels": self.channels, "mean": list(self.mean),
                "std": list(self.std), "resize": dict(self.resize)}

    @classmethod
    def from_dict(cls, doc: Any, source: str | None = None) -> "DataContract":
        """Validated: a hand-edited or hostile entry is one line naming the field."""
        def bad(key: str, why: str) -> UserError:
            return UserError(f"data contract: {why}", source=source, field=f"data.{key}")

        if not isinstance(doc, Mapping):
            raise bad("", f"must be a mapping, got {type(doc).__name__}")
        dataset, root = doc.get("dataset"), doc.get("root")
        if not isinstance(dataset, str) or not 0 < len(dataset) <= MAX_NAME:
            raise bad("dataset", "must be a short string")
        if root is not None and (not isinstance(root, str) or len(root) > 4096):
            raise bad("root", "must be a path string or null")
        classes = doc.get("classes")
        if not isinstance(classes, list) or len(classes) > MAX_CLASSES or not all(
                isinstance(c, str) and len(c) <= MAX_NAME for c in classes):
            raise bad("classes", f"must be a list of at most {MAX_CLASSES} short strings")
        size = doc.get("input_size")
        if not (isinstance(size, list) and len(size) == 2 and all(_int_in(v, 1, 8192) for v in size)):
            raise bad("input_size", "must be [H, W] with integers in [1, 8192]")
        channels = doc.get("channels")
        if not _int_in(channels, 1, 64):
            raise bad("channels", "must be an integer in [1, 64]")
        mean, std = doc.get("mean"), doc.get("std")
        for key, vals, low in (("mean", mean, -math.inf), ("std", std, 0.0)):
            if not (isinstance(vals, list) and len(vals) == channels and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > low
                    for v in vals)):
                raise bad(key, f"must be {channels} finite numbers" + (" > 0" if low == 0.0 else ""))
        resize = doc.get("resize") or {}
        if not isinstance(resize, Mapping) or len(resize) > 8 or not all(
                isinstance(k, str) and (isinstance(v, (str, int, float, bool)) or v is None
                                        or (isinstance(v, list) and len(v) <= 4)) for k, v in resize.items()):
            raise bad("resize", "must be a small mapping of plain values")
        return cls(dataset, root, tuple(classes), (int(size[0]), int(size[1])), int(channels),
                   tuple(float(v) for v in mean), tuple(float(v) for v in std), dict(resize))

    def describe(self) -> str:
        where = f" at {self.root}" if self.root else ""
        return (f"{self.dataset}{where}: {len(self.classes)} classes, {self.input_size[0]}×{self.input_size[1]}×"
                f"{self.channels}, mean {_fmt(self.mean)} std {_fmt(self.std)}")


def _int_in(v: Any, low: int, high: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _fmt(vals: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in vals) + ")"


# --- the contract on a model --------------------------------------------------------------

def attach(model: nn.Module, contract: DataContract | None) -> nn.Module:
    if contract is not None:
        setattr(model, ATTR, contract)
    return model


def of(model: nn.Module) -> DataContract | None:
    c = getattr(model, ATTR, None)
    return c if isinstance(c, DataContract) else None


def from_checkpoint(ck: Mapping[str, Any], source: str | None = None) -> DataContract | None:
    doc = ck.get("data")
    return DataContract.from_dict(doc, source) if doc is not None else None


# --- the contract of a bundle -------------------------------------------------------------

def _size_pair(size: Any) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def bundle_stats(bundle: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation the bundle's test split applies (in-memory arrays or a Normalize transform)."""
    from torch.utils.data import Subset

    ds = bundle.test.dataset if isinstance(bundle.test, Subset) else bundle.test
    mean, std = getattr(ds, "mean", None), getattr(ds, "std", None)
    if mean is not None and std is not None and hasattr(mean, "flatten"):
        return tuple(float(v) for v in mean.flatten()), tuple(float(v) for v in std.flatten())
    for t in getattr(getattr(ds, "transform", None), "transforms", []):
        if type(t).__name__ == "Normalize":
            return tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
    norm = bundle.notes.get("normalisation") or {}
    if norm.get("mean") and norm.get("std"):
        return tuple(map(float, norm["mean"])), tuple(map(float, norm["std"]))
    raise UserError("cannot tell the normalisation this data applies", field="data")


def from_bundle(bundle: Any, dataset: str, root: str | os.PathLike | None, input_size: Any) -> DataContract:
    mean, std = bundle_stats(bundle)
    root_s = os.path.abspath(os.fspath(root)) if root is not None else None
    resize = bundle.notes.get("resize") or {"policy": "unrecorded"}
    return DataContract(dataset, root_s, tuple(str(c) for c in bundle.classes), _size_pair(input_size),
                        int(bundle.notes.get("channels", len(mean))), mean, std, dict(resize))


def check(contract: DataContract, bundle: Any, source: str | None = None) -> None:
    """The data given must be the data the model was made for: class names, count, channels."""
    theirs = tuple(str(c) for c in bundle.classes)
    if len(theirs) != len(contract.classes) and contract.classes:
        raise UserError(f"the data has {len(theirs)} classes, the checkpoint {len(contract.classes)}",
                        source=source, field="classes")
    if contract.classes and theirs != contract.classes:
        diff = [(i, a, b) for i, (a, b) in enumerate(zip(contract.classes, theirs)) if a != b]
        i, a, b = diff[0]
        more = f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""
        raise UserError(f"class {i} is {b!r} in the data but {a!r} in the checkpoint{more}", source=source,
                        field="classes")
    channels = int(bundle.notes.get("channels", contract.channels))
    if channels != contract.channels:
        raise UserError(f"the data has {channels} channels, the checkpoint {contract.channels}", source=source,
                        field="channels")


# --- loading a command's data ---------------------------------------------------------------

def _note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr)


def resolve_source(contract: DataContract | None, data: str | None, root: str | None,
                   recorded: Mapping[str, Any] | None = None, source: str | None = None) -> tuple[str, str | None]:
    """(dataset, root): what the user typed, else the contract's, else a legacy file's provenance,
    else the embedded digits. An explicit choice that differs from the recorded one says so."""
    rec_name = contract.dataset if contract else (recorded or {}).get("data")
    rec_root = contract.root if contract else (recorded or {}).get("data_root")
    rec_name = rec_name if isinstance(rec_name, str) else None
    rec_root = rec_root if isinstance(rec_root, str) else None
    if data is None:
        if root is not None and rec_root is not None and os.path.abspath(root) != os.path.abspath(rec_root):
            _note(f"--data-root {root} overrides the checkpoint's data root ({rec_root})")
        name = rec_name or "digits"
        use_root = root if root is not None else (rec_root if name == rec_name else None)
        if use_root is None and name != "digits":
            raise UserError(f"was made on {name} but records no data root; pass --data-root (or --data)",
                            source=source, field="data-root")
        return name, use_root
    if rec_name is not None and (data != rec_name or (root is not None and rec_root is not None
                                                      and os.path.abspath(root) != os.path.abspath(rec_root))):
        _note(f"--data {data}{f' --data-root {root}' if root else ''} overrides the checkpoint's data "
              f"({rec_name}{f' at {rec_root}' if rec_root else ''})")
    return data, root if root is not None else (rec_root if data == rec_name else None)


def resolve_stats(contract: DataContract | None, model: nn.Module | None,
                  mean: Sequence[float] | None = None, std: Sequence[float] | None = None
                  ) -> tuple[Sequence[float], Sequence[float]] | None:
    """Normalisation: ``--mean/--std`` if typed (an override of the contract says so), else the
    contract's, else what the model declares, else None (the dataset's own or estimated)."""
    from compressor import data as data_mod

    if (mean is None) != (std is None):
        raise UserError("give --mean and --std together", field="mean" if mean is None else "std")
    if mean is not None:
        if len(mean) != len(std) or not all(math.isfinite(v) for v in (*mean, *std)) or min(std) <= 0:
            raise UserError("--mean and --std need the same number of finite values, std > 0", field="std")
        if contract is not None and (tuple(mean), tuple(std)) != (contract.mean, contract.std):
            _note(f"--mean/--std override the checkpoint's normalisation {_fmt(contract.mean)} / {_fmt(contract.std)}")
        return tuple(mean), tuple(std)
    if contract is not None:
        return contract.mean, contract.std
    return data_mod.model_stats(model) if model is not None else None


def load_data(model: nn.Module | None, data: str | None = None, root: str | None = None, *,
              input_size: Any = None, seed: int = 0, val_size: int | None = None, download: bool = False,
              mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
              recorded: Mapping[str, Any] | None = None, source: str | None = None,
              check_classes: bool = True) -> tuple[Any, DataContract]:
    """A command's data bundle and the contract it satisfies.

    ``model``'s contract (if any) picks the dataset, root and normalisation unless ``data``/``root``/
    ``mean``+``std`` are given, and the loaded data must fit it. Without one, a contract is made
    from the data now loaded (a first training run or an import). ``recorded``: a legacy
    checkpoint's provenance (its ``data``/``data_root``), used when there is no contract.
    ``check_classes=False``: ``model`` only says the input size (a probe before the real model is built).
    """
    from compressor import data as data_mod

    contract = of(model) if model is not None else None
    name, use_root = resolve_source(contract, data, root, recorded, source)
    size = input_size if input_size is not None else (getattr(model, "input_size", None) or 32)
    px = _size_pair(size)[0]
    stats = resolve_stats(contract, model, mean, std)
    bundle = data_mod.load(name, use_root, input_size=px, val_size=val_size, seed=seed, download=download,
                           stats=stats)
    bundle.notes["root"] = os.path.abspath(use_root) if use_root is not None else None  # read from, for data_line
    if stats is not None:  # who chose the normalisation: the typed flags, the contract or the model
        bundle.notes["normalisation"]["source"] = "flag" if mean is not None else "contract" if contract else "model"
    if contract is not None:
        check(contract, bundle, source)
    if check_classes and model is not None and hasattr(model, "num_classes"):
        data_mod.check_classes(bundle, int(model.num_classes), what="checkpoint" if source else "model", source=source)
    if contract is None:
        return bundle, from_bundle(bundle, name, use_root, size)
    mean_used, std_used = bundle_stats(bundle)  # inherited; an explicit --mean/--std override is what it now expects
    return bundle, replace(contract, mean=mean_used, std=std_used)
