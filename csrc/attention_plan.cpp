// din_ext::_attention_launch_plan: the cuda attention kernels' launch planning (csrc/cuda/attention_plan.h) run on
// the host, so that its index math is tested without a GPU (python_tests/test_attention_cuda_plan.py). Always built; a private
// op, not public API (schema in csrc/din_ext.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "cuda/attention_plan.h"

namespace din_ext {
namespace {

plan::Widths make_widths(c10::IntArrayRef widths) {
  TORCH_CHECK(!widths.empty() && static_cast<int64_t>(widths.size()) <= plan::kMaxLinears,
              "din_ext: widths must list 1 to ", plan::kMaxLinears, " layer widths, got ", widths.size());
  TORCH_CHECK(widths.back() == 1, "din_ext: the last width (the score) must be 1, got ", widths.back());
  plan::Widths net{};
  net.n = static_cast<int>(widths.size()) - 1;
  for (size_t i = 0; i < widths.size(); ++i) {
    TORCH_CHECK(widths[i] >= 1, "din_ext: widths must be >= 1, got ", widths[i]);
    net.w[i] = widths[i];
  }
  return net;
}

std::vector<int64_t> smem_fields(const plan::SmemLayout& L) {
  std::vector<int64_t> f = {L.weff, L.c, L.q, L.gout, L.keys};
  for (int i = 0; i < plan::kMaxLinears; ++i) f.push_back(L.z[i]);
  for (int i = 0; i < plan::kMaxLinears; ++i) f.push_back(L.h[i]);
  for (int64_t v : {L.score, L.gscore, L.g0, L.g1, L.grad_weff, L.dc, L.acc, L.vals, L.gkeys, L.gvals, L.total}) {
    f.push_back(v);
  }
  return f;
}

// Returns (summary, smem_forward, smem_backward, params, items, tiles, multi, steps) for `candidates` candidates
// per user (C; 1 for a 2-D query):
//   summary = [tile_forward, tile_backward, chunks_per_user, work_items, grid_blocks, kChunkRows, kMaxBlocks,
//              kThreads]
//   smem_* = [weff, c, q, gout, keys, z[0..8], h[0..8], score, gscore, g0, g1, grad_weff, dc, acc, vals, gkeys,
//             gvals, total] (elements)
//   params = [dW[0..8], db[0..8], dA, dKc, dPc, act, total] (elements)
//   items [B * S * G, 6] int64: work item, accumulating block, user, chunk, first row, end row (relative to the user)
//   tiles [T, 3] int64: work item, first row, rows, for every row tile in the order the kernels visit them (a tile
//     is loaded once, whatever the number of candidates)
//   multi = [C, candidate groups G, candidates per group, partial rows B * S * C, kMinGroup]
//   steps [T', 5] int64: work item, first row, rows, candidate, partial row, for every (tile, candidate) step in
//     the accumulating kernels' order (a tile's candidates in order, within the item's group)
std::tuple<std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>, at::Tensor,
           at::Tensor, std::vector<int64_t>, at::Tensor>
attention_launch_plan(c10::IntArrayRef widths, int64_t dim, int64_t value_dim, int64_t elem_bytes, int64_t smem_limit,
                      const at::Tensor& lengths_, int64_t max_len, int64_t candidates) {
  const plan::Widths net = make_widths(widths);
  TORCH_CHECK(dim >= 1 && value_dim >= 1, "din_ext: dim and value_dim must be >= 1");
  TORCH_CHECK(candidates >= 1, "din_ext: candidates must be >= 1, got ", candidates);
  TORCH_CHECK(lengths_.dim() == 1 && lengths_.scalar_type() == at::kLong && lengths_.device().is_cpu(),
              "din_ext: lengths must be a 1-D int64 CPU tensor");
  const at::Tensor lengths = lengths_.contiguous();
  const int64_t B = lengths.size(0), C = candidates;
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(len[b] >= 0 && len[b] <= max_len, "din_ext: lengths must be in [0, max_len]");
  }
  const int64_t tile_fwd = plan::choose_tile_rows(net, dim, value_dim, false, elem_bytes, smem_limit, C);
  const int64_t tile_bwd = plan::choose_tile_rows(net, dim, value_dim, true, elem_bytes, smem_limit, C);
  const int64_t S = plan::chunks_per_user(max_len);
  const int64_t groups = plan::candidate_groups(B * S, C), per_group = plan::group_size(C, groups);
  const int64_t items = B * S * groups;
  const int64_t grid = plan::grid_blocks(items);
  std::vector<int64_t> summary = {tile_fwd, tile_bwd, S, items, grid, plan::kChunkRows, plan::kMaxBlocks,
                                  plan::kThreads};
  std::vector<int64_t> multi = {C, groups, per_group, B * S * C, plan::kMinGroup};
  const int64_t tile_for_layout = tile_bwd > 0 ? tile_bwd : plan::tile_choice(plan::kNumTileChoices - 1);
  const std::vector<int64_t> smem_f = smem_fields(plan::smem_layout(net, tile_fwd > 0 ? tile_fwd : tile_for_layout,
                                                                    dim, value_dim, false, C));
  const std::vector<int64_t> smem_b = smem_fields(plan::smem_layout(net, tile_for_layout, dim, value_dim, true, C));
  const plan::ParamLayout P = plan::param_layout(net, dim);
  std::vector<int64_t> params;
  for (int i = 0; i < plan::kMaxLinears; ++i) params.push_back(P.dW[i]);
  for (int i = 0; i < plan::kMaxLinears; ++i) params.push_back(P.db[i]);
  for (int64_t v : {P.dA, P.dKc, P.dPc, P.act, P.total}) params.push_back(v);

  at::Tensor item_table = at::empty({items, 6}, at::kLong);
  int64_t* it = item_table.data_ptr<int64_t>();
  std::vector<int64_t> tiles, steps;
  // The accumulating kernels' loop: block g takes items g, g + grid, ...; a block's tiles in visiting order, and
  // each tile's candidates in order.
  for (int64_t g = 0; g < grid; ++g) {
    for (int64_t w = g; w < items; w += grid) {
      const plan::Item item = plan::work_item(w, S, groups);
      const plan::Range r = plan::chunk_range(len[item.user], item.chunk);
      const plan::Range cands = plan::candidate_range(C, per_group, item.group);
      int64_t* row = it + w * 6;
      row[0] = w;
      row[1] = g;
      row[2] = item.user;
      row[3] = item.chunk;
      row[4] = r.begin;
      row[5] = r.end;
      if (tile_bwd <= 0) continue;
      for (int64_t t0 = r.begin; t0 < r.end; t0 += tile_bwd) {
        const int64_t rows = plan::tile_rows_at(r, tile_bwd, t0);
        tiles.insert(tiles.end(), {w, t0, rows});
        for (int64_t c = cands.begin; c < cands.end; ++c) {
          steps.insert(steps.end(), {w, t0, rows, c, plan::partial_row(item.user, item.chunk, c, S, C)});
        }
      }
    }
  }
  at::Tensor tile_table = at::tensor(tiles, at::kLong).view({-1, 3});
  at::Tensor step_table = at::tensor(steps, at::kLong).view({-1, 5});
  return {summary, smem_f, smem_b, params, item_table, tile_table, multi, step_table};
}

}  // namespace

TORCH_LIBRARY_IMPL(din_ext, CompositeExplicitAutograd, m) {
  m.impl("_attention_launch_plan", &attention_launch_plan);
}

}  // namespace din_ext
