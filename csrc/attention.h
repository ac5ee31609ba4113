// Block-sparse masked attention (partial-global 1-D / 2-D, banded): launchers on raw pointers
// (no torch header). The kernels are in attention_fwd.cu and attention_bwd.cu, the device-side
// mask logic in attention_kernels.cuh.
//
// Tensors are [B, H, N, D] with any strides (in elements); lse and delta are [B, H, Nq] float32,
// contiguous, the log-sum-exp in base 2 (as the Triton kernels save it, so the two backends'
// statistics mean the same thing). fp16 and bf16 only (fp32 uses the Triton backend), head dims
// 64 and 128 with Dv == D, sm_80 or newer (mma.sync.m16n8k16 on tensor cores).
//
// The mask is (kind, p[5]) exactly as pargo_kernels/masks.py passes it (`.kind`, `.params`):
//   kind 0 (KIND_PG1D): p = (n_partial, 0, 0, 0, 0)
//   kind 1 (KIND_PG2D): p = (n_partial, Hv, Wv, hp, wp)
//   kind 2 (KIND_BAND): p = (left, right, 0, 0, 0), both already clipped to N - 1
//   kind 3 (KIND_PARGO_SELF): p = (n_partial, left, right, 0, 0), left and right clipped to
//     max(n_partial - 1, 0); partial rows see the band among partial keys, global rows the
//     global keys [n_partial, N)
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "common.h"

namespace pargo {

constexpr int kAttnKindPG1D = 0;
constexpr int kAttnKindPG2D = 1;
constexpr int kAttnKindBand = 2;
constexpr int kAttnKindParGoSelf = 3;

struct AttnShape {
  int64_t batch;  // B
  int64_t heads;  // H
  int nq;         // queries
  int nv;         // keys (= values)
  int head_dim;   // D (= Dv)
  int kind;       // kAttnKind*
  int p[5];       // mask params
  float scale;    // softmax scale (natural base)
};

// Strides of a [B, H, N, D] tensor, in elements.
struct Strides4 {
  int64_t b, h, n, d;
};

// Why the kernels cannot run a shape (nullptr: they can): dtype, head dim, grid limits.
const char* attention_unsupported_reason(DType dtype, const AttnShape& s);

// out = softmax(q k^T * scale, masked) v, lse = log2-sum-exp2 of the scaled scores per row.
cudaError_t attention_forward(const void* q, const void* k, const void* v, void* out, float* lse,
                              DType dtype, const AttnShape& s, Strides4 sq, Strides4 sk,
                              Strides4 sv, Strides4 so, cudaStream_t stream);

// dq, dk, dv of the forward above, from dout and the forward's lse. delta is a [B, H, Nq]
// float32 workspace, written here with rowsum(P * dP) in fp32 (not rowsum(dO * O): the forward's
// output O is not needed, as in attention_triton.py).
cudaError_t attention_backward(const void* dout, const void* q, const void* k, const void* v,
                               const float* lse, float* delta, void* dq, void* dk, void* dv,
                               DType dtype, const AttnShape& s, Strides4 sdo, Strides4 sq,
                               Strides4 sk, Strides4 sv, Strides4 sdq, Strides4 sdk,
                               Strides4 sdv, cudaStream_t stream);

}  // namespace pargo
