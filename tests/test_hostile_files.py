"""Issue 22 §3: hostile scores files, ONNX files and YAML files (recipes, rates, a run's resolved config).

Each case is a small file built in tmp_path and fed through the CLI (``compressor.cli.main``, in
process): one line ``error: <file>: <field>: ...``, exit 2, and bounded time and memory.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from compressor.errors import UserError
from compressor.models import hrank
from compressor.pruning import scores as scores_mod
from compressor.storage import checkpoint
from tests.test_bad_input import _private_data_cache, files, run  # noqa: F401 - fixtures


def _error_line(code: int, err: list[str], source: Path, field: str | None, *words: str) -> str:
    errors = [ln for ln in err if ln.startswith("error: ")]
    assert code == 2, err
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    line = errors[0]
    prefix = f"error: {source}: " + (f"{field}: " if field else "")
    assert line.startswith(prefix), (prefix, line)
    for w in words:
        assert w in line, (w, line)
    return line


def _dag(levels: int) -> list:
    node: list = [0]
    for _ in range(levels):
        node = [node, node, node, node]
    return node


# --------------------------------------------------------------------------- scores files
@pytest.fixture(scope="module")
def scored(files, tmp_path_factory):  # noqa: F811
    """The tiny checkpoint's l1 scores (with a tie-break) as a plain document, and a rates file."""
    d = tmp_path_factory.mktemp("scores")
    net, _ = checkpoint.load(files["tiny"])
    sc = scores_mod.compute(net, [], ["l1"], n_images=0, seed=0, progress=False)
    sc.tiebreak = {u: torch.arange(float(t.numel())) for u, t in sc.scores["l1"].items()}
    good = sc.save(d / "good.pt")
    (d / "r.yaml").write_text("default: 0.5\n")
    return torch.load(good, weights_only=True), d / "r.yaml"


def _set(where: str, value: Any) -> Callable[[dict], None]:
    def change(doc: dict) -> None:
        *path, last = where.split("/")
        node = doc
        for key in path:
            node = node[key]
        node[last] = value
    return change


def _drop(where: str) -> Callable[[dict], None]:
    def change(doc: dict) -> None:
        *path, last = where.split("/")
        node = doc
        for key in path:
            node = node[key]
        del node[last]
    return change


C0 = "features.conv0"  # 8 channels in TINY_VGG
SCORE_CASES = {
    "criteria_not_a_dict": (_set("scores", [1.0, 2.0]), "scores", "must be a mapping of criterion"),
    "criterion_is_a_list": (_set("scores/l1", [0.1] * 8), "scores.l1", "must be a mapping of unit -> tensor"),
    "list_instead_of_tensor": (_set(f"scores/l1/{C0}", [0.1] * 8), f"scores.l1.{C0}", "must be a tensor"),
    "no_scores_key": (_drop("scores"), "scores", "missing"),
    "no_criteria": (_set("scores", {}), "scores", "holds no criteria"),
    "tiebreak_other_width": (_set(f"tiebreak/{C0}", torch.zeros(5)), f"tiebreak.{C0}", "has 5 values"),
    "tiebreak_unknown_unit": (_set("tiebreak/features.nope", torch.zeros(3)), "tiebreak.features.nope",
                              "is not in vgg16_bn"),
    "tiebreak_not_a_dict": (_set("tiebreak", [1, 2]), "tiebreak", "must be a mapping"),
    "nan": (_set(f"scores/l1/{C0}", torch.tensor([0.1] * 7 + [float("nan")])), f"scores.l1.{C0}",
            "score 7 is nan"),
    "inf": (_set(f"scores/l1/{C0}", torch.tensor([float("-inf")] + [0.1] * 7)), f"scores.l1.{C0}",
            "score 0 is -inf"),
    "complex": (_set(f"scores/l1/{C0}", torch.ones(8, dtype=torch.complex64)), f"scores.l1.{C0}",
                "must be real numbers, got complex64"),
    "matrix": (_set(f"scores/l1/{C0}", torch.zeros(4, 4)), f"scores.l1.{C0}", "(1-D", "shape (4, 4)"),
    "missing_unit": (_drop("scores/l1/features.conv1"), "scores.l1", "no scores for unit 'features.conv1'"),
    "unknown_unit": (_set("scores/l1/features.conv99", torch.zeros(8)), "scores.l1", "'features.conv99' is not in"),
    "wrong_width": (lambda d: (_set(f"scores/l1/{C0}", torch.zeros(5))(d), _drop(f"tiebreak/{C0}")(d)),
                    f"scores.l1.{C0}", "has 5 scores, the model has 8 channels"),
    "no_checksum": (_drop("meta/model_checksum"), "meta.model_checksum", "missing", "re-run `rank`"),
    "checksum_of_a_list": (_set("meta/model_checksum", [1]), "meta.model_checksum", "must be a string"),
    "other_weights": (_set("meta/model_checksum", "0123456789abcdef"), "meta.model_checksum", "other weights"),
    "meta_not_a_dict": (_set("meta", [1]), "meta", "must be a mapping"),
    "future_version": (_set("version", 99), "version", "must be an integer in [1, 1]"),
    "dag_in_meta": (_set("meta/notes", _dag(40)), "meta", "holds more than"),
    "unit_name_not_a_string": (lambda d: d["scores"]["l1"].__setitem__(7, torch.zeros(8)), "scores.l1",
                               "must be a string, got 7"),
}


@pytest.mark.parametrize("case", sorted(SCORE_CASES))
def test_a_hostile_scores_file_is_one_line_naming_the_field(tmp_path, files, scored, capsys, monkeypatch,
                                                             case):  # noqa: F811
    import copy

    monkeypatch.setattr(checkpoint, "MAX_NODES", 100_000)  # the bound at a test's scale (a scores file: ~30 values)
    change, field, *words = SCORE_CASES[case]
    doc, rates = scored
    doc = copy.deepcopy(doc)
    change(doc)
    path = tmp_path / f"{case}.pt"
    torch.save(doc, path)
    out = tmp_path / "run"
    code, err, _ = run(capsys, ["prune", "--checkpoint", files["tiny"], "--data", "digits", "--scores", path,
                                "--rates", rates, "--out", out, "--no-progress"])
    _error_line(code, err, path, field, *words)
    assert not out.exists()


def test_the_unchanged_scores_file_is_accepted(files, scored, tmp_path):  # noqa: F811
    doc, _ = scored
    torch.save(doc, tmp_path / "good.pt")
    net, _ = checkpoint.load(files["tiny"])
    sc = scores_mod.Scores.load(tmp_path / "good.pt")
    sc.check_model(net, str(tmp_path / "good.pt"))  # the control: the cases above differ from it in one field
    assert set(sc.scores["l1"]) == set(doc["scores"]["l1"])


def test_a_scores_file_of_too_many_units_is_refused_by_its_count(tmp_path, scored, monkeypatch):
    monkeypatch.setattr(scores_mod, "MAX_UNITS", 5)
    doc, _ = scored
    torch.save(doc, tmp_path / "s.pt")  # 13 units
    with pytest.raises(UserError, match=r"scores\.l1: holds 13 units; at most 5 are read"):
        scores_mod.Scores.load(tmp_path / "s.pt")


def test_hrank_rank_files_are_bound_to_the_checkpoint_they_are_imported_for(files, tmp_path):  # noqa: F811
    net, _ = checkpoint.load(files["tiny"])
    sc = scores_mod.compute(net, [], ["l1"], n_images=0, seed=0, progress=False)
    hrank.export_rank_files(sc, "l1", net, tmp_path / "npy")
    imported = hrank.import_rank_files(tmp_path / "npy", net)
    assert imported.meta["model_checksum"] == scores_mod.model_checksum(net)
    imported.check_model(net, str(tmp_path / "npy"))  # no checksum in HRank's files: the import path still works
    saved = scores_mod.Scores.load(imported.save(tmp_path / "scores.pt"))  # a run's scores.pt made from them
    other, _ = checkpoint.load(files["nan"])
    with torch.no_grad():
        other.features.conv0.weight.nan_to_num_(0.0)
    with pytest.raises(UserError, match="meta.model_checksum: scores were computed on other weights"):
        saved.check_model(other, str(tmp_path / "scores.pt"))


def test_a_hostile_hrank_rank_file_names_the_file(files, tmp_path):  # noqa: F811
    net, _ = checkpoint.load(files["tiny"])
    folder = tmp_path / "npy"
    folder.mkdir()
    np.save(folder / "rank_conv1.npy", np.array([1.0] * 7 + [np.nan]))
    with pytest.raises(UserError, match="rank_conv1.npy: holds 1 NaN/inf ranks"):
        hrank.import_rank_files(folder, net)
    np.save(folder / "rank_conv1.npy", np.ones(8, dtype=np.complex64))
    with pytest.raises(UserError, match="rank_conv1.npy: ranks must be real numbers"):
        hrank.import_rank_files(folder, net)
    # A header that declares a billion ranks over a few bytes: refused from the header, nothing allocated.
    header = {"descr": "<f8", "fortran_order": False, "shape": (10**9,)}
    with open(folder / "rank_conv1.npy", "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        fh.write(b"\0" * 64)
    with pytest.raises(UserError, match=r"rank_conv1.npy: has ranks of shape \(1000000000,\)"):
        hrank.import_rank_files(folder, net)


# --------------------------------------------------------------------------- ONNX files
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

CONTRACT = {"dataset": "digits", "root": None, "classes": [str(i) for i in range(10)], "input_size": [8, 8],
            "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3, "resize": {}}


def _graph(meta: dict[str, str], *, side: int | str = "S", classes: int | str = 10, extra_nodes=(),
           extra_init=(), tail: str = "logits") -> Any:
    """input [N, 3, side, side] -> mean per channel -> x W (3 x classes) -> ``tail``; extra nodes may
    read ``f``/``m`` and must write ``logits`` when ``tail`` is not ``logits``."""
    w = numpy_helper.from_array(np.arange(30, dtype=np.float32).reshape(3, 10) / 30, "W")
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "W"], [tail]), *extra_nodes]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                     ["batch", 3, side, side])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
                          [w, *extra_init])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    for k, v in meta.items():
        e = m.metadata_props.add()
        e.key, e.value = k, v
    return m


def _expand_to(n: int) -> dict:
    shape = numpy_helper.from_array(np.array([n], np.int64), "big_shape")
    one = numpy_helper.from_array(np.array([1.0], np.float32), "one")
    nodes = [helper.make_node("Expand", ["one", "big_shape"], ["big"]),
             helper.make_node("ReduceSum", ["big"], ["s"], keepdims=1), helper.make_node("Add", ["m", "s"], ["logits"])]
    return {"extra_nodes": nodes, "extra_init": [shape, one], "tail": "m"}


def _loop() -> dict:
    one = numpy_helper.from_array(np.array(1.0, np.float32), "one")
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("Add", ["acc_in", "one"], ["acc_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [])])
    init = [numpy_helper.from_array(np.array(10**12, np.int64), "trips"), numpy_helper.from_array(np.array(True), "go"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"), one]
    nodes = [helper.make_node("Loop", ["trips", "go", "zero"], ["acc"], body=body),
             helper.make_node("Add", ["m", "acc"], ["logits"])]
    return {"extra_nodes": nodes, "extra_init": init, "tail": "m"}


def _deep_json(n: int) -> str:
    return "[" * n + "]" * n


ONNX_CASES = {
    "deep_contract": (dict(meta={"data_contract": _deep_json(50_000)}), "data_contract", "nested more than 32"),
    "deep_quantization": (dict(meta={"quantization": '{"a": ' + _deep_json(5_000) + "}"}), "quantization",
                          "nested more than 32"),
    "huge_entry": (dict(meta={"notes": "x" * ((1 << 20) + 1)}), "metadata.notes", "entry too large"),
    "many_entries": (dict(meta={f"k{i}": "v" for i in range(1000)}), "metadata", "1,000 metadata entries"),
    "classes_not_a_number": (dict(meta={"num_classes": "ten"}), "metadata.num_classes", "must be an integer"),
    "classes_nowhere": (dict(meta={}, classes="classes"), "metadata.num_classes", "no class count"),
    "classes_disagree": (dict(meta={"num_classes": "7"}), "metadata.num_classes", "says 7 classes"),
    "params_of_5000_digits": (dict(meta={"params": "9" * 5000}), "metadata.params", "must be an integer"),
    "contract_side_8192": (dict(meta={"data_contract": json.dumps({**CONTRACT, "input_size": [8192, 8192]})}),
                           "data_contract.input_size", "8192x8192 px is past the 1024 px"),
    "metadata_side_8192": (dict(meta={"input_size": "8192"}), "metadata.input_size", "[1, 1,024], got '8192'"),
    "graph_side_8192": (dict(meta={}, side=8192), "graph.input", "8192 px is past"),
    "expand_to_2_gib": (dict(meta={}, **_expand_to(1 << 29)), "graph.value", "'big' would hold 2.0+ GiB"),
    "loop": (dict(meta={}, **_loop()), "graph.node[3]", "node Loop", "subgraph"),
}


@pytest.mark.parametrize("case", sorted(ONNX_CASES))
def test_a_hostile_onnx_file_is_one_line_naming_the_field(tmp_path, capsys, case):
    kwargs, field, *words = ONNX_CASES[case]
    path = tmp_path / f"{case}.onnx"
    onnx.save(_graph(**kwargs), str(path))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    for argv in (["eval", path, "--no-progress"], ["report", path, "--out", tmp_path / "r.md", "--no-latency"]):
        t0 = time.perf_counter()
        code, err, _ = run(capsys, argv)
        assert time.perf_counter() - t0 < 5, argv
        _error_line(code, err, path, field, *words)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < (512 << 10)  # no GB-sized allocation
    assert not (tmp_path / "r.md").exists()


def test_an_onnx_file_without_num_classes_takes_the_graphs_class_count(tmp_path, capsys):
    """Before: ``int(None)`` (TypeError). The graph's output [N, 10] says it; the evaluation runs."""
    path = tmp_path / "plain.onnx"
    onnx.save(_graph({"data_contract": json.dumps(CONTRACT)}), str(path))
    code, err, out = run(capsys, ["eval", path, "--json", "--no-progress"])
    assert code == 0, err
    res = json.loads(out)
    assert res["n"] == 360 and res["runtime"] == "onnxruntime"  # the digits test split


def _slow() -> dict:
    """input -> [N, 3] -> x (3 x 1024) -> 400 x (1024 x 1024): seconds to minutes of matmuls, no control flow,
    and nothing constant to fold while the session is made."""
    w0 = numpy_helper.from_array(np.full((3, 1024), 0.01, np.float32), "w0")
    shape = numpy_helper.from_array(np.array([1024, 1024], np.int64), "wshape")
    nodes = [helper.make_node("ConstantOfShape", ["wshape"], ["w"],
                              value=numpy_helper.from_array(np.array([1e-3], np.float32))),
             helper.make_node("MatMul", ["f", "w0"], ["h0"])]
    for i in range(400):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("ReduceSum", ["h400"], ["s"], keepdims=1))
    nodes.append(helper.make_node("Add", ["m", "s"], ["logits"]))
    return {"extra_nodes": nodes, "extra_init": [w0, shape], "tail": "m"}


def test_an_onnx_run_that_does_not_finish_is_stopped(tmp_path, capsys, monkeypatch):
    from compressor.deploy import onnx_model

    monkeypatch.setattr(onnx_model, "RUN_SECONDS", 0.5)  # the bound at a test's scale
    path = tmp_path / "slow.onnx"
    onnx.save(_graph({"data_contract": json.dumps(CONTRACT)}, **_slow()), str(path))
    t0 = time.perf_counter()
    code, err, _ = run(capsys, ["eval", path, "--no-progress", "--batch-size", "360"])
    assert time.perf_counter() - t0 < 10
    _error_line(code, err, path, "graph", "one batch ran longer than 0.5 s")
    assert [ln for ln in err if not ln.startswith("data: ")] == [err[-1]], err  # onnxruntime's own log stays quiet


# --------------------------------------------------------------------------- YAML: recipes, rates, resolved configs
BOMB = ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
        + "".join(f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))
        + "lr: *i\n")
YAML_CASES = {
    "alias_bomb": (BOMB, "expands to more than 100,000 YAML nodes (line 6)"),
    "recursive_alias": ("lr: &a [1, *a]\n", "recursive alias"),
    "flow_50k_deep": ("lr: " + "[" * 50_000 + "]" * 50_000 + "\n", "nested more than 64 levels deep (line 1)"),
    "block_deep": ("lr:\n" + "".join(" " * (i + 1) + "-\n" for i in range(200)),
                   "nested more than 64 levels deep (line 65)"),
    "sequence_deep": ("lr:\n" + "- " * 500 + "1\n", "nested more than 64 levels deep"),
    "duplicate_key": ("lr: 0.1\nepochs: 3\nlr: 0.2\n", "duplicate key 'lr' (line 3)"),
    "not_text": (b"\xff\xfe\x00lr: 1\n", "not a text file"),
}


def _write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize("case", sorted(YAML_CASES))
def test_a_hostile_recipe_is_one_line_in_bounded_time(tmp_path, files, capsys, case):  # noqa: F811
    content, words = YAML_CASES[case]
    recipe = _write(tmp_path / f"{case}.yaml", content)
    out = tmp_path / "never"
    t0 = time.perf_counter()
    code, err, _ = run(capsys, ["finetune", "--checkpoint", files["tiny"], "--config", recipe, "--out", out])
    assert time.perf_counter() - t0 < 2
    _error_line(code, err, recipe, None, words)
    assert not out.exists()


@pytest.mark.parametrize("case", ["alias_bomb", "duplicate_key", "flow_50k_deep"])
def test_a_hostile_rates_file_is_one_line_through_the_same_reader(tmp_path, files, capsys, case):  # noqa: F811
    content, words = YAML_CASES[case]
    rates = _write(tmp_path / "r.yaml", content.replace("lr:", "rates:"))
    code, err, _ = run(capsys, ["prune", "--checkpoint", files["tiny"], "--rates", rates, "--out", tmp_path / "o",
                                "--no-progress"])
    _error_line(code, err, rates, None, words.replace("'lr'", "'rates'"))
    assert not (tmp_path / "o").exists()


def test_a_2_gib_recipe_is_refused_before_it_is_read(tmp_path, files, capsys):  # noqa: F811
    recipe = tmp_path / "huge.yaml"
    with open(recipe, "wb") as fh:
        fh.truncate(2 << 30)  # sparse: no disk used
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, err, _ = run(capsys, ["finetune", "--checkpoint", files["tiny"], "--config", recipe, "--out", tmp_path / "o"])
    _error_line(code, err, recipe, None, "is larger than 256 KiB")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < (256 << 10)


def test_a_hostile_resolved_config_is_neither_followed_nor_fatal(tmp_path):
    """A run folder's resolved_config.yaml is read on --resume: a bomb there is a warning and the run's
    own settings, in bounded time; after the resume it is replaced by the run's options."""
    import warnings

    from compressor.jobs import train_run

    (tmp_path / "resolved_config.yaml").write_text(BOMB)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opts = train_run.saved_options(str(tmp_path / "last.pt"), {"extra": {"train_state": {"config": {"epochs": 3}}}})
    assert any("resolved_config.yaml: expands to more than" in str(w.message) for w in caught)
    train_run.write_resolved(tmp_path, {"lr": 0.1, "epochs": 2}, resume=str(tmp_path / "last.pt"), header="h")
    assert time.perf_counter() - t0 < 2
    text = (tmp_path / "resolved_config.yaml").read_text()
    from compressor.storage import yaml_io

    assert yaml_io.load_yaml(tmp_path / "resolved_config.yaml")["lr"] == 0.1 and text.startswith("# h")
    assert opts == {"epochs": 3}  # the checkpoint's own settings; nothing of the bomb
