// Backward of the block-sparse masked attention (see attention.h), FlashAttention-2 style, in
// three kernels (as attention_triton.py):
//
// * dQ: one CTA per (batch * head, query tile), 4 warps x 16 query rows; visits the key tiles
//   of its rows' windows (same tiles and ranges as the forward) twice, recomputing P from the
//   saved base-2 log-sum-exp and dP = dO V^T: pass 1 sums delta = rowsum(P * dP) in fp32 (and
//   stores it for the dK/dV kernel), pass 2 accumulates dQ += dS K with dS = P * (dP - delta).
//   delta is not rowsum(dO * O): with a 16-bit O that leaves rows of dS that do not sum to zero
//   (an error of ~2^-8 |O| |dO|), the same choice as attention_triton.py;
// * dK/dV: one CTA per (batch * head, 64-key tile), 4 warps x 16 keys; streams the query rows
//   whose windows can hold one of its keys (the inverse window map, partial_rows_of_keys), then,
//   for partial-global masks, every global query (ParGo self-attention: only for tiles holding
//   a global key, global_rows_end); computes S^T = K Q^T and dP^T = V dO^T so that
//   P^T and dS^T come out as A fragments: dV += P^T dO, dK += dS^T Q.
// All products on tensor cores (mma.sync m16n8k16, fp32 accumulation); P and dS are rounded to
// the input dtype before their products, as in the Triton kernels.
#include <cmath>

#include "attention_kernels.cuh"

namespace pargo {
namespace attn {
namespace {

struct BwdArgs {
  const void* dout;
  const void* q;
  const void* k;
  const void* v;
  const float* lse;
  float* delta;
  void* dq;
  void* dk;
  void* dv;
  Strides4 sdo, sq, sk, sv, sdq, sdk, sdv;
  int64_t heads;
  Mask m;
  float qk_scale;  // scale * log2(e)
  float sm_scale;  // scale
  bool vec;        // q, k, v, dout: rows loadable as 16-byte vectors
  bool pair_dq;    // dq: pairs of columns storable as 32-bit words
  bool pair_dkdv;  // dk and dv: same
};

// ------------------------------------------------------------------------------------------
// dQ
// ------------------------------------------------------------------------------------------
template <typename T, int D>
constexpr size_t dq_smem_bytes() {
  return static_cast<size_t>(2 * DqCfg<D>::BM + 2 * DqCfg<D>::BN) * (D + kPad) * sizeof(T);
}

// P = exp2(S * qk_scale - lse) where the mask allows (else 0) into s, and dP = dO V^T into dp,
// for this warp's 16 query rows and the BN keys from n0 (K, V tiles in shared memory).
template <typename T, int D, int BN, bool TWO_D>
__device__ __forceinline__ void dq_scores(float (&s)[BN / 8][4], float (&dp)[BN / 8][4],
                                          const T* sQ, const T* sdO, const T* sK, const T* sV,
                                          int n0, const Window (&w)[2], const float (&lse)[2],
                                          float qk_scale, int wv, int warp, int g, int t) {
  constexpr int LD = D + kPad;
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
    s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
    dp[j][0] = dp[j][1] = dp[j][2] = dp[j][3] = 0.0f;
  }
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t aq[4], ado[4];
    load_a(aq, sQ, LD, warp * 16, kk * 16, g, t);
    load_a(ado, sdO, LD, warp * 16, kk * 16, g, t);
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      uint32_t bf[2];
      load_b_nk(bf, sK, LD, j * 8, kk * 16, g, t);
      Elem<T>::mma(s[j], aq, bf);
      load_b_nk(bf, sV, LD, j * 8, kk * 16, g, t);
      Elem<T>::mma(dp[j], ado, bf);
    }
  }
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = n0 + 8 * j + 2 * t + (e & 1);
      const int xcol = TWO_D ? col % wv : 0;
      const int r = e >> 1;
      s[j][e] = allowed<TWO_D>(col, xcol, w[r]) ? exp2f(s[j][e] * qk_scale - lse[r]) : 0.0f;
    }
  }
}

template <typename T, int D, bool TWO_D>
__global__ void __launch_bounds__(kThreads, 2) attn_bwd_dq_kernel(const BwdArgs a) {
  constexpr int BM = DqCfg<D>::BM;
  constexpr int BN = DqCfg<D>::BN;
  constexpr int LD = D + kPad;
  static_assert(BM == 16 * kWarps, "one 16-row slab per warp");
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + BM * LD;
  T* sK = sdO + BM * LD;
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

  int row[2];
  Window w[2];
  float lse[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row[r] = qt.m0 + warp * 16 + g + 8 * r;
    const bool valid = row[r] < qt.row_end;
    w[r] = row_window(row[r], valid, qt.is_global, m);
    lse[r] = valid ? a.lse[bh * m.nq + row[r]] : 0.0f;
  }
  int n_lo, n_hi;
  tile_key_range(qt, BM, m, n_lo, n_hi);

  const T* Q = static_cast<const T*>(a.q) + b * a.sq.b + h * a.sq.h;
  const T* dO = static_cast<const T*>(a.dout) + b * a.sdo.b + h * a.sdo.h;
  const T* K = static_cast<const T*>(a.k) + b * a.sk.b + h * a.sk.h;
  const T* V = static_cast<const T*>(a.v) + b * a.sv.b + h * a.sv.h;
  load_tile<T, BM, D>(sQ, Q, a.sq.n, a.sq.d, qt.m0, qt.row_end, a.vec);
  load_tile<T, BM, D>(sdO, dO, a.sdo.n, a.sdo.d, qt.m0, qt.row_end, a.vec);

  float s[BN / 8][4], dp[BN / 8][4];

  // Pass 1: delta = rowsum(P * dP), fp32 (per-thread partial sums, reduced over the quad).
  float delta[2] = {0.0f, 0.0f};
  for (int n0 = n_lo; n0 < n_hi; n0 += BN) {
    __syncthreads();  // every warp is done with the previous K, V tiles
    load_tile<T, BN, D>(sK, K, a.sk.n, a.sk.d, n0, n_hi, a.vec);
    load_tile<T, BN, D>(sV, V, a.sv.n, a.sv.d, n0, n_hi, a.vec);
    __syncthreads();
    dq_scores<T, D, BN, TWO_D>(s, dp, sQ, sdO, sK, sV, n0, w, lse, a.qk_scale, m.p2, warp, g, t);
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) delta[e >> 1] += s[j][e] * dp[j][e];
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    delta[r] = quad_sum(delta[r]);
    if (t == 0 && row[r] < qt.row_end) a.delta[bh * m.nq + row[r]] = delta[r];
  }

  // Pass 2: dS = P * (dP - delta), dQ += dS K.
  float dq[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) dq[j][0] = dq[j][1] = dq[j][2] = dq[j][3] = 0.0f;
  for (int n0 = n_lo; n0 < n_hi; n0 += BN) {
    __syncthreads();
    load_tile<T, BN, D>(sK, K, a.sk.n, a.sk.d, n0, n_hi, a.vec);
    load_tile<T, BN, D>(sV, V, a.sv.n, a.sv.d, n0, n_hi, a.vec);
    __syncthreads();
    dq_scores<T, D, BN, TWO_D>(s, dp, sQ, sdO, sK, sV, n0, w, lse, a.qk_scale, m.p2, warp, g, t);
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] *= dp[j][e] - delta[e >> 1];
    }
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t af[4];
      c_to_a<T>(af, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        uint32_t bf[2];
        load_b_kn(bf, sK, LD, kk * 16, j * 8, g, t);
        Elem<T>::mma(dq[j], af, bf);
      }
    }
  }

  T* dQ = static_cast<T*>(a.dq) + b * a.sdq.b + h * a.sdq.h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row[r] < qt.row_end) {
      T* dq_row = dQ + static_cast<int64_t>(row[r]) * a.sdq.n;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        const int col = 8 * j + 2 * t;
        store_pair(dq_row + col * a.sdq.d, a.sdq.d, dq[j][2 * r] * a.sm_scale,
                   dq[j][2 * r + 1] * a.sm_scale, a.pair_dq);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// dK, dV
// ------------------------------------------------------------------------------------------
template <typename T, int D>
constexpr size_t dkdv_smem_bytes() {
  return static_cast<size_t>(2 * DkdvCfg<D>::BN + 2 * DkdvCfg<D>::BM) * (D + kPad) * sizeof(T) +
         static_cast<size_t>(DkdvCfg<D>::BM) * 6 * sizeof(int);
}

// Accumulate into dk, dv the contributions of query rows [q_lo, q_hi) (_dkdv_rows).
template <typename T, int D, bool TWO_D>
__device__ __forceinline__ void dkdv_rows(float (&dk)[D / 8][4], float (&dv)[D / 8][4],
                                          const BwdArgs& a, const Mask& m, const T* sK,
                                          const T* sV, T* sQ, T* sdO, int* sWin, float* sStat,
                                          const T* Q, const T* dO, int64_t bh, int q_lo, int q_hi,
                                          bool is_global, const int key[2], const int xkey[2],
                                          int warp, int g, int t) {
  constexpr int BM = DkdvCfg<D>::BM;
  constexpr int LD = D + kPad;
  int* sLo = sWin;
  int* sHi = sWin + BM;
  int* sX0 = sWin + 2 * BM;
  int* sX1 = sWin + 3 * BM;
  float* sLse = sStat;
  float* sDelta = sStat + BM;
  for (int m0 = q_lo; m0 < q_hi; m0 += BM) {
    __syncthreads();  // every warp is done with the previous query tile
    load_tile<T, BM, D>(sQ, Q, a.sq.n, a.sq.d, m0, q_hi, a.vec);
    load_tile<T, BM, D>(sdO, dO, a.sdo.n, a.sdo.d, m0, q_hi, a.vec);
    for (int i = threadIdx.x; i < BM; i += kThreads) {
      const int row = m0 + i;
      const bool valid = row < q_hi;
      const Window w = row_window(row, valid, is_global, m);
      sLo[i] = w.lo;
      sHi[i] = w.hi;
      sX0[i] = w.x0;
      sX1[i] = w.x1;
      sLse[i] = valid ? a.lse[bh * m.nq + row] : 0.0f;
      sDelta[i] = valid ? a.delta[bh * m.nq + row] : 0.0f;
    }
    __syncthreads();
    // Reload the K, V fragments from shared memory every step rather than keeping them
    // resident: D = 128 would need 64 more registers next to the 128 of dK and dV.
    asm volatile("" ::: "memory");

    // S^T = K Q^T, dP^T = V dO^T (16 keys x BM queries per warp)
    float st[BM / 8][4], dpt[BM / 8][4];
#pragma unroll
    for (int j = 0; j < BM / 8; ++j) {
      st[j][0] = st[j][1] = st[j][2] = st[j][3] = 0.0f;
      dpt[j][0] = dpt[j][1] = dpt[j][2] = dpt[j][3] = 0.0f;
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ak[4], av[4];
      load_a(ak, sK, LD, warp * 16, kk * 16, g, t);
      load_a(av, sV, LD, warp * 16, kk * 16, g, t);
#pragma unroll
      for (int j = 0; j < BM / 8; ++j) {
        uint32_t bf[2];
        load_b_nk(bf, sQ, LD, j * 8, kk * 16, g, t);
        Elem<T>::mma(st[j], ak, bf);
        load_b_nk(bf, sdO, LD, j * 8, kk * 16, g, t);
        Elem<T>::mma(dpt[j], av, bf);
      }
    }
    // P^T (into st), dS^T (into dpt); element (key[e >> 1], query 8j + 2t + (e & 1))
#pragma unroll
    for (int j = 0; j < BM / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qi = 8 * j + 2 * t + (e & 1);
        const int r = e >> 1;
        const Window w{sLo[qi], sHi[qi], TWO_D ? sX0[qi] : 0, TWO_D ? sX1[qi] : 0};
        const float p =
            allowed<TWO_D>(key[r], xkey[r], w) ? exp2f(st[j][e] * a.qk_scale - sLse[qi]) : 0.0f;
        st[j][e] = p;
        dpt[j][e] = p * (dpt[j][e] - sDelta[qi]);
      }
    }
    // dV += P^T dO, dK += dS^T Q
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      uint32_t ap[4], ads[4];
      c_to_a<T>(ap, st[2 * kk], st[2 * kk + 1]);
      c_to_a<T>(ads, dpt[2 * kk], dpt[2 * kk + 1]);
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        uint32_t bf[2];
        load_b_kn(bf, sdO, LD, kk * 16, j * 8, g, t);
        Elem<T>::mma(dv[j], ap, bf);
        load_b_kn(bf, sQ, LD, kk * 16, j * 8, g, t);
        Elem<T>::mma(dk[j], ads, bf);
      }
    }
  }
}

template <typename T, int D, bool TWO_D>
__global__ void __launch_bounds__(kThreads, 2) attn_bwd_dkdv_kernel(const BwdArgs a) {
  constexpr int BN = DkdvCfg<D>::BN;
  constexpr int BM = DkdvCfg<D>::BM;
  constexpr int LD = D + kPad;
  static_assert(BN == 16 * kWarps, "one 16-key slab per warp");
  extern __shared__ __align__(16) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + BN * LD;
  T* sQ = sV + BN * LD;
  T* sdO = sQ + BM * LD;
  int* sWin = reinterpret_cast<int*>(sdO + BM * LD);  // lo, hi, x0, x1 of BM query rows
  float* sStat = reinterpret_cast<float*>(sWin + 4 * BM);  // lse, delta of BM query rows

  const Mask m = a.m;
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / a.heads;
  const int64_t h = bh % a.heads;
  const int n0 = static_cast<int>(blockIdx.y) * BN;
  const int n_last = min(n0 + BN, m.nv) - 1;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  int key[2], xkey[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    key[r] = n0 + warp * 16 + g + 8 * r;
    xkey[r] = TWO_D ? key[r] % m.p2 : 0;
  }

  const T* K = static_cast<const T*>(a.k) + b * a.sk.b + h * a.sk.h;
  const T* V = static_cast<const T*>(a.v) + b * a.sv.b + h * a.sv.h;
  const T* Q = static_cast<const T*>(a.q) + b * a.sq.b + h * a.sq.h;
  const T* dO = static_cast<const T*>(a.dout) + b * a.sdo.b + h * a.sdo.h;
  load_tile<T, BN, D>(sK, K, a.sk.n, a.sk.d, n0, m.nv, a.vec);
  load_tile<T, BN, D>(sV, V, a.sv.n, a.sv.d, n0, m.nv, a.vec);
  // (made visible by the barriers at the top of dkdv_rows' loop)

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    dk[j][0] = dk[j][1] = dk[j][2] = dk[j][3] = 0.0f;
    dv[j][0] = dv[j][1] = dv[j][2] = dv[j][3] = 0.0f;
  }

  // Segment 0: the partial queries (all queries of a band) whose windows can hold these keys;
  // segment 1 (partial-global masks): every global query, which sees every key.
  int q_lo, q_hi;
  partial_rows_of_keys(n0, n_last, m, q_lo, q_hi);
  const int n_segments = m.kind == kAttnKindBand ? 1 : 2;
  for (int seg = 0; seg < n_segments; ++seg) {
    dkdv_rows<T, D, TWO_D>(dk, dv, a, m, sK, sV, sQ, sdO, sWin, sStat, Q, dO, bh,
                           seg == 0 ? q_lo : m.p0, seg == 0 ? q_hi : global_rows_end(n_last, m),
                           seg == 1, key, xkey, warp, g, t);
  }

  T* dK = static_cast<T*>(a.dk) + b * a.sdk.b + h * a.sdk.h;
  T* dV = static_cast<T*>(a.dv) + b * a.sdv.b + h * a.sdv.h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (key[r] < m.nv) {
      T* dk_row = dK + static_cast<int64_t>(key[r]) * a.sdk.n;
      T* dv_row = dV + static_cast<int64_t>(key[r]) * a.sdv.n;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        const int col = 8 * j + 2 * t;
        store_pair(dk_row + col * a.sdk.d, a.sdk.d, dk[j][2 * r] * a.sm_scale,
                   dk[j][2 * r + 1] * a.sm_scale, a.pair_dkdv);
        store_pair(dv_row + col * a.sdv.d, a.sdv.d, dv[j][2 * r], dv[j][2 * r + 1],
                   a.pair_dkdv);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// launchers
// ------------------------------------------------------------------------------------------
template <typename Kernel>
cudaError_t launch(Kernel kernel, dim3 grid, size_t smem, const BwdArgs& a, cudaStream_t stream) {
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int D, bool TWO_D>
cudaError_t launch_bwd(const BwdArgs& a, int64_t bh, cudaStream_t stream) {
  const unsigned grid_x = static_cast<unsigned>(bh);
  // dQ writes delta, dK/dV reads it: same stream, so ordered.
  const cudaError_t err = launch(attn_bwd_dq_kernel<T, D, TWO_D>,
               dim3(grid_x, num_query_tiles(a.m, DqCfg<D>::BM)), dq_smem_bytes<T, D>(), a,
               stream);
  if (err != cudaSuccess) return err;
  return launch(attn_bwd_dkdv_kernel<T, D, TWO_D>,
                dim3(grid_x, (a.m.nv + DkdvCfg<D>::BN - 1) / DkdvCfg<D>::BN),
                dkdv_smem_bytes<T, D>(), a, stream);
}

template <typename T>
cudaError_t dispatch_bwd(const BwdArgs& a, int d, int64_t bh, cudaStream_t stream) {
  const bool two_d = a.m.kind == kAttnKindPG2D;
  if (d == 64) return two_d ? launch_bwd<T, 64, true>(a, bh, stream)
                            : launch_bwd<T, 64, false>(a, bh, stream);
  if (d == 128) return two_d ? launch_bwd<T, 128, true>(a, bh, stream)
                             : launch_bwd<T, 128, false>(a, bh, stream);
  return cudaErrorInvalidValue;
}

}  // namespace
}  // namespace attn

cudaError_t attention_backward(const void* dout, const void* q, const void* k, const void* v,
                               const float* lse, float* delta, void* dq, void* dk, void* dv,
                               DType dtype, const AttnShape& s, Strides4 sdo, Strides4 sq,
                               Strides4 sk, Strides4 sv, Strides4 sdq, Strides4 sdk,
                               Strides4 sdv, cudaStream_t stream) {
  if (attention_unsupported_reason(dtype, s) != nullptr) return cudaErrorInvalidValue;
  const int64_t bh = s.batch * s.heads;
  if (bh == 0) return cudaSuccess;
  using attn::rows_vectorizable;
  attn::BwdArgs a{dout, q, k, v, lse, delta, dq, dk, dv,
                  sdo, sq, sk, sv, sdq, sdk, sdv, s.heads, attn::make_mask(s),
                  s.scale * attn::kLog2e, s.scale,
                  rows_vectorizable(q, sq, 8) && rows_vectorizable(k, sk, 8) &&
                      rows_vectorizable(v, sv, 8) && rows_vectorizable(dout, sdo, 8),
                  rows_vectorizable(dq, sdq, 2),
                  rows_vectorizable(dk, sdk, 2) && rows_vectorizable(dv, sdv, 2)};
  if (dtype == DType::kFloat16) return attn::dispatch_bwd<__half>(a, s.head_dim, bh, stream);
  return attn::dispatch_bwd<__nv_bfloat16>(a, s.head_dim, bh, stream);
}

}  // namespace pargo
