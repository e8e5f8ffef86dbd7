// CPU kernel of ddim_fast::add_layer_norm: a transformer layer's residual add and the
// LayerNorm after it, one row (a token's D channels) at a time. Reads x and residual once,
// writes s and y once (the row is then in cache for the statistics and the output): 2R+2W
// where an add and a LayerNorm take 3R+2W, and one call instead of two.
//
// Statistics of the stored (rounded) sum in fp32, mean first and then the centred second
// moment (an exact two-pass variance: no cancellation whatever the mean).

#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../transformer.h"
#include "vec_util.h"

namespace ddim_fast {
namespace cpu {
namespace {

inline float reduce_sum(Vec v) {
  return at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, v);
}

// s = round_T(x + r) for one row, and the sum of the rounded values.
template <typename T>
inline float add_row(const T* x, const T* r, T* s, int64_t D) {
  Vec acc0(0.f), acc1(0.f);
  int64_t i = 0;
  for (; i + kPair <= D; i += kPair) {
    Vec x0, x1, r0, r1, s0, s1;
    load_pair(x + i, x0, x1);
    load_pair(r + i, r0, r1);
    store_pair(s + i, x0 + r0, x1 + r1);
    load_pair(s + i, s0, s1);  // the stored values: rounded to T as a separate add stores them
    acc0 = acc0 + s0;
    acc1 = acc1 + s1;
  }
  float tail = 0.f;
  for (; i < D; ++i) {
    s[i] = static_cast<T>(static_cast<float>(x[i]) + static_cast<float>(r[i]));
    tail += static_cast<float>(s[i]);
  }
  return reduce_sum(acc0 + acc1) + tail;
}

template <typename T>
inline float centred_sum_of_squares(const T* s, int64_t D, float mean) {
  const Vec m(mean);
  Vec acc0(0.f), acc1(0.f);
  int64_t i = 0;
  for (; i + kPair <= D; i += kPair) {
    Vec s0, s1;
    load_pair(s + i, s0, s1);
    acc0 = at::vec::fmadd(s0 - m, s0 - m, acc0);
    acc1 = at::vec::fmadd(s1 - m, s1 - m, acc1);
  }
  float tail = 0.f;
  for (; i < D; ++i) {
    const float d = static_cast<float>(s[i]) - mean;
    tail += d * d;
  }
  return reduce_sum(acc0 + acc1) + tail;
}

// y = (s - mean) * rstd * w + b
template <typename T>
inline void normalize_row(const T* s, T* y, int64_t D, float mean, float rstd, const float* w, const float* b) {
  const Vec m(mean), rs(rstd);
  int64_t i = 0;
  for (; i + kPair <= D; i += kPair) {
    Vec s0, s1;
    load_pair(s + i, s0, s1);
    store_pair(y + i, (s0 - m) * rs * Vec::loadu(w + i) + Vec::loadu(b + i),
               (s1 - m) * rs * Vec::loadu(w + i + kVec) + Vec::loadu(b + i + kVec));
  }
  for (; i < D; ++i) y[i] = static_cast<T>((static_cast<float>(s[i]) - mean) * rstd * w[i] + b[i]);
}

// The parameter as D floats: absent is `fill`.
std::vector<float> param_f(const std::optional<at::Tensor>& p, int64_t D, float fill) {
  std::vector<float> out(D, fill);
  if (!p.has_value()) return out;
  dispatch_float(p->scalar_type(), "add_layer_norm", [&](auto tag) {
    using W = decltype(tag);
    const W* src = p->const_data_ptr<W>();
    for (int64_t i = 0; i < D; ++i) out[i] = static_cast<float>(src[i]);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_layer_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                      const std::optional<at::Tensor>& weight,
                                                      const std::optional<at::Tensor>& bias, double eps) {
  const RowsArgs a = check_add_layer_norm(x, residual, weight, bias, eps);
  at::Tensor s = at::empty_like(x);
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return {s, y};
  const int64_t D = a.width;
  const std::vector<float> w = param_f(weight, D, 1.f);
  const std::vector<float> b = param_f(bias, D, 0.f);
  const float eps_f = static_cast<float>(eps);
  dispatch_float(x.scalar_type(), "add_layer_norm", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.const_data_ptr<T>();
    const T* rp = residual.const_data_ptr<T>();
    T* sp = s.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    const int64_t grain = std::max<int64_t>(1, 16384 / D);  // rows per task: ~16k values
    at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t o = row * D;
        const float mean = add_row(xp + o, rp + o, sp + o, D) / static_cast<float>(D);
        const float var = centred_sum_of_squares(sp + o, D, mean) / static_cast<float>(D);
        const float rstd = 1.f / std::sqrt(var + eps_f);
        normalize_row(sp + o, yp + o, D, mean, rstd, w.data(), b.data());
      }
    });
  });
  return {s, y};
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(ddim_fast, CPU, m) {
  m.impl("add_layer_norm", &cpu::add_layer_norm_cpu);
}

}  // namespace ddim_fast
