// CPU kernel of ddim_fast::geglu: out = a * gelu(gate) for h = [a, gate] along the last
// dimension, the exact (erf) GELU as diffusers' GEGLU applies it, in fp32 and rounded once.
// Reads h once and writes out once: 1R+1W (of 2F and F values per row) where a GELU and a
// product take 3R+2W, and one call instead of two.

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>

#include "../transformer.h"
#include "vec_util.h"

namespace ddim_fast {
namespace cpu {
namespace {

constexpr float kSqrtHalf = 0.70710678118654752440f;

// gelu(g) = g * (1 + erf(g / sqrt(2))) / 2
inline Vec gelu_v(Vec g) { return g * Vec(0.5f) * (Vec(1.f) + (g * Vec(kSqrtHalf)).erf()); }
inline float gelu_f(float g) { return g * 0.5f * (1.f + std::erf(g * kSqrtHalf)); }

template <typename T>
inline void geglu_row(const T* a, const T* gate, T* out, int64_t F) {
  int64_t i = 0;
  for (; i + kPair <= F; i += kPair) {
    Vec a0, a1, g0, g1;
    load_pair(a + i, a0, a1);
    load_pair(gate + i, g0, g1);
    store_pair(out + i, a0 * gelu_v(g0), a1 * gelu_v(g1));
  }
  for (; i < F; ++i) out[i] = static_cast<T>(static_cast<float>(a[i]) * gelu_f(static_cast<float>(gate[i])));
}

at::Tensor geglu_cpu(const at::Tensor& h) {
  const RowsArgs a = check_geglu(h);
  std::vector<int64_t> shape(h.sizes().begin(), h.sizes().end());
  shape.back() = a.width;
  at::Tensor out = at::empty(shape, h.options());
  if (out.numel() == 0) return out;
  const int64_t F = a.width;
  dispatch_float(h.scalar_type(), "geglu", [&](auto tag) {
    using T = decltype(tag);
    const T* hp = h.const_data_ptr<T>();
    T* op = out.data_ptr<T>();
    const int64_t grain = std::max<int64_t>(1, 16384 / F);  // rows per task: ~16k outputs
    at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const T* in = hp + row * 2 * F;
        geglu_row(in, in + F, op + row * F, F);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(ddim_fast, CPU, m) {
  m.impl("geglu", &cpu::geglu_cpu);
}

}  // namespace ddim_fast
