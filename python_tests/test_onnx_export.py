"""DIN as ONNX: the segment-form translation of the din_ext ops against the reference (plain torch, always run),
then, with the extra din_ext[onnx], the exported file (standard-domain ops only, opset >= 18, dynamic batch,
history and candidates, metadata inside), onnxruntime without din_ext, DINPredictor on .onnx and ``din-ext
predict`` on .pt, .pt2 and .onnx, all against the eager model on real batches with empty histories, L=1 and OOV."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from din_ext import reference
from din_ext.export import ServingDIN
from din_ext.modules import Dice, LocalActivationUnit
from din_ext.onnx_export import dice_eval, segment_pooling, translate
from conftest import requires_cpp

from test_model import one_thread, tiny  # noqa: F401  (fixtures)
from test_serving import (edge_batch, edge_batches, eager_probabilities, exported_by_cli, multi_candidate_of,
                          raw_requests, serving_columns, small_model, warm_statistics)


def jagged_edges(rows: int = 6, dim: int = 12, seed: int = 0):
    """Offsets with empty users (first, middle, last), a user with L=1, and key storage past offsets[-1]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([0, 1, 5, 0, 9, 0][:rows])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    keys = torch.randn(int(offsets[-1]) + 3, dim, generator=g)
    return offsets, keys


@pytest.mark.parametrize("activation", ["dice", "prelu", "sigmoid", "relu"])
@pytest.mark.parametrize("normalization", ["none", "softmax"])
@pytest.mark.parametrize("candidates", [None, 4])
@pytest.mark.parametrize("hidden", [(10, 6), ()])
def test_segment_pooling_equals_reference(activation, normalization, candidates, hidden):
    torch.manual_seed(1)
    offsets, keys = jagged_edges()
    unit = LocalActivationUnit(12, hidden, activation=activation, normalization=normalization,
                               score_scale=0.7).eval()
    if activation == "dice":  # running statistics that are not the initial ones
        for act in unit.activations:
            act.running_mean.uniform_(-1, 1)
            act.running_var.uniform_(0.5, 2)
            act.alpha.data.uniform_(-1, 1)
    rows = offsets.shape[0] - 1
    query = torch.randn(rows, 12) if candidates is None else torch.randn(rows, candidates, 12)
    with torch.no_grad():
        got = segment_pooling(unit, query, keys, offsets)
        want, _ = reference.local_activation_attention(
            query, keys, [lin.weight for lin in unit.linears] + [unit.out.weight],
            [lin.bias for lin in unit.linears] + [unit.out.bias], unit.act_params() if activation in
            ("dice", "prelu") else query.new_empty(0, sum(hidden)), offsets=offsets, activation=activation,
            normalization=normalization, score_scale=0.7, training=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[offsets[1:] == offsets[:-1]], torch.zeros_like(got[offsets[1:] == offsets[:-1]]))


@pytest.mark.parametrize("affine", [False, True])
def test_dice_eval_equals_reference(affine):
    torch.manual_seed(2)
    dice = Dice(7, affine=affine).eval()
    for t in (dice.alpha, dice.running_mean, *((dice.weight, dice.bias) if affine else ())):
        t.data.uniform_(-1, 1)
    dice.running_var.uniform_(0.2, 3)
    x = torch.randn(5, 4, 7) * 2
    want, _, _ = reference.dice(x, dice.alpha, dice.running_mean, dice.running_var, gamma=dice.weight,
                                beta=dice.bias, training=False, eps=dice.eps)
    torch.testing.assert_close(dice_eval(dice, x), want, rtol=1e-5, atol=1e-6)


def test_segment_sum_pooling_equals_sum():
    offsets, keys = jagged_edges()
    query = torch.zeros(6, 3, 12)
    got = segment_pooling(None, query, keys, offsets)
    for b in range(6):
        want = keys[offsets[b]:offsets[b + 1]].sum(0)
        for c in range(3):
            torch.testing.assert_close(got[b, c], want)


MODELS = {"dice": {}, "prelu-softmax": {"activation": "prelu", "normalization": "softmax"},
          "base": {"pooling": "sum"}, "mba-no-dense": {"mba_lambda": 1e-3, "use_dense": False}}


@pytest.mark.parametrize("options", list(MODELS.values()), ids=list(MODELS))
def test_translated_model_equals_eager(tiny, options):
    """The translated copy (what is exported) gives the eager model's probabilities, and leaves the model as it
    was."""
    train, _, schema = tiny
    model = warm_statistics(small_model(schema, **options), train)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    serving = ServingDIN(translate(model))
    for batch in edge_batches(train):
        with torch.no_grad():
            got = serving(*serving_columns(batch, schema))
        torch.testing.assert_close(got, eager_probabilities(model, batch), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.attention is None or isinstance(model.attention, LocalActivationUnit)


def test_missing_extra_says_how_to_install(monkeypatch, tiny, tmp_path, capsys):
    from din_ext import cli
    from din_ext.onnx_export import export_onnx, load_onnx

    for name in ("onnx", "onnxscript", "onnxruntime"):
        monkeypatch.setitem(sys.modules, name, None)
    model, path = small_model(tiny[2]), tmp_path / "m.onnx"
    with pytest.raises(ImportError, match=r"din_ext\[onnx\]"):
        export_onnx(model, str(path))
    with pytest.raises(ImportError, match=r"din_ext\[onnx\]"):
        load_onnx(str(path))
    torch.save(model.checkpoint(), tmp_path / "best.pt")
    path.write_bytes(b"")  # exists, so that predict gets as far as loading it
    for argv in (["export", "--checkpoint", str(tmp_path / "best.pt"), "--format", "onnx", "--out", str(path)],
                 ["predict", "--checkpoint", str(path), "--output", str(tmp_path / "p.csv")]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "din_ext[onnx]" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


# -- the exported file (din_ext[onnx]) ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """(model, checkpoint path, .onnx path) with ``din-ext export --format onnx`` (vocabularies in the schema)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    return exported_by_cli(tiny, tmp_path_factory.mktemp("onnx"), "onnx")


def test_graph_has_standard_ops_only_and_dynamic_inputs(exported):
    import onnx

    from din_ext.onnx_export import METADATA_KEY, foreign_ops

    model, _, path = exported
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    assert min(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 18
    assert foreign_ops(proto) == {} and not proto.functions
    assert not any("din_ext" in n.op_type or "din_ext" in n.domain for n in proto.graph.node)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert all(isinstance(dims[name][0], str) for name in dims)  # batch (and B + 1, history total) symbolic
    assert isinstance(dims["items"][1], str)  # candidates
    meta = json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])
    assert meta["vocabularies"] == {f: list(v) for f, v in model.schema.vocabularies.items()}


OTHER_MODELS = {"softmax-prelu-two-tasks-no-dense": ({"activation": "prelu", "normalization": "softmax",
                                                     "use_dense": False}, True),
                "base-mba": ({"pooling": "sum", "mba_lambda": 1e-3}, False)}


@pytest.mark.parametrize("options, conversion", list(OTHER_MODELS.values()), ids=list(OTHER_MODELS))
def test_other_models_export_and_match_eager(options, conversion, tmp_path):
    """The segment softmax, PReLU, two tasks, no dense features, sum pooling and MBA tables through onnxruntime."""
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from din_ext.data.synthetic import SyntheticConfig, generate
    from din_ext.onnx_export import export_onnx, foreign_ops, load_onnx
    from test_model import TINY

    train, _, schema = generate(SyntheticConfig(**{**TINY.__dict__, "conversion": conversion}), seed=3)
    model = warm_statistics(small_model(schema, **options), train)
    path = export_onnx(model, str(tmp_path / "m.onnx"))
    assert foreign_ops(onnx.load(path)) == {}
    run, meta = load_onnx(path, threads=1)
    assert meta["tasks"] == list(schema.tasks) and len(schema.tasks) == (2 if conversion else 1)
    for batch in edge_batches(train):
        user, items, offsets, hist, dense = serving_columns(batch, schema)
        dense = dense if model.use_dense else dense[:, :0]  # (B, 0): the graph of a model without dense features
        torch.testing.assert_close(run(user, items, offsets, hist, dense), eager_probabilities(model, batch),
                                   rtol=1e-5, atol=1e-5)


def test_foreign_ops_finds_a_custom_domain_node(exported):
    import onnx

    from din_ext.onnx_export import foreign_ops

    proto = onnx.load(exported[2])
    proto.graph.node[0].domain = "din_ext"
    assert foreign_ops(proto) == {f"din_ext::{proto.graph.node[0].op_type}": 1}


# Runs in a fresh interpreter in which din_ext cannot be imported: stock onnxruntime and numpy only.
STOCK_RUNTIME = """
import json, sys
sys.modules["din_ext"] = None
import numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
feeds = json.loads(sys.stdin.read())
out = []
for feed in feeds:
    inputs = {k: np.asarray(v, dtype=np.float32 if k == "dense" else np.int64).reshape(feed["shapes"][k])
              for k, v in feed["values"].items()}
    out.append(session.run(None, inputs)[0].tolist())
print(json.dumps(out))
"""


def test_stock_onnxruntime_without_din_ext_matches_eager(exported, tiny):
    from din_ext.onnx_export import INPUT_NAMES

    model, _, path = exported
    batches = edge_batches(tiny[0])
    feeds = []
    for batch in batches:
        columns = dict(zip(INPUT_NAMES, serving_columns(batch, model.schema)))
        feeds.append({"values": {k: v.reshape(-1).tolist() for k, v in columns.items()},
                      "shapes": {k: list(v.shape) for k, v in columns.items()}})
    done = subprocess.run([sys.executable, "-c", STOCK_RUNTIME, path], input=json.dumps(feeds), text=True,
                          capture_output=True, timeout=300, check=True)
    for batch, got in zip(batches, json.loads(done.stdout)):
        torch.testing.assert_close(torch.tensor(got), eager_probabilities(model, batch), rtol=1e-5, atol=1e-5)


def test_onnx_runner_matches_eager(exported, tiny):
    from din_ext.onnx_export import load_onnx

    model, _, path = exported
    for threads in (1, 2):
        run, _ = load_onnx(path, threads=threads)
        for batch in edge_batches(tiny[0]):
            torch.testing.assert_close(run(*serving_columns(batch, model.schema)), eager_probabilities(model, batch),
                                       rtol=1e-5, atol=1e-5)


def test_predictor_on_onnx_matches_eager_and_threads(exported, tiny):
    from concurrent.futures import ThreadPoolExecutor

    from din_ext.serving import DINPredictor

    model, _, path = exported
    predictor = DINPredictor.load(path, threads=1)
    batch = edge_batch(tiny[0])
    requests = raw_requests(batch, model.schema, candidates=3)
    requests[4]["candidates"]["item"][1] = 987654321  # unseen: OOV
    requests[5]["history"]["item"] = [None] * len(requests[5]["history"]["item"])
    expected = eager_probabilities(model, multi_candidate_of(batch, 3, oov=((4, 1),), oov_history=5))
    got = predictor.predict(requests)
    for b, result in enumerate(got):
        for k, task in enumerate(model.tasks):
            torch.testing.assert_close(torch.tensor(result[task]), expected[b, :, k], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="dense"):
        predictor.predict([{**requests[0], "dense": [1.0]}])
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda i: predictor.predict(requests[i:i + 3]), list(range(0, 18, 3)) * 3))
    assert together == [got[i:i + 3] for i in range(0, 18, 3)] * 3


def test_predictor_refuses_foreign_onnx(exported, tmp_path):
    import onnx

    from din_ext.serving import DINPredictor

    proto = onnx.load(exported[2])
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "plain.onnx"))
    with pytest.raises(ValueError, match="not a din_ext ONNX file"):
        DINPredictor.load(str(tmp_path / "plain.onnx"))
    (tmp_path / "junk.onnx").write_text("junk")
    with pytest.raises(ValueError, match="junk.onnx: onnxruntime cannot load it"):
        DINPredictor.load(str(tmp_path / "junk.onnx"))


@requires_cpp
def test_cli_predict_pt_pt2_onnx_agree(exported, tiny, tmp_path, monkeypatch, capsys):
    import csv

    import din_ext.data
    from din_ext import cli

    _, checkpoint, path = exported
    train, test, schema = tiny
    package = str(tmp_path / "model.pt2")
    assert cli.main(["export", "--checkpoint", checkpoint, "--format", "pt2", "--out", package]) == 0
    monkeypatch.setattr(din_ext.data, "load_dataset", lambda name, path, **options: (train, test, schema),
                        raising=False)
    tables = []
    for name, source in (("pt", checkpoint), ("pt2", package), ("onnx", path)):
        out = str(tmp_path / f"{name}.csv")
        assert cli.main(["predict", "--checkpoint", source, "--output", out, "--threads", "1"]) == 0
        with open(out) as f:
            tables.append(list(csv.reader(f)))
    pt = tables[0]
    assert len(pt) == len(test) + 1 and pt[0] == ["row", "user_id", "p_click", "click"]
    for other in tables[1:]:
        assert other[0] == pt[0] and len(other) == len(pt)
        for a, b in zip(pt[1:], other[1:]):
            assert a[:2] == b[:2] and a[-1] == b[-1] and abs(float(a[2]) - float(b[2])) <= 1e-5
    capsys.readouterr()
    assert cli.main(["predict", "--checkpoint", path, "--output", str(tmp_path / "x.csv"), "--device", "cuda"]) == 2
    assert "--device cuda: a .onnx export runs on the cpu" in capsys.readouterr().err


def test_cli_export_onnx_errors(exported, tmp_path, capsys):
    from din_ext import cli

    _, checkpoint, _ = exported
    assert cli.main(["export", "--checkpoint", checkpoint, "--format", "onnx", "--out", str(tmp_path / "m.pt2")]) == 2
    assert "ends in .onnx" in capsys.readouterr().err
