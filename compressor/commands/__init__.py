"""CLI commands, one module each: ``add_parser(subparsers)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse

from compressor.commands._options import OneLineParser, finite_float, nonneg_int, positive_float, seed_int


def add_common(p: argparse.ArgumentParser, *, data: bool = True, stats: bool = True) -> None:
    """--device/--seed/--no-progress; with ``data``, --data/--data-root/--download (default: the
    checkpoint's data contract), and with ``stats`` too, --mean/--std."""
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=seed_int, default=0,
                   help="seed for data order, calibration subset and init (0 .. 2**32-1)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    if data:
        p.add_argument("--data", default=None,
                       help="digits, cifar10, cifar100, imagefolder (default: the checkpoint's data contract, "
                            "else the embedded digits)")
        p.add_argument("--data-root", default=None,
                       help="dataset folder: torchvision CIFAR root, an ImageFolder tree with train/ test/, or its .tar.gz "
                            "(default: the checkpoint's, for its dataset)")
        p.add_argument("--download", action="store_true", help="let torchvision download CIFAR into --data-root (online only)")
    if data and stats:
        p.add_argument("--mean", type=finite_float, nargs="+", default=None, metavar="M",
                       help="per-channel normalisation mean (default: the checkpoint's, else the dataset's or estimated "
                            "from the training split)")
        p.add_argument("--std", type=positive_float, nargs="+", default=None, metavar="S",
                       help="per-channel normalisation std, with --mean")


def new_parser(sub, name: str, help_text: str, examples: str) -> argparse.ArgumentParser:
    """A command's parser; its errors (a bad or missing option) are one ``UserError`` line, exit 2."""
    old = sub._parser_class  # noqa: SLF001 - argparse builds subparsers with this class, and has no other hook
    sub._parser_class = OneLineParser  # noqa: SLF001
    try:
        return sub.add_parser(name, help=help_text, description=help_text, epilog="examples:\n" + examples,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    finally:
        sub._parser_class = old  # noqa: SLF001


__all__ = ["add_common", "new_parser", "nonneg_int", "seed_int"]
