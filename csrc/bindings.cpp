// torch.library bindings of the CUDA kernels in csrc/ (the only file here that includes torch).
//
// Registers, in the namespace pargo_cuda, with CUDA implementations:
//   pool_tokens_fwd(Tensor x, int hin, int win, int hout, int wout) -> Tensor
//   pool_tokens_bwd(Tensor dy, int hin, int win, int hout, int wout) -> Tensor
//   attention_fwd(Tensor q, Tensor k, Tensor v, int kind, int[] params, float scale)
//       -> (Tensor out, Tensor lse)
//   attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, int kind,
//                 int[] params, float scale) -> (Tensor dq, Tensor dk, Tensor dv)
// x is [B, hin*win, C] (any strides), the result [B, hout*wout, C] contiguous; the backward
// maps dy [B, hout*wout, C] to dx [B, hin*win, C]. The Python side (pargo_kernels/pooling.py)
// wraps them in the pargo:: custom ops that carry autograd and fake implementations.
// Attention tensors are [B, H, N, D] with any strides; out, dq, dk, dv are returned contiguous,
// lse is [B, H, Nq] float32 (base 2, as the Triton backend saves it). attention_bwd takes `out`
// for the op's signature (the Triton backend's too) and checks its shape, but the kernels
// recompute delta = rowsum(P * dP) rather than reading it. The mask is (kind, params)
// of pargo_kernels/masks.py (pargo_kernels/attention.py wraps these in pargo::masked_attention_*).
#include <Python.h>

#include <algorithm>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "attention.h"
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

void check_qkv_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "attention: ", name, " must be a CUDA tensor, got device ",
              t.device());
  TORCH_CHECK(t.dim() == 4, "attention: ", name, " must be [B, H, N, D], got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, "attention: ",
              name, " must be float16 or bfloat16, got ", t.scalar_type(),
              " (fp32 uses the Triton backend)");
}

pargo::Strides4 strides4(const at::Tensor& t) {
  return pargo::Strides4{t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Validates q, k, v and the mask; returns the shape descriptor of the kernels.
pargo::AttnShape attention_shape(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 int64_t kind, c10::IntArrayRef params, double scale) {
  check_qkv_tensor(q, "q");
  check_qkv_tensor(k, "k");
  check_qkv_tensor(v, "v");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "attention: q, k, v must share a dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(),
              "attention: q, k, v must be on one device");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(1) == q.size(1) &&
                  v.size(1) == q.size(1),
              "attention: q, k, v must share [B, H], got q ", q.sizes(), ", k ", k.sizes(),
              ", v ", v.sizes());
  TORCH_CHECK(v.size(2) == k.size(2), "attention: v has ", v.size(2), " tokens but k has ",
              k.size(2));
  TORCH_CHECK(k.size(3) == q.size(3) && v.size(3) == q.size(3),
              "attention: the CUDA kernels need one head dim for q, k and v (Dv == D), got q ",
              q.size(3), ", k ", k.size(3), ", v ", v.size(3));
  TORCH_CHECK(q.size(2) > 0 && k.size(2) > 0, "attention: Nq and Nv must be positive, got q ",
              q.sizes(), ", k ", k.sizes());
  TORCH_CHECK(q.size(2) <= INT32_MAX && k.size(2) <= INT32_MAX,
              "attention: Nq and Nv must fit in int32, got q ", q.sizes(), ", k ", k.sizes());
  TORCH_CHECK(params.size() == 5, "attention: params must hold 5 ints, got ", params.size());
  for (const int64_t p : params) {
    TORCH_CHECK(p >= 0 && p <= INT32_MAX, "attention: mask params must be in [0, 2**31), got ",
                params);
  }
  TORCH_CHECK(kind == pargo::kAttnKindPG1D || kind == pargo::kAttnKindPG2D ||
                  kind == pargo::kAttnKindBand || kind == pargo::kAttnKindParGoSelf,
              "attention: unknown mask kind ", kind);
  const int64_t nq = q.size(2), nv = k.size(2);
  if (kind == pargo::kAttnKindBand || kind == pargo::kAttnKindParGoSelf) {
    TORCH_CHECK(nq == nv, "attention: a band / ParGo self-attention mask needs Nq == Nv, got ",
                nq, " and ", nv);
  } else {
    TORCH_CHECK(params[0] <= nq && params[0] <= nv, "attention: n_partial ", params[0],
                " must be <= Nq (", nq, ") and <= Nv (", nv, ")");
    TORCH_CHECK(params[0] * nv <= INT32_MAX, "attention: n_partial * Nv exceeds 2**31 - 1");
  }
  if (kind == pargo::kAttnKindParGoSelf) {
    const int64_t span = std::max<int64_t>(params[0] - 1, 0);
    TORCH_CHECK(params[0] <= nq && params[1] <= span && params[2] <= span,
                "attention: ParGo self-attention params (n_partial, left, right) = ", params,
                " need n_partial <= N = ", nq, " and left, right <= max(n_partial - 1, 0)");
  }
  if (kind == pargo::kAttnKindPG2D) {
    TORCH_CHECK(params[1] * params[2] == nv && params[3] * params[4] == params[0] &&
                    params[1] > 0 && params[2] > 0 && params[3] > 0 && params[4] > 0,
                "attention: 2-D mask params (n_partial, Hv, Wv, hp, wp) = ", params,
                " do not match Nv = ", nv);
  }
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.device().index());
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q.device().index());
  TORCH_CHECK(major >= 8, "attention: the CUDA kernels need sm_80 or newer (mma.sync m16n8k16 "
              "with bf16), device is sm_", major, minor);
  pargo::AttnShape s{};
  s.batch = q.size(0);
  s.heads = q.size(1);
  s.nq = static_cast<int>(nq);
  s.nv = static_cast<int>(nv);
  s.head_dim = static_cast<int>(q.size(3));
  s.kind = static_cast<int>(kind);
  for (int i = 0; i < 5; ++i) s.p[i] = static_cast<int>(params[i]);
  s.scale = static_cast<float>(scale);
  const char* why = pargo::attention_unsupported_reason(dtype_of(q, "q"), s);
  TORCH_CHECK(why == nullptr, "attention: unsupported input (q ", q.sizes(), ", k ", k.sizes(),
              "): ", why == nullptr ? "" : why);
  return s;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, int64_t kind,
                                                 c10::IntArrayRef params, double scale) {
  const pargo::AttnShape s = attention_shape(q, k, v, kind, params, scale);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  const cudaError_t err = pargo::attention_forward(
      q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr<float>(),
      dtype_of(q, "q"), s, strides4(q), strides4(k), strides4(v), strides4(out),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "attention_fwd: kernel launch failed: ",
              cudaGetErrorString(err));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, int64_t kind, c10::IntArrayRef params,
    double scale) {
  const pargo::AttnShape s = attention_shape(q, k, v, kind, params, scale);
  check_qkv_tensor(dout, "dout");
  check_qkv_tensor(out, "out");
  const std::vector<int64_t> out_shape{q.size(0), q.size(1), q.size(2), v.size(3)};
  TORCH_CHECK(out.sizes() == c10::IntArrayRef(out_shape) &&
                  dout.sizes() == c10::IntArrayRef(out_shape),
              "attention_bwd: out and dout must be ", c10::IntArrayRef(out_shape), ", got out ",
              out.sizes(), ", dout ", dout.sizes());
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && dout.scalar_type() == q.scalar_type(),
              "attention_bwd: out and dout must have the dtype of q (", q.scalar_type(),
              "), got ", out.scalar_type(), " and ", dout.scalar_type());
  TORCH_CHECK(lse.is_cuda() && lse.scalar_type() == at::kFloat && lse.dim() == 3 &&
                  lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                  lse.size(2) == q.size(2),
              "attention_bwd: lse must be a float32 CUDA tensor [B, H, Nq] = [", q.size(0), ", ",
              q.size(1), ", ", q.size(2), "], got ", lse.scalar_type(), " ", lse.sizes());
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor delta = at::empty_like(lse_c);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  const cudaError_t err = pargo::attention_backward(
      dout.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), lse_c.data_ptr<float>(),
      delta.data_ptr<float>(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), dtype_of(q, "q"), s,
      strides4(dout), strides4(q), strides4(k), strides4(v), strides4(dq), strides4(dk),
      strides4(dv),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "attention_bwd: kernel launch failed: ",
              cudaGetErrorString(err));
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY(pargo_cuda, m) {
  m.def("pool_tokens_fwd(Tensor x, int hin, int win, int hout, int wout) -> Tensor");
  m.def("pool_tokens_bwd(Tensor dy, int hin, int win, int hout, int wout) -> Tensor");
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, int kind, int[] params, float scale) -> "
        "(Tensor, Tensor)");
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "int kind, int[] params, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pargo_cuda, CUDA, m) {
  m.impl("pool_tokens_fwd", &pool_tokens_fwd);
  m.impl("pool_tokens_bwd", &pool_tokens_bwd);
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}

// `import pargo_kernels._C` loads this library, which runs the registrations above; the module
// itself is empty.
static struct PyModuleDef pargo_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&pargo_c_module); }
