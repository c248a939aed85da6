"""Triton backend of din_ext's local-activation attention: fused varlen forward and backward kernels.

The math (the layer-1 split z_0 = c_b + Weff_b k, the activations, pooling, the backward through Dice's batch
statistics) is docs/design.md sections 1.1-1.3; the op contract (starts/lengths rows, packed act_params, stats) is
section 2. What follows is particular to these kernels.

Structure (the cpu backend's, csrc/cpu/attention.cpp, on a GPU grid):
- forward: one program per user walks its rows in tiles of BLOCK_L; the per-user c_b and Weff_b are built once, each
  tile costs one [BLOCK_L, D] x [D, H1] tl.dot and one [BLOCK_L, H_{j-1}] x [H_{j-1}, H_j] tl.dot per hidden layer;
  nothing of size [N, H] is written. Training-mode Dice first runs one statistics pass per hidden layer (each program
  writes the shifted sums of its user; they are added up in a fixed order), then the pooling pass. Softmax pooling is
  an online softmax over the tiles; the forward keeps each user's log-sum-exp for the backward.
- backward: three kernels by default (GRADS_INPUTS, GRADS_LAYER1, GRADS_HIDDEN; one fused kernel with
  DIN_EXT_TRITON_SPLIT_BACKWARD=0), each recomputing the forward of every tile: one program per user back-propagates
  to the inputs (and writes each user's Weff_b^T for the next two: weff_scratch); a fixed number of programs
  (NUM_BLOCKS), each owning a contiguous range of users, accumulates the parameter gradients of its users (layer 1's
  in one kernel, the others in the next), and the per-program partials are added up in program order. Layer 1 of a
  [B, D] query: dPc_b = m_b diag(q_b) with m_b = sum_t gz_t k_t^T, so only m_b is accumulated in registers, and added
  to the program's rows after each user. Each
  user's dc_b = sum_t d/dz_0 goes out instead of the (Wq + Wd) terms (grad_query += (Wq + Wd)^T dc_b,
  grad(Wq + Wd) = sum_b dc_b q_b^T), which the host finishes with two small float64 products: two fewer [H1, D]
  tiles held in registers. Training-mode Dice first runs one pass per
  hidden layer (top down) gathering sum(g_xhat) and sum(g_xhat * xhat), the terms of the exact gradient through the
  batch statistics.
  Softmax uses delta_b = grad_out_b . out_b (flash-attention's trick) instead of a separate scoring sweep.
- multi-candidate queries [B, C, D] (MULTI; C = 1 runs the path above as [B, D]): a tile holds BLOCK_L (candidate,
  behaviour) pairs, BLOCK_C candidates x BLOCK_L // BLOCK_C behaviours, row i * (BLOCK_L // BLOCK_C) + t; its layer 1
  is z_0 = c_{b,c} + Kc k + Pc (q * k), two [BLOCK_L, D] x [D, H1] tl.dots (Weff differs per candidate), with c_{b,c}
  computed once on the host (CB); the hidden layers and their backward are the 2-D path's on the pair rows. The
  forward's grid is (user, candidate block): each program loads a key tile once for its BLOCK_C candidates (with
  their own online softmax). The backward's program walks each user's key tiles once and, per tile, the user's
  candidates BLOCK_C at a time, so grad_keys/grad_values are summed over the candidates in registers and stored once
  per tile; the per-candidate gq and dc are summed over the tiles in zero-filled scratch that only the user's
  program touches (read-modify-write, a barrier after each). Dice statistics count every valid pair.
Every reduction over users goes through per-program partial sums added in a fixed order, so the results are
bitwise reproducible run to run. Hidden layers: at most MAX_HIDDEN, widths padded to powers of two (>= 16).
"""

from __future__ import annotations

import math
import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from din_ext.contract import (ACTIVATION_IDS, DICE_ALPHA, DICE_BETA, DICE_RUNNING_MEAN, DICE_RUNNING_VAR, PRELU_SLOPE,
                              acc_dtype)
from din_ext.kernels.common import interpreting, sigmoid

MAX_HIDDEN = 4
NUM_BLOCKS = 128  # programs of the backward: fixes the summation order of the parameter gradients
# What a backward gradient pass computes: everything in one kernel, or three kernels that each recompute the
# forward: the input gradients (GQ, DC, GK, GV; one program per user), layer 1's parameter gradients (dKc, dPc) and
# the other parameter gradients (hidden and score linears, activation parameters), each as per-program partial sums.
# Split is the default: the fused kernel holds the recomputation, the input gradients and every parameter
# accumulator live at once and spills at every config on sm_90, and so does one kernel for all the parameter
# gradients, whereas each of the three fits in 255 registers (bench/results/gpu_static.md lists the
# exceptions: fp32).
# DIN_EXT_TRITON_SPLIT_BACKWARD=0 selects the fused kernel (to compare on a GPU).
GRADS_ALL = tl.constexpr(0)
GRADS_INPUTS = tl.constexpr(1)
GRADS_LAYER1 = tl.constexpr(2)
GRADS_HIDDEN = tl.constexpr(3)
SPLIT_PASSES = (GRADS_INPUTS, GRADS_LAYER1, GRADS_HIDDEN)  # the split backward's gradient passes, in launch order
MAX_BLOCK_C = 4  # candidates per pair tile (BLOCK_L // BLOCK_C behaviours each) of a multi-candidate query
# The activation ids of the ACT constexpr (din_ext.contract's).
DICE, SIGMOID, PRELU, RELU = (tl.constexpr(ACTIVATION_IDS[name]) for name in ("dice", "sigmoid", "prelu", "relu"))

# CONSTS holds CONST_ROWS rows per hidden layer j, row const_row(j, ROW_*), then one row for score_scale.
CONST_ROWS = 8
ROW_ALPHA = tl.constexpr(0)  # Dice's alpha, PReLU's slope
ROW_GAMMA = tl.constexpr(1)
ROW_BETA = tl.constexpr(2)
ROW_MEAN = tl.constexpr(3)  # the mean of the Dice statistics (batch ones in training, running ones in eval)
ROW_RSTD = tl.constexpr(4)  # 1 / sqrt(var + eps); 1 on padding features
ROW_G_MEAN = tl.constexpr(5)  # backward, Dice training: batch mean of g_xhat
ROW_GX_MEAN = tl.constexpr(6)  # backward, Dice training: batch mean of g_xhat * xhat (row 7 is unused)
SCALE_ROW = tl.constexpr(CONST_ROWS * MAX_HIDDEN)  # the row of CONSTS that holds score_scale


@triton.constexpr_function
def const_row(j, row):
    """The row of CONSTS that holds row ``row`` (a ROW_*) of hidden layer ``j``; host and jit code alike."""
    return CONST_ROWS * j + row


def _configs(configs, maxnreg=None, stages=2):
    """Autotuning configs (BLOCK_L, num_warps) or (BLOCK_L, num_warps, num_stages), with ptxas's register limit
    ``maxnreg`` (None: its own choice) and ``stages`` software-pipelining stages where a config names none; one when
    interpreting, or when DIN_EXT_TRITON_AUTOTUNE=0: the first. For bf16 and H = (80, 40) on sm_90 every config of
    the forward and the split backward compiles without register spills at D = 32, 64, 128, with softmax and with
    several candidates under Triton 3.6; fp32 spills 8 bytes in the hidden parameter pass with TF32 and in every
    backward pass without it, less with its own configs (_backward_fp32_inputs_kernel; bench/results/gpu_static.md)."""
    if interpreting():  # nothing to tune, and large tiles keep the interpreter fast
        return [triton.Config({"BLOCK_L": 32}, num_warps=4)]
    if os.environ.get("DIN_EXT_TRITON_AUTOTUNE", "1") == "0":
        configs = configs[:1]
    return [triton.Config({"BLOCK_L": block}, num_warps=warps, num_stages=rest[0] if rest else stages, maxnreg=maxnreg)
            for block, warps, *rest in configs]


_KEY = ["b_bucket", "l_bucket", "D", "DV", "N0", "N1", "N2", "N3", "NUM_HIDDEN", "ACT", "SOFTMAX", "STOP", "MULTI",
        "BLOCK_C"]


# ---------------------------------------------------------------------------------------------------------------
# Device helpers



@triton.jit
def _mm(a, b, ACC: tl.constexpr, TF32: tl.constexpr):
    """a @ b with both operands in b's dtype (the inputs' dtype: tensor cores for bf16/fp16, tf32 when torch allows
    it for float32) and ACC accumulation (float32, or float64 for float64 inputs)."""
    if TF32:
        out = tl.dot(a.to(b.dtype), b, input_precision="tf32", out_dtype=ACC)
    else:
        out = tl.dot(a.to(b.dtype), b, input_precision="ieee", out_dtype=ACC)
    return out


@triton.jit
def _mm_tn(a, b, ACC: tl.constexpr, IN: tl.constexpr, TF32: tl.constexpr):
    """a^T @ b for a [M, K], b [M, N]: a sum over the rows of a tile, operands in IN, ACC accumulation."""
    if TF32:
        out = tl.dot(tl.trans(a.to(IN)), b.to(IN), input_precision="tf32", out_dtype=ACC)
    else:
        out = tl.dot(tl.trans(a.to(IN)), b.to(IN), input_precision="ieee", out_dtype=ACC)
    return out


@triton.jit
def _load_mat(W, n_rows, n_cols, row_stride, ROWS_P: tl.constexpr, COLS_P: tl.constexpr):
    """W [ROWS_P, COLS_P] (element (r, c) at W + r * row_stride + c), zero-padded."""
    r = tl.arange(0, ROWS_P)[:, None]
    c = tl.arange(0, COLS_P)[None, :]
    return tl.load(W + r * row_stride + c, mask=(r < n_rows) & (c < n_cols), other=0.0)


@triton.jit
def _load_t(W, n_rows, n_cols, row_stride, COLS_P: tl.constexpr, ROWS_P: tl.constexpr):
    """The transpose [COLS_P, ROWS_P] of W [n_rows, n_cols] (row stride row_stride), zero-padded."""
    c = tl.arange(0, COLS_P)[:, None]
    r = tl.arange(0, ROWS_P)[None, :]
    return tl.load(W + r * row_stride + c, mask=(r < n_rows) & (c < n_cols), other=0.0)


@triton.jit
def _load_vec(X, n, P: tl.constexpr):
    offs = tl.arange(0, P)
    return tl.load(X + offs, mask=offs < n, other=0.0)


@triton.jit
def _store_mat(X, x, ROWS_P: tl.constexpr, COLS_P: tl.constexpr):
    r = tl.arange(0, ROWS_P)[:, None]
    c = tl.arange(0, COLS_P)[None, :]
    tl.store(X + r * COLS_P + c, x)


@triton.jit
def _const(CONSTS, J: tl.constexpr, ROW: tl.constexpr, P: tl.constexpr, HMAXP: tl.constexpr):
    """Row ROW of hidden layer J's feature constants, [1, P] (padding features: 0, and rstd 1)."""
    return tl.load(CONSTS + const_row(J, ROW) * HMAXP + tl.arange(0, P))[None, :]


@triton.jit
def _dice_consts(CONSTS, J: tl.constexpr, P: tl.constexpr, HMAXP: tl.constexpr):
    """Dice's alpha, gamma, beta, mean, rstd of hidden layer J, [1, P] each."""
    alpha = _const(CONSTS, J, ROW_ALPHA, P, HMAXP)
    gamma = _const(CONSTS, J, ROW_GAMMA, P, HMAXP)
    beta = _const(CONSTS, J, ROW_BETA, P, HMAXP)
    mean = _const(CONSTS, J, ROW_MEAN, P, HMAXP)
    rstd = _const(CONSTS, J, ROW_RSTD, P, HMAXP)
    return alpha, gamma, beta, mean, rstd


@triton.jit
def _act_fwd(z, CONSTS, J: tl.constexpr, P: tl.constexpr, HMAXP: tl.constexpr, ACT: tl.constexpr,
             ALPHA_ONCE: tl.constexpr):
    if ACT == DICE:
        alpha, gamma, beta, mean, rstd = _dice_consts(CONSTS, J, P, HMAXP)
        p = sigmoid(gamma * ((z - mean) * rstd) + beta)
        # Two roundings of h = z (alpha + (1 - alpha) p), each the one that ptxas fits with fewer registers on sm_90
        # (bench/results/gpu_static.md): ALPHA_ONCE, the forward kernel's, keeps no 1 - alpha [P] live through its
        # tile loop (the D = 32 forward then fits two blocks' 128 registers, 4 B of spills before); the backward's
        # recomputation keeps the other (with ALPHA_ONCE its multi-candidate hidden pass spills 24 B, 0 without).
        if ALPHA_ONCE:
            h = z * (p + alpha * (1.0 - p))
        else:
            h = z * (alpha + (1.0 - alpha) * p)
    elif ACT == SIGMOID:
        h = sigmoid(z)
    elif ACT == PRELU:
        h = tl.where(z > 0, z, _const(CONSTS, J, ROW_ALPHA, P, HMAXP) * z)
    else:  # relu
        h = tl.where(z > 0, z, 0.0)
    return h


@triton.jit
def _act_bwd(g, z, valid, CONSTS, J: tl.constexpr, P: tl.constexpr, HMAXP: tl.constexpr, ACT: tl.constexpr):
    """d/dh g (zero on invalid rows) -> d/dz (zero on invalid rows), plus the tile's per-feature sums
    (d alpha, d gamma, d beta) for Dice, (d slope, 0, 0) for PReLU. Dice's other two, sum g_xhat = gamma d beta and
    sum g_xhat * xhat = gamma d gamma (gamma is per feature), are formed from these once, after the last tile
    (_store_sums, _gamma): two fewer [P] accumulators a layer live through the loops.

    Dice: g_arg = g z (1 - alpha) p (1 - p) (d/d sigmoid argument), g_xhat = gamma g_arg,
    dz = g (alpha + (1 - alpha) p) + rstd (g_xhat - g_mean - xhat gx_mean), where g_mean and gx_mean are the batch
    means of g_xhat and g_xhat * xhat in training (BatchNorm's backward) and zero in eval.
    """
    zero = tl.zeros([P], dtype=z.dtype)
    s0, s1, s2 = zero, zero, zero
    if ACT == DICE:
        alpha, gamma, beta, mean, rstd = _dice_consts(CONSTS, J, P, HMAXP)
        g_mean = _const(CONSTS, J, ROW_G_MEAN, P, HMAXP)
        gx_mean = _const(CONSTS, J, ROW_GX_MEAN, P, HMAXP)
        xhat = (z - mean) * rstd
        p = sigmoid(gamma * xhat + beta)
        one_minus_alpha = 1.0 - alpha
        g_arg = g * z * one_minus_alpha * p * (1.0 - p)
        g_xhat = g_arg * gamma
        s0 = tl.sum(g * z * (1.0 - p), 0)
        s1 = tl.sum(g_arg * xhat, 0)
        s2 = tl.sum(g_arg, 0)
        gz = g * (alpha + one_minus_alpha * p) + rstd * (g_xhat - g_mean - xhat * gx_mean)
    elif ACT == SIGMOID:
        y = sigmoid(z)
        gz = g * y * (1.0 - y)
    elif ACT == PRELU:
        s0 = tl.sum(tl.where(z > 0, 0.0, g * z), 0)
        gz = tl.where(z > 0, g, g * _const(CONSTS, J, ROW_ALPHA, P, HMAXP))
    else:
        gz = tl.where(z > 0, g, 0.0)
    gz = tl.where(valid[:, None], gz, 0.0)
    return gz, s0, s1, s2


@triton.jit
def _layer0_t(KPT, DP: tl.constexpr, P0: tl.constexpr):
    """The candidate-independent blocks of layer 1 transposed, Kc^T = (Wk - Wd)^T and Pc^T = Wp^T [DP, P0], from
    KPT (made by the host: accumulation dtype, zero-padded, contiguous). Compile-time strides and no masks let the
    addresses be one base plus immediates: nothing of size [DP, P0] but the values is kept for reloading them."""
    offs = tl.arange(0, DP)[:, None] * P0 + tl.arange(0, P0)[None, :]
    return tl.load(KPT + offs), tl.load(KPT + DP * P0 + offs)


@triton.jit
def _user_layer0(Q, CB, KPT, b, length, D, DP: tl.constexpr, P0: tl.constexpr, ACC: tl.constexpr,
                 IN: tl.constexpr):
    """User b's layer-1 terms: q [DP] and c_b [P0] in ACC (c_b = (Wq + Wd) q + b_0 is CB's row b, made by the host),
    and Weff_b^T = Kc^T + diag(q) Pc^T [DP, P0], summed in ACC and rounded once to IN. ``length``: user b's row
    count (>= 0)."""
    offs_d = tl.arange(0, DP)
    q = tl.load(Q + b * D + offs_d, mask=offs_d < D, other=0.0).to(ACC)
    c = tl.load(CB + b * P0 + tl.arange(0, P0))
    # min(length, 0) = 0, which the compiler cannot prove: the loads stay in a backward program's loop over its
    # users, so Kc^T and Pc^T live only until Weff_b is formed. Hoisted out of it (they are loop-invariant), they would
    # hold 2 DP P0 values in ACC, 64 registers a thread at D = 64 with 8 warps, for the whole kernel and spill.
    kc_t, pc_t = _layer0_t(KPT + tl.minimum(length, 0), DP, P0)
    return q, c, (kc_t + pc_t * q[:, None]).to(IN)


@triton.jit
def _candidates(Q, CB, b, first_c, NC, D, DP: tl.constexpr, P0: tl.constexpr, BLOCK_C: tl.constexpr,
                ACC: tl.constexpr):
    """Row b's candidates first_c .. first_c + BLOCK_C - 1 (those past NC masked out): their flat indices b * NC + c
    [BLOCK_C], mask [BLOCK_C], queries [BLOCK_C, DP] and c_{b,c} [BLOCK_C, P0] (ACC; zero when masked)."""
    offs_c = first_c + tl.arange(0, BLOCK_C)
    cmask = offs_c < NC
    pair = b * NC + offs_c
    offs_d = tl.arange(0, DP)
    q = tl.load(Q + pair[:, None] * D + offs_d[None, :], mask=cmask[:, None] & (offs_d < D)[None, :],
                other=0.0).to(ACC)
    c = tl.load(CB + pair[:, None] * P0 + tl.arange(0, P0)[None, :], mask=cmask[:, None], other=0.0).to(ACC)
    return pair, cmask, q, c


@triton.jit
def _pairs_z0(k, q, c, kc_t, pc_t, BLOCK_C: tl.constexpr, KT: tl.constexpr, ACC: tl.constexpr, TF32: tl.constexpr):
    """Layer 1 of a pair tile: row i * KT + t pairs candidate i (q [BLOCK_C, DP], c [BLOCK_C, P0]) with key t
    (k [KT, DP]): z_0 = c_i + Kc k_t + Pc (q_i * k_t). Returns the keys repeated per candidate and the products
    q_i * k_t, [BLOCK_C * KT, DP] in ACC, and z_0 [BLOCK_C * KT, P0]."""
    kf = k.to(ACC)
    km = tl.reshape(tl.broadcast_to(kf[None, :, :], [BLOCK_C, KT, k.shape[1]]), [BLOCK_C * KT, k.shape[1]])
    qk = tl.reshape(q[:, None, :] * kf[None, :, :], [BLOCK_C * KT, k.shape[1]])
    cm = tl.reshape(tl.broadcast_to(c[:, None, :], [BLOCK_C, KT, c.shape[1]]), [BLOCK_C * KT, c.shape[1]])
    z0 = _mm(km, kc_t, ACC, TF32) + _mm(qk, pc_t, ACC, TF32) + cm
    return km, qk, z0


@triton.jit
def _mlp_tile(z0, w1t, b1, w2t, b2, w3t, b3, ws, bs, CONSTS,
              NUM_HIDDEN: tl.constexpr, UPTO: tl.constexpr, ACT: tl.constexpr,
              P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr, HMAXP: tl.constexpr,
              ACC: tl.constexpr, TF32: tl.constexpr, ALPHA_ONCE: tl.constexpr):
    """Forward of a tile from its layer-1 output z0 [BLOCK_L, P0] up to z_UPTO; with UPTO = NUM_HIDDEN up to the
    scores s [BLOCK_L]. Returns z_0..z_3, h_0..h_3, s; what was not computed repeats z_0 (and s = row sums of z_0).
    ALPHA_ONCE: see _act_fwd."""
    z1, z2, z3, h0, h1, h2, h3 = z0, z0, z0, z0, z0, z0, z0
    s = tl.sum(z0, 1)  # without hidden layers z_0 is the score (its padding columns are 0)
    if UPTO >= 1:
        h0 = _act_fwd(z0, CONSTS, 0, P0, HMAXP, ACT, ALPHA_ONCE)
        if NUM_HIDDEN == 1:
            s = tl.sum(h0 * ws[None, :], 1) + bs
        else:
            z1 = _mm(h0, w1t, ACC, TF32) + b1[None, :]
    if UPTO >= 2:
        h1 = _act_fwd(z1, CONSTS, 1, P1, HMAXP, ACT, ALPHA_ONCE)
        if NUM_HIDDEN == 2:
            s = tl.sum(h1 * ws[None, :], 1) + bs
        else:
            z2 = _mm(h1, w2t, ACC, TF32) + b2[None, :]
    if UPTO >= 3:
        h2 = _act_fwd(z2, CONSTS, 2, P2, HMAXP, ACT, ALPHA_ONCE)
        if NUM_HIDDEN == 3:
            s = tl.sum(h2 * ws[None, :], 1) + bs
        else:
            z3 = _mm(h2, w3t, ACC, TF32) + b3[None, :]
    if UPTO >= 4:
        h3 = _act_fwd(z3, CONSTS, 3, P3, HMAXP, ACT, ALPHA_ONCE)
        s = tl.sum(h3 * ws[None, :], 1) + bs
    return z0, z1, z2, z3, h0, h1, h2, h3, s


@triton.jit
def _load_mlp(W1, B1, W2, B2, W3, B3, WS, BS, N0, N1, N2, N3, NUM_HIDDEN: tl.constexpr,
              P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr, ACC: tl.constexpr,
              IN: tl.constexpr):
    """The hidden-to-hidden linears transposed (W_j^T [P_{j-1}, P_j], in IN) with their biases, and the score layer
    (ws [P_last], bs); absent layers get small zero placeholders."""
    w1t = tl.zeros([16, 16], dtype=IN)
    w2t, w3t = w1t, w1t
    b1 = tl.zeros([16], dtype=ACC)
    b2, b3, ws = b1, b1, b1
    bs = tl.load(BS).to(ACC)
    if NUM_HIDDEN >= 2:
        w1t = _load_t(W1, N1, N0, N0, P0, P1).to(IN)
        b1 = _load_vec(B1, N1, P1).to(ACC)
    if NUM_HIDDEN >= 3:
        w2t = _load_t(W2, N2, N1, N1, P1, P2).to(IN)
        b2 = _load_vec(B2, N2, P2).to(ACC)
    if NUM_HIDDEN >= 4:
        w3t = _load_t(W3, N3, N2, N2, P2, P3).to(IN)
        b3 = _load_vec(B3, N3, P3).to(ACC)
    if NUM_HIDDEN == 1:
        ws = _load_vec(WS, N0, P0).to(ACC)
    if NUM_HIDDEN == 2:
        ws = _load_vec(WS, N1, P1).to(ACC)
    if NUM_HIDDEN == 3:
        ws = _load_vec(WS, N2, P2).to(ACC)
    if NUM_HIDDEN == 4:
        ws = _load_vec(WS, N3, P3).to(ACC)
    return w1t, b1, w2t, b2, w3t, b3, ws, bs


# ---------------------------------------------------------------------------------------------------------------
# Forward


# Configs that spilled on sm_90 in some case of bench/results/gpu_static.md are dropped: BLOCK_L = 64 at 8 warps
# (0.6-0.9 KB in every case), BLOCK_L = 32 at 4 warps (D = 128 and C >= 4 candidates, 8-24 B) and BLOCK_L = 16 at
# 4 warps (C >= 4 candidates, 24 B). BLOCK_L = 16 at 8 warps spills in none, and fits 2 blocks per SM at D = 32, 64.
@triton.autotune(configs=_configs([(32, 8), (16, 8)]), key=_KEY)
@triton.jit
def _forward_kernel(
    Q,  # [B, D] queries, or [B, NC, D] (MULTI)
    K,  # [N, D] keys, row-major
    V,  # [N, DV] values (K itself when the keys are the values)
    STARTS,  # [B] int64: user b's rows are STARTS[b] .. STARTS[b] + LENGTHS[b] - 1
    LENGTHS,  # [B] int64
    W0, B0,  # first linear [N0, 4D], [N0] (the forward reads layer 1 as CB and KPT; the backward W0 untransposed)
    W1, B1, W2, B2, W3, B3,  # hidden-to-hidden linears [N_j, N_{j-1}], [N_j] (placeholders when absent)
    WS, BS,  # score linear [1, N_last], [1]
    CONSTS,  # [CONST_ROWS * MAX_HIDDEN + 1, HMAXP] activation constants (accumulation dtype); last: score_scale
    CB,  # [B * NC, P0] c_{b,c} = (Wq + Wd) q_{b,c} + b_0 (accumulation dtype, zero padding; NC = 1 unless MULTI)
    KPT,  # [2, DP, P0] Kc^T = (Wk - Wd)^T, Pc^T = Wp^T (accumulation dtype, zero padding)
    OUT,  # [B, DV] pooled output (pooling pass); [B, NC, DV] (MULTI)
    LSE,  # [B] log-sum-exp of the scaled scores (softmax pooling pass; accumulation dtype); [B, NC] (MULTI)
    PART,  # [programs, 2, PS] shifted sum and sum of squares of z_STOP over the program's rows (statistics pass)
    SHIFT,  # [NS] bias of layer STOP, the shift of the statistics sums
    D, DV,  # key and value widths
    N0, N1, N2, N3,  # hidden widths (1 for absent layers; N0 = 1 without hidden layers)
    NS,  # width of layer STOP
    NC,  # candidates per user (1 unless MULTI)
    b_bucket, l_bucket,  # autotuning keys: power-of-two B, bucketed max_len
    NUM_HIDDEN: tl.constexpr,  # number of hidden layers (0 .. MAX_HIDDEN)
    ACT: tl.constexpr,  # DICE, SIGMOID, PRELU or RELU
    SOFTMAX: tl.constexpr,  # softmax-normalized pooling weights
    STOP: tl.constexpr,  # -1: pooling pass; j >= 0: statistics pass of hidden layer j
    MULTI: tl.constexpr,  # NC candidates per user: program (b, i) scores candidates i * BLOCK_C .. of user b
    DP: tl.constexpr, DVP: tl.constexpr,  # padded D, DV
    P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr,  # padded hidden widths
    PS: tl.constexpr,  # padded width of layer STOP
    HMAXP: tl.constexpr,  # row length of CONSTS
    TF32: tl.constexpr,  # float32 products on tf32 tensor cores
    BLOCK_C: tl.constexpr,  # candidates per program (1 unless MULTI)
    BLOCK_L: tl.constexpr,  # rows per tile: (candidate, behaviour) pairs, BLOCK_L // BLOCK_C behaviours
):
    ACC = CONSTS.dtype.element_ty  # accumulation dtype
    IN = K.dtype.element_ty  # input dtype (the tl.dot operands)
    b = tl.program_id(0).to(tl.int64)
    length = tl.load(LENGTHS + b)
    start = tl.load(STARTS + b)
    if MULTI:
        part_row = b * tl.num_programs(1) + tl.program_id(1)
        first_c = tl.program_id(1).to(tl.int64) * BLOCK_C
        pair, cmask, qb, cb = _candidates(Q, CB, b, first_c, NC, D, DP, P0, BLOCK_C, ACC)
        kc_t, pc_t = _layer0_t(KPT, DP, P0)
        kc_t, pc_t = kc_t.to(IN), pc_t.to(IN)
        acc = tl.zeros([BLOCK_C, DVP], dtype=ACC)
        row_max = tl.where(cmask, float("-inf"), 0.0).to(ACC)  # 0 on masked candidates: no inf - inf
        denom = tl.zeros([BLOCK_C], dtype=ACC)
    else:
        part_row = b
        _, c0, weff_t = _user_layer0(Q, CB, KPT, b, length, D, DP, P0, ACC, IN)
        acc = tl.zeros([DVP], dtype=ACC)
        row_max = tl.full([1], float("-inf"), ACC)
        denom = tl.zeros([1], dtype=ACC)
    w1t, b1, w2t, b2, w3t, b3, ws, bs = _load_mlp(W1, B1, W2, B2, W3, B3, WS, BS, N0, N1, N2, N3, NUM_HIDDEN,
                                                  P0, P1, P2, P3, ACC, IN)
    scale = tl.load(CONSTS + SCALE_ROW * HMAXP)
    offs_l = tl.arange(0, BLOCK_L)
    offs_k = tl.arange(0, BLOCK_L // BLOCK_C)
    offs_d = tl.arange(0, DP)
    offs_v = tl.arange(0, DVP)
    offs_s = tl.arange(0, PS)
    shift = tl.load(SHIFT + offs_s, mask=offs_s < NS, other=0.0).to(ACC)
    sum1 = tl.zeros([PS], dtype=ACC)
    sum2 = tl.zeros([PS], dtype=ACC)
    for t0 in range(0, length, BLOCK_L // BLOCK_C):
        rows = t0 + offs_k
        kvalid = rows < length
        r = start + rows
        k = tl.load(K + r[:, None] * D + offs_d[None, :], mask=kvalid[:, None] & (offs_d < D)[None, :], other=0.0)
        if MULTI:  # the tile's keys, read once, against the program's candidates
            _, _, z0 = _pairs_z0(k, qb, cb, kc_t, pc_t, BLOCK_C, BLOCK_L // BLOCK_C, ACC, TF32)
            valid = (t0 + offs_l % (BLOCK_L // BLOCK_C) < length) & (first_c + offs_l // (BLOCK_L // BLOCK_C) < NC)
        else:
            z0 = _mm(k, weff_t, ACC, TF32) + c0[None, :]
            valid = kvalid
        if STOP >= 0:
            z0, z1, z2, z3, h0, h1, h2, h3, s = _mlp_tile(z0, w1t, b1, w2t, b2, w3t, b3, ws, bs, CONSTS,
                                                          NUM_HIDDEN, STOP, ACT, P0, P1, P2, P3, HMAXP, ACC, TF32,
                                                          True)
            z = z0
            if STOP == 1:
                z = z1
            if STOP == 2:
                z = z2
            if STOP == 3:
                z = z3
            x = tl.where(valid[:, None], z - shift[None, :], 0.0)
            sum1 += tl.sum(x, 0)
            sum2 += tl.sum(x * x, 0)
        else:
            z0, z1, z2, z3, h0, h1, h2, h3, s = _mlp_tile(z0, w1t, b1, w2t, b2, w3t, b3, ws, bs, CONSTS,
                                                          NUM_HIDDEN, NUM_HIDDEN, ACT, P0, P1, P2, P3, HMAXP, ACC,
                                                          TF32, True)
            t = s * scale
            v = tl.load(V + r[:, None] * DV + offs_v[None, :], mask=kvalid[:, None] & (offs_v < DV)[None, :],
                        other=0.0).to(ACC)
            if MULTI:  # per candidate: t [BLOCK_C, KT], the tile's values shared
                t = tl.reshape(t, [BLOCK_C, BLOCK_L // BLOCK_C])
                valid2 = cmask[:, None] & kvalid[None, :]
                if SOFTMAX:
                    t = tl.where(valid2, t, float("-inf"))
                    new_max = tl.maximum(row_max, tl.max(t, 1))
                    rescale = tl.exp(row_max - new_max)
                    e = tl.exp(t - new_max[:, None])
                    denom = denom * rescale + tl.sum(e, 1)
                    acc = acc * rescale[:, None] + tl.sum(e[:, :, None] * v[None, :, :], 1)
                    row_max = new_max
                else:
                    w = tl.where(valid2, t, 0.0)
                    acc += tl.sum(w[:, :, None] * v[None, :, :], 1)
            elif SOFTMAX:  # online softmax: rescale what was accumulated when the running maximum grows
                t = tl.where(valid, t, float("-inf"))
                new_max = tl.maximum(row_max, tl.max(t, 0))
                rescale = tl.exp(row_max - new_max)
                e = tl.exp(t - new_max)
                denom = denom * rescale + tl.sum(e, 0)
                acc = acc * rescale + tl.sum(e[:, None] * v, 0)
                row_max = new_max
            else:
                w = tl.where(valid, t, 0.0)
                acc += tl.sum(w[:, None] * v, 0)
    if STOP >= 0:
        tl.store(PART + part_row * 2 * PS + offs_s, sum1)
        tl.store(PART + part_row * 2 * PS + PS + offs_s, sum2)
    elif MULTI:
        if SOFTMAX:
            has_rows = denom > 0
            acc = tl.where(has_rows[:, None], acc / tl.where(has_rows, denom, 1.0)[:, None], 0.0)
            lse = tl.where(has_rows, row_max + tl.log(tl.where(has_rows, denom, 1.0)), 0.0)
            tl.store(LSE + pair, lse, mask=cmask)
        tl.store(OUT + pair[:, None] * DV + offs_v[None, :], acc, mask=cmask[:, None] & (offs_v < DV)[None, :])
    else:
        if SOFTMAX:
            has_rows = denom > 0
            acc = tl.where(has_rows, acc / tl.where(has_rows, denom, 1.0), 0.0)  # an empty user gets exactly 0
            lse = tl.where(has_rows, row_max + tl.log(tl.where(has_rows, denom, 1.0)), 0.0)
            tl.store(LSE + b + tl.arange(0, 1), lse)
        tl.store(OUT + b * DV + offs_v, acc, mask=offs_v < DV)


# ---------------------------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _hidden_bwd(gz, h_prev, z_prev, valid, w_t, dw, db, CONSTS, J: tl.constexpr, P: tl.constexpr,
                HMAXP: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr, IN: tl.constexpr, TF32: tl.constexpr,
                PARAMS: tl.constexpr):
    """Back through hidden-to-hidden linear J + 1 (z_{J+1} = W h_J + b, w_t = W^T [P, P_{J+1}], the forward's
    operand) and activation J: gz = d/dz_{J+1} -> d/dz_J; adds the tile's dW, db (PARAMS) and returns activation J's
    sums. d/dh = gz W through tl.trans of the forward's W^T, not a second copy of W loaded untransposed: one matrix
    fewer held in registers (fp32 on sm_90 at _backward_kernel's config: hidden pass 296 -> 140 B of spills, layer-1
    pass 184 -> 156 B)."""
    if PARAMS:
        dw += _mm_tn(gz, h_prev, ACC, IN, TF32)
        db += tl.sum(gz, 0)
    gh = _mm(gz, tl.trans(w_t), ACC, TF32)
    g, s0, s1, s2 = _act_bwd(gh, z_prev, valid, CONSTS, J, P, HMAXP, ACT)
    return g, dw, db, s0, s1, s2


@triton.jit
def _gamma(CONSTS, J: tl.constexpr, P: tl.constexpr, HMAXP: tl.constexpr):
    """Dice's gamma of hidden layer J, [P] (0 for the other activations, whose sums s1, s2 are 0)."""
    return tl.load(CONSTS + const_row(J, ROW_GAMMA) * HMAXP + tl.arange(0, P))


@triton.jit
def _store_sums(PART, s0, s1, s2, CONSTS, J: tl.constexpr, P: tl.constexpr, HMAXP: tl.constexpr):
    """Activation J's five sums (_backward_layout's "act" piece) from its three accumulated ones (see _act_bwd)."""
    offs = tl.arange(0, P)
    gamma = _gamma(CONSTS, J, P, HMAXP)
    tl.store(PART + offs, s0)
    tl.store(PART + P + offs, s1)
    tl.store(PART + 2 * P + offs, s2)
    tl.store(PART + 3 * P + offs, gamma * s2)
    tl.store(PART + 4 * P + offs, gamma * s1)


_RESTORE = ["GQ", "DC", "PART"]


# maxnreg=255: every backward kernel needs about all of a thread's 255 registers at 8 warps (one block per SM
# either way); left to itself, ptxas holds some configs to far fewer and spills (32 registers and 15 KB of spills at
# D = 32, BLOCK_L = 32 under Triton 3.6). Configs that spilled in some case of bench/results/gpu_static.md are
# dropped: BLOCK_L = 16 at 4 warps (every case, 4 B to 1.2 KB) and BLOCK_L = 32 at 8 warps (9 of the 12 bf16
# cases, 24 B to 3.5 KB at 2 stages, 36 B to 2.3 KB at 1); the second candidate is the default's tile with one
# pipelining stage, spill-free in every bf16 case of the split backward. restore_value: the buffers a pass
# read-modify-writes (PART's dKc, dPc rows, a multi-candidate query's GQ and DC), which autotuning's timed runs
# would otherwise add to again.
@triton.autotune(configs=_configs([(16, 8), (16, 8, 1)], maxnreg=255), key=[*_KEY, "GRADS", "DB"],
                 restore_value=_RESTORE)
@triton.jit
def _backward_kernel(
    GOUT,  # [B, DV] gradient of the pooled output ([B, NC, DV]: MULTI, and so on below)
    OUT,  # [B, DV] pooled output (softmax: delta_b = GOUT_b . OUT_b)
    LSE,  # [B] log-sum-exp of the scaled scores (softmax)
    Q, K, V, STARTS, LENGTHS,  # as in the forward (V is K when the keys are the values)
    W0, B0, W1, B1, W2, B2, W3, B3, WS, BS,  # linears, as in the forward
    CONSTS,  # activation constants, as in the forward, with ROW_G_MEAN and ROW_GX_MEAN (Dice training)
    CB, KPT,  # c_{b,c} and layer 1's blocks, as in the forward
    WEFF,  # [B, DP, P0] Weff_b^T in the input dtype (WEFF_SCRATCH: GRADS_INPUTS writes it, the parameter passes
           # read it)
    GQ,  # [B, D] gradient of the queries through Weff_b (accumulation dtype; the caller adds (Wq + Wd)^T dc_b;
         # MULTI: zero-filled by the caller, accumulated tile by tile)
    DC,  # [B, P0] dc_b = sum over the user's rows of d/dz_0 (accumulation dtype; MULTI: as GQ)
    GK,  # [N, D] gradient of the keys (rows outside every user are zero-filled by the caller)
    GV,  # [N, DV] gradient of the values (HAS_V)
    PART,  # [programs, part_size] per-program parameter gradient sums (layout: _backward_layout)
    batch, users_per_program,  # users [pid * users_per_program, ...) belong to program pid
    D, DV, N0, N1, N2, N3,
    part_size,  # elements of one program's partial sums
    NC,  # candidates per user (1 unless MULTI)
    b_bucket, l_bucket,  # autotuning keys
    NUM_HIDDEN: tl.constexpr, ACT: tl.constexpr, SOFTMAX: tl.constexpr,
    STOP: tl.constexpr,  # -1: gradient pass; j >= 0: Dice sums pass of hidden layer j (sum g_xhat, g_xhat * xhat)
    GRADS: tl.constexpr,  # gradient pass: GRADS_ALL, GRADS_INPUTS (GQ, DC, GK, GV), GRADS_LAYER1 or GRADS_HIDDEN (PART)
    HAS_V: tl.constexpr,  # values are separate from the keys
    WEFF_SCRATCH: tl.constexpr,  # a [B, D] query's Weff_b^T goes through WEFF (weff_scratch says why)
    MULTI: tl.constexpr,  # NC candidates per user: each key tile meets them BLOCK_C at a time
    DP: tl.constexpr, DVP: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr,
    PS: tl.constexpr, HMAXP: tl.constexpr, TF32: tl.constexpr,
    BLOCK_C: tl.constexpr,  # candidates per step (1 unless MULTI)
    DB: tl.constexpr,  # GRADS_LAYER1 of a [B, D] query: columns of dKc, dPc per program, block program_id(1); else DP
    BLOCK_L: tl.constexpr,  # rows per tile: (candidate, behaviour) pairs, BLOCK_L // BLOCK_C behaviours
):
    ACC = CONSTS.dtype.element_ty  # accumulation dtype
    IN = K.dtype.element_ty  # input dtype (the tl.dot operands)
    FULL = STOP < 0
    INPUTS = FULL and (GRADS == GRADS_ALL or GRADS == GRADS_INPUTS)
    LAYER1 = FULL and (GRADS == GRADS_ALL or GRADS == GRADS_LAYER1)
    HIDDEN = FULL and (GRADS == GRADS_ALL or GRADS == GRADS_HIDDEN)
    pid = tl.program_id(0).to(tl.int64)
    first = pid * users_per_program
    last = tl.minimum(first + users_per_program, batch)
    w1t, b1, w2t, b2, w3t, b3, ws, bs = _load_mlp(W1, B1, W2, B2, W3, B3, WS, BS, N0, N1, N2, N3, NUM_HIDDEN,
                                                  P0, P1, P2, P3, ACC, IN)
    # Layer 1 untransposed: (Wk - Wd), Wp [P0, DP]. The (Wq + Wd) terms (d/dq through c_b and d(Wq + Wd)) are
    # products of the per-user dc_b with small matrices, done by the caller: fewer live registers here.
    wd = _load_mat(W0 + 2 * D, N0, D, 4 * D, P0, DP).to(ACC)
    kc = (_load_mat(W0 + D, N0, D, 4 * D, P0, DP).to(ACC) - wd).to(IN)
    pc = _load_mat(W0 + 3 * D, N0, D, 4 * D, P0, DP).to(IN)
    # Kc and Pc side by side, [P0, 2 DP] with their columns interleaved: the input gradients' two products with gz
    # (d/dk through Kc, d/d(k * q)) are one tl.dot, so gz is loaded as an operand once, not twice. On sm_90 the fp32
    # input pass without TF32 then spills 212 B, not 572 (bench/results/gpu_static.md). The same sums: each output
    # column is its own dot product over the same P0 terms.
    kpc = tl.reshape(tl.join(kc, pc), [P0, 2 * DP])
    scale = tl.load(CONSTS + SCALE_ROW * HMAXP)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, DP)
    offs_v = tl.arange(0, DVP)
    col0 = tl.arange(0, P0) == 0
    offs_weff = offs_d[:, None] * P0 + tl.arange(0, P0)[None, :]

    # Per-program sums of the parameter gradients. Layer 1's dKc and dPc: with one candidate per user, dPc_b =
    # (sum_t gz_t k_t^T) diag(q_b), so a program keeps only the user's m_b = sum_t gz_t k_t^T in registers and adds
    # m_b and m_b diag(q_b) to its (zero-filled) rows of PART after each user: one [P0, DP] accumulator, not two;
    # [P0, DB] with DB < DP, the columns offs_db of program (pid, program_id(1)) (layer1_columns says why).
    offs_db = tl.program_id(1) * DB + tl.arange(0, DB)
    d_k = tl.zeros([P0, DP], dtype=ACC)
    d_p = tl.zeros([P0, DP], dtype=ACC)
    dw1 = tl.zeros([16, 16], dtype=ACC)
    dw2, dw3 = dw1, dw1
    db1 = tl.zeros([16], dtype=ACC)
    db2, db3 = db1, db1
    if NUM_HIDDEN >= 2:
        dw1 = tl.zeros([P1, P0], dtype=ACC)
        db1 = tl.zeros([P1], dtype=ACC)
    if NUM_HIDDEN >= 3:
        dw2 = tl.zeros([P2, P1], dtype=ACC)
        db2 = tl.zeros([P2], dtype=ACC)
    if NUM_HIDDEN >= 4:
        dw3 = tl.zeros([P3, P2], dtype=ACC)
        db3 = tl.zeros([P3], dtype=ACC)
    dws = tl.zeros_like(ws)
    dbs = tl.zeros([1], dtype=ACC)
    # Activation sums per hidden layer j: a{j}_0 .. a{j}_4 (see _act_bwd).
    a0_0 = tl.zeros([P0], dtype=ACC)
    a0_1, a0_2 = a0_0, a0_0
    a1_0 = tl.zeros([P1], dtype=ACC)
    a1_1, a1_2 = a1_0, a1_0
    a2_0 = tl.zeros([P2], dtype=ACC)
    a2_1, a2_2 = a2_0, a2_0
    a3_0 = tl.zeros([P3], dtype=ACC)
    a3_1, a3_2 = a3_0, a3_0

    if MULTI:  # layer 1's forward blocks, shared by every candidate
        kc_t, pc_t = _layer0_t(KPT, DP, P0)
        kc_t, pc_t = kc_t.to(IN), pc_t.to(IN)
    offs_k = tl.arange(0, BLOCK_L // BLOCK_C)
    for b in range(first, last):
        length = tl.load(LENGTHS + b)
        start = tl.load(STARTS + b)
        if not MULTI:
            if WEFF_SCRATCH and not INPUTS:  # the input pass's Weff_b^T, the same bits
                q = tl.load(Q + b * D + offs_d, mask=offs_d < D, other=0.0).to(ACC)
                c0 = tl.load(CB + b * P0 + tl.arange(0, P0))
                weff_t = tl.load(WEFF + b * (DP * P0) + offs_weff)
            else:
                q, c0, weff_t = _user_layer0(Q, CB, KPT, b, length, D, DP, P0, ACC, IN)
                if WEFF_SCRATCH:
                    tl.store(WEFF + b * (DP * P0) + offs_weff, weff_t)
            g_out = tl.load(GOUT + b * DV + offs_v, mask=offs_v < DV, other=0.0).to(ACC)
            lse = tl.zeros([1], dtype=ACC)
            delta = tl.zeros([1], dtype=ACC)
            if SOFTMAX:
                lse = tl.load(LSE + b + tl.arange(0, 1))
                out = tl.load(OUT + b * DV + offs_v, mask=offs_v < DV, other=0.0).to(ACC)
                delta = tl.zeros([1], dtype=ACC) + tl.sum(g_out * out, 0)
            dc = tl.zeros([P0], dtype=ACC)
            gq = tl.zeros([DP], dtype=ACC)
            m_b = tl.zeros([P0, DB], dtype=ACC)
        for t0 in range(0, length, BLOCK_L // BLOCK_C):
            rows = t0 + offs_k
            kvalid = rows < length
            r = start + rows
            kmask = kvalid[:, None] & (offs_d < D)[None, :]
            vmask = kvalid[:, None] & (offs_v < DV)[None, :]
            k = tl.load(K + r[:, None] * D + offs_d[None, :], mask=kmask, other=0.0)
            if MULTI:  # the tile's keys and values, read once; their gradients summed over the candidates
                v = tl.load(V + r[:, None] * DV + offs_v[None, :], mask=vmask, other=0.0).to(ACC)
                gk_sum = tl.zeros([BLOCK_L // BLOCK_C, DP], dtype=ACC)  # (dead code in a parameter pass)
                gv_sum = tl.zeros([BLOCK_L // BLOCK_C, DVP], dtype=ACC)
            for first_c in range(0, NC, BLOCK_C):
                if MULTI:
                    pair, cmask, qb, cb = _candidates(Q, CB, b, first_c, NC, D, DP, P0, BLOCK_C, ACC)
                    km, qk, z0 = _pairs_z0(k, qb, cb, kc_t, pc_t, BLOCK_C, BLOCK_L // BLOCK_C, ACC, TF32)
                    valid = ((t0 + offs_l % (BLOCK_L // BLOCK_C) < length)
                             & (first_c + offs_l // (BLOCK_L // BLOCK_C) < NC))
                else:
                    z0 = _mm(k, weff_t, ACC, TF32) + c0[None, :]
                    valid = kvalid
                z0, z1, z2, z3, h0, h1, h2, h3, s = _mlp_tile(z0, w1t, b1, w2t, b2, w3t, b3, ws, bs, CONSTS,
                                                              NUM_HIDDEN, NUM_HIDDEN, ACT, P0, P1, P2, P3, HMAXP,
                                                              ACC, TF32, False)
                t = s * scale
                if MULTI:  # per candidate: [BLOCK_C, KT]
                    omask = cmask[:, None] & (offs_v < DV)[None, :]
                    g_out = tl.load(GOUT + pair[:, None] * DV + offs_v[None, :], mask=omask, other=0.0).to(ACC)
                    t = tl.reshape(t, [BLOCK_C, BLOCK_L // BLOCK_C])
                    valid2 = cmask[:, None] & kvalid[None, :]
                    gw = tl.sum(v[None, :, :] * g_out[:, None, :], 2)  # d loss / d pooling weight
                    if SOFTMAX:
                        lse = tl.load(LSE + pair, mask=cmask, other=0.0)
                        out = tl.load(OUT + pair[:, None] * DV + offs_v[None, :], mask=omask, other=0.0).to(ACC)
                        w = tl.exp(t - lse[:, None])
                        gs = scale * w * (gw - tl.sum(g_out * out, 1)[:, None])
                    else:
                        w = t
                        gs = scale * gw
                    w = tl.where(valid2, w, 0.0)
                    gs = tl.reshape(tl.where(valid2, gs, 0.0), [BLOCK_L])
                else:
                    v = tl.load(V + r[:, None] * DV + offs_v[None, :], mask=vmask, other=0.0).to(ACC)
                    gw = tl.sum(v * g_out[None, :], 1)  # d loss / d pooling weight
                    if SOFTMAX:
                        w = tl.exp(t - lse)
                        gs = scale * w * (gw - delta)
                    else:
                        w = t
                        gs = scale * gw
                    w = tl.where(valid, w, 0.0)
                    gs = tl.where(valid, gs, 0.0)
                # Score layer, then the hidden layers from the top; a sums pass stops at its layer's activation.
                if NUM_HIDDEN == 0:
                    gz = tl.where(col0[None, :], gs[:, None], 0.0)
                else:
                    h_last = h0
                    z_last = z0
                    if NUM_HIDDEN == 2:
                        h_last, z_last = h1, z1
                    if NUM_HIDDEN == 3:
                        h_last, z_last = h2, z2
                    if NUM_HIDDEN == 4:
                        h_last, z_last = h3, z3
                    if HIDDEN:
                        dws += tl.sum(gs[:, None] * h_last, 0)
                        dbs += tl.sum(gs, 0)
                    gz, s0, s1, s2 = _act_bwd(gs[:, None] * ws[None, :], z_last, valid, CONSTS, NUM_HIDDEN - 1,
                                              ws.shape[0], HMAXP, ACT)
                    if NUM_HIDDEN == 4:
                        a3_0 += s0
                        a3_1 += s1
                        a3_2 += s2
                        if STOP <= 2:
                            gz, dw3, db3, s0, s1, s2 = _hidden_bwd(gz, h2, z2, valid, w3t, dw3, db3, CONSTS,
                                                               2, P2, HMAXP, ACT, ACC, IN, TF32, HIDDEN)
                    if NUM_HIDDEN >= 3 and STOP <= 2:
                        a2_0 += s0
                        a2_1 += s1
                        a2_2 += s2
                        if STOP <= 1:
                            gz, dw2, db2, s0, s1, s2 = _hidden_bwd(gz, h1, z1, valid, w2t, dw2, db2, CONSTS,
                                                               1, P1, HMAXP, ACT, ACC, IN, TF32, HIDDEN)
                    if NUM_HIDDEN >= 2 and STOP <= 1:
                        a1_0 += s0
                        a1_1 += s1
                        a1_2 += s2
                        if STOP <= 0:
                            gz, dw1, db1, s0, s1, s2 = _hidden_bwd(gz, h0, z0, valid, w1t, dw1, db1, CONSTS,
                                                               0, P0, HMAXP, ACT, ACC, IN, TF32, HIDDEN)
                    if STOP <= 0:
                        a0_0 += s0
                        a0_1 += s1
                        a0_2 += s2
                if INPUTS:
                    if MULTI:  # layer 1: z_0 = c_{b,c} + Kc k + Pc (q_{b,c} * k)
                        gk, gy = tl.split(tl.reshape(_mm(gz, kpc, ACC, TF32), [BLOCK_L, DP, 2]))  # gy: d/d(k * q)
                        gy3 = tl.reshape(gy, [BLOCK_C, BLOCK_L // BLOCK_C, DP])
                        gk3 = tl.reshape(gk, [BLOCK_C, BLOCK_L // BLOCK_C, DP])
                        gk_sum += tl.sum(gk3 + gy3 * qb[:, None, :], 0)
                        gv = tl.sum(w[:, :, None] * g_out[:, None, :], 0)
                        if HAS_V:
                            gv_sum += gv
                        else:
                            gk_sum += gv
                        # The candidates' gq and dc, summed over the tiles in GQ and DC: only this program touches
                        # user b's rows, and the barrier orders each tile's update before the next one reads them.
                        qmask = cmask[:, None] & (offs_d < D)[None, :]
                        gq_at = GQ + pair[:, None] * D + offs_d[None, :]
                        gq = tl.load(gq_at, mask=qmask, other=0.0) + tl.sum(gy3 * k.to(ACC)[None, :, :], 1)
                        dc_at = DC + pair[:, None] * P0 + tl.arange(0, P0)[None, :]
                        gz3 = tl.reshape(gz, [BLOCK_C, BLOCK_L // BLOCK_C, P0])
                        dc = tl.load(dc_at, mask=cmask[:, None], other=0.0) + tl.sum(gz3, 1)
                        tl.store(gq_at, gq, mask=qmask)
                        tl.store(dc_at, dc, mask=cmask[:, None])
                        tl.debug_barrier()
                    else:  # layer 1: z_0 = c_b + Weff_b k
                        dc += tl.sum(gz, 0)
                        gk, gy = tl.split(tl.reshape(_mm(gz, kpc, ACC, TF32), [BLOCK_L, DP, 2]))  # gy: d/d(k * q)
                        gk += gy * q[None, :]
                        gq += tl.sum(gy * k.to(ACC), 0)
                        if HAS_V:
                            tl.store(GV + r[:, None] * DV + offs_v[None, :], w[:, None] * g_out[None, :], mask=vmask)
                        else:
                            gk += w[:, None] * g_out[None, :]
                        tl.store(GK + r[:, None] * D + offs_d[None, :], gk, mask=kmask)
                if LAYER1:  # layer 1's weight gradients: dKc = sum gz k^T, dPc = sum gz (q * k)^T
                    if MULTI:
                        d_k += _mm_tn(gz, km, ACC, IN, TF32)
                        d_p += _mm_tn(gz, qk, ACC, IN, TF32)
                    else:
                        kb = k
                        if DB < DP:  # this program's columns of the tile's keys (an L1 hit)
                            kb = tl.load(K + r[:, None] * D + offs_db[None, :],
                                         mask=kvalid[:, None] & (offs_db < D)[None, :], other=0.0)
                        m_b += _mm_tn(gz, kb, ACC, IN, TF32)
            if MULTI:
                if INPUTS:
                    tl.store(GK + r[:, None] * D + offs_d[None, :], gk_sum, mask=kmask)
                    if HAS_V:
                        tl.store(GV + r[:, None] * DV + offs_v[None, :], gv_sum, mask=vmask)
        if not MULTI:
            if INPUTS:
                tl.store(GQ + b * D + offs_d, gq, mask=offs_d < D)
                tl.store(DC + b * P0 + tl.arange(0, P0), dc)
            if LAYER1:  # only this program touches its rows; the barrier orders this update before the next one
                q_b = q
                if DB < DP:
                    q_b = tl.load(Q + b * D + offs_db, mask=offs_db < D, other=0.0).to(ACC)
                dkp_at = PART + pid * part_size + tl.arange(0, P0)[:, None] * DP + offs_db[None, :]
                tl.store(dkp_at, tl.load(dkp_at) + m_b)
                tl.store(dkp_at + P0 * DP, tl.load(dkp_at + P0 * DP) + m_b * q_b[None, :])
                tl.debug_barrier()

    base = PART + pid * part_size
    if LAYER1 and MULTI:  # the layout of _backward_layout
        _store_mat(base, d_k, P0, DP)
        _store_mat(base + P0 * DP, d_p, P0, DP)
    if HIDDEN:
        base += 2 * P0 * DP
        if NUM_HIDDEN >= 2:
            _store_mat(base, dw1, P1, P0)
            tl.store(base + P1 * P0 + tl.arange(0, P1), db1)
            base += P1 * P0 + P1
        if NUM_HIDDEN >= 3:
            _store_mat(base, dw2, P2, P1)
            tl.store(base + P2 * P1 + tl.arange(0, P2), db2)
            base += P2 * P1 + P2
        if NUM_HIDDEN >= 4:
            _store_mat(base, dw3, P3, P2)
            tl.store(base + P3 * P2 + tl.arange(0, P3), db3)
            base += P3 * P2 + P3
        if NUM_HIDDEN >= 1:
            tl.store(base + tl.arange(0, ws.shape[0]), dws)
            tl.store(base + ws.shape[0] + tl.arange(0, 1), dbs)
            base += ws.shape[0] + 1
            _store_sums(base, a0_0, a0_1, a0_2, CONSTS, 0, P0, HMAXP)
            base += 5 * P0
        if NUM_HIDDEN >= 2:
            _store_sums(base, a1_0, a1_1, a1_2, CONSTS, 1, P1, HMAXP)
            base += 5 * P1
        if NUM_HIDDEN >= 3:
            _store_sums(base, a2_0, a2_1, a2_2, CONSTS, 2, P2, HMAXP)
            base += 5 * P2
        if NUM_HIDDEN >= 4:
            _store_sums(base, a3_0, a3_1, a3_2, CONSTS, 3, P3, HMAXP)
    if not FULL:  # sums pass: sum g_xhat and sum g_xhat * xhat of layer STOP
        offs_s = tl.arange(0, PS)
        if STOP == 0:
            tl.store(base + offs_s, _gamma(CONSTS, 0, PS, HMAXP) * a0_2)
            tl.store(base + PS + offs_s, _gamma(CONSTS, 0, PS, HMAXP) * a0_1)
        if STOP == 1:
            tl.store(base + offs_s, _gamma(CONSTS, 1, PS, HMAXP) * a1_2)
            tl.store(base + PS + offs_s, _gamma(CONSTS, 1, PS, HMAXP) * a1_1)
        if STOP == 2:
            tl.store(base + offs_s, _gamma(CONSTS, 2, PS, HMAXP) * a2_2)
            tl.store(base + PS + offs_s, _gamma(CONSTS, 2, PS, HMAXP) * a2_1)
        if STOP == 3:
            tl.store(base + offs_s, _gamma(CONSTS, 3, PS, HMAXP) * a3_2)
            tl.store(base + PS + offs_s, _gamma(CONSTS, 3, PS, HMAXP) * a3_1)


# float32 products without TF32 (torch's default) are "ieee" tl.dots on FMA units, whose operand layouts hold about
# twice the registers of tensor-core fragments: _backward_kernel's default spills 1.0 KB / 156 B / 140 B in the input /
# layer-1 / hidden passes on sm_90 (bench/results/gpu_static.md). These configs of the same kernel, chosen by dtype
# (backward_kernel_name), spill less: one pipelining stage (the input pass: 212 B) and 16 warps of at most 128
# registers for the parameter passes (28 / 16 B). None is spill-free; a GPU run has to say whether they win.
_backward_fp32_inputs_kernel = triton.autotune(configs=_configs([(16, 8)], maxnreg=255, stages=1),
                                               key=[*_KEY, "GRADS", "DB"], restore_value=_RESTORE)(_backward_kernel.fn)
_backward_fp32_params_kernel = triton.autotune(configs=_configs([(16, 16)], maxnreg=128, stages=1),
                                               key=[*_KEY, "GRADS", "DB"], restore_value=_RESTORE)(_backward_kernel.fn)


_BACKWARD_KERNELS = {"_backward_kernel": _backward_kernel,
                     "_backward_fp32_inputs_kernel": _backward_fp32_inputs_kernel,
                     "_backward_fp32_params_kernel": _backward_fp32_params_kernel}


def backward_kernel_name(ieee_fp32: bool, stop: int, grads) -> str:
    """The autotuned object that runs a backward pass (module attribute name): float32 inputs without TF32
    (``ieee_fp32``) have configs of their own, one for the parameter gradient passes and one for the others."""
    if not ieee_fp32:
        return "_backward_kernel"
    if stop < 0 and int(grads) in (int(GRADS_LAYER1), int(GRADS_HIDDEN)):
        return "_backward_fp32_params_kernel"
    return "_backward_fp32_inputs_kernel"


# ---------------------------------------------------------------------------------------------------------------
# Host side: launch parameters, the passes and the launchers of the forward and the backward


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(int(n)))


class _Plan:
    """Padded widths and launch constants of one call."""

    def __init__(self, query: Tensor, keys: Tensor, values: Optional[Tensor], weights: List[Tensor], max_len: int,
                 activation: str, normalization: str):
        self.batch, self.dim = query.shape[0], query.shape[-1]
        self.multi = query.dim() == 3  # query [B, C, D] with C > 1 (the launchers run C = 1 as [B, D])
        self.candidates = query.shape[1] if self.multi else 1
        # (a symbolic C, while torch.compile traces: the widest block, valid for any C)
        self.block_c = (min(MAX_BLOCK_C, triton.next_power_of_2(self.candidates)) if isinstance(self.candidates, int)
                        else MAX_BLOCK_C)
        self.value_dim = keys.shape[1] if values is None else values.shape[1]
        self.num_hidden = len(weights) - 1
        if self.num_hidden > MAX_HIDDEN:
            raise ValueError(f"din_ext backend 'triton' supports at most {MAX_HIDDEN} hidden layers, got "
                             f"{self.num_hidden}; use backend='cuda', 'cpu' or 'reference' for deeper MLPs")
        self.hidden = [int(w.shape[0]) for w in weights[:-1]]
        widths = self.hidden if self.hidden else [1]
        self.n = widths + [1] * (MAX_HIDDEN - len(widths))  # N0..N3
        self.p = [_pad(w) for w in self.n]  # P0..P3
        self.hmaxp = max(self.p)
        self.acc = acc_dtype(query.dtype)
        self.tf32 = query.dtype == torch.float32 and query.is_cuda and torch.backends.cuda.matmul.allow_tf32
        self.act = ACTIVATION_IDS[activation]
        self.softmax = normalization == "softmax"
        self.common = dict(
            D=self.dim, DV=self.value_dim, N0=self.n[0], N1=self.n[1], N2=self.n[2], N3=self.n[3],
            b_bucket=_bucket(self.batch), l_bucket=_length_bucket(max_len),
            NUM_HIDDEN=self.num_hidden, ACT=self.act, SOFTMAX=self.softmax, DP=_pad(self.dim),
            DVP=_pad(self.value_dim), P0=self.p[0], P1=self.p[1], P2=self.p[2], P3=self.p[3], HMAXP=self.hmaxp,
            TF32=self.tf32, NC=self.candidates, MULTI=self.multi, BLOCK_C=self.block_c)
        self.pairs = self.batch * self.candidates  # rows of the query viewed as [B * C, D]

    def candidate_terms(self, query: Tensor, weights: List[Tensor], biases: List[Tensor]) -> Tensor:
        """The CB argument: c_{b,c} = (Wq + Wd) q_{b,c} + b_0 of every user (candidate), [B * C, P0] in the
        accumulation dtype (computed in float64, zero padding)."""
        w0, dim = weights[0].double(), self.dim
        terms = torch.zeros(self.pairs, self.p[0], dtype=self.acc, device=query.device)
        terms[:, :self.n[0]] = torch.addmm(biases[0].double(), query.reshape(self.pairs, dim).double(),
                                            (w0[:, :dim] + w0[:, 2 * dim:3 * dim]).t())
        return terms

    def layer1_blocks(self, weights: List[Tensor]) -> Tensor:
        """The KPT argument: [Kc^T; Pc^T] = [(Wk - Wd)^T; Wp^T], [2, DP, P0] in the accumulation dtype, zero
        padding (Kc in the accumulation dtype, as the kernels formed it before)."""
        w0, dim, width = weights[0].to(self.acc), self.dim, self.n[0]
        blocks = torch.zeros(2, _pad(dim), self.p[0], dtype=self.acc, device=w0.device)
        blocks[0, :dim, :width] = (w0[:, dim:2 * dim] - w0[:, 2 * dim:3 * dim]).t()
        blocks[1, :dim, :width] = w0[:, 3 * dim:].t()
        return blocks

    def linears(self, weights: List[Tensor], biases: List[Tensor]) -> list:
        """W0, B0, W1, B1, W2, B2, W3, B3, WS, BS (placeholders repeat the first linear)."""
        weights = [w.contiguous() for w in weights]
        biases = [b.contiguous() for b in biases]
        args = [weights[0], biases[0]]
        for j in range(1, MAX_HIDDEN):
            i = j if j < self.num_hidden else 0
            args += [weights[i], biases[i]]
        return args + [weights[-1], biases[-1]]


def _bucket(batch) -> int:
    """Power-of-two bucket of B for the autotuning key; 0 while torch.compile traces a symbolic B (no guard)."""
    return triton.next_power_of_2(batch) if isinstance(batch, int) else 0


def _length_bucket(max_len: int) -> int:
    return 0 if max_len < 0 else triton.next_power_of_2(max(int(max_len), 1))


def _constants(plan: _Plan, act_params: Tensor, activation: str, training: bool, stats: Optional[Tensor],
               eps: float, score_scale: float) -> Tensor:
    """[CONST_ROWS * MAX_HIDDEN + 1, HMAXP] in the accumulation dtype: the ROW_* rows of every hidden layer (padding
    features 0, with rstd 1), then score_scale in row SCALE_ROW. The statistics are the running ones in eval,
    ``stats`` (the batch ones, rounded to the input dtype) in training.
    """
    scale_row = int(SCALE_ROW)
    consts = torch.zeros(scale_row + 1, plan.hmaxp, dtype=plan.acc, device=act_params.device)
    consts[int(ROW_RSTD):scale_row:CONST_ROWS] = 1
    consts[scale_row, 0] = score_scale
    column = 0
    for j, width in enumerate(plan.hidden):
        cols = slice(column, column + width)
        if activation == "prelu":
            consts[const_row(j, ROW_ALPHA), :width] = act_params[PRELU_SLOPE, cols]
        elif activation == "dice":
            # alpha, gamma, beta: the same order in act_params and in CONSTS
            consts[const_row(j, ROW_ALPHA):const_row(j, ROW_BETA) + 1, :width] = act_params[DICE_ALPHA:DICE_BETA + 1,
                                                                                            cols]
            if training:
                mean, var = stats[0, cols], stats[1, cols]
            else:
                mean, var = act_params[DICE_RUNNING_MEAN, cols], act_params[DICE_RUNNING_VAR, cols]
            consts[const_row(j, ROW_MEAN), :width] = mean
            consts[const_row(j, ROW_RSTD), :width] = torch.rsqrt(var.double() + eps)
        column += width
    return consts


def _forward_pass(plan, query, keys, values, starts, lengths, linears, consts, terms, stop, out, lse, part, shift,
                  shift_width, stop_pad):
    grid = (plan.batch, triton.cdiv(plan.candidates, plan.block_c)) if plan.multi else (plan.batch,)
    wrap_triton(_forward_kernel)[grid](
        query, keys, keys if values is None else values, starts, lengths, *linears, consts, *terms, out, lse, part,
        shift, NS=shift_width, STOP=stop, PS=stop_pad, **plan.common)


def _single(query: Tensor) -> Optional[Tensor]:
    """A query [B, 1, D] as [B, D] (one candidate runs the 2-D path, with its results); None for other shapes."""
    return query.reshape(query.shape[0], query.shape[2]) if query.dim() == 3 and query.shape[1] == 1 else None


def forward(
    query: Tensor, keys: Tensor, values: Optional[Tensor], starts: Tensor, lengths: Tensor, max_len: int,
    weights: List[Tensor], biases: List[Tensor], act_params: Tensor, activation: str, normalization: str,
    score_scale: float, training: bool, eps: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Forward of din_ext::local_activation_attention on Triton (canonical form: keys rows + starts/lengths).
    query: (B, D), or (B, C, D) candidates against each user's one history.
    Returns (out [B, Dv], stats [2, sum H], lse [B]), or out [B, C, Dv] and lse [B, C] for a 3-D query: lse is the
    log-sum-exp of the scaled scores (softmax) of each user (candidate), kept for the backward."""
    single = _single(query)
    if single is not None:
        out, stats, lse = forward(single, keys, values, starts, lengths, max_len, weights, biases, act_params,
                                  activation, normalization, score_scale, training, eps)
        return out.unsqueeze(1), stats, lse.unsqueeze(1)
    plan = _Plan(query, keys, values, weights, max_len, activation, normalization)
    query, keys = query.contiguous(), keys.contiguous()
    values = None if values is None else values.contiguous()
    linears = plan.linears(weights, biases)
    terms = plan.candidate_terms(query, weights, biases), plan.layer1_blocks(weights)
    hidden_total = sum(plan.hidden)
    stats = query.new_zeros(2, hidden_total)
    out = query.new_empty(*query.shape[:-1], plan.value_dim)
    lse = torch.zeros(query.shape[:-1], dtype=plan.acc, device=query.device)
    dice_train = activation == "dice" and training
    consts = _constants(plan, act_params, activation, False, None, eps, score_scale)
    if dice_train:
        count = lengths.sum().to(torch.float64) * plan.candidates  # every (candidate, behaviour) pair is a row
        column = 0
        programs = plan.batch * (triton.cdiv(plan.candidates, plan.block_c) if plan.multi else 1)
        for j, width in enumerate(plan.hidden):
            # Statistics of z_j over all valid rows: per-program sums shifted by the bias (a cheap guess of the
            # mean), added up in program (user, then candidate block) order in float64.
            part = torch.empty(programs, 2, plan.p[j], dtype=plan.acc, device=query.device)
            _forward_pass(plan, query, keys, values, starts, lengths, linears, consts, terms, j, out, lse, part,
                          biases[j], width, plan.p[j])
            sums = part[:, :, :width].sum(0, dtype=torch.float64)
            safe = count.clamp(min=1)
            shifted_mean = sums[0] / safe
            var = (sums[1] / safe - shifted_mean * shifted_mean).clamp(min=0)
            mean = shifted_mean + biases[j].double()
            stats[0, column:column + width] = torch.where(count > 0, mean, 0)
            stats[1, column:column + width] = torch.where(count > 0, var, 0)
            consts[const_row(j, ROW_MEAN), :width] = stats[0, column:column + width]
            consts[const_row(j, ROW_RSTD), :width] = torch.rsqrt(stats[1, column:column + width].double() + eps)
            column += width
    _forward_pass(plan, query, keys, values, starts, lengths, linears, consts, terms, -1, out, lse, lse, biases[0],
                  1, 16)
    return out, stats, lse


def _backward_layout(plan: _Plan) -> List[Tuple[str, int, Tuple[int, ...]]]:
    """(name, layer, padded shape) of the pieces of one backward program's partial sums, in memory order."""
    dp, p, n = _pad(plan.dim), plan.p, plan.num_hidden
    pieces = [("dKc", 0, (p[0], dp)), ("dPc", 0, (p[0], dp))]
    for j in range(1, n):
        pieces += [("dW", j, (p[j], p[j - 1])), ("db", j, (p[j],))]
    if n >= 1:
        pieces += [("dW", n, (p[n - 1],)), ("db", n, (1,))]
    for j in range(n):
        pieces.append(("act", j, (5, p[j])))
    return pieces


LAYER1_COLUMNS = 64  # the widest [P0, DB] block of dKc, dPc that one program of the layer-1 pass sums


def layer1_columns(dim: int, multi: bool) -> int:
    """DB of the GRADS_LAYER1 pass: the columns of dKc and dPc one program sums for key width ``dim``. A [B, D] query
    with padded D above LAYER1_COLUMNS splits them over program_id(1) (each program recomputes its users' tiles):
    with m_b [128, 128] in registers the pass spills on sm_90 at D = 128 (bench/results/gpu_static.md). A
    multi-candidate query keeps them whole (its dKc, dPc accumulators are the [P0, DP] d_k, d_p)."""
    padded = _pad(dim)
    return padded if multi else min(padded, LAYER1_COLUMNS)


def split_backward() -> bool:
    """Whether the gradient pass runs as the three kernels of SPLIT_PASSES (else one fused kernel): see GRADS_ALL."""
    return os.environ.get("DIN_EXT_TRITON_SPLIT_BACKWARD", "1") != "0"


WEFF_SCRATCH_ABOVE = 64  # padded key widths above which the split backward passes Weff_b^T through a scratch


def weff_scratch(dim: int, multi: bool, stop: int, grads: int) -> bool:
    """Whether a backward pass takes Weff_b^T from the WEFF scratch: the split gradient passes of a [B, D] query with
    padded D above WEFF_SCRATCH_ABOVE. The input pass (first) forms it per user as before and writes it; the
    parameter passes, which hold the recomputation and their parameter accumulators at once, read it instead of
    forming it from Kc^T and Pc^T in the accumulation dtype (2 DP P0 values live while it is formed): at D = 128 the
    hidden parameter pass spilled 24 B there on sm_90 (bench/results/gpu_static.md). Costs B DP P0 input-dtype
    elements (32 KB a user at bf16 D = 128: 64 MB at B = 2048), written once and read by two passes; the bits are the
    ones the pass would have formed. At D <= 64 the passes fit without it (and fp32's 16-warp passes spill more
    with it: layer-1 / hidden 44 / 52 B, 28 / 16 B without), so they form their own."""
    return _pad(dim) > WEFF_SCRATCH_ABOVE and not multi and stop < 0 and int(grads) != int(GRADS_ALL)


def _backward_pass(plan, grad_out, out, lse, query, keys, values, starts, lengths, linears, consts, terms, stop,
                   grad_query, dc, grad_keys, grad_values, part, programs, grads=GRADS_ALL, weff=None):
    """One launch of _backward_kernel: a sums pass (stop >= 0) or a gradient pass computing ``grads`` (``weff``: the
    WEFF scratch of weff_scratch's passes). The input gradients have no cross-user sums, so GRADS_INPUTS runs one
    program per user."""
    grads = int(grads)
    scratch = weff_scratch(plan.dim, plan.multi, stop, grads)
    if not scratch:
        weff = keys  # (not read)
    if stop < 0 and grads == int(GRADS_INPUTS):
        programs = plan.batch
    columns = layer1_columns(plan.dim, plan.multi) if stop < 0 and grads == int(GRADS_LAYER1) else _pad(plan.dim)
    kernel = _BACKWARD_KERNELS[backward_kernel_name(keys.dtype == torch.float32 and not plan.tf32, stop, grads)]
    wrap_triton(kernel)[(programs, _pad(plan.dim) // columns)](
        grad_out, out, lse, query, keys, keys if values is None else values, starts, lengths, *linears, consts, *terms,
        weff, grad_query, dc, grad_keys, grad_keys if grad_values is None else grad_values, part, plan.batch,
        triton.cdiv(plan.batch, programs), part_size=part.shape[1], STOP=stop, GRADS=grads,
        HAS_V=values is not None, WEFF_SCRATCH=scratch, PS=plan.p[max(stop, 0)], DB=columns, **plan.common)


def backward(
    grad_out: Tensor, query: Tensor, keys: Tensor, values: Optional[Tensor], starts: Tensor, lengths: Tensor,
    max_len: int, weights: List[Tensor], biases: List[Tensor], act_params: Tensor, out: Tensor, stats: Tensor,
    lse: Tensor, activation: str, normalization: str, score_scale: float, training: bool, eps: float,
) -> Tuple[Tensor, Tensor, Tensor, List[Tensor], List[Tensor], Tensor]:
    """Backward of ``forward``: (grad_query (like query), grad_keys (summed over a 3-D query's candidates),
    grad_values (empty without values), grad_weights, grad_biases, grad_act_params)."""
    single = _single(query)
    if single is not None:
        batch = single.shape[0]
        grad_query, *grads = backward(grad_out.reshape(batch, -1), single, keys, values, starts, lengths, max_len,
                                      weights, biases, act_params, out.reshape(batch, -1), stats, lse.reshape(batch),
                                      activation, normalization, score_scale, training, eps)
        return (grad_query.unsqueeze(1), *grads)
    plan = _Plan(query, keys, values, weights, max_len, activation, normalization)
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    query, keys = query.contiguous(), keys.contiguous()
    values = None if values is None else values.contiguous()
    linears = plan.linears(weights, biases)
    terms = plan.candidate_terms(query, weights, biases), plan.layer1_blocks(weights)
    dice_train = activation == "dice" and training
    consts = _constants(plan, act_params, activation, dice_train, stats, eps, score_scale)
    programs = min(plan.batch, NUM_BLOCKS)
    # Through Weff_b; + (Wq + Wd)^T dc below. A 3-D query's are sums over tiles: zero-filled.
    new = torch.zeros if plan.multi else torch.empty
    grad_query = new(plan.pairs, plan.dim, dtype=plan.acc, device=query.device)
    dc = new(plan.pairs, plan.p[0], dtype=plan.acc, device=query.device)
    grad_keys = torch.zeros_like(keys)  # rows outside every user's range get exactly zero
    grad_values = None if values is None else torch.zeros_like(values)
    if dice_train:
        count = (lengths.sum() * plan.candidates).to(plan.acc).clamp(min=1)
        for j in reversed(range(plan.num_hidden)):
            # The batch means of g_xhat and g_xhat * xhat of layer j, with those of the layers above known.
            part = torch.empty(programs, 2 * plan.p[j], dtype=plan.acc, device=query.device)
            _backward_pass(plan, grad_out, out, lse, query, keys, values, starts, lengths, linears, consts, terms,
                           j, grad_query, dc, grad_keys, grad_values, part, programs)
            sums = part.view(programs, 2, plan.p[j]).sum(0, dtype=torch.float64)
            consts[const_row(j, ROW_G_MEAN):const_row(j, ROW_GX_MEAN) + 1, :plan.p[j]] = sums / count
    layout = _backward_layout(plan)
    size = sum(math.prod(shape) for _, _, shape in layout)
    # Zero-filled: a [B, D] query's dKc and dPc are added to user by user, and each split pass writes its own pieces.
    part = torch.zeros(programs, size, dtype=plan.acc, device=query.device)
    passes = SPLIT_PASSES if split_backward() else (GRADS_ALL,)
    weff = None
    if weff_scratch(plan.dim, plan.multi, -1, passes[0]):
        weff = torch.empty(plan.batch, _pad(plan.dim), plan.p[0], dtype=keys.dtype, device=keys.device)
    for grads in passes:
        _backward_pass(plan, grad_out, out, lse, query, keys, values, starts, lengths, linears, consts, terms, -1,
                       grad_query, dc, grad_keys, grad_values, part, programs, grads, weff)
    total = part.sum(0, dtype=torch.float64)
    pieces, offset = {}, 0
    for name, layer, shape in layout:
        numel = math.prod(shape)
        pieces[name, layer] = total[offset:offset + numel].view(shape)
        offset += numel
    # Layer 1's (Wq + Wd) terms from the per-user (per-candidate) dc_b (float64 products, users in order).
    width0, dim = weights[0].shape[0], plan.dim
    dc = dc[:, :width0].double()
    w0 = weights[0].double()
    grad_query = (grad_query.double() + dc @ (w0[:, :dim] + w0[:, 2 * dim:3 * dim])).to(query.dtype)
    grad_query = grad_query.view(query.shape)
    pieces["dA", 0] = dc.t() @ query.reshape(plan.pairs, dim).double()
    pieces["db", 0] = dc.sum(0)
    return (grad_query, grad_keys, query.new_empty(0) if grad_values is None else grad_values,
            *_parameter_gradients(plan, pieces, weights, act_params, consts, activation, training))


def _parameter_gradients(plan, pieces, weights, act_params, consts, activation, training):
    dim, n, dtype = plan.dim, plan.num_hidden, weights[0].dtype
    width0 = weights[0].shape[0]
    d_a = pieces["dA", 0]
    d_k = pieces["dKc", 0][:width0, :dim]
    # W_0 = [Wq, Wk, Wd, Wp] with A = Wq + Wd, Kc = Wk - Wd, Pc = Wp.
    grad_weights = [torch.cat([d_a, d_k, d_a - d_k, pieces["dPc", 0][:width0, :dim]], 1).to(dtype)]
    grad_biases = [pieces["db", 0][:width0].to(dtype, copy=True)]
    for j in range(1, n + 1):
        rows, cols = weights[j].shape
        dw = pieces["dW", j]
        grad_weights.append((dw[:cols] if j == n else dw[:rows, :cols]).reshape(rows, cols).to(dtype, copy=True))
        grad_biases.append(pieces["db", j][:rows].to(dtype, copy=True))
    grad_act = torch.zeros_like(act_params)
    column = 0
    for j, width in enumerate(plan.hidden):
        sums = pieces["act", j][:, :width]
        cols = slice(column, column + width)
        if activation == "prelu":
            grad_act[PRELU_SLOPE, cols] = sums[0].to(dtype)
        elif activation == "dice":
            grad_act[DICE_ALPHA:DICE_BETA + 1, cols] = sums[0:3].to(dtype)  # d alpha, d gamma, d beta
            if not training:  # eval: the running statistics are inputs of the op
                rstd = consts[const_row(j, ROW_RSTD), :width].double()
                grad_act[DICE_RUNNING_MEAN, cols] = (-rstd * sums[3]).to(dtype)
                grad_act[DICE_RUNNING_VAR, cols] = (-0.5 * rstd * rstd * sums[4]).to(dtype)
        column += width
    return grad_weights, grad_biases, grad_act
