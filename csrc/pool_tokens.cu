// Adaptive average pooling of tokens, forward and backward (see pool_tokens.h).
//
// One thread block per output token (forward) or input token (backward), threads along the
// channels, so loads and stores are coalesced when the channel stride is 1. The window of an
// output cell and, for the backward, the inverse map (which output cells hold an input token)
// are computed per block with integer arithmetic; nothing is precomputed on the host.
#include "pool_tokens.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace pargo {
namespace {

constexpr int kMaxThreads = 256;
constexpr int64_t kMaxGridX = 2147483647;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Half-open input interval [lo, hi) of output index o when n_in is pooled to n_out. With the
// sizes swapped it is the inverse map: the output indices whose windows contain input index o.
__device__ __forceinline__ void window(int o, int n_in, int n_out, int& lo, int& hi) {
  lo = static_cast<int>((static_cast<int64_t>(o) * n_in) / n_out);
  hi = static_cast<int>((static_cast<int64_t>(o + 1) * n_in + n_out - 1) / n_out);
}

template <typename T>
__global__ void pool_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, PoolGeometry g,
                                int64_t sxb, int64_t sxn, int64_t sxc, int64_t syb, int64_t syn,
                                int64_t syc) {
  const int64_t nout = static_cast<int64_t>(g.hout) * g.wout;
  for (int64_t row = blockIdx.x; row < g.batch * nout; row += gridDim.x) {
    const int64_t b = row / nout;
    const int o = static_cast<int>(row % nout);
    int y0, y1, x0, x1;
    window(o / g.wout, g.hin, g.hout, y0, y1);
    window(o % g.wout, g.win, g.wout, x0, x1);
    const float inv = 1.0f / static_cast<float>((y1 - y0) * (x1 - x0));
    const T* xb = x + b * sxb;
    for (int64_t c = threadIdx.x; c < g.channels; c += blockDim.x) {
      float acc = 0.0f;
      for (int iy = y0; iy < y1; ++iy) {
        for (int ix = x0; ix < x1; ++ix) {
          acc += to_float(xb[(static_cast<int64_t>(iy) * g.win + ix) * sxn + c * sxc]);
        }
      }
      y[b * syb + o * syn + c * syc] = from_float<T>(acc * inv);
    }
  }
}

template <typename T>
__global__ void pool_bwd_kernel(const T* __restrict__ dy, T* __restrict__ dx, PoolGeometry g,
                                int64_t sdyb, int64_t sdyn, int64_t sdyc, int64_t sdxb,
                                int64_t sdxn, int64_t sdxc) {
  const int64_t nin = static_cast<int64_t>(g.hin) * g.win;
  for (int64_t row = blockIdx.x; row < g.batch * nin; row += gridDim.x) {
    const int64_t b = row / nin;
    const int t = static_cast<int>(row % nin);
    int oy0, oy1, ox0, ox1;
    window(t / g.win, g.hout, g.hin, oy0, oy1);  // inverse map: sizes swapped
    window(t % g.win, g.wout, g.win, ox0, ox1);
    const T* dyb = dy + b * sdyb;
    for (int64_t c = threadIdx.x; c < g.channels; c += blockDim.x) {
      float acc = 0.0f;
      for (int oy = oy0; oy < oy1; ++oy) {
        int y0, y1;
        window(oy, g.hin, g.hout, y0, y1);
        for (int ox = ox0; ox < ox1; ++ox) {
          int x0, x1;
          window(ox, g.win, g.wout, x0, x1);
          const float inv = 1.0f / static_cast<float>((y1 - y0) * (x1 - x0));
          acc += to_float(dyb[(static_cast<int64_t>(oy) * g.wout + ox) * sdyn + c * sdyc]) * inv;
        }
      }
      dx[b * sdxb + t * sdxn + c * sdxc] = from_float<T>(acc);
    }
  }
}

inline dim3 block_for(int64_t channels) {
  int64_t threads = ((channels + 31) / 32) * 32;
  if (threads > kMaxThreads) threads = kMaxThreads;
  if (threads < 32) threads = 32;
  return dim3(static_cast<unsigned>(threads));
}

inline dim3 grid_for(int64_t rows) {
  return dim3(static_cast<unsigned>(rows < kMaxGridX ? rows : kMaxGridX));
}

template <typename T>
cudaError_t launch_fwd(const void* x, void* y, const PoolGeometry& g, int64_t sxb, int64_t sxn,
                       int64_t sxc, int64_t syb, int64_t syn, int64_t syc, cudaStream_t stream) {
  const int64_t rows = g.batch * g.hout * g.wout;
  if (rows == 0 || g.channels == 0) return cudaSuccess;
  pool_fwd_kernel<T><<<grid_for(rows), block_for(g.channels), 0, stream>>>(
      static_cast<const T*>(x), static_cast<T*>(y), g, sxb, sxn, sxc, syb, syn, syc);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const void* dy, void* dx, const PoolGeometry& g, int64_t sdyb,
                       int64_t sdyn, int64_t sdyc, int64_t sdxb, int64_t sdxn, int64_t sdxc,
                       cudaStream_t stream) {
  const int64_t rows = g.batch * g.hin * g.win;
  if (rows == 0 || g.channels == 0) return cudaSuccess;
  pool_bwd_kernel<T><<<grid_for(rows), block_for(g.channels), 0, stream>>>(
      static_cast<const T*>(dy), static_cast<T*>(dx), g, sdyb, sdyn, sdyc, sdxb, sdxn, sdxc);
  return cudaGetLastError();
}

}  // namespace

cudaError_t pool_tokens_forward(const void* x, void* y, DType dtype, const PoolGeometry& g,
                                int64_t sxb, int64_t sxn, int64_t sxc, int64_t syb, int64_t syn,
                                int64_t syc, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_fwd<float>(x, y, g, sxb, sxn, sxc, syb, syn, syc, stream);
    case DType::kFloat16:
      return launch_fwd<__half>(x, y, g, sxb, sxn, sxc, syb, syn, syc, stream);
    case DType::kBFloat16:
      return launch_fwd<__nv_bfloat16>(x, y, g, sxb, sxn, sxc, syb, syn, syc, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t pool_tokens_backward(const void* dy, void* dx, DType dtype, const PoolGeometry& g,
                                 int64_t sdyb, int64_t sdyn, int64_t sdyc, int64_t sdxb,
                                 int64_t sdxn, int64_t sdxc, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_bwd<float>(dy, dx, g, sdyb, sdyn, sdyc, sdxb, sdxn, sdxc, stream);
    case DType::kFloat16:
      return launch_bwd<__half>(dy, dx, g, sdyb, sdyn, sdyc, sdxb, sdxn, sdxc, stream);
    case DType::kBFloat16:
      return launch_bwd<__nv_bfloat16>(dy, dx, g, sdyb, sdyn, sdyc, sdxb, sdxn, sdxc, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace pargo
