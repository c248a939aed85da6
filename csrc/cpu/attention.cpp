// cpu backend of din_ext::local_activation_attention: fused forward and backward.
//
// The math (layer-1 split z_0 = c_b + Weff_b k, activations, pooling, backward) is docs/design.md sections 1.1-1.3,
// the op contract section 2; this header says what is particular to the cpu kernels.
// The q-only half of layer 1 is computed once per user, so a behaviour costs one D x H1 product there. Users are
// processed in tiles of at most kTile rows whose activations live in per-thread buffers: nothing of size [N, H]
// is materialized, padded positions are never touched, and the backward recomputes the forward.
//
// Short histories (one candidate): the per-user work (Weff_b, and in the backward the fold of the user's dWeff into
// the parameter gradients) is H1 x D elementwise work per user, as much as a user's products at L_b ~ 10; it runs
// vectorized (AVX2 / AVX-512 builds). With DIN_EXT_ATTENTION_SPLIT_BELOW set, calls whose mean history length is
// below it compute layer 1 in the split form z_0 = c_b + [k, k * q_b] [Kc; Pc]^T instead: one 2D-deep product per
// behaviour and no Weff_b, measured faster in eval below a mean of 6.5 only (see choose_layer1).
//
// Several candidates per user (query [B, C, D], C > 1; design §6): every (candidate, behaviour) pair is one row of
// the unit, and c_{b,c} is computed once per candidate in one product. The forward's work items are groups of
// candidates of one user (at most kGroup, fewer when there are fewer users than threads), each reading the
// history once from memory. For histories of at least kWeffRows behaviours the forward scores one candidate at a
// time with its effective weight Weff_{b,c} (layer 1 costs one D x H1 product per pair, as with one candidate, and
// the history, at most a few hundred KB, is re-read from cache; a one-output last linear is a dot per row after the
// last activation, forward_scores); for shorter ones, and in the backward, the
// behaviour-only part k Kc^T of layer 1 is computed once per behaviour and the pairs are batched into pair tiles
// of kTile / R candidates x R behaviours whose (k * q) Pc^T is one product (MultiWork). The backward sums each key
// row's gradient over the candidates in a fixed order and writes it once. C = 1 (a query [B, D], or [B, 1, D])
// runs the single-candidate kernels unchanged, bitwise.
//
// Stored activations (training Dice, a query [B, D], short histories): a second pair of kernels keeps every pair's
// pre-activations from the forward for the backward instead of recomputing them (see "Stored activations" below);
// the autograd picks them per call by size.
//
// Training-mode Dice needs statistics over all valid rows before its activation, so the forward runs one pass per
// hidden layer to gather them, then the pooling pass; the backward, for the exact gradient through those
// statistics (BatchNorm's), runs one pass per hidden layer from the top gathering sum(g_xhat) and
// sum(g_xhat * xhat), then the gradient pass. Every reduction over rows goes through per-block partial sums over a
// fixed partition of the users (independent of the thread count) added up in block order, so results are
// bitwise reproducible run to run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.h"
#include "cpu/attention.h"
#include "cpu/kernels.h"

namespace din_ext::cpu {
namespace {

constexpr int64_t kTile = 64;       // rows of one user processed together
constexpr int64_t kMaxBlocks = 64;  // fixed partition of the users for deterministic reductions
constexpr int64_t kGroup = 64;      // candidates of one forward work item (a user's C are cut into equal groups)
constexpr int64_t kWeffRows = 16;   // histories at least this long: the multi forward's per-candidate Weff path

template <typename T>
using Vec = std::vector<T>;

// Users [first, last) of block i of a fixed partition.
struct Blocks {
  int64_t count, size;
  Blocks(int64_t batch) : count(std::min<int64_t>(std::max<int64_t>(batch, 1), kMaxBlocks)),
                          size((batch + count - 1) / count) {}
  int64_t first(int64_t i, int64_t batch) const { return std::min(i * size, batch); }
  int64_t last(int64_t i, int64_t batch) const { return std::min((i + 1) * size, batch); }
};

// Per-feature parameters of one hidden layer, padded: padding features have all-zero parameters and rstd 1, so
// they stay exactly zero through every activation and its backward.
template <typename T>
struct ActLayer {
  Vec<T> alpha, gamma, beta, mean, rstd;  // alpha doubles as PReLU's slope
  Vec<T> g_mean, gx_mean;                 // Dice training backward: mean of g_xhat and of g_xhat * xhat
  // The Dice forward's folded affine, -(gamma (z - mean) rstd + beta) = z * neg_scale + neg_shift, and 1 - alpha
  // (fold_dice, whenever mean or rstd change).
  Vec<T> neg_scale, neg_shift, one_minus_alpha;
  // The AVX-512 Dice forward's copy of neg_scale, neg_shift, 1 - alpha and alpha, each repeated to `period`
  // features, the least multiple of wp that is one of 16: a tile's [rows, wp] z is one stream of 16-wide vectors
  // whose parameters repeat with that period.
  int64_t period = 0;
  Vec<T> flat;  // [4, period]
};

// The folded Dice parameters of a from its alpha, gamma, beta, mean and rstd.
template <typename T>
void fold_dice(ActLayer<T>& a) {
  const size_t wp = a.alpha.size();
  a.neg_scale.resize(wp);
  a.neg_shift.resize(wp);
  a.one_minus_alpha.resize(wp);
  for (size_t c = 0; c < wp; ++c) {
    const T s = a.gamma[c] * a.rstd[c];
    a.neg_scale[c] = -s;
    a.neg_shift[c] = a.mean[c] * s - a.beta[c];
    a.one_minus_alpha[c] = T(1) - a.alpha[c];
  }
  const int64_t w = static_cast<int64_t>(wp);
  a.period = w;
  while (w > 0 && a.period % 16 != 0) a.period += w;
  a.flat.resize(4 * a.period);
  for (int64_t c = 0; c < a.period; ++c) {
    a.flat[c] = a.neg_scale[c % w];
    a.flat[a.period + c] = a.neg_shift[c % w];
    a.flat[2 * a.period + c] = a.one_minus_alpha[c % w];
    a.flat[3 * a.period + c] = a.alpha[c % w];
  }
}

// The MLP packed for the kernels; read-only once built.
template <typename T>
struct Net {
  Activation act;
  bool dice_train;  // Dice with batch statistics
  int64_t D, Dp, n;  // n hidden layers, n + 1 linears
  std::vector<int64_t> w, wp;  // output width of linear i, padded
  Vec<T> A, AT;      // [w0, D], [D, wp0]   q coefficient Wq + Wd, and transposed
  Vec<T> KcT, PcT;   // [D, wp0]   k coefficient Wk - Wd and q*k coefficient Wp, transposed
  Vec<T> Kc, Pc;     // [w0, Dp]   the same, h-major
  std::vector<Vec<T>> WT, Wn, bias;  // linear i >= 1: [w_{i-1}, wp_i], [w_i, wp_{i-1}]; bias [wp_i] (i >= 0)
  std::vector<ActLayer<T>> acts;
  int64_t max_wp = 0;
  // Single-candidate layer 1 of this call (choose_layer1): split (z_0 = c + [k, k * q] KPT) or per-user Weff.
  bool split = false;
  Vec<T> KPT;  // split: [2D, wp0], KcT stacked over PcT
};

// forward_only: without what only the backward reads (A, Kc, Pc, and Wn but the last layer's, which the forward's
// score dot reads).
template <typename T>
Net<T> pack(int64_t D, at::TensorList weights, at::TensorList biases, const at::Tensor& act_params, Activation act,
            bool training, double eps, const at::Tensor& stats, bool forward_only = false) {
  Net<T> net;
  net.act = act;
  net.dice_train = act == Activation::kDice && training;
  net.D = D;
  net.Dp = padded<T>(D);
  net.n = static_cast<int64_t>(weights.size()) - 1;
  for (const auto& W : weights) {
    net.w.push_back(W.size(0));
    net.wp.push_back(padded<T>(W.size(0)));
    net.max_wp = std::max(net.max_wp, net.wp.back());
  }
  const int64_t w0 = net.w[0], wp0 = net.wp[0];
  const at::Tensor W0 = weights[0].contiguous();
  const T* W = W0.data_ptr<T>();
  net.AT.assign(D * wp0, T(0));
  net.KcT.assign(D * wp0, T(0));
  net.PcT.assign(D * wp0, T(0));
  for (int64_t h = 0; h < w0; ++h) {
    const T* row = W + h * 4 * D;
    for (int64_t d = 0; d < D; ++d) {
      net.AT[d * wp0 + h] = row[d] + row[2 * D + d];
      net.KcT[d * wp0 + h] = row[D + d] - row[2 * D + d];
      net.PcT[d * wp0 + h] = row[3 * D + d];
    }
  }
  if (!forward_only) {
    net.A.assign(w0 * D, T(0));
    net.Kc.assign(w0 * net.Dp, T(0));
    net.Pc.assign(w0 * net.Dp, T(0));
    for (int64_t h = 0; h < w0; ++h) {
      for (int64_t d = 0; d < D; ++d) {
        net.A[h * D + d] = net.AT[d * wp0 + h];
        net.Kc[h * net.Dp + d] = net.KcT[d * wp0 + h];
        net.Pc[h * net.Dp + d] = net.PcT[d * wp0 + h];
      }
    }
  }
  net.WT.resize(net.n + 1);
  net.Wn.resize(net.n + 1);
  net.bias.resize(net.n + 1);
  for (int64_t i = 0; i <= net.n; ++i) {
    const at::Tensor b = biases[i].contiguous();
    net.bias[i].assign(net.wp[i], T(0));
    std::copy(b.data_ptr<T>(), b.data_ptr<T>() + net.w[i], net.bias[i].begin());
    if (i == 0) continue;
    const at::Tensor Wi = weights[i].contiguous();
    const T* src = Wi.data_ptr<T>();
    const int64_t in = net.w[i - 1];
    net.WT[i].assign(in * net.wp[i], T(0));
    for (int64_t o = 0; o < net.w[i]; ++o)
      for (int64_t k = 0; k < in; ++k) net.WT[i][k * net.wp[i] + o] = src[o * in + k];
    if (forward_only && i < net.n) continue;
    net.Wn[i].assign(net.w[i] * net.wp[i - 1], T(0));
    for (int64_t o = 0; o < net.w[i]; ++o)
      for (int64_t k = 0; k < in; ++k) net.Wn[i][o * net.wp[i - 1] + k] = src[o * in + k];
  }
  const at::Tensor params = act_params.contiguous();
  const at::Tensor st = stats.contiguous();
  const int64_t htot = params.size(1);
  net.acts.resize(net.n);
  int64_t col = 0;
  for (int64_t j = 0; j < net.n; ++j) {
    ActLayer<T>& a = net.acts[j];
    const int64_t wj = net.w[j], wpj = net.wp[j];
    a.alpha.assign(wpj, T(0));
    a.gamma.assign(wpj, T(0));
    a.beta.assign(wpj, T(0));
    a.mean.assign(wpj, T(0));
    a.rstd.assign(wpj, T(1));
    a.g_mean.assign(wpj, T(0));
    a.gx_mean.assign(wpj, T(0));
    const T* p = params.data_ptr<T>();
    for (int64_t h = 0; h < wj; ++h) {
      if (act == Activation::kPrelu) a.alpha[h] = p[col + h];
      if (act != Activation::kDice) continue;
      a.alpha[h] = p[kDiceAlpha * htot + col + h];
      a.gamma[h] = p[kDiceGamma * htot + col + h];
      a.beta[h] = p[kDiceBeta * htot + col + h];
      // Training: the batch statistics in `stats` (filled by the forward's statistics passes, or saved for the
      // backward); eval: the running statistics.
      const T mean = training ? st.data_ptr<T>()[col + h] : p[kDiceRunningMean * htot + col + h];
      const T var = training ? st.data_ptr<T>()[htot + col + h] : p[kDiceRunningVar * htot + col + h];
      a.mean[h] = mean;
      a.rstd[h] = T(1) / std::sqrt(var + static_cast<T>(eps));
    }
    fold_dice(a);
    col += wj;
  }
  return net;
}

// Per-user quantities of layer 1 and per-thread tile buffers.
template <typename T>
struct Work {
  Vec<T> c, weffT, weff, G, dc, gq;
  Vec<T> X;              // split layer 1: [kTile, 2D], the tile's [k, k * q] rows
  const T* q = nullptr;  // the current user's query
  std::vector<Vec<T>> z, h;  // [kTile, wp_i]
  Vec<T> g0, g1, gk, kp, wt;  // backward: [kTile, max_wp] x 2, [kTile, Dp] x 2, pooling weights [kTile]
  explicit Work(const Net<T>& net) {
    const int64_t wp0 = net.wp[0];
    c.assign(wp0, T(0));
    if (net.split) {
      X.assign(kTile * 2 * net.D, T(0));
    } else {
      weffT.assign(net.D * wp0, T(0));
    }
    z.resize(net.n + 1);
    h.resize(net.n);
    for (int64_t i = 0; i <= net.n; ++i) z[i].assign(kTile * net.wp[i], T(0));
    for (int64_t i = 0; i < net.n; ++i) h[i].assign(kTile * net.wp[i], T(0));
  }
  void init_backward(const Net<T>& net) {
    weff.assign(net.w[0] * net.Dp, T(0));
    G.assign(net.wp[0] * net.Dp, T(0));
    dc.assign(net.wp[0], T(0));
    gq.assign(net.D, T(0));
    g0.assign(kTile * net.max_wp, T(0));
    g1.assign(kTile * net.max_wp, T(0));
    gk.assign(kTile * net.Dp, T(0));
    kp.assign(kTile * net.Dp, T(0));
    wt.assign(kTile, T(0));
  }
  // The per-user sums of the single-candidate backward's layer 1 (G, dc).
  void clear_user_gradients() {
    std::fill(G.begin(), G.end(), T(0));
    std::fill(dc.begin(), dc.end(), T(0));
  }
  // c = (Wq + Wd) q + b_0 and Weff^T = (Wk - Wd)^T + diag(q) Wp^T for user query q (backward: also Weff).
  void set_user(const Net<T>& net, const T* q, bool backward);
  // Weff alone, for the stored backward's layer 1 (its z_0 is stored: neither c nor Weff^T is read).
  void set_user_weff(const Net<T>& net, const T* q) { build_user(net, q, nullptr, weff.data()); }
  // The vectorized build of Weff^T (weffT not null) and of Weff (weff not null), set_user_body.
  void build_user(const Net<T>& net, const T* q, T* weffT, T* weff);
};

// The per-user loops of layer 1 (set_user, layer1_backward_user) touch H1 x D elements per user: at short
// histories (L_b ~ 10) as many as the user's products, so they run vectorized, in an AVX2+FMA and an AVX-512 build
// like the activations (restrict-qualified: the baseline compiler keeps them scalar otherwise).
// Weff^T = (Wk - Wd)^T + diag(q) Wp^T of query q into out [D, wp0], in the row-wise (axpy) form, which vectorizes
// over the H1 outputs: a user's (set_user) or one candidate's (effective_weight, the multi forward).
template <typename T>
DIN_EXT_INLINE void weffT_body(const Net<T>& net, const T* __restrict q, T* __restrict out) {
  const int64_t wp0 = net.wp[0];
  for (int64_t d = 0; d < net.D; ++d) {
    const T qd = q[d];
    const T* __restrict kc = net.KcT.data() + d * wp0;
    const T* __restrict pc = net.PcT.data() + d * wp0;
    T* __restrict o = out + d * wp0;
    for (int64_t hh = 0; hh < wp0; ++hh) o[hh] = kc[hh] + pc[hh] * qd;
  }
}

// Weff^T (when weffT is not null) and Weff (when weff is not null) of user query q.
template <typename T>
DIN_EXT_INLINE void set_user_body(const Net<T>& net, const T* __restrict q, T* __restrict weffT, T* __restrict weff) {
  const int64_t D = net.D, w0 = net.w[0], Dp = net.Dp;
  if (weffT) weffT_body(net, q, weffT);
  if (!weff) return;
  for (int64_t hh = 0; hh < w0; ++hh) {
    const T* __restrict kc = net.Kc.data() + hh * Dp;
    const T* __restrict pc = net.Pc.data() + hh * Dp;
    T* __restrict out = weff + hh * Dp;
    for (int64_t d = 0; d < D; ++d) out[d] = kc[d] + pc[d] * q[d];
  }
}

template <typename T>
void set_user_base(const Net<T>& net, const T* q, T* weffT, T* weff) {
  set_user_body(net, q, weffT, weff);
}
#if DIN_EXT_HAVE_AVX2
template <typename T>
DIN_EXT_AVX2 void set_user_avx2(const Net<T>& net, const T* q, T* weffT, T* weff) {
  set_user_body(net, q, weffT, weff);
}
template <typename T>
DIN_EXT_AVX512 void set_user_avx512(const Net<T>& net, const T* q, T* weffT, T* weff) {
  set_user_body(net, q, weffT, weff);
}
#endif

template <typename T>
void Work<T>::set_user(const Net<T>& net, const T* q_, bool backward) {
  q = q_;
  // c = (Wq + Wd) q + b_0 as one row of a product, whose accumulators stay in registers: the axpy over d it
  // replaces stored and reloaded c at every d (a store-forwarding chain, half of set_user's time at D = 32). The
  // same sum in the same order, one FMA a term. Split: Weff only for the backward's d/dk.
  gemm<T>().nn(1, net.D, net.wp[0], q, net.D, net.AT.data(), net.wp[0], net.bias[0].data(), c.data(), net.wp[0]);
  if (net.split && !backward) return;
  build_user(net, q, net.split ? nullptr : weffT.data(), backward ? weff.data() : nullptr);
}

template <typename T>
void Work<T>::build_user(const Net<T>& net, const T* q, T* wt, T* w) {
#if DIN_EXT_HAVE_AVX2
  if (has_avx512()) return set_user_avx512(net, q, wt, w);
  if (has_avx2_fma()) return set_user_avx2(net, q, wt, w);
#endif
  set_user_base(net, q, wt, w);
}

template <typename T>
DIN_EXT_INLINE void activation_forward_body(const Net<T>& net, int64_t j, int64_t rows, const T* z, T* h) {
  const ActLayer<T>& a = net.acts[j];
  const int64_t wp = net.wp[j];
  const T* alpha = a.alpha.data();
  switch (net.act) {
    case Activation::kDice: {
      // p = sigmoid(gamma (z - mean) rstd + beta) from the folded affine, h = z (alpha + (1 - alpha) p): the
      // forward's (and the recomputing backward's) gate in 23 vector operations a vector, where the unfolded
      // form took 31 (the multi forward's Dice was ~28% of its time).
      const T* __restrict ns = a.neg_scale.data();
      const T* __restrict nt = a.neg_shift.data();
      const T* __restrict oma = a.one_minus_alpha.data();
      for (int64_t r = 0; r < rows; ++r) {
        const T* __restrict zr = z + r * wp;
        T* __restrict hr = h + r * wp;
        for (int64_t c = 0; c < wp; ++c) {
          const T p = sigmoid_of_neg(zr[c] * ns[c] + nt[c]);
          hr[c] = zr[c] * (alpha[c] + oma[c] * p);
        }
      }
      break;
    }
    case Activation::kSigmoid:
      for (int64_t k = 0; k < rows * wp; ++k) h[k] = sigmoid(z[k]);
      break;
    case Activation::kPrelu:
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < wp; ++c) h[r * wp + c] = z[r * wp + c] > T(0) ? z[r * wp + c] : alpha[c] * z[r * wp + c];
      break;
    case Activation::kRelu:
      for (int64_t k = 0; k < rows * wp; ++k) h[k] = z[k] > T(0) ? z[k] : T(0);
      break;
  }
}

// Dice backward on a tile (branch-free so it vectorizes). With kAcc, per-feature sums of the tile go to acc
// (5 x wp, double): d alpha, d gamma, d beta, sum g_xhat, sum g_xhat * xhat. The statistics term uses
// g_mean/gx_mean, which are zero unless Dice trains with known backward sums (eval: plain g_xhat * rstd).
template <typename T, bool kAcc>
DIN_EXT_INLINE void dice_backward_rows(const ActLayer<T>& a, int64_t wp, int64_t rows, const T* z, T* g,
                                       double* acc) {
  constexpr int64_t kMaxWidth = 1024;
  T tile[5][kMaxWidth];
  for (int64_t c0 = 0; c0 < wp; c0 += kMaxWidth) {
    const int64_t width = std::min(kMaxWidth, wp - c0);
    if (kAcc) {
      for (int k = 0; k < 5; ++k)
        for (int64_t c = 0; c < width; ++c) tile[k][c] = T(0);
    }
    const T* alpha = a.alpha.data() + c0;
    const T* gamma = a.gamma.data() + c0;
    const T* beta = a.beta.data() + c0;
    const T* mean = a.mean.data() + c0;
    const T* rstd = a.rstd.data() + c0;
    const T* m1 = a.g_mean.data() + c0;
    const T* m2 = a.gx_mean.data() + c0;
    for (int64_t r = 0; r < rows; ++r) {
      const T* zr = z + r * wp + c0;
      T* gr = g + r * wp + c0;
      for (int64_t c = 0; c < width; ++c) {
        const T xhat = (zr[c] - mean[c]) * rstd[c];
        const T p = sigmoid(gamma[c] * xhat + beta[c]);
        const T one_minus_alpha = T(1) - alpha[c];
        const T g_arg = gr[c] * zr[c] * one_minus_alpha * p * (T(1) - p);
        const T g_xhat = g_arg * gamma[c];
        if (kAcc) {
          tile[0][c] += gr[c] * zr[c] * (T(1) - p);
          tile[1][c] += g_arg * xhat;
          tile[2][c] += g_arg;
          tile[3][c] += g_xhat;
          tile[4][c] += g_xhat * xhat;
        }
        gr[c] = gr[c] * (alpha[c] + one_minus_alpha * p) + rstd[c] * (g_xhat - m1[c] - xhat * m2[c]);
      }
    }
    if (kAcc) {
      for (int k = 0; k < 5; ++k)
        for (int64_t c = 0; c < width; ++c) acc[k * wp + c0 + c] += tile[k][c];
    }
  }
}

// Backward through hidden layer j's activation: g (d/dh, [rows, wp_j]) -> d/dz in place. Accumulates the
// parameter gradients (and the Dice sums) into acc (5 x wp_j) when acc is not null.
template <typename T>
DIN_EXT_INLINE void activation_backward_body(const Net<T>& net, int64_t j, int64_t rows, const T* z, T* g,
                                             double* acc) {
  const ActLayer<T>& a = net.acts[j];
  const int64_t wp = net.wp[j];
  switch (net.act) {
    case Activation::kDice:
      if (acc) {
        dice_backward_rows<T, true>(a, wp, rows, z, g, acc);
      } else {
        dice_backward_rows<T, false>(a, wp, rows, z, g, acc);
      }
      break;
    case Activation::kSigmoid:
      for (int64_t k = 0; k < rows * wp; ++k) {
        const T y = sigmoid(z[k]);
        g[k] = g[k] * y * (T(1) - y);
      }
      break;
    case Activation::kPrelu:
      for (int64_t r = 0; r < rows; ++r) {
        const T* zr = z + r * wp;
        T* gr = g + r * wp;
        if (acc) {
          for (int64_t c = 0; c < wp; ++c) acc[c] += zr[c] > T(0) ? T(0) : gr[c] * zr[c];
        }
        for (int64_t c = 0; c < wp; ++c) gr[c] = zr[c] > T(0) ? gr[c] : gr[c] * a.alpha[c];
      }
      break;
    case Activation::kRelu:
      for (int64_t k = 0; k < rows * wp; ++k) g[k] = z[k] > T(0) ? g[k] : T(0);
      break;
  }
}

// The activation tiles in a baseline, an AVX2+FMA and an AVX-512 build (the sigmoid's exp vectorizes with the
// latter two).
template <typename T>
void activation_forward_base(const Net<T>& net, int64_t j, int64_t rows, const T* z, T* h) {
  activation_forward_body(net, j, rows, z, h);
}
template <typename T>
void activation_backward_base(const Net<T>& net, int64_t j, int64_t rows, const T* z, T* g, double* acc) {
  activation_backward_body(net, j, rows, z, g, acc);
}
#if DIN_EXT_HAVE_AVX2
template <typename T>
DIN_EXT_AVX2 void activation_forward_avx2(const Net<T>& net, int64_t j, int64_t rows, const T* z, T* h) {
  activation_forward_body(net, j, rows, z, h);
}
template <typename T>
DIN_EXT_AVX2 void activation_backward_avx2(const Net<T>& net, int64_t j, int64_t rows, const T* z, T* g,
                                           double* acc) {
  activation_backward_body(net, j, rows, z, g, acc);
}
// The float Dice forward in the AVX-512 build, with the instructions that build has: the rounding of x / ln 2 in one
// vrndscaleps and the scaling by 2^n in one vscalefps (which saturates to 0 and inf, so no clamp): 18 vector
// operations a vector instead of sigmoid_of_neg's 23, the same reduction and polynomial (results equal to
// sigmoid_of_neg's over the range checked; at most 1.5e-7 relative error against double). A row's last 8
// features (widths are multiples of 8) run masked.
// 1 / (1 + exp(x)) of U vectors x[u]: the Dice gate, and the sigmoid of -x. The U dependency chains (~60 cycles
// of latency each) step by step, interleaved, so that the core overlaps them: one chain at a time ran the gate at
// half the FMA ports' rate.
template <int U>
DIN_EXT_AVX512 DIN_EXT_INLINE void gate_vectors_avx512(const __m512* x, __m512* gate) {
  const __m512 one = _mm512_set1_ps(1.0f), ln2_hi = _mm512_set1_ps(0.693359375f),
               ln2_lo = _mm512_set1_ps(-2.12194440e-4f), log2e = _mm512_set1_ps(1.44269504088896341f);
  __m512 n[U], rr[U], p[U];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    n[u] = _mm512_roundscale_ps(_mm512_mul_ps(x[u], log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    rr[u] = _mm512_fnmadd_ps(n[u], ln2_lo, _mm512_fnmadd_ps(n[u], ln2_hi, x[u]));
  }
  const float coef[] = {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f,
                        1.0f, 1.0f};
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) p[u] = _mm512_fmadd_ps(_mm512_set1_ps(1.9875691500e-4f), rr[u], _mm512_set1_ps(coef[0]));
#pragma GCC unroll 8
  for (int k = 1; k < 7; ++k) {
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) p[u] = _mm512_fmadd_ps(p[u], rr[u], _mm512_set1_ps(coef[k]));  // exp(r) at k = 6
  }
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) gate[u] = _mm512_div_ps(one, _mm512_add_ps(_mm512_scalef_ps(p[u], n[u]), one));
}
// h of U vectors zv[u] of z whose parameters start at a.flat's column off[u], lanes outside m[u] zero.
template <int U>
DIN_EXT_AVX512 DIN_EXT_INLINE void dice_vectors_avx512(const ActLayer<float>& a, const int64_t* off,
                                                       const __mmask16* m, const __m512* zv, __m512* h) {
  const float* prm = a.flat.data();
  const int64_t P = a.period;
  __m512 x[U], gate[U];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    x[u] = _mm512_fmadd_ps(zv[u], _mm512_maskz_loadu_ps(m[u], prm + off[u]),
                           _mm512_maskz_loadu_ps(m[u], prm + P + off[u]));
  }
  gate_vectors_avx512<U>(x, gate);
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    const __m512 mix = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m[u], prm + 2 * P + off[u]), gate[u],
                                       _mm512_maskz_loadu_ps(m[u], prm + 3 * P + off[u]));
    h[u] = _mm512_mul_ps(zv[u], mix);
  }
}
// The tile's z [rows, wp] as one stream of 16-wide vectors, 4 at a time (a.flat's columns follow the stream).
DIN_EXT_AVX512 void dice_forward_avx512(const ActLayer<float>& a, int64_t wp, int64_t rows, const float* z,
                                        float* h) {
  constexpr int U = 4;
  const int64_t N = rows * wp, P = a.period;
  int64_t e = 0, o = 0;
  const __mmask16 all[U] = {0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF};
  for (; e + U * 16 <= N; e += U * 16) {
    int64_t off[U];
    __m512 zv[U], hv[U];
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      off[u] = o;
      o = o + 16 == P ? 0 : o + 16;
      zv[u] = _mm512_loadu_ps(z + e + 16 * u);
    }
    dice_vectors_avx512<U>(a, off, all, zv, hv);
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) _mm512_storeu_ps(h + e + 16 * u, hv[u]);
  }
  for (; e < N; e += 16) {  // N is a multiple of 8
    const __mmask16 m = N - e >= 16 ? __mmask16(0xFFFF) : __mmask16(0x00FF);
    const __m512 zv = _mm512_maskz_loadu_ps(m, z + e);
    __m512 hv;
    dice_vectors_avx512<1>(a, &o, &m, &zv, &hv);
    _mm512_mask_storeu_ps(h + e, m, hv);
    o = o + 16 == P ? 0 : o + 16;
  }
}
// The float sigmoid forward in the AVX-512 build: h = 1 / (1 + exp(-z)) over the tile's [rows, wp] z as one
// stream of 16-wide vectors, 4 at a time, with the Dice gate's instructions (the autovectorized sigmoid(z) took
// 5.6 ns a vector, this 3.6; at most 1e-7 relative error against double). The last 8 features run masked.
DIN_EXT_AVX512 void sigmoid_forward_avx512(int64_t rows, int64_t wp, const float* z, float* h) {
  constexpr int U = 4;
  const int64_t N = rows * wp;
  const __m512 sign = _mm512_set1_ps(-0.0f);
  int64_t e = 0;
  for (; e + U * 16 <= N; e += U * 16) {
    __m512 x[U], hv[U];
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) x[u] = _mm512_xor_ps(_mm512_loadu_ps(z + e + 16 * u), sign);
    gate_vectors_avx512<U>(x, hv);
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) _mm512_storeu_ps(h + e + 16 * u, hv[u]);
  }
  for (; e < N; e += 16) {  // N is a multiple of 8
    const __mmask16 m = N - e >= 16 ? __mmask16(0xFFFF) : __mmask16(0x00FF);
    const __m512 x = _mm512_xor_ps(_mm512_maskz_loadu_ps(m, z + e), sign);
    __m512 hv;
    gate_vectors_avx512<1>(&x, &hv);
    _mm512_mask_storeu_ps(h + e, m, hv);
  }
}
template <typename T>
DIN_EXT_AVX512 void activation_forward_avx512(const Net<T>& net, int64_t j, int64_t rows, const T* z, T* h) {
  if constexpr (std::is_same_v<T, float>) {
    if (net.act == Activation::kDice) return dice_forward_avx512(net.acts[j], net.wp[j], rows, z, h);
    if (net.act == Activation::kSigmoid) return sigmoid_forward_avx512(rows, net.wp[j], z, h);
  }
  activation_forward_body(net, j, rows, z, h);
}
template <typename T>
DIN_EXT_AVX512 void activation_backward_avx512(const Net<T>& net, int64_t j, int64_t rows, const T* z, T* g,
                                               double* acc) {
  activation_backward_body(net, j, rows, z, g, acc);
}
#endif

// s[r * ss] = b_n + h_r . w_n for the tile's rows from the last hidden layer's activations h: the last linear when
// it has one output, as one dot over the padded width per row where the GEMM spent a vector of wp_n padded outputs
// on every input feature. score_rows: the last activation (z -> h), then these dots.
template <typename T>
DIN_EXT_INLINE void score_dots(const Net<T>& net, int64_t rows, const T* h, T* s, int64_t ss) {
  using V = typename Simd<T>::type;
  constexpr int64_t L = Simd<T>::lanes;
  const int64_t wp = net.wp[net.n - 1];
  const T* w = net.Wn[net.n].data();
  for (int64_t r = 0; r < rows; ++r) {
    V acc = {};
    for (int64_t c = 0; c < wp; c += L) acc += load(h + r * wp + c) * load(w + c);
    T sum = T(0);
    for (int64_t l = 0; l < L; ++l) sum += acc[l];
    s[r * ss] = net.bias[net.n][0] + sum;
  }
}
template <typename T>
DIN_EXT_INLINE void score_rows_body(const Net<T>& net, int64_t rows, const T* z, T* h, T* s, int64_t ss) {
  activation_forward_body(net, net.n - 1, rows, z, h);
  score_dots(net, rows, h, s, ss);
}
template <typename T>
void score_rows_base(const Net<T>& net, int64_t rows, const T* z, T* h, T* s, int64_t ss) {
  score_rows_body(net, rows, z, h, s, ss);
}
#if DIN_EXT_HAVE_AVX2
template <typename T>
DIN_EXT_AVX2 void score_rows_avx2(const Net<T>& net, int64_t rows, const T* z, T* h, T* s, int64_t ss) {
  score_rows_body(net, rows, z, h, s, ss);
}
template <typename T>
DIN_EXT_AVX512 void score_rows_avx512(const Net<T>& net, int64_t rows, const T* z, T* h, T* s, int64_t ss) {
  activation_forward_avx512(net, net.n - 1, rows, z, h);
  score_dots(net, rows, h, s, ss);
}
#endif
template <typename T>
void score_rows(const Net<T>& net, int64_t rows, const T* z, T* h, T* s, int64_t ss) {
#if DIN_EXT_HAVE_AVX2
  if (has_avx512()) return score_rows_avx512(net, rows, z, h, s, ss);
  if (has_avx2_fma()) return score_rows_avx2(net, rows, z, h, s, ss);
#endif
  score_rows_base(net, rows, z, h, s, ss);
}

template <typename T>
void activation_forward_tile(const Net<T>& net, int64_t j, int64_t rows, const T* z, T* h) {
#if DIN_EXT_HAVE_AVX2
  if (has_avx512()) return activation_forward_avx512(net, j, rows, z, h);
  if (has_avx2_fma()) return activation_forward_avx2(net, j, rows, z, h);
#endif
  activation_forward_base(net, j, rows, z, h);
}

template <typename T>
void activation_backward_tile(const Net<T>& net, int64_t j, int64_t rows, const T* z, T* g, double* acc) {
#if DIN_EXT_HAVE_AVX2
  if (has_avx512()) return activation_backward_avx512(net, j, rows, z, g, acc);
  if (has_avx2_fma()) return activation_backward_avx2(net, j, rows, z, g, acc);
#endif
  activation_backward_base(net, j, rows, z, g, acc);
}

// Layers above the first of a tile whose z_0 is in work.z[0]: z_1 .. z_upto and h_0 .. h_{upto-1}.
template <typename T>
void forward_layers(const Net<T>& net, Work<T>& work, int64_t rows, int64_t upto) {
  const Gemm<T>& g = gemm<T>();
  for (int64_t i = 1; i <= upto; ++i) {
    activation_forward_tile(net, i - 1, rows, work.z[i - 1].data(), work.h[i - 1].data());
    g.nn(rows, net.w[i - 1], net.wp[i], work.h[i - 1].data(), net.wp[i - 1], net.WT[i].data(), net.wp[i],
         net.bias[i].data(), work.z[i].data(), net.wp[i]);
  }
}

// forward_layers up to the scores, the one-output last linear fused with the activation before it (score_rows):
// the scores land in work.z[n] at row stride wp_n, where forward_layers leaves them. Not bitwise the same as
// forward_layers (the dot's sum runs in another order): the forward passes and the softmax backward's scoring
// sweep only (visit_user), never the gradient pass. A tenth of the GEMM's time where the product spent a padded
// vector of 8 outputs on each of the H2 inputs (about 3% of a 1-thread eval forward at D = 32).
template <typename T>
void forward_scores(const Net<T>& net, Work<T>& work, int64_t rows) {
  if (net.n == 0 || net.w[net.n] != 1) return forward_layers(net, work, rows, net.n);
  forward_layers(net, work, rows, net.n - 1);
  score_rows(net, rows, work.z[net.n - 1].data(), work.h[net.n - 1].data(), work.z[net.n].data(), net.wp[net.n]);
}

// z_0 [rows, wp0] of `rows` behaviours (keys rows, contiguous) of the current user (set_user): one product with
// the user's Weff^T, or (split) one with the shared [Kc; Pc]^T over the rows [k, k * q], 2D deep.
template <typename T>
void layer1_forward(const Net<T>& net, Work<T>& work, const T* keys, int64_t rows, T* z) {
  const int64_t D = net.D, wp0 = net.wp[0];
  if (!net.split) {
    gemm<T>().nn(rows, D, wp0, keys, D, work.weffT.data(), wp0, work.c.data(), z, wp0);
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* k = keys + r * D;
    T* x = work.X.data() + r * 2 * D;
    for (int64_t d = 0; d < D; ++d) {
      x[d] = k[d];
      x[D + d] = k[d] * work.q[d];
    }
  }
  gemm<T>().nn(rows, 2 * D, wp0, work.X.data(), 2 * D, net.KPT.data(), wp0, work.c.data(), z, wp0);
}

// The single-candidate layer 1 of a call. Per user, Weff_b = Kc + diag(q_b) Pc (set_user) is a pass over three
// [D, H1] arrays, bound by L2 bandwidth (about 1.05 us at D = 64, H1 = 80: as much as ~10 behaviours' D x H1
// products), and buys one D-deep product per behaviour; the split form z_0 = c_b + [k, k * q_b] [Kc; Pc]^T needs
// only c_b per user (one row of a product) but a 2D-deep product per behaviour. Timing both (eval, B = 1024, 1
// thread, D = 32 and 64, every user of length L_b): the split is 2-14% faster for L_b <= 6, 2-8% slower from 7 on;
// whole training calls measured -8% to +8% with it (their backward keeps Weff_b for d/dk and the per-user fold of
// dWeff, which the split would trade for two more products per behaviour). So the per-user form is the default,
// and DIN_EXT_ATTENTION_SPLIT_BELOW = m splits the calls whose mean history length is below m (6.5 for inference
// on very short histories; docs/design.md §3.2).
template <typename T>
void choose_layer1(Net<T>& net, int64_t users, int64_t candidates, int64_t valid) {
  const char* env = std::getenv("DIN_EXT_ATTENTION_SPLIT_BELOW");
  const double below = env && *env ? std::atof(env) : 0.0;
  net.split = candidates == 1 && users > 0 && static_cast<double>(valid) < below * static_cast<double>(users);
  if (!net.split) return;
  const int64_t D = net.D, wp0 = net.wp[0];
  net.KPT.resize(2 * D * wp0);
  std::copy(net.KcT.begin(), net.KcT.begin() + D * wp0, net.KPT.begin());
  std::copy(net.PcT.begin(), net.PcT.begin() + D * wp0, net.KPT.begin() + D * wp0);
}

// Per-block accumulators of the backward: parameter gradients and Dice sums (double for the sums over rows).
template <typename T>
struct Partial {
  std::vector<Vec<T>> dW, db;  // linear i >= 1: [wp_i, wp_{i-1}]; db [wp_i]
  Vec<T> dA, dKc, dPc;         // [w0, D], [wp0, Dp] x 2
  std::vector<Vec<double>> act;  // per hidden layer: 5 x wp_j (d alpha, d gamma, d beta, sum g_xhat, sum g_xhat*xhat)
  void init(const Net<T>& net) {
    dW.resize(net.n + 1);
    db.resize(net.n + 1);
    for (int64_t i = 0; i <= net.n; ++i) {
      db[i].assign(net.wp[i], T(0));
      if (i > 0) dW[i].assign(net.wp[i] * net.wp[i - 1], T(0));
    }
    dA.assign(net.w[0] * net.D, T(0));
    dKc.assign(net.wp[0] * net.Dp, T(0));
    dPc.assign(net.wp[0] * net.Dp, T(0));
    act.resize(net.n);
    for (int64_t j = 0; j < net.n; ++j) act[j].assign(5 * net.wp[j], 0.0);
  }
};


// ---------------------------------------------------------------------------------------------------------------
// Users, candidates and tiles of (candidate, behaviour) pairs

template <typename T>
struct Problem {
  int64_t B, C, D, Dv;  // C candidates per user (1 for a query [B, D])
  int64_t valid;  // C * sum of lengths: the (candidate, behaviour) rows batch statistics are taken over
  const T* query;  // [B, C, D]
  const T* keys;
  const T* values;  // keys when no values were given
  const int64_t* starts;
  const int64_t* lengths;
  Normalization norm;
  T scale;
};

// A partition of the users for the backward's block partials: contiguous blocks of about `per_block` (candidate,
// behaviour) pairs each (at most kMaxBlocks), cut where the running count of pairs crosses a multiple of
// valid / count. It depends on the lengths alone, not on the thread count, so the block partials' reductions stay
// bitwise reproducible; each block's partials (every weight's gradient, ~45 KB at D = 32) are zeroed and reduced
// once per backward pass, so a partition by users (64 blocks at any B >= 64, whatever the pairs) spent a fixed
// cost per call that short histories did not pay back. At least `min_blocks` (users permitting), so that a few
// threads still balance.
constexpr int64_t kBlockPairs = 256;           // the stored backward's (one pass over the pairs per layer)
constexpr int64_t kRecomputeBlockPairs = 1024;  // the recomputing backward's (a full MLP pass per pair and pass)
constexpr int64_t kRecomputeMinBlocks = 16;     // its floor: B = 256 at the synthetic default's mean of 12.7
                                                // behaviours (~3200 pairs) would have 4

struct PairBlocks {
  std::vector<int64_t> first;  // count + 1 user boundaries: block i holds users [first[i], first[i + 1])
  int64_t count() const { return static_cast<int64_t>(first.size()) - 1; }
};

template <typename T>
PairBlocks pair_blocks(const Problem<T>& pb, int64_t per_block, int64_t min_blocks) {
  const int64_t limit = std::min(kMaxBlocks, std::max<int64_t>(pb.B, 1));
  const int64_t count = std::clamp<int64_t>((pb.valid + per_block - 1) / per_block, std::min(min_blocks, limit), limit);
  PairBlocks blocks{std::vector<int64_t>(count + 1, pb.B)};
  blocks.first[0] = 0;
  int64_t seen = 0, next = 1;
  for (int64_t b = 0; b < pb.B && next < count; ++b) {
    seen += pb.C * pb.lengths[b];
    while (next < count && seen * count >= next * pb.valid) blocks.first[next++] = b + 1;
  }
  return blocks;
}

// A tile of one user's (candidate, behaviour) pairs: candidates [c0, c0 + nc) against behaviours [t0, t0 + R);
// pair row p = cc * R + r of the tile's buffers is candidate c0 + cc and behaviour t0 + r. With one candidate
// (C = 1) a tile is R behaviours, as in the single-candidate kernels.
struct PairTile {
  int64_t t0, R, c0, nc;
  int64_t rows() const { return nc * R; }
};

// One candidate's Weff^T (weffT_body) into out [D, wp0], in a baseline, an AVX2+FMA and an AVX-512 build like the
// activation tiles: the multi forward builds one per candidate, which in the baseline build alone costs about a
// tenth of a 50-behaviour history's products.
template <typename T>
void effective_weight_base(const Net<T>& net, const T* q, T* out) {
  weffT_body(net, q, out);
}
#if DIN_EXT_HAVE_AVX2
template <typename T>
DIN_EXT_AVX2 void effective_weight_avx2(const Net<T>& net, const T* q, T* out) {
  weffT_body(net, q, out);
}
template <typename T>
DIN_EXT_AVX512 void effective_weight_avx512(const Net<T>& net, const T* q, T* out) {
  weffT_body(net, q, out);
}
#endif
template <typename T>
void effective_weight(const Net<T>& net, const T* q, T* out) {
#if DIN_EXT_HAVE_AVX2
  if (has_avx512()) return effective_weight_avx512(net, q, out);
  if (has_avx2_fma()) return effective_weight_avx2(net, q, out);
#endif
  effective_weight_base(net, q, out);
}

// The buffers of several candidates (C > 1) per user. Layer 1 of pair (c, t) is split into a candidate-only
// part, a behaviour-only part and one product (design §1.1 and §6):
//   z_0 = c_{b,c} + k_t Kc^T + (k_t * q_{b,c}) Pc^T,   c_{b,c} = A q_{b,c} + b_0,
// so k_t Kc^T is computed once per behaviour (not once per pair), c_{b,c} once per candidate in one product for
// all of them, and the pairs' (k * q) Pc^T of a pair tile is one product of up to kTile rows.
template <typename T>
struct MultiWork {
  Vec<T> cvec;  // [C, wp0]: c_{b,c} of the user's candidates
  Vec<T> kp;    // [kTile, Dp]: the key tile, zero-padded (read once per key tile, for all the candidates)
  Vec<T> KK;    // [kTile, wp0]: k Kc^T of the key tile
  Vec<T> X;     // [kTile, Dp]: k * q of the pair tile (padding columns zero)
  Vec<T> weffT;  // [D, wp0]: Weff^T of one candidate (the forward's per-candidate path)
  // Backward: per candidate sum of e_0 over t; per pair Pc^T e_0; per behaviour sums over candidates of e_0,
  // of (Pc^T e_0) * q and of the pooling weight times grad_out; Kc^T (sum over candidates of e_0).
  Vec<T> dc, P, gzsum, gkacc, gvacc, gkK;
  MultiWork(const Net<T>& net, int64_t candidates, int64_t value_dim, bool backward) {
    const int64_t wp0 = net.wp[0], Dp = net.Dp;
    cvec.assign(candidates * wp0, T(0));
    kp.assign(kTile * Dp, T(0));
    KK.assign(kTile * wp0, T(0));
    X.assign(kTile * Dp, T(0));
    weffT.assign(net.D * wp0, T(0));
    if (!backward) return;
    dc.assign(candidates * wp0, T(0));
    P.assign(kTile * Dp, T(0));
    gzsum.assign(kTile * wp0, T(0));
    gkacc.assign(kTile * Dp, T(0));
    gvacc.assign(kTile * value_dim, T(0));
    gkK.assign(kTile * Dp, T(0));
  }
  // c_{b,c} for `count` candidates q [count, D], one product.
  void set_candidates(const Net<T>& net, const T* q, int64_t count) {
    gemm<T>().nn(count, net.D, net.wp[0], q, net.D, net.AT.data(), net.wp[0], net.bias[0].data(), cvec.data(),
                 net.wp[0]);
  }
  // The key tile [R, D] and its k Kc^T; clears the backward's per-behaviour sums.
  void set_keys(const Net<T>& net, const T* keys, int64_t R, int64_t value_dim) {
    const int64_t D = net.D, Dp = net.Dp, wp0 = net.wp[0];
    for (int64_t r = 0; r < R; ++r) std::copy(keys + r * D, keys + (r + 1) * D, kp.data() + r * Dp);
    gemm<T>().nn(R, D, wp0, kp.data(), Dp, net.KcT.data(), wp0, nullptr, KK.data(), wp0);
    if (gzsum.empty()) return;
    std::fill(gzsum.begin(), gzsum.begin() + R * wp0, T(0));
    std::fill(gkacc.begin(), gkacc.begin() + R * Dp, T(0));
    std::fill(gvacc.begin(), gvacc.begin() + R * value_dim, T(0));
  }
  // z_0 of the pair tile into work.z[0]: q [nc, D] the tile's candidates, cv [nc, wp0] their c_{b,c}.
  void layer1(const Net<T>& net, Work<T>& work, const T* q, const T* cv, int64_t nc, int64_t R) {
    const int64_t D = net.D, Dp = net.Dp, wp0 = net.wp[0];
    for (int64_t cc = 0; cc < nc; ++cc) {
      const T* qc = q + cc * D;
      for (int64_t r = 0; r < R; ++r) {
        const T* k = kp.data() + r * Dp;
        T* x = X.data() + (cc * R + r) * Dp;
        for (int64_t d = 0; d < D; ++d) x[d] = k[d] * qc[d];
      }
    }
    T* z = work.z[0].data();
    gemm<T>().nn(nc * R, D, wp0, X.data(), Dp, net.PcT.data(), wp0, nullptr, z, wp0);
    for (int64_t cc = 0; cc < nc; ++cc) {
      const T* c = cv + cc * wp0;
      for (int64_t r = 0; r < R; ++r) {
        T* zr = z + (cc * R + r) * wp0;
        const T* kk = KK.data() + r * wp0;
        for (int64_t h = 0; h < wp0; ++h) zr[h] += kk[h] + c[h];
      }
    }
  }
};

// The forward of user b's pairs with candidates [cbeg, cend), tile by tile, up to layer `upto` (backward: also
// the per-user inputs of the gradient pass): on_tile(tile) after each pair tile (its z and h in work), on_keys(tile)
// after the last pair tile of each key tile (multi-candidate backward only). One candidate runs the
// single-candidate kernel (per-user effective weight, set_user). Several run, outside the gradient pass, for a
// history of at least kWeffRows behaviours, one candidate at a time over the whole history with that candidate's
// effective weight (the c_{b,c} as the product's bias): per pair the single-candidate kernel's work, with no
// k Kc^T, k * q or sum pass, the history re-read from cache; for shorter histories, and in the gradient pass
// (whose dPc needs k * q), MultiWork's split, the key tile shared by pair tiles of kTile / R candidates each (at
// least one). Either way each pair's row of every product is computed alone and each candidate's pooling sees
// the same key tiles, so a candidate's results do not depend on which others share its call or work item.
template <typename T, typename OnTile, typename OnKeys>
void visit_user(const Net<T>& net, const Problem<T>& pb, Work<T>& work, MultiWork<T>* multi, int64_t b,
                int64_t cbeg, int64_t cend, int64_t upto, bool backward, OnTile&& on_tile, OnKeys&& on_keys) {
  const int64_t len = pb.lengths[b], row0 = pb.starts[b], D = pb.D;
  if (pb.C == 1) {
    work.set_user(net, pb.query + b * D, backward);
    // The scores of a pass outside the gradient pass by forward_scores' dots, except with training Dice, whose
    // forward the stored kernels' must equal bitwise (their last linear is a product).
    const bool dots = upto == net.n && !backward && !net.dice_train;
    for (int64_t t0 = 0; t0 < len; t0 += kTile) {
      const int64_t rows = std::min(kTile, len - t0);
      layer1_forward(net, work, pb.keys + (row0 + t0) * D, rows, work.z[0].data());
      if (dots) {
        forward_scores(net, work, rows);
      } else {
        forward_layers(net, work, rows, upto);
      }
      on_tile(PairTile{t0, rows, 0, 1});
    }
    return;
  }
  const T* q = pb.query + b * pb.C * D;
  const int64_t wp0 = net.wp[0];
  multi->set_candidates(net, q + cbeg * D, cend - cbeg);
  if (!backward && len >= kWeffRows) {
    for (int64_t c = cbeg; c < cend; ++c) {
      effective_weight(net, q + c * D, multi->weffT.data());
      const T* cv = multi->cvec.data() + (c - cbeg) * wp0;
      for (int64_t t0 = 0; t0 < len; t0 += kTile) {
        const int64_t R = std::min(kTile, len - t0);
        gemm<T>().nn(R, D, wp0, pb.keys + (row0 + t0) * D, D, multi->weffT.data(), wp0, cv, work.z[0].data(), wp0);
        if (upto == net.n) {
          forward_scores(net, work, R);
        } else {
          forward_layers(net, work, R, upto);
        }
        on_tile(PairTile{t0, R, c, 1});
      }
    }
    return;
  }
  for (int64_t t0 = 0; t0 < len; t0 += kTile) {
    const int64_t R = std::min(kTile, len - t0), per_tile = std::max<int64_t>(1, kTile / R);
    multi->set_keys(net, pb.keys + (row0 + t0) * D, R, pb.Dv);
    for (int64_t c0 = cbeg; c0 < cend; c0 += per_tile) {
      const int64_t nc = std::min(per_tile, cend - c0);
      multi->layer1(net, work, q + c0 * D, multi->cvec.data() + (c0 - cbeg) * wp0, nc, R);
      forward_layers(net, work, nc * R, upto);
      on_tile(PairTile{t0, R, c0, nc});
    }
    on_keys(PairTile{t0, R, cbeg, cend - cbeg});
  }
}

template <typename T>
std::unique_ptr<MultiWork<T>> make_multi(const Net<T>& net, const Problem<T>& pb, int64_t candidates, bool backward) {
  return pb.C > 1 ? std::make_unique<MultiWork<T>>(net, candidates, pb.Dv, backward) : nullptr;
}

// ---------------------------------------------------------------------------------------------------------------
// Forward

// Shifted sums and sums of squares of a tile's z_j [rows, wp] (the bias is a cheap guess of the mean), taken in T
// over the tile (at most kTile terms) into `tile` [2 * wp], then added to the double totals sum [2 * wp]. Columns
// outer in blocks of two vectors (then one; wp is a multiple of kPad<T>, one vector), rows inner: a block's sums stay
// in registers where a row-outer loop stored and reloaded tile at every element. Each column adds its rows in the
// same order, and the baseline build has no FMA to contract v * v into: bitwise the row-outer loop's sums.
template <typename T>
void add_moments(const T* z, int64_t rows, int64_t wp, const T* shift, T* tile, double* sum) {
  using V = typename Simd<T>::type;
  constexpr int64_t L = Simd<T>::lanes;
  int64_t c0 = 0;
  for (; c0 + 2 * L <= wp; c0 += 2 * L) {
    const V s0 = load(shift + c0), s1 = load(shift + c0 + L);
    V t0 = {}, t1 = {}, q0 = {}, q1 = {};
    for (int64_t r = 0; r < rows; ++r) {
      const V v0 = load(z + r * wp + c0) - s0, v1 = load(z + r * wp + c0 + L) - s1;
      t0 += v0;
      t1 += v1;
      q0 += v0 * v0;
      q1 += v1 * v1;
    }
    store(tile + c0, t0);
    store(tile + c0 + L, t1);
    store(tile + wp + c0, q0);
    store(tile + wp + c0 + L, q1);
  }
  for (; c0 < wp; c0 += L) {
    const V s0 = load(shift + c0);
    V t0 = {}, q0 = {};
    for (int64_t r = 0; r < rows; ++r) {
      const V v0 = load(z + r * wp + c0) - s0;
      t0 += v0;
      q0 += v0 * v0;
    }
    store(tile + c0, t0);
    store(tile + wp + c0, q0);
  }
  for (int64_t c = 0; c < 2 * wp; ++c) sum[c] += tile[c];
}

// Dice training: the mean and biased variance of z_j over the pb.valid pairs from the block partials (2 * wp_j
// each, in block order), into stats and net.acts[j].
template <typename T>
void finish_statistics(Net<T>& net, const Problem<T>& pb, int64_t j, const std::vector<double>& partial,
                       int64_t blocks, T* stats, int64_t col, int64_t htot, double eps) {
  const int64_t count = pb.valid, wp = net.wp[j];
  ActLayer<T>& a = net.acts[j];
  for (int64_t c = 0; c < net.w[j]; ++c) {
    double sum = 0, sq = 0;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      sum += partial[blk * 2 * wp + c];
      sq += partial[blk * 2 * wp + wp + c];
    }
    double mean = 0, var = 0;
    if (count > 0) {
      const double shifted_mean = sum / count;
      var = std::max(sq / count - shifted_mean * shifted_mean, 0.0);
      mean = shifted_mean + net.bias[j][c];
    }
    stats[col + c] = static_cast<T>(mean);
    stats[htot + col + c] = static_cast<T>(var);
    a.mean[c] = static_cast<T>(mean);
    a.rstd[c] = static_cast<T>(1.0 / std::sqrt(static_cast<double>(static_cast<T>(var)) + eps));
  }
  fold_dice(a);
}

// Dice training: mean and biased variance of z_j over all valid pairs, into stats (and net.acts[j]).
template <typename T>
void gather_statistics(Net<T>& net, const Problem<T>& pb, int64_t j, T* stats, int64_t col, int64_t htot,
                       double eps) {
  const Blocks blocks(pb.B);
  const int64_t wp = net.wp[j];
  std::vector<double> partial(blocks.count * 2 * wp, 0.0);
  at::parallel_for(0, blocks.count, 1, [&](int64_t lo, int64_t hi) {
    Work<T> work(net);
    const auto multi = make_multi(net, pb, pb.C, false);
    Vec<T> tile(2 * wp);
    for (int64_t blk = lo; blk < hi; ++blk) {
      double* sum = partial.data() + blk * 2 * wp;
      for (int64_t b = blocks.first(blk, pb.B); b < blocks.last(blk, pb.B); ++b) {
        if (pb.lengths[b] == 0) continue;
        visit_user(net, pb, work, multi.get(), b, 0, pb.C, j, false, [&](const PairTile& pt) {
          add_moments(work.z[j].data(), pt.rows(), wp, net.bias[j].data(), tile.data(), sum);
        }, [](const PairTile&) {});
      }
    }
  });
  finish_statistics(net, pb, j, partial, blocks.count, stats, col, htot, eps);
}

// Pools `rows` scored behaviours (score r at s[r * stride], values from key row row0 on) into acc [Dv]: plain
// sums, or an online softmax that rescales what was accumulated whenever the running maximum grows. In a
// baseline, an AVX2+FMA and an AVX-512 build like the activations (the baseline one was a twentieth of the multi
// forward's time).
template <typename T>
DIN_EXT_INLINE void pool_rows_body(const Problem<T>& pb, const T* s, int64_t stride, int64_t rows, int64_t row0,
                                   T* __restrict acc, double& row_max, double& denom) {
  if (pb.norm == Normalization::kSoftmax) {
    double tile_max = row_max;
    for (int64_t r = 0; r < rows; ++r) tile_max = std::max(tile_max, static_cast<double>(pb.scale * s[r * stride]));
    const T rescale = static_cast<T>(std::exp(row_max - tile_max));
    denom *= rescale;
    for (int64_t d = 0; d < pb.Dv; ++d) acc[d] *= rescale;
    row_max = tile_max;
    for (int64_t r = 0; r < rows; ++r) {
      const T e = static_cast<T>(std::exp(static_cast<double>(pb.scale * s[r * stride]) - row_max));
      denom += e;
      const T* __restrict v = pb.values + (row0 + r) * pb.Dv;
      for (int64_t d = 0; d < pb.Dv; ++d) acc[d] += e * v[d];
    }
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      const T wt = pb.scale * s[r * stride];
      const T* __restrict v = pb.values + (row0 + r) * pb.Dv;
      for (int64_t d = 0; d < pb.Dv; ++d) acc[d] += wt * v[d];
    }
  }
}

template <typename T>
void pool_rows_base(const Problem<T>& pb, const T* s, int64_t stride, int64_t rows, int64_t row0, T* acc,
                    double& row_max, double& denom) {
  pool_rows_body(pb, s, stride, rows, row0, acc, row_max, denom);
}
#if DIN_EXT_HAVE_AVX2
template <typename T>
DIN_EXT_AVX2 void pool_rows_avx2(const Problem<T>& pb, const T* s, int64_t stride, int64_t rows, int64_t row0,
                                 T* acc, double& row_max, double& denom) {
  pool_rows_body(pb, s, stride, rows, row0, acc, row_max, denom);
}
template <typename T>
DIN_EXT_AVX512 void pool_rows_avx512(const Problem<T>& pb, const T* s, int64_t stride, int64_t rows, int64_t row0,
                                     T* acc, double& row_max, double& denom) {
  pool_rows_body(pb, s, stride, rows, row0, acc, row_max, denom);
}
#endif
template <typename T>
void pool_rows(const Problem<T>& pb, const T* s, int64_t stride, int64_t rows, int64_t row0, T* acc,
               double& row_max, double& denom) {
#if DIN_EXT_HAVE_AVX2
  if (has_avx512()) return pool_rows_avx512(pb, s, stride, rows, row0, acc, row_max, denom);
  if (has_avx2_fma()) return pool_rows_avx2(pb, s, stride, rows, row0, acc, row_max, denom);
#endif
  pool_rows_base(pb, s, stride, rows, row0, acc, row_max, denom);
}

// Candidates per group of the forward's work items: at most kGroup, and, while there are fewer users than
// threads, few enough for a group per thread (one candidate at least). A candidate's output does not depend on
// its group (visit_user), so the split may follow the thread count: results stay bitwise the same.
int64_t candidate_group_size(int64_t batch, int64_t candidates) {
  int64_t groups = (candidates + kGroup - 1) / kGroup;
  const int64_t threads = at::get_num_threads();
  if (batch > 0 && batch * groups < threads) groups = std::min(candidates, (threads + batch - 1) / batch);
  return (candidates + groups - 1) / groups;
}

// Work items are (user, group of candidates): a user's C candidates are cut into groups of candidate_group_size
// (the last one shorter), which lets a few users with many candidates fill the threads; each group reads the
// user's history once.
template <typename T>
void pool_forward(const Net<T>& net, const Problem<T>& pb, T* out) {
  const int64_t wpn = net.wp[net.n], C = pb.C, Dv = pb.Dv;
  const int64_t size = candidate_group_size(pb.B, C), groups = (C + size - 1) / size;
  at::parallel_for(0, pb.B * groups, 1, [&](int64_t lo, int64_t hi) {
    Work<T> work(net);
    const auto multi = make_multi(net, pb, size, false);
    Vec<T> acc(size * Dv);
    Vec<double> row_max(size), denom(size);
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t b = item / groups, cbeg = item % groups * size, count = std::min(size, C - cbeg);
      T* o = out + (b * C + cbeg) * Dv;
      const int64_t len = pb.lengths[b];
      if (len == 0) {
        std::fill(o, o + count * Dv, T(0));
        continue;
      }
      std::fill(acc.begin(), acc.end(), T(0));
      std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<double>::infinity());
      std::fill(denom.begin(), denom.end(), 0.0);
      visit_user(net, pb, work, multi.get(), b, cbeg, cbeg + count, net.n, false, [&](const PairTile& pt) {
        const T* s = work.z[net.n].data();
        for (int64_t cc = 0; cc < pt.nc; ++cc) {
          const int64_t c = pt.c0 - cbeg + cc;
          pool_rows(pb, s + cc * pt.R * wpn, wpn, pt.R, pb.starts[b] + pt.t0, acc.data() + c * Dv, row_max[c],
                    denom[c]);
        }
      }, [](const PairTile&) {});
      for (int64_t c = 0; c < count; ++c) {
        const T inv = pb.norm == Normalization::kSoftmax ? static_cast<T>(1.0 / denom[c]) : T(1);
        for (int64_t d = 0; d < Dv; ++d) o[c * Dv + d] = acc[c * Dv + d] * inv;
      }
    }
  });
}

template <typename T>
Problem<T> make_problem(const AttentionArgs& args) {
  const AttentionShape& s = args.shape;
  const int64_t* len = args.lengths.data_ptr<int64_t>();
  return {s.batch, s.candidates, s.dim, s.value_dim,
          s.candidates * std::accumulate(len, len + s.batch, int64_t(0)), args.query.data_ptr<T>(),
          args.keys.data_ptr<T>(), args.values.data_ptr<T>(), args.starts.data_ptr<int64_t>(), len, args.norm,
          static_cast<T>(args.score_scale)};
}

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& query_, const at::Tensor& keys_,
                                                     const std::optional<at::Tensor>& values_,
                                                     const at::Tensor& starts_, const at::Tensor& lengths_,
                                                     int64_t max_len, at::TensorList weights, at::TensorList biases,
                                                     const at::Tensor& act_params, c10::string_view activation,
                                                     c10::string_view normalization, double score_scale,
                                                     bool training, double eps) {
  const AttentionForwardArgs args = attention_forward_args(query_, keys_, values_, starts_, lengths_, max_len,
                                                           weights, biases, act_params, activation, normalization,
                                                           score_scale, training, eps);
  AT_DISPATCH_FLOATING_TYPES(args.query.scalar_type(), "din_ext_attention_forward", [&] {
    const bool dice_train = args.act == Activation::kDice && training;
    Net<scalar_t> net = pack<scalar_t>(args.shape.dim, weights, biases, act_params, args.act, training, eps,
                                       args.stats, true);
    const Problem<scalar_t> pb = make_problem<scalar_t>(args);
    choose_layer1(net, pb.B, pb.C, pb.valid);
    if (dice_train) {
      int64_t col = 0;
      for (int64_t j = 0; j < net.n; ++j) {
        gather_statistics(net, pb, j, args.stats.data_ptr<scalar_t>(), col, args.shape.hidden_total, eps);
        col += net.w[j];
      }
    }
    pool_forward(net, pb, args.out.data_ptr<scalar_t>());
  });
  return {args.out, args.stats};
}

// ---------------------------------------------------------------------------------------------------------------
// Backward

// User b's pooling weights and d loss / d score of its valid pairs, at index (key row) * C + candidate, from its
// scale * scores (in weight on entry; the weights replace them).
template <typename T>
void score_gradients_user(const Problem<T>& pb, const T* grad_out, int64_t b, T* weight, T* grad_score) {
  const int64_t C = pb.C, len = pb.lengths[b], row0 = pb.starts[b];
  for (int64_t c = 0; c < C; ++c) {
    const T* g = grad_out + (b * C + c) * pb.Dv;
    T* w = weight + row0 * C + c;  // w[t * C]: behaviour t
    T* gs = grad_score + row0 * C + c;
    double dot = 0;
    if (pb.norm == Normalization::kSoftmax) {
      double row_max = -std::numeric_limits<double>::infinity(), denom = 0;
      for (int64_t t = 0; t < len; ++t) row_max = std::max(row_max, static_cast<double>(w[t * C]));
      for (int64_t t = 0; t < len; ++t) denom += std::exp(w[t * C] - row_max);
      for (int64_t t = 0; t < len; ++t) w[t * C] = static_cast<T>(std::exp(w[t * C] - row_max) / denom);
    }
    for (int64_t t = 0; t < len; ++t) {
      const T* v = pb.values + (row0 + t) * pb.Dv;
      double gw = 0;
      for (int64_t d = 0; d < pb.Dv; ++d) gw += static_cast<double>(g[d]) * v[d];
      gs[t * C] = static_cast<T>(gw);
      dot += w[t * C] * gw;
    }
    for (int64_t t = 0; t < len; ++t) {
      const T gw = gs[t * C];
      // softmax: d/dt_t = w_t (gw_t - sum_u w_u gw_u); none: d/dt_t = gw_t. Then d/ds = score_scale * d/dt.
      gs[t * C] = pb.scale * (pb.norm == Normalization::kSoftmax ? w[t * C] * (gw - static_cast<T>(dot)) : gw);
    }
  }
}

// Softmax pooling: d loss / d score of every valid pair and its pooling weight, at index (key row) * C +
// candidate (one scoring sweep; both need the whole row's scores). Without softmax the backward passes derive
// them per tile.
template <typename T>
void score_gradients(const Net<T>& net, const Problem<T>& pb, const T* grad_out, T* weight, T* grad_score) {
  const int64_t wpn = net.wp[net.n], C = pb.C;
  at::parallel_for(0, pb.B, 1, [&](int64_t lo, int64_t hi) {
    Work<T> work(net);
    const auto multi = make_multi(net, pb, C, false);
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t row0 = pb.starts[b];
      if (pb.lengths[b] == 0) continue;
      visit_user(net, pb, work, multi.get(), b, 0, C, net.n, false, [&](const PairTile& pt) {
        for (int64_t p = 0; p < pt.rows(); ++p) {
          const int64_t c = pt.c0 + p / pt.R, t = pt.t0 + p % pt.R;
          weight[(row0 + t) * C + c] = pb.scale * work.z[net.n][p * wpn];
        }
      }, [](const PairTile&) {});
      score_gradients_user(pb, grad_out, b, weight, grad_score);
    }
  });
}

struct BackwardOutputs {
  at::Tensor grad_query, grad_keys, grad_values;
};

// d loss / d score (column 0 of gz [rows, wpn], the rest zero) and the pooling weight wt of a pair tile of user b
// whose scores are at s[p * wpn]: from score_gradients' arrays with softmax, else from grad_out and the values.
template <typename T>
void score_gradient_tile(const Problem<T>& pb, int64_t wpn, int64_t b, const PairTile& pt, const T* s,
                         const T* weight, const T* grad_score, const T* grad_out, T* gz, T* wt) {
  const int64_t rows = pt.rows(), R = pt.R, C = pb.C, Dv = pb.Dv, row0 = pb.starts[b];
  std::fill(gz, gz + rows * wpn, T(0));
  for (int64_t p = 0; p < rows; ++p) {
    const int64_t c = pt.c0 + p / R, row = row0 + pt.t0 + p % R;
    if (pb.norm == Normalization::kSoftmax) {
      gz[p * wpn] = grad_score[row * C + c];
      wt[p] = weight[row * C + c];
    } else {
      const T* gout = grad_out + (b * C + c) * Dv;
      const T* v = pb.values + row * Dv;
      T gw = 0;
      for (int64_t d = 0; d < Dv; ++d) gw += gout[d] * v[d];
      gz[p * wpn] = pb.scale * gw;
      wt[p] = pb.scale * s[p * wpn];
    }
  }
}

// Layer 1 of a single-candidate tile (user b, behaviours [t0, t0 + rows)), z_0 = c + Weff k, from e_0 (gz
// [rows, wp0]) and the pooling weights in work.wt: adds to the user's sums (work.dc, work.G) and writes the tile's
// key (and value) gradients.
template <typename T>
void layer1_backward_tile(const Net<T>& net, const Problem<T>& pb, Work<T>& work, int64_t b, int64_t t0,
                          int64_t rows, const T* gz, const T* grad_out, T* gk_all, T* gv_all) {
  const Gemm<T>& g = gemm<T>();
  const int64_t D = pb.D, Dv = pb.Dv, Dp = net.Dp, wp0 = net.wp[0], w0 = net.w[0], row0 = pb.starts[b] + t0;
  const T* keys = pb.keys + row0 * D;
  const T* gout = grad_out + b * Dv;
  for (int64_t r = 0; r < rows; ++r) {
    std::copy(keys + r * D, keys + (r + 1) * D, work.kp.data() + r * Dp);
    for (int64_t c = 0; c < wp0; ++c) work.dc[c] += gz[r * wp0 + c];
  }
  g.tn(rows, wp0, Dp, gz, wp0, work.kp.data(), Dp, work.G.data(), Dp);
  g.nn(rows, w0, Dp, gz, wp0, work.weff.data(), Dp, nullptr, work.gk.data(), Dp);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = row0 + r;
    T* gk = gk_all + row * D;
    const T* src = work.gk.data() + r * Dp;
    const T wt = work.wt[r];
    if (gv_all) {
      for (int64_t d = 0; d < D; ++d) gk[d] = src[d];
      T* gv = gv_all + row * Dv;
      for (int64_t d = 0; d < Dv; ++d) gv[d] = wt * gout[d];
    } else {
      for (int64_t d = 0; d < D; ++d) gk[d] = src[d] + wt * gout[d];
    }
  }
}

// The end of a single-candidate user (query q) in the backward: d/dq = (Wq + Wd)^T dc + sum_h G[h, :] * Wp[h, :]
// into gq (zeroed by the caller); d(Wq + Wd) += dc q^T; d(Wk - Wd) += G; dWp += G diag(q); db_0 += dc. With dA_all
// null, the two terms of dc (in d/dq and d(Wq + Wd)) are left to the caller (fold_user_dc, over many users).
// Vectorized over d in the AVX2 / AVX-512 builds (see set_user_body).
template <typename T>
DIN_EXT_INLINE void layer1_backward_user_body(const Net<T>& net, const T* __restrict dc, const T* __restrict G,
                                              const T* __restrict q, T* __restrict gq, T* __restrict dA_all,
                                              T* __restrict dKc_all, T* __restrict dPc_all, T* __restrict db0) {
  const int64_t D = net.D, Dp = net.Dp;
  for (int64_t hh = 0; hh < net.w[0]; ++hh) {
    const T dch = dc[hh];
    const T* __restrict a = net.A.data() + hh * D;
    const T* __restrict Gh = G + hh * Dp;
    const T* __restrict pc = net.Pc.data() + hh * Dp;
    T* __restrict dKc = dKc_all + hh * Dp;
    T* __restrict dPc = dPc_all + hh * Dp;
    if (dA_all) {
      T* __restrict dA = dA_all + hh * D;
      for (int64_t d = 0; d < D; ++d) {
        gq[d] += a[d] * dch + Gh[d] * pc[d];
        dA[d] += dch * q[d];
        dKc[d] += Gh[d];
        dPc[d] += Gh[d] * q[d];
      }
    } else {
      for (int64_t d = 0; d < D; ++d) {
        gq[d] += Gh[d] * pc[d];
        dKc[d] += Gh[d];
        dPc[d] += Gh[d] * q[d];
      }
    }
    db0[hh] += dch;
  }
}

template <typename T>
void layer1_backward_user_base(const Net<T>& net, const T* dc, const T* G, const T* q, T* gq, T* dA, T* dKc,
                               T* dPc, T* db0) {
  layer1_backward_user_body(net, dc, G, q, gq, dA, dKc, dPc, db0);
}
#if DIN_EXT_HAVE_AVX2
template <typename T>
DIN_EXT_AVX2 void layer1_backward_user_avx2(const Net<T>& net, const T* dc, const T* G, const T* q, T* gq, T* dA,
                                            T* dKc, T* dPc, T* db0) {
  layer1_backward_user_body(net, dc, G, q, gq, dA, dKc, dPc, db0);
}
template <typename T>
DIN_EXT_AVX512 void layer1_backward_user_avx512(const Net<T>& net, const T* dc, const T* G, const T* q, T* gq,
                                                T* dA, T* dKc, T* dPc, T* db0) {
  layer1_backward_user_body(net, dc, G, q, gq, dA, dKc, dPc, db0);
}
#endif

template <typename T>
void layer1_backward_user(const Net<T>& net, const Work<T>& work, Partial<T>& part, const T* q, T* gq,
                          bool with_dc = true) {
  const T *dc = work.dc.data(), *G = work.G.data();
  T *dA = with_dc ? part.dA.data() : nullptr, *dKc = part.dKc.data(), *dPc = part.dPc.data(), *db0 = part.db[0].data();
#if DIN_EXT_HAVE_AVX2
  if (has_avx512()) return layer1_backward_user_avx512(net, dc, G, q, gq, dA, dKc, dPc, db0);
  if (has_avx2_fma()) return layer1_backward_user_avx2(net, dc, G, q, gq, dA, dKc, dPc, db0);
#endif
  layer1_backward_user_base(net, dc, G, q, gq, dA, dKc, dPc, db0);
}

// One pass over all pairs: recompute the forward, back-propagate from the scores down to hidden layer `stop`
// (Dice sums pass: accumulate sum(g_xhat), sum(g_xhat * xhat) of that layer) or, with stop < 0, all the way to
// the inputs (gradient pass). A key row's gradient is summed over the user's candidates in a fixed order and
// written once.
template <typename T>
void backward_pass(const Net<T>& net, const Problem<T>& pb, const T* weight, const T* grad_score, const T* grad_out,
                   int64_t stop, const PairBlocks& blocks, std::vector<Partial<T>>& partials,
                   BackwardOutputs* outs) {
  const bool full = stop < 0;
  const int64_t C = pb.C, D = pb.D, Dv = pb.Dv, Dp = net.Dp, n = net.n, wp0 = net.wp[0], w0 = net.w[0];
  T* gq_all = full ? outs->grad_query.data_ptr<T>() : nullptr;
  T* gk_all = full ? outs->grad_keys.data_ptr<T>() : nullptr;
  T* gv_all = full && outs->grad_values.numel() ? outs->grad_values.data_ptr<T>() : nullptr;
  at::parallel_for(0, blocks.count(), 1, [&](int64_t lo, int64_t hi) {
    const Gemm<T>& g = gemm<T>();
    Work<T> work(net);
    work.init_backward(net);
    const auto multi = make_multi(net, pb, C, full);
    for (int64_t blk = lo; blk < hi; ++blk) {
      Partial<T>& part = partials[blk];
      for (int64_t b = blocks.first[blk]; b < blocks.first[blk + 1]; ++b) {
        const int64_t len = pb.lengths[b], row0 = pb.starts[b];
        const T* q = pb.query + b * C * D;  // the user's candidates [C, D]
        if (full) std::fill(gq_all + b * C * D, gq_all + (b + 1) * C * D, T(0));
        if (len == 0) continue;
        if (full) {
          work.clear_user_gradients();
          if (multi) std::fill(multi->dc.begin(), multi->dc.end(), T(0));
        }
        const auto on_tile = [&](const PairTile& pt) {
          const int64_t rows = pt.rows(), R = pt.R;
          T* gz = work.g0.data();
          T* gh = work.g1.data();
          score_gradient_tile(pb, net.wp[n], b, pt, work.z[n].data(), weight, grad_score, grad_out, gz,
                              work.wt.data());
          for (int64_t i = n; i >= 1; --i) {
            const int64_t wpi = net.wp[i], wpp = net.wp[i - 1];
            if (full) {
              g.tn(rows, wpi, wpp, gz, wpi, work.h[i - 1].data(), wpp, part.dW[i].data(), wpp);
              for (int64_t r = 0; r < rows; ++r)
                for (int64_t c = 0; c < wpi; ++c) part.db[i][c] += gz[r * wpi + c];
            }
            g.nn(rows, net.w[i], wpp, gz, wpi, net.Wn[i].data(), wpp, nullptr, gh, wpp);  // d/dh_{i-1}
            const bool sums_here = !full && i - 1 == stop;
            double* acc = (full || sums_here) ? part.act[i - 1].data() : nullptr;
            activation_backward_tile(net, i - 1, rows, work.z[i - 1].data(), gh, acc);
            std::swap(gz, gh);  // gz = d/dz_{i-1}
            if (sums_here) break;
          }
          if (!full) return;
          if (C == 1) return layer1_backward_tile(net, pb, work, b, pt.t0, rows, gz, grad_out, gk_all, gv_all);
          // Layer 1 of the pairs, z_0 = c_{b,c} + k Kc^T + (k * q) Pc^T: dPc += e_0^T (k * q) (X still holds the
          // tile's k * q); P = Pc^T e_0 per pair gives d/dq += k * P and d/dk += q * P; e_0 is summed per
          // candidate (dc: d/dq and dA, db_0 per user) and per behaviour (gzsum: Kc's part, on_keys).
          MultiWork<T>& m = *multi;
          T* P = m.P.data();
          g.nn(rows, w0, Dp, gz, wp0, net.Pc.data(), Dp, nullptr, P, Dp);
          g.tn(rows, wp0, Dp, gz, wp0, m.X.data(), Dp, part.dPc.data(), Dp);
          for (int64_t cc = 0; cc < pt.nc; ++cc) {
            const int64_t c = pt.c0 + cc;
            const T* qc = q + c * D;
            const T* gout = grad_out + (b * C + c) * Dv;
            T* gq = gq_all + (b * C + c) * D;
            T* dc = m.dc.data() + c * wp0;
            for (int64_t r = 0; r < R; ++r) {
              const int64_t p = cc * R + r;
              const T* e = gz + p * wp0;
              T* es = m.gzsum.data() + r * wp0;
              for (int64_t h = 0; h < wp0; ++h) {
                dc[h] += e[h];
                es[h] += e[h];
              }
              const T* pp = P + p * Dp;
              const T* k = m.kp.data() + r * Dp;
              T* ga = m.gkacc.data() + r * Dp;
              for (int64_t d = 0; d < D; ++d) {
                gq[d] += k[d] * pp[d];
                ga[d] += qc[d] * pp[d];
              }
              const T wt = work.wt[p];
              T* gva = m.gvacc.data() + r * Dv;
              for (int64_t d = 0; d < Dv; ++d) gva[d] += wt * gout[d];
            }
          }
        };
        // Multi-candidate, once per behaviour: dKc += (sum_c e_0)^T k, d/dk = Kc^T sum_c e_0 + sum_c q * P, and the
        // values' part (sum_c w g), written once per key row.
        const auto on_keys = [&](const PairTile& pt) {
          if (!full) return;
          MultiWork<T>& m = *multi;
          const int64_t R = pt.R;
          g.tn(R, wp0, Dp, m.gzsum.data(), wp0, m.kp.data(), Dp, part.dKc.data(), Dp);
          g.nn(R, w0, Dp, m.gzsum.data(), wp0, net.Kc.data(), Dp, nullptr, m.gkK.data(), Dp);
          for (int64_t r = 0; r < R; ++r) {
            const int64_t row = row0 + pt.t0 + r;
            T* gk = gk_all + row * D;
            const T* kk = m.gkK.data() + r * Dp;
            const T* ga = m.gkacc.data() + r * Dp;
            const T* gva = m.gvacc.data() + r * Dv;
            if (gv_all) {
              for (int64_t d = 0; d < D; ++d) gk[d] = kk[d] + ga[d];
              std::copy(gva, gva + Dv, gv_all + row * Dv);
            } else {
              for (int64_t d = 0; d < D; ++d) gk[d] = kk[d] + ga[d] + gva[d];
            }
          }
        };
        visit_user(net, pb, work, multi.get(), b, 0, C, full ? n : n - 1, full, on_tile, on_keys);
        if (!full) continue;
        if (C == 1) {
          layer1_backward_user(net, work, part, q, gq_all + b * D);
          continue;
        }
        // Per candidate: d/dq += (Wq + Wd)^T dc; d(Wq + Wd) += dc q^T; db_0 += dc.
        for (int64_t c = 0; c < C; ++c) {
          const T* qc = q + c * D;
          const T* dc = multi->dc.data() + c * wp0;
          T* gq = gq_all + (b * C + c) * D;
          for (int64_t hh = 0; hh < w0; ++hh) {
            const T dch = dc[hh];
            const T* a = net.A.data() + hh * D;
            T* dA = part.dA.data() + hh * D;
            for (int64_t d = 0; d < D; ++d) {
              gq[d] += a[d] * dch;
              dA[d] += dch * qc[d];
            }
            part.db[0][hh] += dch;
          }
        }
      }
    }
  });
}

template <typename T>
void zero_partials(std::vector<Partial<T>>& partials, const Net<T>& net) {
  for (auto& p : partials) p.init(net);
}

// Dice training backward: the means of g_xhat and of g_xhat * xhat of hidden layer j over the count valid pairs,
// from the block partials (rows 3 and 4 of act[j]).
template <typename T>
void set_backward_sums(Net<T>& net, int64_t j, const std::vector<Partial<T>>& partials, int64_t count) {
  ActLayer<T>& a = net.acts[j];
  for (int64_t c = 0; c < net.wp[j]; ++c) {
    double s1 = 0, s2 = 0;
    for (const auto& p : partials) {
      s1 += p.act[j][3 * net.wp[j] + c];
      s2 += p.act[j][4 * net.wp[j] + c];
    }
    a.g_mean[c] = static_cast<T>(s1 / count);
    a.gx_mean[c] = static_cast<T>(s2 / count);
  }
}

// The parameter gradients from the block partials, reduced in block order: grad_weights, grad_biases (allocated
// here) and the activation parameters' rows of grad_act (zeros on entry).
template <typename T>
void write_gradients(const Net<T>& net, const AttentionArgs& args, const std::vector<Partial<T>>& partials,
                     std::vector<at::Tensor>& grad_weights, std::vector<at::Tensor>& grad_biases,
                     const at::Tensor& grad_act) {
  const AttentionShape& shape = args.shape;
  const at::Tensor& query = args.query;
  const Activation act = args.act;
  const bool training = args.training;
  const int64_t D = shape.dim, Dp = net.Dp, n = net.n;
  // Reduce the block partials in block order.
  auto reduce = [&](auto member, size_t size) {
    Vec<double> total(size, 0.0);
    for (const auto& p : partials) {
      const auto& v = member(p);
      for (size_t k = 0; k < size; ++k) total[k] += v[k];
    }
    return total;
  };
  const int64_t w0 = net.w[0], wp0 = net.wp[0];
  const Vec<double> dA = reduce([](const Partial<T>& p) -> const Vec<T>& { return p.dA; }, w0 * D);
  const Vec<double> dKc = reduce([](const Partial<T>& p) -> const Vec<T>& { return p.dKc; }, wp0 * Dp);
  const Vec<double> dPc = reduce([](const Partial<T>& p) -> const Vec<T>& { return p.dPc; }, wp0 * Dp);
  // W_0 = [Wq, Wk, Wd, Wp] with A = Wq + Wd, Kc = Wk - Wd, Pc = Wp.
  grad_weights[0] = at::empty({w0, 4 * D}, query.options());
  T* gw0 = grad_weights[0].data_ptr<T>();
  for (int64_t hh = 0; hh < w0; ++hh) {
    for (int64_t d = 0; d < D; ++d) {
      const double a = dA[hh * D + d], kc = dKc[hh * Dp + d];
      gw0[hh * 4 * D + d] = static_cast<T>(a);
      gw0[hh * 4 * D + D + d] = static_cast<T>(kc);
      gw0[hh * 4 * D + 2 * D + d] = static_cast<T>(a - kc);
      gw0[hh * 4 * D + 3 * D + d] = static_cast<T>(dPc[hh * Dp + d]);
    }
  }
  for (int64_t i = 0; i <= n; ++i) {
    const int64_t wi = net.w[i], wpi = net.wp[i];
    const Vec<double> db = reduce([i](const Partial<T>& p) -> const Vec<T>& { return p.db[i]; }, wpi);
    grad_biases[i] = at::empty({wi}, query.options());
    for (int64_t c = 0; c < wi; ++c) grad_biases[i].data_ptr<T>()[c] = static_cast<T>(db[c]);
    if (i == 0) continue;
    const int64_t in = net.w[i - 1], wpp = net.wp[i - 1];
    const Vec<double> dW = reduce([i](const Partial<T>& p) -> const Vec<T>& { return p.dW[i]; }, wpi * wpp);
    grad_weights[i] = at::empty({wi, in}, query.options());
    T* gw = grad_weights[i].data_ptr<T>();
    for (int64_t o = 0; o < wi; ++o)
      for (int64_t k = 0; k < in; ++k) gw[o * in + k] = static_cast<T>(dW[o * wpp + k]);
  }
  // Activation parameters: Dice rows (alpha, gamma, beta, running_mean, running_var), PReLU row (slope).
  if (act == Activation::kDice || act == Activation::kPrelu) {
    T* ga = grad_act.data_ptr<T>();
    const int64_t htot = shape.hidden_total;
    int64_t col = 0;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t wj = net.w[j], wpj = net.wp[j];
      Vec<double> sums(5 * wpj, 0.0);
      for (const auto& p : partials)
        for (int64_t k = 0; k < 5 * wpj; ++k) sums[k] += p.act[j][k];
      const ActLayer<T>& a = net.acts[j];
      for (int64_t c = 0; c < wj; ++c) {
        ga[col + c] = static_cast<T>(sums[c]);  // alpha / slope
        if (act != Activation::kDice) continue;
        ga[kDiceGamma * htot + col + c] = static_cast<T>(sums[wpj + c]);
        ga[kDiceBeta * htot + col + c] = static_cast<T>(sums[2 * wpj + c]);
        if (!training) {  // eval: the running statistics are inputs of the op
          const double rstd = a.rstd[c];
          ga[kDiceRunningMean * htot + col + c] = static_cast<T>(-rstd * sums[3 * wpj + c]);
          ga[kDiceRunningVar * htot + col + c] = static_cast<T>(-0.5 * rstd * rstd * sums[4 * wpj + c]);
        }
      }
      col += wj;
    }
  }
}

// Zeroes the rows of grad_keys (and grad_values) outside every user's range, which no kernel writes (the kernels
// write each covered row once, design §2.1): the padding of a [B, L, D] history is most of it at short histories,
// and zeroing all of keys first cost a memset of the whole tensor (1.4 ms of a 21 ms call at B=1024, L=20, D=64).
void zero_uncovered_rows(const AttentionBackwardArgs& a) {
  const int64_t B = a.shape.batch, N = a.keys.size(0);
  const int64_t* starts = a.starts.data_ptr<int64_t>();
  const int64_t* lengths = a.lengths.data_ptr<int64_t>();
  std::vector<std::pair<int64_t, int64_t>> ranges;  // [start, end) of the non-empty ranges
  ranges.reserve(B);
  bool sorted = true;
  for (int64_t b = 0; b < B; ++b) {
    if (lengths[b] == 0) continue;
    if (!ranges.empty() && starts[b] < ranges.back().first) sorted = false;
    ranges.emplace_back(starts[b], starts[b] + lengths[b]);
  }
  if (!sorted) std::sort(ranges.begin(), ranges.end());
  std::vector<std::pair<int64_t, int64_t>> gaps;
  int64_t cursor = 0;
  for (const auto& [first, last] : ranges) {
    if (first > cursor) gaps.emplace_back(cursor, first);
    cursor = std::max(cursor, last);
  }
  if (N > cursor) gaps.emplace_back(cursor, N);
  for (const at::Tensor& t : {a.grad_keys, a.grad_values}) {
    if (!t.numel()) continue;
    const int64_t width = t.size(1), bytes = t.element_size() * width;
    char* base = static_cast<char*>(t.data_ptr());
    at::parallel_for(0, static_cast<int64_t>(gaps.size()), 64, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i)
        std::memset(base + gaps[i].first * bytes, 0, (gaps[i].second - gaps[i].first) * bytes);
    });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>
attention_backward(const at::Tensor& grad_out_, const at::Tensor& query_, const at::Tensor& keys_,
                   const std::optional<at::Tensor>& values_, const at::Tensor& starts_, const at::Tensor& lengths_,
                   int64_t max_len, at::TensorList weights, at::TensorList biases, const at::Tensor& act_params,
                   const at::Tensor& stats_, c10::string_view activation, c10::string_view normalization,
                   double score_scale, bool training, double eps) {
  const AttentionBackwardArgs args =
      attention_backward_args(grad_out_, query_, keys_, values_, starts_, lengths_, max_len, weights, biases,
                              act_params, stats_, activation, normalization, score_scale, training, eps, false);
  zero_uncovered_rows(args);
  const AttentionShape& shape = args.shape;
  const at::Tensor &query = args.query, &grad_out = args.grad_out;
  BackwardOutputs outs{at::empty_like(query), args.grad_keys, args.grad_values};  // grad_query: zeroed per user
  std::vector<at::Tensor> grad_weights(weights.size()), grad_biases(weights.size());

  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "din_ext_attention_backward", [&] {
    using T = scalar_t;
    Net<T> net = pack<T>(shape.dim, weights, biases, act_params, args.act, training, eps, args.stats);
    const Problem<T> pb = make_problem<T>(args);
    choose_layer1(net, pb.B, pb.C, pb.valid);
    Vec<T> weight, grad_score;
    if (args.norm == Normalization::kSoftmax) {
      weight.resize(shape.num_keys * pb.C);
      grad_score.resize(shape.num_keys * pb.C);
      score_gradients(net, pb, grad_out.data_ptr<T>(), weight.data(), grad_score.data());
    }

    const PairBlocks blocks = pair_blocks(pb, kRecomputeBlockPairs, kRecomputeMinBlocks);
    std::vector<Partial<T>> partials(blocks.count());
    zero_partials(partials, net);
    if (net.dice_train && pb.valid > 0) {
      // A sums pass writes act[j] alone: the partials are zeroed once, and act[j] again after its sums are read.
      for (int64_t j = net.n - 1; j >= 0; --j) {
        backward_pass(net, pb, weight.data(), grad_score.data(), grad_out.data_ptr<T>(), j, blocks, partials,
                      nullptr);
        set_backward_sums(net, j, partials, pb.valid);
        for (auto& p : partials) std::fill(p.act[j].begin(), p.act[j].end(), 0.0);
      }
    }
    backward_pass(net, pb, weight.data(), grad_score.data(), grad_out.data_ptr<T>(), -1, blocks, partials, &outs);
    write_gradients(net, args, partials, grad_weights, grad_biases, args.grad_act_params);
  });
  return {outs.grad_query, outs.grad_keys, outs.grad_values, grad_weights, grad_biases, args.grad_act_params};
}

// ---------------------------------------------------------------------------------------------------------------
// Stored activations: din_ext::_local_activation_attention_stored and its backward. The autograd
// (csrc/attention_autograd.cpp) runs them for training Dice with one candidate per user when
// cpu_attention_stored_row_bytes() x N fits its budget (short histories), the recomputing kernels otherwise.
//
// Training Dice's exact statistics make the recomputing kernels run the MLP once per hidden layer and once more in
// each direction. These store every valid pair's pre-activations z_0 .. z_n in the forward, computed one layer at
// a time over all the pairs, and the backward reads them: each layer is computed once in each direction, and the
// backward keeps d/dh_j of all pairs [N, wp_j] between its pass over layer j (the weight gradient above, the Dice
// sums and the gradient but for the statistics' term, one sigmoid per element: dice_stored_rows) and the next one,
// which adds that term once the sums are complete. `saved` holds z_j as [V, wp_j] at offset
// V * (wp_0 + ... + wp_{j-1}), V the valid pairs, indexed by pair: user b's behaviour t at pair_starts[b] + t (the
// lengths' prefix sum), whatever the keys' layout, so padded keys ([B, L, D], half padding at typical lengths)
// store and walk their valid pairs alone and the backward's row tiles span users; only layer 1's parts read keys
// and write key gradients at key rows (starts[b] + t). The tensor keeps N x width values (the fake op's size, known
// without the lengths): the tail past V x width is never touched. The forward's tiles run the same products and
// activation code, in the same order and over the same tiles, as the recomputing kernels: both modes give bitwise
// the same output and statistics. The backward runs the layers above the first over row tiles that span users
// (for_row_tiles) and reduces its partials over pair_blocks, so its gradients equal the recomputing ones to
// rounding, and are bitwise reproducible at any thread count.

// z_j of the stored layout: V = pb.valid rows of wp_j.
template <typename T>
std::vector<int64_t> stored_offsets(const Net<T>& net, int64_t pairs) {
  std::vector<int64_t> offsets(net.n + 2, 0);
  for (int64_t j = 0; j <= net.n; ++j) offsets[j + 1] = offsets[j] + pairs * net.wp[j];
  return offsets;
}

// B + 1 pair offsets: user b's pairs are the stored rows [first[b], first[b + 1]).
template <typename T>
std::vector<int64_t> pair_starts(const Problem<T>& pb) {
  std::vector<int64_t> first(pb.B + 1, 0);
  for (int64_t b = 0; b < pb.B; ++b) first[b + 1] = first[b] + pb.lengths[b];
  return first;
}

// Calls fn(b, t0, rows, row, p) for every tile of kTile behaviours of every user of block blk, in order (row: the
// key row of the tile's first behaviour, p: its pair).
template <typename T, typename Fn>
void for_tiles(const Problem<T>& pb, const std::vector<int64_t>& first, const Blocks& blocks, int64_t blk, Fn&& fn) {
  for (int64_t b = blocks.first(blk, pb.B); b < blocks.last(blk, pb.B); ++b) {
    for (int64_t t0 = 0; t0 < pb.lengths[b]; t0 += kTile) {
      fn(b, t0, std::min(kTile, pb.lengths[b] - t0), pb.starts[b] + t0, first[b] + t0);
    }
  }
}

template <typename T>
void stored_forward(Net<T>& net, const Problem<T>& pb, T* saved, T* stats, int64_t htot, double eps, T* out) {
  const Blocks blocks(pb.B);
  const std::vector<int64_t> off = stored_offsets(net, pb.valid), first = pair_starts(pb);
  const int64_t D = pb.D, Dv = pb.Dv, n = net.n, wpn = net.wp[n];
  int64_t col = 0;
  for (int64_t j = 0; j <= n; ++j) {
    const int64_t wp = net.wp[j];
    T* Z = saved + off[j];
    std::vector<double> partial(j < n ? blocks.count * 2 * wp : 0, 0.0);
    at::parallel_for(0, blocks.count, 1, [&](int64_t lo, int64_t hi) {
      const Gemm<T>& g = gemm<T>();
      Work<T> work(net);
      Vec<T> tile(2 * wp);
      for (int64_t blk = lo; blk < hi; ++blk) {
        int64_t user = -1;
        for_tiles(pb, first, blocks, blk, [&](int64_t b, int64_t, int64_t rows, int64_t row, int64_t p) {
          T* z = Z + p * wp;
          if (j == 0) {
            if (b != user) work.set_user(net, pb.query + b * D, false);
            user = b;
            layer1_forward(net, work, pb.keys + row * D, rows, z);
          } else {
            const int64_t wpp = net.wp[j - 1];
            activation_forward_tile(net, j - 1, rows, saved + off[j - 1] + p * wpp, work.h[j - 1].data());
            g.nn(rows, net.w[j - 1], wp, work.h[j - 1].data(), wpp, net.WT[j].data(), wp, net.bias[j].data(), z, wp);
          }
          if (j < n) add_moments(z, rows, wp, net.bias[j].data(), tile.data(), partial.data() + blk * 2 * wp);
        });
      }
    });
    if (j < n) {
      finish_statistics(net, pb, j, partial, blocks.count, stats, col, htot, eps);
      col += net.w[j];
    }
  }
  const T* scores = saved + off[n];
  at::parallel_for(0, pb.B, 1, [&](int64_t lo, int64_t hi) {
    Vec<T> acc(Dv);
    for (int64_t b = lo; b < hi; ++b) {
      std::fill(acc.begin(), acc.end(), T(0));
      double row_max = -std::numeric_limits<double>::infinity(), denom = 0;
      const int64_t len = pb.lengths[b], row0 = pb.starts[b];
      for (int64_t t0 = 0; t0 < len; t0 += kTile) {
        pool_rows(pb, scores + (first[b] + t0) * wpn, wpn, std::min(kTile, len - t0), row0 + t0, acc.data(), row_max,
                  denom);
      }
      const T inv = pb.norm == Normalization::kSoftmax && len > 0 ? static_cast<T>(1.0 / denom) : T(1);
      for (int64_t d = 0; d < Dv; ++d) out[b * Dv + d] = acc[d] * inv;
    }
  });
}

// User b's behaviours [t0, t0 + rows) at rows [at, at + rows) of a row tile.
struct Piece {
  int64_t b, t0, at, rows;
};

// Calls fn(p, rows, pieces, count) for row tiles of kTile consecutive pairs [p, p + rows) (the last one shorter)
// over the behaviours of users [first, last) in order (pairs: pair_starts): a tile spans users, and a history
// longer than a tile's room continues in the next one. The layers above the first share their weights across
// users, so their products run over these tiles rather than over each user's few rows.
template <typename T, typename Fn>
void for_row_tiles(const Problem<T>& pb, const std::vector<int64_t>& pairs, int64_t first, int64_t last, Fn&& fn) {
  Piece pieces[kTile];
  int64_t count = 0, rows = 0;
  for (int64_t b = first; b < last; ++b) {
    for (int64_t t0 = 0; t0 < pb.lengths[b];) {
      const int64_t take = std::min(pb.lengths[b] - t0, kTile - rows);
      pieces[count++] = Piece{b, t0, rows, take};
      rows += take;
      t0 += take;
      if (rows == kTile) {
        fn(pairs[b] + t0 - rows, rows, static_cast<const Piece*>(pieces), count);
        count = rows = 0;
      }
    }
  }
  if (rows > 0) fn(pairs[last] - rows, rows, static_cast<const Piece*>(pieces), count);
}

// Dice of hidden layer j in the stored backward, on a tile of `rows` rows: from z (z_j) and g (d/dh_j, replaced in
// place), h = Dice(z) (the input of the weight gradient above) and g <- g (alpha + (1 - alpha) p) + rstd g_xhat,
// the gradient but for the batch statistics' term, with the tile's sums added to acc (5 x wp, double: d alpha,
// d gamma, d beta, sum g_xhat, sum g_xhat * xhat). One sigmoid per element where the recomputing kernels'
// activation_forward_tile and two activation_backward_tile passes take three; dice_finish_rows subtracts the
// statistics' term once the sums of every tile are known.
template <typename T>
DIN_EXT_INLINE void dice_stored_rows(const ActLayer<T>& a, int64_t wp, int64_t rows, const T* __restrict z,
                                     T* __restrict g, T* __restrict h, double* __restrict acc) {
  constexpr int64_t kMaxWidth = 1024;
  T tile[5][kMaxWidth];
  for (int64_t c0 = 0; c0 < wp; c0 += kMaxWidth) {
    const int64_t width = std::min(kMaxWidth, wp - c0);
    for (int k = 0; k < 5; ++k)
      for (int64_t c = 0; c < width; ++c) tile[k][c] = T(0);
    const T* __restrict alpha = a.alpha.data() + c0;
    const T* __restrict gamma = a.gamma.data() + c0;
    const T* __restrict beta = a.beta.data() + c0;
    const T* __restrict mean = a.mean.data() + c0;
    const T* __restrict rstd = a.rstd.data() + c0;
    for (int64_t r = 0; r < rows; ++r) {
      const T* __restrict zr = z + r * wp + c0;
      T* __restrict gr = g + r * wp + c0;
      T* __restrict hr = h + r * wp + c0;
      for (int64_t c = 0; c < width; ++c) {
        const T xhat = (zr[c] - mean[c]) * rstd[c];
        const T p = sigmoid(gamma[c] * xhat + beta[c]);
        const T one_minus_alpha = T(1) - alpha[c];
        const T slope = alpha[c] + one_minus_alpha * p;
        const T g_arg = gr[c] * zr[c] * one_minus_alpha * p * (T(1) - p);
        const T g_xhat = g_arg * gamma[c];
        hr[c] = zr[c] * slope;
        tile[0][c] += gr[c] * zr[c] * (T(1) - p);
        tile[1][c] += g_arg * xhat;
        tile[2][c] += g_arg;
        tile[3][c] += g_xhat;
        tile[4][c] += g_xhat * xhat;
        gr[c] = gr[c] * slope + rstd[c] * g_xhat;
      }
    }
    for (int k = 0; k < 5; ++k)
      for (int64_t c = 0; c < width; ++c) acc[k * wp + c0 + c] += tile[k][c];
  }
}

// The statistics' term of dice_stored_rows' gradient: g -= rstd (mean(g_xhat) + xhat mean(g_xhat xhat)).
template <typename T>
DIN_EXT_INLINE void dice_finish_rows(const ActLayer<T>& a, int64_t wp, int64_t rows, const T* __restrict z,
                                     T* __restrict g) {
  const T* __restrict mean = a.mean.data();
  const T* __restrict rstd = a.rstd.data();
  const T* __restrict m1 = a.g_mean.data();
  const T* __restrict m2 = a.gx_mean.data();
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict zr = z + r * wp;
    T* __restrict gr = g + r * wp;
    for (int64_t c = 0; c < wp; ++c) gr[c] -= rstd[c] * (m1[c] + (zr[c] - mean[c]) * rstd[c] * m2[c]);
  }
}

// Either of them (dice_finish_rows where h is null), in a baseline, an AVX2+FMA and an AVX-512 build (the sigmoid's
// exp vectorizes in the latter two).
template <typename T>
DIN_EXT_INLINE void dice_stored_body(const ActLayer<T>& a, int64_t wp, int64_t rows, const T* z, T* g, T* h,
                                     double* acc) {
  if (h) {
    dice_stored_rows(a, wp, rows, z, g, h, acc);
  } else {
    dice_finish_rows(a, wp, rows, z, g);
  }
}
template <typename T>
void dice_stored_base(const ActLayer<T>& a, int64_t wp, int64_t rows, const T* z, T* g, T* h, double* acc) {
  dice_stored_body(a, wp, rows, z, g, h, acc);
}
#if DIN_EXT_HAVE_AVX2
template <typename T>
DIN_EXT_AVX2 void dice_stored_avx2(const ActLayer<T>& a, int64_t wp, int64_t rows, const T* z, T* g, T* h,
                                   double* acc) {
  dice_stored_body(a, wp, rows, z, g, h, acc);
}
template <typename T>
DIN_EXT_AVX512 void dice_stored_avx512(const ActLayer<T>& a, int64_t wp, int64_t rows, const T* z, T* g, T* h,
                                       double* acc) {
  dice_stored_body(a, wp, rows, z, g, h, acc);
}
#endif

// h null: dice_finish_rows.
template <typename T>
void dice_stored_tile(const ActLayer<T>& a, int64_t wp, int64_t rows, const T* z, T* g, T* h, double* acc) {
#if DIN_EXT_HAVE_AVX2
  if (has_avx512()) return dice_stored_avx512(a, wp, rows, z, g, h, acc);
  if (has_avx2_fma()) return dice_stored_avx2(a, wp, rows, z, g, h, acc);
#endif
  dice_stored_base(a, wp, rows, z, g, h, acc);
}

// The per-user terms of dc of a block's `users` users (DC [users, wp0], their queries Q [users, Dp], zero-padded)
// that layer1_backward_user left out: d(Wq + Wd) += DC^T Q and d/dq += DC (Wq + Wd) into gq [users, D], two products
// over the block's users in place of two H1 x D passes per user.
template <typename T>
void fold_user_dc(const Net<T>& net, int64_t users, const T* DC, const T* Q, const T* An, Vec<T>& GQ, Vec<T>& dA,
                  Partial<T>& part, T* gq) {
  const int64_t D = net.D, Dp = net.Dp, w0 = net.w[0], wp0 = net.wp[0];
  if (users == 0) return;
  const Gemm<T>& g = gemm<T>();
  dA.assign(wp0 * Dp, T(0));
  g.tn(users, wp0, Dp, DC, wp0, Q, Dp, dA.data(), Dp);
  for (int64_t h = 0; h < w0; ++h)
    for (int64_t d = 0; d < D; ++d) part.dA[h * D + d] += dA[h * Dp + d];
  GQ.resize(users * Dp);
  g.nn(users, w0, Dp, DC, wp0, An, Dp, nullptr, GQ.data(), Dp);
  for (int64_t u = 0; u < users; ++u)
    for (int64_t d = 0; d < D; ++d) gq[u * D + d] += GQ[u * Dp + d];
}

// The stored backward, from the scores down: hidden layer j = n-1 .. 0 in one pass over row tiles each (d/dh_j
// of every pair into a buffer [N, wp_j], with the weight gradient above and the Dice sums of layer j), the
// statistics' term of e_j added when the next pass (or layer 1's) reads it; then layer 1 per user as the
// recomputing gradient pass (its product is per user: the effective weight Weff_b).
template <typename T>
void stored_backward(Net<T>& net, const Problem<T>& pb, const std::vector<int64_t>& pairs, const T* saved,
                     const T* weight, const T* grad_score, const T* grad_out, const PairBlocks& blocks,
                     std::vector<Partial<T>>& partials, BackwardOutputs& outs) {
  const std::vector<int64_t> off = stored_offsets(net, pb.valid);
  const int64_t D = pb.D, n = net.n, wp0 = net.wp[0], wpn = net.wp[n];
  const T* scores = saved + off[n];
  at::Tensor above;  // d/dh_{j+1} of every pair [V, wp_{j+1}] (j + 1 < n), statistics' term not yet subtracted
  for (int64_t j = n - 1; j >= 0; --j) {
    const int64_t wj = net.wp[j], wa = net.wp[j + 1];
    const T* Zj = saved + off[j];
    const T* Za = saved + off[j + 1];
    at::Tensor here = at::empty({pb.valid * wj}, outs.grad_keys.options());
    T* dh = here.data_ptr<T>();
    T* e_above = j + 1 < n ? above.data_ptr<T>() : nullptr;
    at::parallel_for(0, blocks.count(), 1, [&](int64_t lo, int64_t hi) {
      const Gemm<T>& g = gemm<T>();
      Vec<T> top(e_above ? 0 : kTile * wa), h(kTile * wj), wt(e_above ? 0 : kTile);
      for (int64_t blk = lo; blk < hi; ++blk) {
        Partial<T>& part = partials[blk];
        for_row_tiles(pb, pairs, blocks.first[blk], blocks.first[blk + 1],
                      [&](int64_t row, int64_t rows, const Piece* pieces, int64_t count) {
          T* gz = top.data();
          if (e_above) {  // e_{j+1}, complete now that layer j+1's sums are
            gz = e_above + row * wa;
            dice_stored_tile<T>(net.acts[j + 1], wa, rows, Za + row * wa, gz, nullptr, nullptr);
          } else {  // d loss / d score, piece by piece (wt, the pooling weights, unused here)
            for (int64_t i = 0; i < count; ++i) {
              const Piece& pc = pieces[i];
              score_gradient_tile(pb, wpn, pc.b, PairTile{pc.t0, pc.rows, 0, 1}, scores + (row + pc.at) * wpn,
                                  weight, grad_score, grad_out, gz + pc.at * wpn, wt.data());
            }
          }
          T* d = dh + row * wj;
          g.nn(rows, net.w[j + 1], wj, gz, wa, net.Wn[j + 1].data(), wj, nullptr, d, wj);
          dice_stored_tile(net.acts[j], wj, rows, Zj + row * wj, d, h.data(), part.act[j].data());
          g.tn(rows, wa, wj, gz, wa, h.data(), wj, part.dW[j + 1].data(), wj);
          T* db = part.db[j + 1].data();
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t c = 0; c < wa; ++c) db[c] += gz[r * wa + c];
        });
      }
    });
    set_backward_sums(net, j, partials, pb.valid);
    above = here;
  }
  T* e0 = above.data_ptr<T>();
  T* gq_all = outs.grad_query.data_ptr<T>();
  T* gk_all = outs.grad_keys.data_ptr<T>();
  T* gv_all = outs.grad_values.numel() ? outs.grad_values.data_ptr<T>() : nullptr;
  const T* Z0 = saved + off[0];
  Vec<T> An(net.w[0] * net.Dp, T(0));  // A = Wq + Wd [w0, D], rows padded to Dp (fold_user_dc's product)
  for (int64_t h = 0; h < net.w[0]; ++h)
    std::copy(net.A.begin() + h * D, net.A.begin() + (h + 1) * D, An.begin() + h * net.Dp);
  at::parallel_for(0, blocks.count(), 1, [&](int64_t lo, int64_t hi) {
    Work<T> work(net);
    work.init_backward(net);
    Vec<T> DC, Q, GQ, dA;
    for (int64_t blk = lo; blk < hi; ++blk) {
      const int64_t first = blocks.first[blk], users = blocks.first[blk + 1] - first;
      DC.assign(users * wp0, T(0));
      Q.assign(users * net.Dp, T(0));
      for (int64_t b = first; b < first + users; ++b) {
        const T* q = pb.query + b * D;
        std::fill(gq_all + b * D, gq_all + (b + 1) * D, T(0));
        std::copy(q, q + D, Q.begin() + (b - first) * net.Dp);
        if (pb.lengths[b] == 0) continue;
        work.set_user_weff(net, q);
        work.clear_user_gradients();
        for (int64_t t0 = 0; t0 < pb.lengths[b]; t0 += kTile) {
          const int64_t rows = std::min(kTile, pb.lengths[b] - t0), row = pb.starts[b] + t0, p = pairs[b] + t0;
          for (int64_t r = 0; r < rows; ++r) {  // the pooling weights (score_gradient_tile's, without its dots)
            work.wt[r] = pb.norm == Normalization::kSoftmax ? weight[row + r] : pb.scale * scores[(p + r) * wpn];
          }
          dice_stored_tile<T>(net.acts[0], wp0, rows, Z0 + p * wp0, e0 + p * wp0, nullptr, nullptr);
          layer1_backward_tile(net, pb, work, b, t0, rows, e0 + p * wp0, grad_out, gk_all, gv_all);
        }
        layer1_backward_user(net, work, partials[blk], q, gq_all + b * D, false);
        std::copy(work.dc.begin(), work.dc.end(), DC.begin() + (b - first) * wp0);
      }
      fold_user_dc(net, users, DC.data(), Q.data(), An.data(), GQ, dA, partials[blk], gq_all + first * D);
    }
  });
}

void check_stored(const AttentionArgs& args) {
  TORCH_CHECK(args.act == Activation::kDice && args.training && !args.shape.multi && !args.shape.hidden.empty(),
              "din_ext: the stored-activation attention kernels are for training Dice with a query [B, D] and at "
              "least one hidden layer");
}

template <typename T>
int64_t stored_width(at::TensorList weights) {
  int64_t width = 0;
  for (const auto& w : weights) width += padded<T>(w.size(0));
  return width;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_stored_forward(
    const at::Tensor& query_, const at::Tensor& keys_, const std::optional<at::Tensor>& values_,
    const at::Tensor& starts_, const at::Tensor& lengths_, int64_t max_len, at::TensorList weights,
    at::TensorList biases, const at::Tensor& act_params, c10::string_view activation, c10::string_view normalization,
    double score_scale, bool training, double eps) {
  const AttentionForwardArgs args = attention_forward_args(query_, keys_, values_, starts_, lengths_, max_len,
                                                           weights, biases, act_params, activation, normalization,
                                                           score_scale, training, eps);
  check_stored(args);
  at::Tensor saved;
  AT_DISPATCH_FLOATING_TYPES(args.query.scalar_type(), "din_ext_attention_stored_forward", [&] {
    saved = at::empty({args.shape.num_keys * stored_width<scalar_t>(weights)}, args.query.options());
    Net<scalar_t> net = pack<scalar_t>(args.shape.dim, weights, biases, act_params, args.act, training, eps,
                                       args.stats);
    const Problem<scalar_t> pb = make_problem<scalar_t>(args);
    choose_layer1(net, pb.B, pb.C, pb.valid);
    stored_forward(net, pb, saved.data_ptr<scalar_t>(),
                   args.stats.data_ptr<scalar_t>(), args.shape.hidden_total, eps, args.out.data_ptr<scalar_t>());
  });
  return {args.out, args.stats, saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>
attention_stored_backward(const at::Tensor& grad_out_, const at::Tensor& query_, const at::Tensor& keys_,
                          const std::optional<at::Tensor>& values_, const at::Tensor& starts_,
                          const at::Tensor& lengths_, int64_t max_len, at::TensorList weights, at::TensorList biases,
                          const at::Tensor& act_params, const at::Tensor& stats_, const at::Tensor& saved_,
                          c10::string_view activation, c10::string_view normalization, double score_scale,
                          bool training, double eps) {
  const AttentionBackwardArgs args =
      attention_backward_args(grad_out_, query_, keys_, values_, starts_, lengths_, max_len, weights, biases,
                              act_params, stats_, activation, normalization, score_scale, training, eps, false);
  check_stored(args);
  zero_uncovered_rows(args);
  const AttentionShape& shape = args.shape;
  const at::Tensor &query = args.query, &grad_out = args.grad_out;
  BackwardOutputs outs{at::empty_like(query), args.grad_keys, args.grad_values};
  std::vector<at::Tensor> grad_weights(weights.size()), grad_biases(weights.size());
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "din_ext_attention_stored_backward", [&] {
    using T = scalar_t;
    const int64_t numel = shape.num_keys * stored_width<T>(weights);
    TORCH_CHECK(saved_.dim() == 1 && saved_.numel() == numel && saved_.scalar_type() == query.scalar_type() &&
                    saved_.device() == query.device(),
                "din_ext: saved must be the stored forward's [", numel, "] activations, got ", saved_.scalar_type(),
                " ", saved_.sizes());
    const at::Tensor saved = saved_.contiguous();
    Net<T> net = pack<T>(shape.dim, weights, biases, act_params, args.act, training, eps, args.stats);
    const Problem<T> pb = make_problem<T>(args);
    choose_layer1(net, pb.B, pb.C, pb.valid);
    const std::vector<int64_t> pairs = pair_starts(pb);
    Vec<T> weight, grad_score;
    if (args.norm == Normalization::kSoftmax) {
      weight.resize(shape.num_keys);
      grad_score.resize(shape.num_keys);
      const T* scores = saved.data_ptr<T>() + stored_offsets(net, pb.valid)[net.n];
      const int64_t wpn = net.wp[net.n];
      at::parallel_for(0, pb.B, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t b = lo; b < hi; ++b) {
          for (int64_t t = 0; t < pb.lengths[b]; ++t) {
            weight[pb.starts[b] + t] = pb.scale * scores[(pairs[b] + t) * wpn];
          }
          if (pb.lengths[b] > 0) score_gradients_user(pb, grad_out.data_ptr<T>(), b, weight.data(), grad_score.data());
        }
      });
    }
    const PairBlocks blocks = pair_blocks(pb, kBlockPairs, 1);
    std::vector<Partial<T>> partials(blocks.count());
    zero_partials(partials, net);
    if (pb.valid > 0) {
      stored_backward(net, pb, pairs, saved.data_ptr<T>(), weight.data(), grad_score.data(), grad_out.data_ptr<T>(),
                      blocks, partials, outs);
    } else {
      outs.grad_query.zero_();
    }
    write_gradients(net, args, partials, grad_weights, grad_biases, args.grad_act_params);
  });
  return {outs.grad_query, outs.grad_keys, outs.grad_values, grad_weights, grad_biases, args.grad_act_params};
}

}  // namespace

int64_t stored_row_bytes(at::TensorList weights, at::ScalarType dtype) {
  int64_t bytes = 0;
  AT_DISPATCH_FLOATING_TYPES(dtype, "din_ext_attention_stored_row_bytes", [&] {
    // saved (every z_j), and the backward's d/dh_j and e_{j+1} of the layer it works on.
    int64_t buffers = 0;
    for (size_t j = 0; j + 1 < weights.size(); ++j) {
      const int64_t above = j + 2 < weights.size() ? padded<scalar_t>(weights[j + 1].size(0)) : 0;
      buffers = std::max(buffers, padded<scalar_t>(weights[j].size(0)) + above);
    }
    bytes = (stored_width<scalar_t>(weights) + buffers) * static_cast<int64_t>(sizeof(scalar_t));
  });
  return bytes;
}

TORCH_LIBRARY_IMPL(din_ext, CPU, m) {
  m.impl("local_activation_attention", &attention_forward);
  m.impl("local_activation_attention_backward", &attention_backward);
  m.impl("_local_activation_attention_stored", &attention_stored_forward);
  m.impl("_local_activation_attention_stored_backward", &attention_stored_backward);
}

}  // namespace din_ext::cpu
