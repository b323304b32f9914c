// Sigmoid and tanh inside the recurrent loops' own element loops.
//
// Why not torch's kernels: a step of a small LSTM (batch 8, hidden 128) spent more time in the
// four calls that apply its activations (sigmoid on three gate blocks, tanh on the fourth and
// on the cell) than in its matrix product: each call is a dispatch and a TensorIterator set-up
// for 1,024-3,072 elements. Written here as plain branch-free arithmetic, the compiler
// vectorises them together with the cell update into one pass over the step.
//
// float: Cephes' expf (range reduction to |r| <= ln2/2, degree-5 polynomial, ~1 ulp) and
// Cephes' tanhf polynomial below |x| = 0.625 (where 2σ(2x) − 1 would cancel); results agree
// with torch's to a few ulp. double: std::exp and std::tanh (tests and gradchecks; no speed
// needed). NaN stays NaN and ±inf saturate, as in torch.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace gradhealth {

inline float exp_approx(float x) {
  // clamp: exp(88.72) is float's largest finite power; NaN passes through both comparisons
  x = x > 88.72f ? 88.72f : x;
  x = x < -87.33f ? -87.33f : x;
  // round(x / ln2) by the 1.5·2^23 trick: branch-free (std::floor is a libm call without
  // SSE4.1, which keeps the loop from vectorising)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - n * 0.693359375f - n * -2.12194440e-4f;  // ln2 in two parts: exact r
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n through the exponent bits (n is in [-126, 128] after the clamp; a NaN n becomes 0
  // before the conversion, which would be undefined for it, and p carries the NaN)
  const float whole = n == n ? n : 0.0f;
  const int32_t bits = (static_cast<int32_t>(whole) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline float sigmoid_approx(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

inline float tanh_approx(float x) {
  const float ax = std::fabs(x);
  const float large = 1.0f - 2.0f / (exp_approx(2.0f * ax) + 1.0f);  // |x| >= 0.625
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = x + x * z * p;
  return ax >= 0.625f ? std::copysign(large, x) : small;
}

template <typename scalar_t>
inline scalar_t sigmoid(scalar_t x) {
  return scalar_t(1) / (scalar_t(1) + std::exp(-x));
}

template <typename scalar_t>
inline scalar_t tanh(scalar_t x) {
  return std::tanh(x);
}

template <>
inline float sigmoid<float>(float x) {
  return sigmoid_approx(x);
}

template <>
inline float tanh<float>(float x) {
  return tanh_approx(x);
}

}  // namespace gradhealth
