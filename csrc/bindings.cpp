// torch.library bindings of the CUDA kernels in csrc/ (the only file here that includes torch).
//
// Registers, in the namespace pargo_cuda, with CUDA implementations:
//   pool_tokens_fwd(Tensor x, int hin, int win, int hout, int wout) -> Tensor
//   pool_tokens_bwd(Tensor dy, int hin, int win, int hout, int wout) -> Tensor
// x is [B, hin*win, C] (any strides), the result [B, hout*wout, C] contiguous; the backward
// maps dy [B, hout*wout, C] to dx [B, hin*win, C]. The Python side (pargo_kernels/pooling.py)
// wraps them in the pargo:: custom ops that carry autograd and fake implementations.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "pool_tokens.h"

namespace {

pargo::DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return pargo::DType::kFloat32;
    case at::kHalf: return pargo::DType::kFloat16;
    case at::kBFloat16: return pargo::DType::kBFloat16;
    default:
      TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return pargo::DType::kFloat32;  // unreachable
}

void check_grid(int64_t rows, int64_t cols, const char* name) {
  TORCH_CHECK(rows > 0 && cols > 0, name, " must be positive, got (", rows, ", ", cols, ")");
  TORCH_CHECK(rows <= INT32_MAX && cols <= INT32_MAX, name, " is too large: (", rows, ", ", cols,
              ")");
}

void check_tokens(const at::Tensor& t, const char* name, int64_t n_tokens, const char* grid) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 3, name, " must be [B, N, C], got ", t.dim(), " dimensions with shape ",
              t.sizes());
  TORCH_CHECK(t.size(1) == n_tokens, name, " has ", t.size(1), " tokens but ", grid, " has ",
              n_tokens, " cells");
}

at::Tensor pool_tokens_fwd(const at::Tensor& x, int64_t hin, int64_t win, int64_t hout,
                           int64_t wout) {
  check_grid(hin, win, "in_grid (hin, win)");
  check_grid(hout, wout, "out_grid (hout, wout)");
  check_tokens(x, "x", hin * win, "in_grid");
  const pargo::DType dtype = dtype_of(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({x.size(0), hout * wout, x.size(2)}, x.options());
  const pargo::PoolGeometry g{x.size(0), x.size(2), static_cast<int>(hin), static_cast<int>(win),
                              static_cast<int>(hout), static_cast<int>(wout)};
  const cudaError_t err = pargo::pool_tokens_forward(
      x.data_ptr(), y.data_ptr(), dtype, g, x.stride(0), x.stride(1), x.stride(2), y.stride(0),
      y.stride(1), y.stride(2), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "pool_tokens_fwd: kernel launch failed: ",
              cudaGetErrorString(err));
  return y;
}

at::Tensor pool_tokens_bwd(const at::Tensor& dy, int64_t hin, int64_t win, int64_t hout,
                           int64_t wout) {
  check_grid(hin, win, "in_grid (hin, win)");
  check_grid(hout, wout, "out_grid (hout, wout)");
  check_tokens(dy, "dy", hout * wout, "out_grid");
  const pargo::DType dtype = dtype_of(dy, "dy");
  const c10::cuda::CUDAGuard guard(dy.device());
  at::Tensor dx = at::empty({dy.size(0), hin * win, dy.size(2)}, dy.options());
  const pargo::PoolGeometry g{dy.size(0), dy.size(2), static_cast<int>(hin),
                              static_cast<int>(win), static_cast<int>(hout),
                              static_cast<int>(wout)};
  const cudaError_t err = pargo::pool_tokens_backward(
      dy.data_ptr(), dx.data_ptr(), dtype, g, dy.stride(0), dy.stride(1), dy.stride(2),
      dx.stride(0), dx.stride(1), dx.stride(2), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "pool_tokens_bwd: kernel launch failed: ",
              cudaGetErrorString(err));
  return dx;
}

}  // namespace

TORCH_LIBRARY(pargo_cuda, m) {
  m.def("pool_tokens_fwd(Tensor x, int hin, int win, int hout, int wout) -> Tensor");
  m.def("pool_tokens_bwd(Tensor dy, int hin, int win, int hout, int wout) -> Tensor");
}

TORCH_LIBRARY_IMPL(pargo_cuda, CUDA, m) {
  m.impl("pool_tokens_fwd", &pool_tokens_fwd);
  m.impl("pool_tokens_bwd", &pool_tokens_bwd);
}

// `import pargo_kernels._C` loads this library, which runs the registrations above; the module
// itself is empty.
static struct PyModuleDef pargo_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&pargo_c_module); }
