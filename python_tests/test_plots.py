"""Pictures: din-ext train's curves.png (or the line saying why there is none), and benchmark tables as line charts
(bench/common.plot_table)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from din_ext import plots
from din_ext.cli import main

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import common  # noqa: E402  (bench/common.py)

PNG = b"\x89PNG\r\n\x1a\n"
TINY = ["--synthetic-users", "40", "--batch-size", "64", "--embed-dim", "8", "--attention-hidden", "8",
        "--tower-hidden", "16", "--no-progress", "--threads", "1"]
TABLE = """# a benchmark

| shape | act | mode | impl | median ms | spread ms |
|---|---|---|---|---:|---:|
| B=4 L=10 D=8 | dice | eval fwd | eager | 2.00 | 0.1 |
| B=4 L=10 D=8 | dice | eval fwd | cpu | 0.50 | 0.1 |
| B=4 L=100 D=8 | dice | eval fwd | eager | 20.0 | 0.1 |
| B=4 L=100 D=8 | dice | eval fwd | cpu | OOM | |
| B=4 L=100 D=8 | dice | eval fwd | cpu | 3.00 | 0.1 |
| skipped: out of the budget | | |

after the table
"""


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_train_writes_curves_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--out", str(out)]) == 0
    assert (out / "curves.png").read_bytes()[:8] == PNG
    from PIL import Image  # matplotlib depends on pillow

    with Image.open(out / "curves.png") as image:
        assert image.size[0] > image.size[1] > 300  # two panels side by side
    assert len(json.loads((out / "metrics.json").read_text())["history"]) == 2


def test_without_matplotlib_train_says_why_there_is_no_picture(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(plots, "available", lambda: False)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    assert 'no curves.png: matplotlib is not installed (pip install "din_ext[plots]")' in capsys.readouterr().out
    assert not (out / "curves.png").exists() and (out / "metrics.json").exists()


def test_drawing_without_matplotlib_raises_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r'pip install "din_ext\[plots\]"'):
        plots.training_curves([{"epoch": 1, "train_loss": 0.5, "auc": 0.6, "gauc": 0.6}], str(tmp_path / "c.png"))


def test_table_rows_reads_the_first_markdown_table():
    rows = common.table_rows(TABLE)
    assert len(rows) == 5 and rows[0] == {"shape": "B=4 L=10 D=8", "act": "dice", "mode": "eval fwd",
                                          "impl": "eager", "median ms": "2.00", "spread ms": "0.1"}
    assert common.table_rows("no table here") == []


def test_plot_table_draws_one_line_per_series(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    drawn = {}
    real = plots.line_panels
    monkeypatch.setattr(plots, "line_panels", lambda panels, out, **kw: drawn.update(panels) or real(panels, out,
                                                                                                    **kw))
    out = tmp_path / "table.png"
    common.plot_table(TABLE, str(out), x=lambda r: int(r["shape"].split()[1][2:]), y="median ms", series="impl",
                      panel=lambda r: r["act"], xlabel="L", ylabel="ms", logx=True, logy=True)
    assert out.read_bytes()[:8] == PNG and f"wrote {out}" in capsys.readouterr().out
    assert drawn == {"dice": {"eager": [(10, 2.0), (100, 20.0)], "cpu": [(10, 0.5), (100, 3.0)]}}  # OOM left out
