// What the cpu attention kernels (csrc/cpu/attention.cpp) tell the device-agnostic autograd
// (csrc/attention_autograd.cpp) beyond their op registrations.
#pragma once

#include <ATen/ATen.h>

namespace din_ext::cpu {

// Bytes per key row that the stored-activation kernels (training Dice, query [B, D]) hold at their peak, for the
// MLP `weights` in `dtype`: the autograd compares N x this with its budget to choose them.
int64_t stored_row_bytes(at::TensorList weights, at::ScalarType dtype);

}  // namespace din_ext::cpu
