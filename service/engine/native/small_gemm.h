// out = other + x·w for the recurrent loops' small per-step products, register-blocked with
// vectors of SMALL_GEMM_VECTOR_BYTES. recurrent_cpu.cpp includes this file once per instruction
// set, inside that set's target pragma and with these macros defined: AVX-512 (x86-64-v4, 64-byte
// vectors, blocks of up to 8 rows) and AVX2 (x86-64-v3, 32-byte vectors, blocks of up to 4 rows:
// it has 16 vector registers, not 32), and calls the one the CPU has.
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

#include <cstdint>

#ifndef GRADHEALTH_SMALL_GEMM_OPERANDS
#define GRADHEALTH_SMALL_GEMM_OPERANDS
namespace gradhealth::small_gemm {
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
}  // namespace gradhealth::small_gemm
#endif

namespace gradhealth::small_gemm::SMALL_GEMM_ISA {

constexpr int kLanes = SMALL_GEMM_VECTOR_BYTES / 4;  // floats in a vector
constexpr int kMaxRows = SMALL_GEMM_MAX_ROWS;
// unaligned (aligned(4)) and may_alias: loads and stores straight from the float buffers. (They
// were memcpy's: with 32-byte vectors GCC copied each through the stack in 16-byte halves, and
// kept the accumulators there, ~10x slower than addmm)
typedef float vec __attribute__((vector_size(SMALL_GEMM_VECTOR_BYTES), aligned(4), may_alias));

inline vec load(const float* at) { return *reinterpret_cast<const vec*>(at); }
inline void store(float* at, vec value) { *reinterpret_cast<vec*>(at) = value; }

// rows [row, row + ROWS) × columns [col, col + VECS · kLanes)
template <int ROWS, int VECS>
inline void block(const Operands& p, int64_t row, int64_t col) {
  vec acc[ROWS][VECS];
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECS; ++v) acc[r][v] = load(p.other + (row + r) * p.ldo + col + v * kLanes);
  const float* x = p.x + row * p.ldx;
  for (int64_t k = 0; k < p.K; ++k) {
    vec wk[VECS];
    for (int v = 0; v < VECS; ++v) wk[v] = load(p.w + k * p.ldw + col + v * kLanes);
    for (int r = 0; r < ROWS; ++r) {
      const float xv = x[r * p.ldx + k];
      for (int v = 0; v < VECS; ++v) acc[r][v] += xv * wk[v];
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECS; ++v) store(p.out + (row + r) * p.ldout + col + v * kLanes, acc[r][v]);
}

// the last N % kLanes columns, one scalar at a time
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

// kMaxRows rows × two vectors of columns a block (AVX-512: 16 accumulators of the 32 vector
// registers; AVX2: 8 of 16), fewer rows at the end of the batch
inline void multiply_add(const Operands& p, int64_t rows) {
  int64_t row = 0;
  if constexpr (kMaxRows == 8) {
    for (; row + 8 <= rows; row += 8) row_block<8>(p, row);
  }
  for (; row + 4 <= rows; row += 4) row_block<4>(p, row);
  for (; row < rows; ++row) row_block<1>(p, row);
}

}  // namespace gradhealth::small_gemm::SMALL_GEMM_ISA
