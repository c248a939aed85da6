"""The cuda attention launch planning (csrc/cuda/attention_plan.h) run on the host: din_ext::_attention_launch_plan.

The kernels cannot run without a GPU; their index math (chunks, work items, row tiles, shared-memory and partial-sum
layouts) is the same code as this op runs, checked here against a plain-Python computation. The chunked online
softmax and the chunk-order combine of the pooling kernels are emulated on the plan's own tables, for one candidate
per user and for several (query [B, C, D]: candidate groups, (tile, candidate) steps, per-candidate partial rows).
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import requires_cpp

CHUNK, MAX_BLOCKS, THREADS, ALIGN = 256, 512, 256, 4
MAX_LINEARS = 9
TILES = (64, 32, 16, 8)
MIN_GROUP = 8
SM90_SMEM = 227 * 1024  # sharedMemPerBlockOptin of sm_90 (H100/H200)


def plan(widths, dim, value_dim, lengths, max_len, elem_bytes=4, smem_limit=SM90_SMEM, candidates=None):
    extra = () if candidates is None else (candidates,)
    out = torch.ops.din_ext._attention_launch_plan(list(widths), dim, value_dim, elem_bytes, smem_limit,
                                                   torch.tensor(lengths, dtype=torch.long), max_len, *extra)
    summary, smem_f, smem_b, params, items, tiles, multi, steps = out
    return dict(summary=list(summary), smem_f=list(smem_f), smem_b=list(smem_b), params=list(params),
                items=items.tolist(), tiles=tiles.tolist(), multi=list(multi), steps=steps.tolist())


def align(n):
    return -(-n // ALIGN) * ALIGN


def py_smem(widths, tile, dim, value_dim, backward, candidates=1):
    """[weff, c, q, gout, keys, z*9, h*9, score, gscore, g0, g1, grad_weff, dc, acc, vals, gkeys, gvals, total] as
    the plan lays them (vals, gkeys, gvals: empty with one candidate)."""
    n = len(widths) - 1
    w0, widest = widths[0], max(widths)
    sizes = [dim * w0, w0, dim, value_dim if backward else 0, tile * dim]
    sizes += [tile * widths[i] if i <= n else 0 for i in range(MAX_LINEARS)]
    sizes += [tile * widths[i] if i < n else 0 for i in range(MAX_LINEARS)]
    sizes += [tile, tile if backward else 0, tile * widest if backward else 0, tile * widest if backward else 0,
              w0 * dim if backward else 0, w0 if backward else 0, max(dim, value_dim)]
    multi = candidates > 1
    sizes += [tile * value_dim if multi else 0, tile * dim if multi and backward else 0,
              tile * value_dim if multi and backward else 0]
    offsets, at = [], 0
    for size in sizes:
        offsets.append(at)
        at += align(size)
    return offsets + [at], sizes


def py_tile(widths, dim, value_dim, backward, elem_bytes, limit, candidates=1):
    for tile in TILES:
        if py_smem(widths, tile, dim, value_dim, backward, candidates)[0][-1] * elem_bytes <= limit:
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


def py_groups(user_chunks, candidates):
    """Candidate groups: 1 unless the chunks leave blocks idle; then groups of >= MIN_GROUP, up to MAX_BLOCKS items."""
    if candidates <= 1 or user_chunks >= MAX_BLOCKS:
        return 1
    groups = min(-(-MAX_BLOCKS // user_chunks), max(candidates // MIN_GROUP, 1))
    per = -(-candidates // groups)
    return -(-candidates // per)


def py_items(lengths, max_len, candidates=1):
    chunks = max(-(-max_len // CHUNK), 1)
    groups = py_groups(len(lengths) * chunks, candidates)
    count = len(lengths) * chunks * groups
    grid = max(min(count, MAX_BLOCKS), 1)
    rows = []
    for w in range(count):
        user, chunk = divmod(w // groups, chunks)
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
    with pytest.raises(RuntimeError, match="candidates must be >= 1"):
        plan((80, 1), 24, 24, [1], 1, candidates=0)


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


# ---------------------------------------------------------------------------------------------------------------
# Several candidates per user (query [B, C, D])

CANDIDATES = (2, 7, 16, 100, 500)


@requires_cpp
@pytest.mark.parametrize("case", list(LENGTH_CASES))
def test_one_candidate_is_the_single_candidate_plan(case):
    lengths, max_len = LENGTH_CASES[case]
    single = plan((80, 40, 1), 24, 24, lengths, max_len)
    one = plan((80, 40, 1), 24, 24, lengths, max_len, candidates=1)
    assert one == single
    chunks = single["summary"][2]
    assert single["multi"] == [1, 1, 1, len(lengths) * chunks, MIN_GROUP]
    # One step per tile, candidate 0, whose partial row is the work item.
    assert single["steps"] == [[w, first, rows, 0, w] for w, first, rows in single["tiles"]]


@pytest.mark.parametrize("user_chunks", [1, 2, 3, 7, 64, 511, 512, 4096])
@pytest.mark.parametrize("candidates", (1,) + CANDIDATES)
def test_candidate_groups_rule(user_chunks, candidates):
    """Pure Python: the rule the plan implements (checked against the op below)."""
    groups = py_groups(user_chunks, candidates)
    per = -(-candidates // groups)
    assert 1 <= groups <= candidates
    assert (groups - 1) * per < candidates <= groups * per  # no empty group
    if candidates == 1 or user_chunks >= MAX_BLOCKS:
        assert groups == 1  # the history is read once per chunk
    else:
        assert groups <= -(-MAX_BLOCKS // user_chunks)  # items stay within about one wave of MAX_BLOCKS blocks
        assert groups == 1 or per >= MIN_GROUP  # a tile serves at least MIN_GROUP candidates


@requires_cpp
@pytest.mark.parametrize("candidates", CANDIDATES)
@pytest.mark.parametrize("case", ["odd", "all-empty", "L=1", "long", "many-users", "loose-bound"])
def test_multi_work_items_and_steps(case, candidates):
    lengths, max_len = LENGTH_CASES[case]
    if (case == "many-users" and candidates > 7) or (case == "long" and candidates > 16):
        pytest.skip("big table; the same rule as for fewer candidates")
    C = candidates
    p = plan((80, 40, 1), 24, 24, lengths, max_len, candidates=C)
    chunks, grid, items = py_items(lengths, max_len, C)
    groups = py_groups(len(lengths) * chunks, C)
    per = -(-C // groups)
    tile = p["summary"][1]
    assert tile > 0
    assert p["summary"][2:] == [chunks, len(lengths) * chunks * groups, grid, CHUNK, MAX_BLOCKS, THREADS]
    assert p["multi"] == [C, groups, per, len(lengths) * chunks * C, MIN_GROUP]
    assert p["items"] == items
    # A key tile is loaded once per work item (not once per candidate): the tiles table has each (item, row) once,
    # and every chunk's rows are loaded by exactly `groups` items.
    assert len({(w, first) for w, first, _ in p["tiles"]}) == len(p["tiles"])
    loads = {}
    for w, first, rows in p["tiles"]:
        user, chunk = items[w][2], items[w][3]
        for row in range(first, first + rows):
            loads[(user, row)] = loads.get((user, row), 0) + 1
    assert all(v == groups for v in loads.values())
    assert len(loads) == sum(lengths)
    # Each tile's steps are the item's candidate group, in candidate order, right after the tile is loaded.
    steps = p["steps"]
    at = 0
    for w, first, rows in p["tiles"]:
        group = w % groups
        expected = list(range(group * per, min((group + 1) * per, C)))
        mine = steps[at:at + len(expected)]
        at += len(expected)
        assert [s[:3] for s in mine] == [[w, first, rows]] * len(expected)
        assert [s[3] for s in mine] == expected
    assert at == len(steps)
    # Every valid (candidate, row) pair is visited exactly once, and its partial row is (user, chunk, candidate)'s.
    pairs = set()
    for w, first, rows, c, prow in steps:
        user, chunk = items[w][2], items[w][3]
        assert prow == (user * chunks + chunk) * C + c
        for row in range(first, first + rows):
            assert (user, row, c) not in pairs
            pairs.add((user, row, c))
    assert len(pairs) == C * sum(lengths)  # the Dice statistics' count
    # A partial row belongs to one work item, hence to one block: its carried state is never shared.
    owner = {}
    for w, _, _, _, prow in steps:
        assert owner.setdefault(prow, w) == w
    # The combine and query-gradient kernels read B * C rows' chunks in chunk order from these partial rows.
    assert max((s[4] for s in steps), default=-1) < p["multi"][3]


@requires_cpp
def test_candidate_groups_of_the_op():
    for user_chunks in (1, 3, 64, 511, 512):
        for C in (1, 7, 16, 100, 500):
            p = plan((8, 1), 4, 4, [1] * user_chunks, 1, candidates=C)
            groups = py_groups(user_chunks, C)
            assert p["multi"][:3] == [C, groups, -(-C // groups)]
            assert p["summary"][3] == user_chunks * groups


@requires_cpp
@pytest.mark.parametrize("widths", [(80, 40, 1), (200, 80, 1), (36, 1), (3,) * 8 + (1,)])
@pytest.mark.parametrize("dim, value_dim", [(48, 48), (18, 18), (5, 17), (128, 64)])
@pytest.mark.parametrize("elem_bytes", [4, 8])
@pytest.mark.parametrize("candidates", [2, 100])
def test_multi_smem_layouts(widths, dim, value_dim, elem_bytes, candidates):
    """The multi-candidate layouts: the single-candidate layout plus the vals / gkeys / gvals tiles at the end, and
    within sm_90's 227 KiB per block wherever a tile fits."""
    limit = SM90_SMEM
    p = plan(widths, dim, value_dim, [3, 0], 3, elem_bytes, limit, candidates=candidates)
    tile_f, tile_b = p["summary"][:2]
    assert tile_f == py_tile(widths, dim, value_dim, False, elem_bytes, limit, candidates)
    assert tile_b == py_tile(widths, dim, value_dim, True, elem_bytes, limit, candidates)
    assert tile_f >= tile_b
    single = plan(widths, dim, value_dim, [3, 0], 3, elem_bytes, limit)
    assert tile_f <= single["summary"][0] and tile_b <= single["summary"][1]
    for key, backward, tile in (("smem_f", False, tile_f or 8), ("smem_b", True, tile_b or 8)):
        offsets, sizes = py_smem(widths, tile, dim, value_dim, backward, candidates)
        assert p[key] == offsets
        for off, size, nxt in zip(offsets, sizes, offsets[1:]):
            assert off % ALIGN == 0 and off + size <= nxt
        # Up to acc, the same layout as one candidate at the same tile.
        assert offsets[:-4] == py_smem(widths, tile, dim, value_dim, backward)[0][:-4]
        vals, gkeys, gvals, total = offsets[-4:]
        assert gkeys - vals >= tile * value_dim
        if backward:
            assert gvals - gkeys >= tile * dim and total - gvals >= tile * value_dim
    if tile_f:
        assert p["smem_f"][-1] * elem_bytes <= limit
    if tile_b:
        assert p["smem_b"][-1] * elem_bytes <= limit
    assert p["params"] == py_params(widths, dim)


@requires_cpp
@pytest.mark.parametrize("dim", [18, 48, 64])
def test_din_shapes_fit_sm90_with_candidates(dim):
    """DIN's activation unit (80, 40) with the benchmark's D fits with a full 64-row tile for float32, and a tile
    for float64, forward and backward, with any number of candidates."""
    for candidates in (2, 500):
        p = plan((80, 40, 1), dim, dim, [50], 50, 4, SM90_SMEM, candidates=candidates)
        assert p["summary"][:2] == [64, 64]
        assert p["smem_b"][-1] * 4 <= SM90_SMEM
        p = plan((80, 40, 1), dim, dim, [50], 50, 8, SM90_SMEM, candidates=candidates)
        assert p["summary"][1] >= 16 and p["smem_b"][-1] * 8 <= SM90_SMEM


@requires_cpp
@pytest.mark.parametrize("candidates", [2, 7, 100])
@pytest.mark.parametrize("case", ["odd", "long", "L=1"])
def test_multi_chunked_softmax_pooling_emulation(case, candidates):
    if case == "long" and candidates > 7:
        pytest.skip("big table; the same steps as for fewer candidates")
    """The pooling kernel with several candidates, on the plan's step table: each (tile, candidate) step carries the
    candidate's online-softmax triple (m, l, acc) in its partial row from tile to tile; the combine then merges the
    chunks of each (user, candidate) in chunk order. Equals each candidate's softmax pooling over its whole row; the
    key-gradient emulation (a tile's candidates summed in order per group, the groups then in group order) equals
    the plain sum over candidates (float64)."""
    lengths, max_len = LENGTH_CASES[case]
    C = candidates
    p = plan((80, 40, 1), 24, 24, lengths, max_len, elem_bytes=8, candidates=C)
    chunks, groups = p["summary"][2], p["multi"][1]
    g = torch.Generator().manual_seed(0)
    scores = [torch.randn(C, n, generator=g, dtype=torch.float64) * 3 for n in lengths]
    values = [torch.randn(n, 5, generator=g, dtype=torch.float64) for n in lengths]
    contrib = [torch.randn(C, n, 3, generator=g, dtype=torch.float64) for n in lengths]  # per-pair key gradients
    items = p["items"]
    partial = {}
    gk_partial = {}  # (group, user) -> [n, 3]
    tile_sum = None
    steps = p["steps"]
    for i, (w, first, rows, c, prow) in enumerate(steps):
        user, chunk, begin = items[w][2], items[w][3], items[w][4]
        if first == begin:
            m, l, acc = -math.inf, 0.0, torch.zeros(5, dtype=torch.float64)
        else:
            m, l, acc = partial[prow]
        s = scores[user][c, first:first + rows]
        tile_max = max(m, float(s.max()))
        rescale = math.exp(m - tile_max)
        e = torch.exp(s - tile_max)
        partial[prow] = (tile_max, l * rescale + float(e.sum()),
                         acc * rescale + (e[:, None] * values[user][first:first + rows]).sum(0))
        # Key gradients: summed over the tile's candidates in shared memory, stored once per tile.
        piece = contrib[user][c, first:first + rows]
        new_tile = i == 0 or steps[i - 1][:2] != [w, first]
        tile_sum = piece.clone() if new_tile else tile_sum + piece
        last_of_tile = i + 1 == len(steps) or steps[i + 1][:2] != [w, first]
        if last_of_tile:
            key = (w % groups, user)
            gk_partial.setdefault(key, torch.zeros(lengths[user], 3, dtype=torch.float64))
            assert not gk_partial[key][first:first + rows].any()  # each (group, row) written once
            gk_partial[key][first:first + rows] = tile_sum
    for b, n in enumerate(lengths):
        for c in range(C):
            parts = [partial[(b * chunks + k) * C + c] for k in range(math.ceil(n / CHUNK))]
            if not parts:
                continue
            top = max(m for m, _, _ in parts)
            denom = sum(l * math.exp(m - top) for m, l, _ in parts)
            out = sum(acc * math.exp(m - top) for m, _, acc in parts) / denom
            expected = (torch.softmax(scores[b][c], 0)[:, None] * values[b]).sum(0)
            torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        if n:
            total = sum(gk_partial[(grp, b)] for grp in range(groups))
            torch.testing.assert_close(total, contrib[b].sum(0), rtol=1e-12, atol=1e-12)
