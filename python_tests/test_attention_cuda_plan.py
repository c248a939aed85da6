"""The cuda attention launch planning (csrc/cuda/attention_plan.h) run on the host: din_ext::_attention_launch_plan.

The kernels cannot run without a GPU; their index math (chunks, work items, row tiles, shared-memory and partial-sum
layouts) is the same code as this op runs, checked here against a plain-Python computation. The chunked online
softmax and the chunk-order combine of the pooling kernels are emulated on the plan's own tables.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import requires_cpp

CHUNK, MAX_BLOCKS, THREADS, ALIGN = 256, 512, 256, 4
MAX_LINEARS = 9
TILES = (64, 32, 16, 8)


def plan(widths, dim, value_dim, lengths, max_len, elem_bytes=4, smem_limit=227 * 1024):
    out = torch.ops.din_ext._attention_launch_plan(list(widths), dim, value_dim, elem_bytes, smem_limit,
                                                   torch.tensor(lengths, dtype=torch.long), max_len)
    summary, smem_f, smem_b, params, items, tiles = out
    return dict(summary=list(summary), smem_f=list(smem_f), smem_b=list(smem_b), params=list(params),
                items=items.tolist(), tiles=tiles.tolist())


def align(n):
    return -(-n // ALIGN) * ALIGN


def py_smem(widths, tile, dim, value_dim, backward):
    """[weff, c, q, gout, keys, z*9, h*9, score, gscore, g0, g1, grad_weff, dc, acc, total] as the plan lays them."""
    n = len(widths) - 1
    w0, widest = widths[0], max(widths)
    sizes = [dim * w0, w0, dim, value_dim if backward else 0, tile * dim]
    sizes += [tile * widths[i] if i <= n else 0 for i in range(MAX_LINEARS)]
    sizes += [tile * widths[i] if i < n else 0 for i in range(MAX_LINEARS)]
    sizes += [tile, tile if backward else 0, tile * widest if backward else 0, tile * widest if backward else 0,
              w0 * dim if backward else 0, w0 if backward else 0, max(dim, value_dim)]
    offsets, at = [], 0
    for size in sizes:
        offsets.append(at)
        at += align(size)
    return offsets + [at], sizes


def py_tile(widths, dim, value_dim, backward, elem_bytes, limit):
    for tile in TILES:
        if py_smem(widths, tile, dim, value_dim, backward)[0][-1] * elem_bytes <= limit:
            return tile
    return 0


def py_params(widths, dim):
    n = len(widths) - 1
    sizes = [widths[i] * widths[i - 1] if 1 <= i <= n else 0 for i in range(MAX_LINEARS)]
    sizes += [widths[i] if i <= n else 0 for i in range(MAX_LINEARS)]
    sizes += [widths[0] * dim] * 3 + [5 * sum(widths[:-1])]
    offsets, at = [], 0
    for size in sizes:
        offsets.append(at)
        at += size
    return offsets + [at]


def py_items(lengths, max_len):
    chunks = max(-(-max_len // CHUNK), 1)
    count = len(lengths) * chunks
    grid = max(min(count, MAX_BLOCKS), 1)
    rows = []
    for w in range(count):
        user, chunk = divmod(w, chunks)
        begin = min(chunk * CHUNK, lengths[user])
        rows.append([w, w % grid, user, chunk, begin, min(begin + CHUNK, lengths[user])])
    return chunks, grid, rows


LENGTH_CASES = {
    "odd": ([113, 0, 57, 1, 256, 257, 99], 257),
    "all-empty": ([0, 0, 0], 4),
    "L=1": ([1, 0, 1, 1], 1),
    "long": ([10007, 0, 3, 10000, 511, 512, 513], 10007),
    "many-users": ([(7 * b) % 300 for b in range(1200)], 300),  # more items than blocks: blocks take several
    "loose-bound": ([5, 9], 1000),  # a max_len far above the lengths: empty chunks are reserved and skipped
}


@requires_cpp
@pytest.mark.parametrize("case", list(LENGTH_CASES))
def test_work_items_and_tiles(case):
    lengths, max_len = LENGTH_CASES[case]
    widths = (80, 40, 1)
    p = plan(widths, 24, 24, lengths, max_len)
    chunks, grid, items = py_items(lengths, max_len)
    tile = p["summary"][1]
    assert p["summary"][2:] == [chunks, len(lengths) * chunks, grid, CHUNK, MAX_BLOCKS, THREADS]
    assert p["items"] == items
    # Every user's rows are covered exactly once, in order, by its non-empty chunks, and by their tiles.
    covered = {b: [] for b in range(len(lengths))}
    per_item = {}
    for w, first, rows in p["tiles"]:
        assert 1 <= rows <= tile
        per_item.setdefault(w, []).append((first, rows))
    for w, block, user, chunk, begin, end in items:
        tiles = per_item.get(w, [])
        assert sum(r for _, r in tiles) == end - begin
        assert [f for f, _ in tiles] == list(range(begin, end, tile))
        covered[user] += list(range(begin, end))
    for b, length in enumerate(lengths):
        assert covered[b] == list(range(length))
        assert sum(1 for it in items if it[2] == b and it[4] < it[5]) == math.ceil(length / CHUNK)
    # The tiles come in the accumulating kernels' visiting order: block by block, items g, g + grid, ...
    expected_order = [w for g in range(grid) for w in range(g, len(items), grid) if items[w][4] < items[w][5]]
    seen = []
    for w, _, _ in p["tiles"]:
        if not seen or seen[-1] != w:
            seen.append(w)
    assert seen == expected_order


@requires_cpp
@pytest.mark.parametrize("widths", [(80, 40, 1), (1,), (7, 1), (33, 9, 5, 1), (200, 80, 1), (3,) * 8 + (1,)])
@pytest.mark.parametrize("dim, value_dim", [(24, 24), (5, 17), (128, 64)])
@pytest.mark.parametrize("elem_bytes", [4, 8])
def test_smem_and_param_layouts(widths, dim, value_dim, elem_bytes):
    limit = 227 * 1024
    p = plan(widths, dim, value_dim, [3, 0], 3, elem_bytes, limit)
    tile_f, tile_b = p["summary"][:2]
    assert tile_f == py_tile(widths, dim, value_dim, False, elem_bytes, limit)
    assert tile_b == py_tile(widths, dim, value_dim, True, elem_bytes, limit)
    assert tile_f >= tile_b
    for key, backward, tile in (("smem_f", False, tile_f or 8), ("smem_b", True, tile_b or 8)):
        offsets, sizes = py_smem(widths, tile, dim, value_dim, backward)
        assert p[key] == offsets
        # Regions are aligned, in order and disjoint, and the total bounds them.
        for off, size, nxt in zip(offsets, sizes, offsets[1:]):
            assert off % ALIGN == 0 and off + size <= nxt
    if tile_b:
        assert p["smem_b"][-1] * elem_bytes <= limit
    assert p["params"] == py_params(widths, dim)


@requires_cpp
def test_tile_choice_shrinks_with_the_limit():
    widths, dim = (200, 80, 1), 96
    sizes = {t: py_smem(widths, t, dim, dim, True)[0][-1] * 4 for t in TILES}
    for tile in TILES:
        p = plan(widths, dim, dim, [1], 1, 4, sizes[tile])
        assert p["summary"][1] == tile
    assert plan(widths, dim, dim, [1], 1, 4, sizes[8] - 1)["summary"][1] == 0  # the op then raises a clear error


@requires_cpp
def test_bad_arguments():
    with pytest.raises(RuntimeError, match="last width"):
        plan((80, 40), 24, 24, [1], 1)
    with pytest.raises(RuntimeError, match="lengths must be in"):
        plan((80, 1), 24, 24, [5], 4)


@requires_cpp
@pytest.mark.parametrize("case", ["odd", "long", "L=1"])
def test_chunked_softmax_pooling_emulation(case):
    """The pooling kernels' online softmax over tiles within a chunk, then the chunk-order combine, on the plan's
    tables, equals softmax pooling over the whole row (float64)."""
    lengths, max_len = LENGTH_CASES[case]
    p = plan((80, 40, 1), 24, 24, lengths, max_len, elem_bytes=8)
    g = torch.Generator().manual_seed(0)
    scores = [torch.randn(n, generator=g, dtype=torch.float64) * 3 for n in lengths]
    values = [torch.randn(n, 5, generator=g, dtype=torch.float64) for n in lengths]
    tiles_of = {}
    for w, first, rows in p["tiles"]:
        tiles_of.setdefault(w, []).append((first, rows))
    partial = {}
    for w, _, user, chunk, begin, end in p["items"]:
        if begin == end:
            continue
        m, l, acc = -math.inf, 0.0, torch.zeros(5, dtype=torch.float64)
        for first, rows in tiles_of[w]:
            s = scores[user][first:first + rows]
            tile_max = max(m, float(s.max()))
            rescale = math.exp(m - tile_max)
            e = torch.exp(s - tile_max)
            l = l * rescale + float(e.sum())
            acc = acc * rescale + (e[:, None] * values[user][first:first + rows]).sum(0)
            m = tile_max
        partial[(user, chunk)] = (m, l, acc)
    for b, n in enumerate(lengths):
        parts = [partial[(b, c)] for c in range(math.ceil(n / CHUNK))]
        if not parts:
            continue
        top = max(m for m, _, _ in parts)
        denom = sum(l * math.exp(m - top) for m, l, _ in parts)
        out = sum(acc * math.exp(m - top) for m, _, acc in parts) / denom
        expected = (torch.softmax(scores[b], 0)[:, None] * values[b]).sum(0)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
