// Adaptive average pooling of tokens: launchers on raw pointers (no torch header).
//
// x is [B, Hin*Win, C] (a row-major Hin x Win grid per image, channels last, any strides in
// elements); y is [B, Hout*Wout, C]. Output cell (oy, ox) averages input rows
// [floor(oy*Hin/Hout), ceil((oy+1)*Hin/Hout)) and columns [floor(ox*Win/Wout),
// ceil((ox+1)*Win/Wout)), exactly torch.nn.functional.adaptive_avg_pool2d. Sums are fp32.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "common.h"

namespace pargo {

struct PoolGeometry {
  int64_t batch;     // B
  int64_t channels;  // C
  int hin, win;      // input grid
  int hout, wout;    // output grid
};

// y[b, o, c] = mean of x over the window of output cell o. Strides are in elements.
// Returns the launch error (cudaSuccess when B*Hout*Wout*C == 0 and nothing is launched).
cudaError_t pool_tokens_forward(const void* x, void* y, DType dtype, const PoolGeometry& g,
                                int64_t sxb, int64_t sxn, int64_t sxc, int64_t syb, int64_t syn,
                                int64_t syc, cudaStream_t stream);

// dx[b, t, c] = sum over output cells o whose window holds token t of dy[b, o, c] / |window o|.
// A gather (each dx element written once, no atomics).
cudaError_t pool_tokens_backward(const void* dy, void* dx, DType dtype, const PoolGeometry& g,
                                 int64_t sdyb, int64_t sdyn, int64_t sdyc, int64_t sdxb,
                                 int64_t sdxn, int64_t sdxc, cudaStream_t stream);

}  // namespace pargo
