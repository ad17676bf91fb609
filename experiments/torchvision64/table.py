"""The torchvision 64-px table (issue 20) from the summary files run_prune.sh copies here."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent


def top1(m: dict, key: str) -> str:
    return f"{m[key]['top1']:.2f}" if key in m else "–"


def main() -> None:
    print("| model | run | MACs kept | params kept | baseline | pruned | + reconstruct | + block refit "
          "| + 1 distilled epoch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for f in sorted(HERE.glob("summary_*.json")):
        if f.stem.startswith("summary_ft1_"):
            continue
        model, crit = f.stem[len("summary_"):].rsplit("_", 1)
        m = json.loads(f.read_text())
        ft = HERE / f"summary_ft1_{model}_{crit}.json"
        ft_top1 = f"{json.loads(ft.read_text())['last']['test']['top1']:.2f}" if ft.is_file() else "–"
        kept = m.get("policy", {}).get("achieved", {})
        print(f"| {model} | {crit} | {kept.get('macs', float('nan')):.3f} | {kept.get('params', float('nan')):.3f} "
              f"| {top1(m, 'baseline_test')} | {top1(m, 'pruned_test_no_finetune')} "
              f"| {top1(m, 'pruned_test_reconstructed')} | {top1(m, 'pruned_test_block_refit')} | {ft_top1} |")


if __name__ == "__main__":
    main()
