// Device-side building blocks of the attention kernels (included by attention_fwd.cu and
// attention_bwd.cu only; no torch header):
//
// * the mask-window logic, a line-by-line port of pargo_kernels/ops/attention_triton.py
//   (_row_windows, _allowed, _query_tile, the key range of a query tile, and the inverse map
//   used by dK/dV);
// * tensor-core fragments for mma.sync.aligned.m16n8k16 (fp16 / bf16 in, fp32 accumulate),
//   loaded straight from row-major shared memory;
// * the global -> shared tile loader (any strides; 16-byte vectors when the rows allow).
//
// Thread <-> fragment layout of m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with
// lane = 4 * g + t:
//   A (16 x 16, row-major): reg0 = (row g,   k 2t..2t+1), reg1 = (row g+8, k 2t..2t+1),
//                           reg2 = (row g,   k 2t+8..+9), reg3 = (row g+8, k 2t+8..+9)
//   B (16 x 8, "col"):      reg0 = (k 2t..2t+1, col g),   reg1 = (k 2t+8..2t+9, col g)
//   C (16 x 8, fp32):       c0, c1 = (row g, cols 2t, 2t+1), c2, c3 = (row g+8, cols 2t, 2t+1)
// The lower 16 bits of a register hold the element of lower k. The C fragments of two adjacent
// 8-column tiles are exactly the A fragment of a 16-wide k chunk (FlashAttention-2's register
// reuse of P), see c_to_a().
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention.h"

namespace pargo {
namespace attn {

constexpr int kThreads = 128;  // 4 warps; each owns 16 rows of a 64-row tile
constexpr int kWarps = kThreads / 32;
constexpr int kPad = 8;  // shared-memory row padding (elements): conflict-free fragment loads
constexpr float kLog2e = 1.4426950408889634f;

// Tile shapes, one table for the launchers and the kernels.
template <int D>
struct FwdCfg {
  static constexpr int BM = 64;  // queries per CTA (16 per warp)
  static constexpr int BN = D <= 64 ? 64 : 32;  // keys per step (D = 128: 255 regs at 64)
};
template <int D>
struct DqCfg {
  static constexpr int BM = 64;
  static constexpr int BN = D <= 64 ? 64 : 32;  // S and dP in registers next to a D-wide dQ
};
template <int D>
struct DkdvCfg {
  static constexpr int BN = 64;                 // keys per CTA (16 per warp)
  static constexpr int BM = D <= 64 ? 64 : 16;  // queries per step, next to D-wide dK and dV
};

// ------------------------------------------------------------------------------------------
// element types and the mma instruction
// ------------------------------------------------------------------------------------------
template <typename T>
struct Elem;

template <>
struct Elem<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], const uint32_t b[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap();  // the launchers refuse devices below sm_80
#endif
  }
};

template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) {
    return __float2bfloat16_rn(x);
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], const uint32_t b[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap();
#endif
  }
};

// ------------------------------------------------------------------------------------------
// fragments from row-major shared memory (ld = row stride in elements, even)
// ------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ uint32_t ld_pair(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

template <typename T>
__device__ __forceinline__ uint32_t ld_two(const T* lo, const T* hi) {
  const uint32_t a = *reinterpret_cast<const uint16_t*>(lo);
  const uint32_t b = *reinterpret_cast<const uint16_t*>(hi);
  return a | (b << 16);
}

// A = s[row0 .. row0+15][k0 .. k0+15] (s row-major [row][k]).
template <typename T>
__device__ __forceinline__ void load_a(uint32_t a[4], const T* s, int ld, int row0, int k0,
                                       int g, int t) {
  const T* p = s + (row0 + g) * ld + k0 + 2 * t;
  a[0] = ld_pair(p);
  a[1] = ld_pair(p + 8 * ld);
  a[2] = ld_pair(p + 8);
  a[3] = ld_pair(p + 8 * ld + 8);
}

// B[k][n] = s[n0 + n][k0 + k]: s holds B transposed ([n][k] row-major, e.g. K for Q K^T).
template <typename T>
__device__ __forceinline__ void load_b_nk(uint32_t b[2], const T* s, int ld, int n0, int k0,
                                          int g, int t) {
  const T* p = s + (n0 + g) * ld + k0 + 2 * t;
  b[0] = ld_pair(p);
  b[1] = ld_pair(p + 8);
}

// B[k][n] = s[k0 + k][n0 + n]: s holds B itself ([k][n] row-major, e.g. V for P V).
template <typename T>
__device__ __forceinline__ void load_b_kn(uint32_t b[2], const T* s, int ld, int k0, int n0,
                                          int g, int t) {
  const T* p = s + (k0 + 2 * t) * ld + n0 + g;
  b[0] = ld_two(p, p + ld);
  b[1] = ld_two(p + 8 * ld, p + 9 * ld);
}

// A fragment of k chunk kk from C fragments c[2kk], c[2kk+1] (rounded to T).
template <typename T>
__device__ __forceinline__ void c_to_a(uint32_t a[4], const float c0[4], const float c1[4]) {
  a[0] = Elem<T>::pack(c0[0], c0[1]);
  a[1] = Elem<T>::pack(c0[2], c0[3]);
  a[2] = Elem<T>::pack(c1[0], c1[1]);
  a[3] = Elem<T>::pack(c1[2], c1[3]);
}

// ------------------------------------------------------------------------------------------
// global -> shared tiles
// ------------------------------------------------------------------------------------------
// s[r][c] = g[(row0 + r) * s_row + c * s_col] for r < ROWS, c < C, zero where row0 + r >=
// row_end (so padding rows never carry NaN / inf into a product). vec: s_col == 1 and every row
// start 16-byte aligned.
template <typename T, int ROWS, int C>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t s_row, int64_t s_col,
                                          int row0, int row_end, bool vec) {
  constexpr int kChunks = C / 8;  // 8 elements = 16 bytes per chunk
  constexpr int ld = C + kPad;
  static_assert((ROWS * kChunks) % kThreads == 0, "tile must split evenly over the threads");
#pragma unroll
  for (int it = 0; it < ROWS * kChunks / kThreads; ++it) {
    const int i = it * kThreads + static_cast<int>(threadIdx.x);
    const int r = i / kChunks;
    const int c = (i % kChunks) * 8;
    const int row = row0 + r;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (row < row_end) {
      const T* p = g + static_cast<int64_t>(row) * s_row;
      if (vec) {
        val = __ldg(reinterpret_cast<const uint4*>(p + c));
      } else {
        val.x = ld_two(p + (c + 0) * s_col, p + (c + 1) * s_col);
        val.y = ld_two(p + (c + 2) * s_col, p + (c + 3) * s_col);
        val.z = ld_two(p + (c + 4) * s_col, p + (c + 5) * s_col);
        val.w = ld_two(p + (c + 6) * s_col, p + (c + 7) * s_col);
      }
    }
    *reinterpret_cast<uint4*>(s + r * ld + c) = val;
  }
}

// ------------------------------------------------------------------------------------------
// mask windows (port of attention_triton.py)
// ------------------------------------------------------------------------------------------
struct Mask {
  int kind, nq, nv, p0, p1, p2, p3, p4;
};

__host__ __device__ __forceinline__ Mask make_mask(const AttnShape& s) {
  return Mask{s.kind, s.nq, s.nv, s.p[0], s.p[1], s.p[2], s.p[3], s.p[4]};
}

// Key window of one query row: flat [lo, hi) and, for 2-D windows, columns [x0, x1).
// Rows that are not valid get the empty window [0, 0) (_row_windows).
struct Window {
  int lo, hi, x0, x1;
};

__device__ __forceinline__ Window row_window(int row, bool valid, bool is_global, const Mask& m) {
  Window w{0, 0, 0, 0};
  if (!valid) return w;
  if (m.kind == kAttnKindBand) {  // p0 = left, p1 = right
    w.lo = max(row - m.p0, 0);
    w.hi = min(row + m.p1 + 1, m.nv);
  } else if (m.kind == kAttnKindParGoSelf) {  // p0 = n_partial, (p1, p2) = (left, right)
    w.lo = is_global ? m.p0 : max(row - m.p1, 0);
    w.hi = is_global ? m.nv : min(row + m.p2 + 1, m.p0);
  } else if (is_global) {  // global queries see every key (every column of a 2-D grid)
    w.lo = 0;
    w.hi = m.nv;
    w.x1 = m.p2;
  } else if (m.kind == kAttnKindPG1D) {  // p0 = n_partial
    const int64_t np = max(m.p0, 1);
    w.lo = static_cast<int>(static_cast<int64_t>(row) * m.nv / np);
    w.hi = static_cast<int>(static_cast<int64_t>(row + 1) * m.nv / np);
  } else {  // 2-D: p0 = n_partial, (p1, p2) = (Hv, Wv), (p3, p4) = (hp, wp)
    const int r = row / m.p4;
    const int c = row % m.p4;
    const int y0 = (r * m.p1) / m.p3;
    const int y1 = ((r + 1) * m.p1 + m.p3 - 1) / m.p3;
    w.lo = y0 * m.p2;
    w.hi = y1 * m.p2;
    w.x0 = (c * m.p2) / m.p4;
    w.x1 = ((c + 1) * m.p2 + m.p4 - 1) / m.p4;
  }
  return w;
}

// _allowed: col is the key index, xcol = col % Wv (used only for 2-D windows).
template <bool TWO_D>
__device__ __forceinline__ bool allowed(int col, int xcol, const Window& w) {
  bool ok = col >= w.lo && col < w.hi;
  if (TWO_D) ok = ok && xcol >= w.x0 && xcol < w.x1;
  return ok;
}

// _query_tile: partial tiles first (rows [0, Np)), then global tiles (rows [Np, Nq)), so no
// tile mixes the two; a band has one segment.
struct QueryTile {
  int m0, row_end;
  bool is_global;
};

__host__ __device__ __forceinline__ int num_query_tiles(const Mask& m, int bm) {
  if (m.kind == kAttnKindBand) return (m.nq + bm - 1) / bm;
  return (m.p0 + bm - 1) / bm + (m.nq - m.p0 + bm - 1) / bm;
}

__device__ __forceinline__ QueryTile query_tile(int pid, int bm, const Mask& m) {
  const int n_seg = m.kind == kAttnKindBand ? m.nq : m.p0;
  const int n_ptiles = (n_seg + bm - 1) / bm;
  QueryTile q;
  q.is_global = pid >= n_ptiles;
  q.m0 = q.is_global ? n_seg + (pid - n_ptiles) * bm : pid * bm;
  q.row_end = q.is_global ? m.nq : n_seg;
  return q;
}

// Key range [n_lo, n_hi) a query tile must visit (the union of its rows' windows). Every window
// kind is monotone in the row (lo and hi never decrease as the row grows: 1-D chunks, bands,
// 2-D grid rows), so the union spans from the first row's lo to the last valid row's hi; the
// Triton kernel takes the min / max over the rows, which is the same.
__device__ __forceinline__ void tile_key_range(const QueryTile& qt, int bm, const Mask& m,
                                               int& n_lo, int& n_hi) {
  const int last = min(qt.m0 + bm, qt.row_end) - 1;
  n_lo = row_window(qt.m0, true, qt.is_global, m).lo;
  n_hi = row_window(last, true, qt.is_global, m).hi;
}

// Query rows of the first segment (partial queries, or all rows of a band) whose windows can
// hold a key in [n0, n_last]: the inverse of row_window, conservative by at most a tile (the
// same formulas as _attn_bwd_dkdv_kernel).
__device__ __forceinline__ void partial_rows_of_keys(int n0, int n_last, const Mask& m,
                                                     int& q_lo, int& q_hi) {
  if (m.kind == kAttnKindBand) {
    q_lo = max(n0 - m.p1, 0);
    q_hi = min(n_last + m.p0 + 1, m.nq);
  } else if (m.kind == kAttnKindParGoSelf) {  // partial key j: partial rows [j - right, j + left]
    q_lo = max(n0 - m.p2, 0);
    q_hi = n0 < m.p0 ? min(n_last + m.p1 + 1, m.p0) : 0;
  } else if (m.kind == kAttnKindPG1D) {
    const int64_t nv = m.nv;
    q_lo = max(static_cast<int>(((n0 + 1) * static_cast<int64_t>(m.p0) + nv - 1) / nv) - 1, 0);
    q_hi = min(static_cast<int>(((n_last + 1) * static_cast<int64_t>(m.p0) + nv - 1) / nv), m.p0);
  } else {
    const int r_lo = ((n0 / m.p2) * m.p3) / m.p1;
    const int r_hi = min(((n_last / m.p2 + 1) * m.p3 + m.p1 - 1) / m.p1, m.p3);
    q_lo = r_lo * m.p4;
    q_hi = r_hi * m.p4;
  }
}

// End of the global query rows [p0, end) that can see a key in [n0, n_last]: all of them for
// partial-global masks; for ParGo self-attention none unless the tile holds a global key.
__device__ __forceinline__ int global_rows_end(int n_last, const Mask& m) {
  return m.kind == kAttnKindParGoSelf && n_last < m.p0 ? m.p0 : m.nq;
}

// Host: column stride 1 and every row start aligned to `elems` 2-byte elements (16-byte vector
// loads for elems = 8, 32-bit pair stores for elems = 2). Defined in attention_fwd.cu.
bool rows_vectorizable(const void* p, const Strides4& s, int elems);

// Row max / sum over the 4 lanes (t = 0..3) that share a fragment row.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Store a pair (cols c, c+1) of one output row: a 32-bit store when `pair` (column stride 1,
// rows 4-byte aligned), else two scalar stores.
template <typename T>
__device__ __forceinline__ void store_pair(T* p, int64_t s_col, float x0, float x1, bool pair) {
  if (pair) {
    *reinterpret_cast<uint32_t*>(p) = Elem<T>::pack(x0, x1);
  } else {
    p[0] = Elem<T>::from_float(x0);
    p[s_col] = Elem<T>::from_float(x1);
  }
}

}  // namespace attn
}  // namespace pargo
