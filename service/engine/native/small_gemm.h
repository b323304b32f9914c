// out = other + x·w for the recurrent loops' small per-step products, register-blocked with
// 512-bit vectors; recurrent_cpu.cpp compiles it for x86-64-v4 (AVX-512) only and calls it on
// CPUs that have it.
//
// Why: a step's product is tiny (batch 8, hidden 128: [8, 128]·[128, 512], 0.5 M multiply-adds)
// and MKL's sgemm spends most of its time around it (packing w on every call): 15.6 µs on an AMD
// EPYC (Zen 5), where this kernel takes 5.1 µs (one thread; 100+ G multiply-adds/s, close to the
// core's peak). Each block keeps ROWS × VECS vectors of out in registers while k runs over the
// whole reduction, reading one row of w and one scalar of x per row and k. Larger products go to
// oneDNN or MKL, which block for the caches; this one does not.
//
// x [B, K] with row stride ldx; w [K, N] with row stride ldw (N for a whole row-major matrix, more
// for a band of its columns); other, out [B, N] with row strides ldo, ldout; out may be other
// (each block reads its part of other before writing the same part of out).

#pragma once

#include <cstdint>
#include <cstring>

namespace gradhealth::small_gemm {

constexpr int kLanes = 16;  // floats in a 512-bit vector
typedef float vec __attribute__((vector_size(64), aligned(4)));

struct Operands {
  const float* x;
  int64_t ldx;
  const float* w;
  int64_t K, N, ldw;
  const float* other;
  int64_t ldo;
  float* out;
  int64_t ldout;
};

// rows [row, row + ROWS) × columns [col, col + VECS · kLanes)
template <int ROWS, int VECS>
inline void block(const Operands& p, int64_t row, int64_t col) {
  vec acc[ROWS][VECS];
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECS; ++v) std::memcpy(&acc[r][v], p.other + (row + r) * p.ldo + col + v * kLanes, 64);
  const float* x = p.x + row * p.ldx;
  for (int64_t k = 0; k < p.K; ++k) {
    vec wk[VECS];
    for (int v = 0; v < VECS; ++v) std::memcpy(&wk[v], p.w + k * p.ldw + col + v * kLanes, 64);
    for (int r = 0; r < ROWS; ++r) {
      const float xv = x[r * p.ldx + k];
      for (int v = 0; v < VECS; ++v) acc[r][v] += xv * wk[v];
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECS; ++v) std::memcpy(p.out + (row + r) * p.ldout + col + v * kLanes, &acc[r][v], 64);
}

// the last N % 16 columns, one scalar at a time
inline void tail_columns(const Operands& p, int64_t row, int64_t col) {
  for (int64_t c = col; c < p.N; ++c) {
    float acc = p.other[row * p.ldo + c];
    for (int64_t k = 0; k < p.K; ++k) acc += p.x[row * p.ldx + k] * p.w[k * p.ldw + c];
    p.out[row * p.ldout + c] = acc;
  }
}

template <int ROWS>
inline void row_block(const Operands& p, int64_t row) {
  int64_t col = 0;
  for (; col + 2 * kLanes <= p.N; col += 2 * kLanes) block<ROWS, 2>(p, row, col);
  for (; col + kLanes <= p.N; col += kLanes) block<ROWS, 1>(p, row, col);
  for (int r = 0; r < ROWS; ++r) tail_columns(p, row + r, col);
}

// 8 rows × 32 columns a block (16 accumulators of the 32 vector registers), fewer rows at the
// end of the batch
inline void multiply_add(const Operands& p, int64_t rows) {
  int64_t row = 0;
  for (; row + 8 <= rows; row += 8) row_block<8>(p, row);
  for (; row + 4 <= rows; row += 4) row_block<4>(p, row);
  for (; row < rows; ++row) row_block<1>(p, row);
}

}  // namespace gradhealth::small_gemm
