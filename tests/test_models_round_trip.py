"""Issue 22: anything the tool writes, it can read back. Every registered model, built with each option
that changes its shape (input size, class count), is saved and loaded again: the same model comes back
(its input size, classes and weights), and it runs at that size. A size a model cannot take is refused
when building, before anything is written."""

from __future__ import annotations

import pytest
import torch

from compressor.storage import checkpoint
from compressor.errors import UserError
from compressor.models import get_model, list_models

OPTIONS = [{"input_size": 64}, {"num_classes": 7}, {"input_size": 48, "num_classes": 3}]


@pytest.mark.parametrize("name", list_models())
def test_every_model_written_with_a_shape_option_loads_back(tmp_path, name):
    torch.manual_seed(0)
    for i, opts in enumerate(OPTIONS[2:] if name.endswith("_imagenet") else OPTIONS):  # big ones: one case
        try:
            net = get_model(name, **opts)
        except UserError as exc:  # refused up front: only an input size a fixed classifier cannot take
            assert "input_size" in opts and "cannot take" in str(exc), exc
            continue
        path = checkpoint.save(tmp_path / f"{i}.pt", net)
        back, ck = checkpoint.load(path)
        size = opts.get("input_size", net.input_size)
        assert back.input_size == size and back.num_classes == opts.get("num_classes", net.num_classes)
        sd, sd_back = net.state_dict(), back.state_dict()
        assert sd.keys() == sd_back.keys() and all(torch.equal(sd[k], sd_back[k]) for k in sd)
        with torch.no_grad():
            y = back.eval()(torch.zeros(1, 3, size, size))
        assert tuple(y.shape) == (1, back.num_classes)
        del net, back, sd, sd_back


def test_a_large_input_size_is_checked_without_allocating_it():
    """mobilenet_v2 at 4096 px: the input-size check runs on the meta device (it allocated 9 GB at 1024 px)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    net = get_model("mobilenet_v2", input_size=4096)
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert net.input_size == 4096 and net.builder_kwargs["input_size"] == 4096 and grew_mb < 500, grew_mb
    assert next(net.parameters()).device.type == "cpu"
    with pytest.raises(UserError, match="input size must be an integer in \\[8, 4096\\]"):
        get_model("mobilenet_v2", input_size=8192)
