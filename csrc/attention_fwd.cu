// Forward of the block-sparse masked attention (see attention.h): FlashAttention-2 style, one
// CTA per (batch * head, query tile), 4 warps x 16 query rows, online softmax in base 2 with
// fp32 statistics and fp32 accumulation, Q K^T and P V on tensor cores (mma.sync m16n8k16).
//
// A query tile visits only the key tiles its rows' windows touch (tile_key_range): partial
// tiles their windows' key range, global tiles every key, band tiles the band. Partial and
// global rows never share a tile (query_tile), exactly as in attention_triton.py.
#include <cmath>

#include "attention_kernels.cuh"

namespace pargo {
namespace attn {
namespace {

struct FwdArgs {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  float* lse;
  Strides4 sq, sk, sv, so;
  int64_t heads;
  Mask m;
  float qk_scale;  // scale * log2(e)
  bool vec;        // q, k, v: rows loadable as 16-byte vectors
  bool pair_out;   // o: pairs of columns storable as 32-bit words
};

template <typename T, int D>
constexpr size_t fwd_smem_bytes() {
  return static_cast<size_t>(FwdCfg<D>::BM + 2 * FwdCfg<D>::BN) * (D + kPad) * sizeof(T);
}

template <typename T, int D, bool TWO_D>
__global__ void __launch_bounds__(kThreads, 2) attn_fwd_kernel(const FwdArgs a) {
  constexpr int BM = FwdCfg<D>::BM;
  constexpr int BN = FwdCfg<D>::BN;
  constexpr int LD = D + kPad;
  static_assert(BM == 16 * kWarps, "one 16-row slab per warp");
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + BM * LD;
  T* sV = sK + BN * LD;

  const Mask m = a.m;
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / a.heads;
  const int64_t h = bh % a.heads;
  const QueryTile qt = query_tile(static_cast<int>(blockIdx.y), BM, m);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int t = lane % 4;

  // This thread's two rows (fragment rows g and g + 8 of its warp's slab) and their windows.
  int row[2];
  Window w[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row[r] = qt.m0 + warp * 16 + g + 8 * r;
    w[r] = row_window(row[r], row[r] < qt.row_end, qt.is_global, m);
  }
  int n_lo, n_hi;
  tile_key_range(qt, BM, m, n_lo, n_hi);

  const T* Q = static_cast<const T*>(a.q) + b * a.sq.b + h * a.sq.h;
  const T* K = static_cast<const T*>(a.k) + b * a.sk.b + h * a.sk.h;
  const T* V = static_cast<const T*>(a.v) + b * a.sv.b + h * a.sv.h;
  load_tile<T, BM, D>(sQ, Q, a.sq.n, a.sq.d, qt.m0, qt.row_end, a.vec);

  float acc[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
  float m_i[2] = {-INFINITY, -INFINITY};
  float l_i[2] = {0.0f, 0.0f};  // per-thread partial row sums, reduced over the quad at the end

  for (int n0 = n_lo; n0 < n_hi; n0 += BN) {
    __syncthreads();  // every warp is done with the previous K, V tiles
    load_tile<T, BN, D>(sK, K, a.sk.n, a.sk.d, n0, n_hi, a.vec);
    load_tile<T, BN, D>(sV, V, a.sv.n, a.sv.d, n0, n_hi, a.vec);
    __syncthreads();

    // S = Q K^T for this warp's 16 rows and BN keys
    float s[BN / 8][4];
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t af[4];
      load_a(af, sQ, LD, warp * 16, kk * 16, g, t);
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        uint32_t bf[2];
        load_b_nk(bf, sK, LD, j * 8, kk * 16, g, t);
        Elem<T>::mma(s[j], af, bf);
      }
    }

    // mask, scale (base 2), row max
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = n0 + 8 * j + 2 * t + (e & 1);
        const int xcol = TWO_D ? col % m.p2 : 0;
        const int r = e >> 1;
        s[j][e] = allowed<TWO_D>(col, xcol, w[r]) ? s[j][e] * a.qk_scale : -INFINITY;
        mx[r] = fmaxf(mx[r], s[j][e]);
      }
    }
    float m_safe[2], alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float m_new = fmaxf(m_i[r], quad_max(mx[r]));
      m_safe[r] = m_new == -INFINITY ? 0.0f : m_new;
      alpha[r] = exp2f(m_i[r] - m_safe[r]);
      m_i[r] = m_new;
      l_i[r] *= alpha[r];
    }
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = exp2f(s[j][e] - m_safe[e >> 1]);
        s[j][e] = p;
        l_i[e >> 1] += p;
      }
    }
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      acc[j][0] *= alpha[0];
      acc[j][1] *= alpha[0];
      acc[j][2] *= alpha[1];
      acc[j][3] *= alpha[1];
    }

    // acc += P V (P rounded to T, from registers)
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t af[4];
      c_to_a<T>(af, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        uint32_t bf[2];
        load_b_kn(bf, sV, LD, kk * 16, j * 8, g, t);
        Elem<T>::mma(acc[j], af, bf);
      }
    }
  }

  T* O = static_cast<T*>(a.o) + b * a.so.b + h * a.so.h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_i[r]);  // all lanes take part in the shuffles
    const float l_safe = l == 0.0f ? 1.0f : l;
    const float inv = 1.0f / l_safe;
    if (row[r] < qt.row_end) {
      T* o_row = O + static_cast<int64_t>(row[r]) * a.so.n;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        const int col = 8 * j + 2 * t;
        store_pair(o_row + col * a.so.d, a.so.d, acc[j][2 * r] * inv, acc[j][2 * r + 1] * inv,
                   a.pair_out);
      }
      if (t == 0) a.lse[bh * m.nq + row[r]] = m_i[r] + log2f(l_safe);
    }
  }
}

template <typename T, int D, bool TWO_D>
cudaError_t launch_fwd(const FwdArgs& a, int64_t bh, cudaStream_t stream) {
  const auto kernel = attn_fwd_kernel<T, D, TWO_D>;
  constexpr size_t smem = fwd_smem_bytes<T, D>();
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>(bh),
                  static_cast<unsigned>(num_query_tiles(a.m, FwdCfg<D>::BM)));
  kernel<<<grid, kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_fwd(const FwdArgs& a, int d, int64_t bh, cudaStream_t stream) {
  const bool two_d = a.m.kind == kAttnKindPG2D;
  if (d == 64) return two_d ? launch_fwd<T, 64, true>(a, bh, stream)
                            : launch_fwd<T, 64, false>(a, bh, stream);
  if (d == 128) return two_d ? launch_fwd<T, 128, true>(a, bh, stream)
                             : launch_fwd<T, 128, false>(a, bh, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

bool rows_vectorizable(const void* p, const Strides4& s, int elems) {
  // column stride 1 and every row start aligned to `elems` elements of 2 bytes
  return s.d == 1 && reinterpret_cast<uintptr_t>(p) % (2 * elems) == 0 && s.b % elems == 0 &&
         s.h % elems == 0 && s.n % elems == 0;
}

}  // namespace attn

const char* attention_unsupported_reason(DType dtype, const AttnShape& s) {
  if (dtype == DType::kFloat32) return "fp32 uses the Triton backend";
  if (dtype != DType::kFloat16 && dtype != DType::kBFloat16) return "dtype must be fp16 or bf16";
  if (s.head_dim != 64 && s.head_dim != 128) return "head dim must be 64 or 128";
  if (s.kind != kAttnKindPG1D && s.kind != kAttnKindPG2D && s.kind != kAttnKindBand &&
      s.kind != kAttnKindParGoSelf) {
    return "unknown mask kind";
  }
  if (s.kind == kAttnKindPG2D && (s.p[1] <= 0 || s.p[2] <= 0 || s.p[3] <= 0 || s.p[4] <= 0)) {
    return "2-D mask needs positive grids";
  }
  if (s.batch * s.heads > 2147483647LL) return "B * H exceeds 2**31 - 1";
  const attn::Mask m = attn::make_mask(s);
  const int bm = attn::FwdCfg<128>::BM < attn::DqCfg<128>::BM ? attn::FwdCfg<128>::BM
                                                               : attn::DqCfg<128>::BM;
  if (attn::num_query_tiles(m, bm) > 65535) return "too many query tiles (Nq too large)";
  if ((s.nv + attn::DkdvCfg<128>::BN - 1) / attn::DkdvCfg<128>::BN > 65535) {
    return "too many key tiles (Nv too large)";
  }
  return nullptr;
}

cudaError_t attention_forward(const void* q, const void* k, const void* v, void* out, float* lse,
                              DType dtype, const AttnShape& s, Strides4 sq, Strides4 sk,
                              Strides4 sv, Strides4 so, cudaStream_t stream) {
  if (attention_unsupported_reason(dtype, s) != nullptr) return cudaErrorInvalidValue;
  const int64_t bh = s.batch * s.heads;
  if (bh == 0) return cudaSuccess;
  attn::FwdArgs a{q, k, v, out, lse, sq, sk, sv, so, s.heads, attn::make_mask(s),
                  s.scale * attn::kLog2e,
                  attn::rows_vectorizable(q, sq, 8) && attn::rows_vectorizable(k, sk, 8) &&
                      attn::rows_vectorizable(v, sv, 8),
                  attn::rows_vectorizable(out, so, 2)};
  if (dtype == DType::kFloat16) return attn::dispatch_fwd<__half>(a, s.head_dim, bh, stream);
  return attn::dispatch_fwd<__nv_bfloat16>(a, s.head_dim, bh, stream);
}

}  // namespace pargo
