"""din_ext_serve, the C++ program of CMakeLists.txt (csrc/serve), scores a .pt2 package's JSON-line requests as
din_ext.serving.DINPredictor does: the same probabilities (1e-5) on real requests with empty histories, L=1, OOV,
integer and string ids; the same requests refused, with a one-line error naming the field."""

from __future__ import annotations

import json
import subprocess
import zipfile

import pytest
import torch
from conftest import requires_cpp
from test_cmake import built, requires_cmake
from test_model import TINY, one_thread  # noqa: F401
from test_serving import SPEC, edge_batch, raw_requests, small_model, warm_statistics, with_vocabularies

pytestmark = [pytest.mark.slow, requires_cmake, requires_cpp]

NUMERIC_BRANDS = 500  # the package's brand vocabulary is the strings "501", "502", ...: integer ids look them up


def rewrite_metadata(source, target, edit):
    """A copy of the package ``source`` at ``target`` whose din_ext.json is ``edit(metadata)``."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            data = old.read(info)
            if info.filename.endswith("/extra/din_ext.json"):
                data = json.dumps(edit(json.loads(data))).encode()
            new.writestr(info, data)
    return str(target)


def numeric_brands(meta):
    meta["vocabularies"]["brand"] = [None, *(str(NUMERIC_BRANDS + r) for r in range(1, len(meta["vocabularies"]
                                                                                          ["brand"])))]
    return meta


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(serve(lines, *options): din_ext_serve's run on the package, the package, the training data): the package of
    test_serving's model with numeric-string brand ids (the other string fields: 'category3', ...)."""
    from din_ext.data.synthetic import generate
    from din_ext.export import export_package

    program = built(tmp_path_factory) / "din_ext_serve"
    train, _, schema = generate(TINY, seed=3)
    folder = tmp_path_factory.mktemp("serve_cpp")
    model = warm_statistics(small_model(with_vocabularies(schema)), train)
    package = rewrite_metadata(export_package(model, str(folder / "exported.pt2"), SPEC), folder / "model.pt2",
                               numeric_brands)

    def serve(lines, *options, path=package):
        """The program's run on ``path`` with ``lines`` (str, or bytes as they are) on stdin."""
        stdin = b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines)
        done = subprocess.run([str(program), "--threads", "1", *options, path], check=False, input=stdin,
                              capture_output=True, timeout=300)
        return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())

    return serve, package, train


def request_lines(batch, schema):
    """JSON lines of the edge batch's requests (3 candidates each) and of hand-written ones: unseen ids, null,
    integer ids of the numeric-string brands, \\u escapes, a surrogate pair, an empty history with one candidate."""
    requests = raw_requests(batch, schema, candidates=3)  # the package's schema: brands "501", "502", ...
    for r in requests:  # the history's brands as integers, which look up their decimal text
        r["history"]["brand"] = [None if b is None else int(b) for b in r["history"]["brand"]]
    requests[4]["candidates"]["item"][1] = 987654321  # unseen: OOV
    requests[5]["candidates"]["category"][0] = "category-unseen"
    requests[6]["history"]["item"] = [None] * len(requests[6]["history"]["item"])
    requests[7]["candidates"]["item"][2] = 2 ** 70  # beyond int64: unseen, OOV
    lines = [json.dumps(r) for r in requests]
    dense = json.dumps(requests[0]["dense"])
    lines.append('{"user": {"gender": "\\u0067ender1", "age": "age2", "note": [1]}, "dense": ' + dense + ', '
                 '"history": {"item": [1003], "category": ["category\\u0031"], "brand": ["\\u0035\\u00302"]}, '
                 '"candidates": {"item": [1003, 1004], "category": ["\\ud83d\\ude00", "category2"], '
                 '"brand": [-0, 503]}}')
    lines.append(' {"candidates": {"brand": [null], "category": [null], "item": [1001]}, "user": {"age": null, '
                 '"gender": "gender2"}, "history": {"item": [], "category": [], "brand": []}, "dense": ' + dense +
                 '}\t')
    return lines


def test_serve_matches_the_predictor(served):
    from din_ext.serving import DINPredictor

    serve, package, train = served
    predictor = DINPredictor.load(package)
    lines = request_lines(edge_batch(train), predictor.schema)
    done = serve(lines)
    assert done.returncode == 0, done.stderr
    got = [json.loads(line) for line in done.stdout.splitlines()]
    expected = [predictor.predict([json.loads(line)])[0] for line in lines]
    assert len(got) == len(lines)
    for g, e in zip(got, expected):
        assert list(g) == list(e) == list(predictor.tasks)
        for task in e:
            torch.testing.assert_close(torch.tensor(g[task]), torch.tensor(e[task]), rtol=1e-5, atol=1e-5)


# (request edit, the field its error names): the Python predictor refuses the same requests.
MALFORMED = [
    (lambda r: r["candidates"].update(item=[]), "candidates"),
    (lambda r: r["history"].pop("brand"), "history"),
    (lambda r: r["user"].pop("gender"), "gender"),
    (lambda r: r.update(dense=[1.0]), "dense"),
    (lambda r: r.update(dense=[1.0, True]), "dense"),
    (lambda r: r["candidates"].update(item=["1001"]), "item"),
    (lambda r: r["candidates"].update(item=[1.5]), "item"),
    (lambda r: r["candidates"].update(category=[True]), "category"),
    (lambda r: r["history"].update(category=r["history"]["category"] + ["category1"]), "category"),
    (lambda r: r["user"].update(age=["age1"]), "age"),
    (lambda r: r.update(history=[]), "history"),
    (lambda r: r.update(extra=1), "extra"),
]

# Not JSON, or not strict JSON (Python's json.loads takes NaN and a lone surrogate).
NOT_JSON = ['{"user": {}, }', '{"dense": [NaN]}', '{"user": "gender1', '{"user": "\\ud800"}', '{"a": 1, "a": 2}',
            '{"a": 01}', "", '{"a": [1 2]}', '{"a": "\\x"}', '{"a": 1} {}', '[' * 100 + ']' * 100, b'{"a": "\xff"}']


def test_serve_refuses_malformed_requests(served):
    from din_ext.serving import DINPredictor

    serve, package, train = served
    predictor = DINPredictor.load(package)
    good = request_lines(edge_batch(train), predictor.schema)[1]
    lines, fields = [], []
    for edit, field in MALFORMED:
        request = json.loads(good)
        edit(request)
        with pytest.raises(ValueError, match=field):
            predictor.predict([request])
        lines.append(json.dumps(request))
        fields.append(field)
    infinite = json.dumps({**json.loads(good), "dense": [12345.5, 0]}).replace("12345.5", "1e999")
    lines += NOT_JSON + ["[1, 2]", infinite]  # the predictor takes an infinite dense value; the program does not
    fields += ["invalid JSON at column"] * len(NOT_JSON) + ["must be an object", "finite"]

    done = serve([good, *lines, good], "--keep-going")
    assert done.returncode == 1 and not done.stderr
    out = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(out) == len(lines) + 2 and "click" in out[0] and out[-1] == out[0]
    for number, (result, field) in enumerate(zip(out[1:-1], fields), start=2):
        assert list(result) == ["error"] and result["error"].startswith(f"line {number}: "), result
        assert field in result["error"] and "\n" not in result["error"], result

    # without --keep-going: the lines before are answered, then one line on stderr and status 1
    done = serve([good, lines[5], good])
    assert done.returncode == 1 and len(done.stdout.splitlines()) == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("din_ext_serve: line 2: candidates['item']")


def test_serve_refuses_a_package_it_cannot_serve(served, tmp_path):
    serve, package, _ = served
    torch.save({"not": "a package"}, tmp_path / "checkpoint.pt")
    cases = [(rewrite_metadata(package, tmp_path / "old.pt2", lambda m: {**m, "vocabularies": {}}),
              "re-export from a checkpoint that has them"),
             (rewrite_metadata(package, tmp_path / "new.pt2", lambda m: {**m, "format": 99}), "package format 99"),
             (str(tmp_path / "checkpoint.pt"), "not a din_ext package"),  # a zip archive too
             (str(tmp_path / "missing.pt2"), "cannot load the package")]
    for path, message in cases:
        done = serve([], path=path)
        assert done.returncode == 2 and message in done.stderr and done.stderr.count("\n") == 1, done.stderr
    done = serve([], "--threads", "0")
    assert done.returncode == 2 and "--threads must be" in done.stderr
