"""CLI commands, one module each: ``add_parser(subparsers)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse


def add_common(p: argparse.ArgumentParser, *, data: bool = True) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, calibration subset and init")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    if data:
        p.add_argument("--data", default="digits", help="digits (embedded, default), cifar10, cifar100, imagefolder")
        p.add_argument("--data-root", default=None,
                       help="dataset folder: torchvision CIFAR root, an ImageFolder tree with train/ test/, or its .tar.gz")
        p.add_argument("--download", action="store_true", help="let torchvision download CIFAR into --data-root (online only)")


def new_parser(sub, name: str, help_text: str, examples: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_text, description=help_text, epilog="examples:\n" + examples,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
