"""What a new user trips on (issue 23): names and messages."""

from __future__ import annotations

import torch

import compressor

def test_list_layers_names_relu6_and_count_takes_a_size_without_a_record(capsys) -> None:
    """Issue 23: ReLU6 is shown as relu6 (torch traces it as hardtanh); a size passed to count needs none recorded."""
    import torchvision

    from compressor.cli import main
    from compressor.pruning import counting

    assert main(["list-layers", "mobilenet_v2"]) == 0
    out = capsys.readouterr().out
    assert "+relu6" in out and "hardtanh" not in out
    m = torchvision.models.resnet18(num_classes=10)
    assert counting.count(m, 64)["macs"] == compressor.count(m, torch.zeros(1, 3, 64, 64))["macs"]
