// CPU kernel of ddim_fast::predict_x0: x0 from the model output, plus clamp, in one pass.
// Reads x, model_output; writes x0 (and eps recomputed from the clamped x0).

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common.h"
#include "vec_util.h"

namespace ddim_fast {
namespace cpu {
namespace {

constexpr int64_t kGrain = 32768;

template <typename V>
inline void predict_value(V x, V m, const StepCoefs& c, int64_t prediction, bool clip, V& x0, V& eps) {
  const V sa(c.sa), s1m(c.s1m);
  x0_eps_from(prediction, x, m, sa, s1m, x0, eps);
  if (clip) {
    x0 = clamp_v(x0, V(c.lo), V(c.hi));
    eps = (x - sa * x0) / s1m;  // eps consistent with the clamped x0
  }
}

// As ddim_step.cpp's step_kernel: the coefficients broadcast once on this task's stack, so
// that the loop holds its values in registers. Whether eps is written is a template
// argument: without eps_out the loop neither computes nor stores it (with the clamp, eps
// costs a division and a store per vector, 40% of the loop's time).
template <int64_t P, bool EPS_OUT, typename scalar_t>
void predict_kernel(const scalar_t* x, const scalar_t* m, scalar_t* x0_out, scalar_t* eps_out, int64_t n,
                    const StepCoefs c, bool clip) {
  at::parallel_for(0, n, kGrain, [=](int64_t begin, int64_t end) {
    const Vec sa(c.sa), s1m(c.s1m), lo(c.lo), hi(c.hi);
    int64_t i = begin;
    for (; i + kVec <= end; i += kVec) {
      const Vec xv = load_f(x + i);
      Vec x0, eps;
      x0_eps_from(P, xv, load_f(m + i), sa, s1m, x0, eps);
      if (clip) x0 = clamp_v(x0, lo, hi);
      store_f(x0_out + i, x0);
      if constexpr (EPS_OUT) {
        if (clip) eps = (xv - sa * x0) / s1m;  // eps consistent with the clamped x0
        store_f(eps_out + i, eps);
      }
    }
    for (; i < end; ++i) {
      float x0, eps;
      predict_value<float>(static_cast<float>(x[i]), static_cast<float>(m[i]), c, P, clip, x0, eps);
      x0_out[i] = static_cast<scalar_t>(x0);
      if constexpr (EPS_OUT) eps_out[i] = static_cast<scalar_t>(eps);
    }
  });
}

void predict_x0_cpu(const at::Tensor& x, const at::Tensor& model_output, double sqrt_alpha_t,
                    double sqrt_one_minus_alpha_t, bool clip, double clip_min, double clip_max, int64_t prediction,
                    const at::Tensor& out, const std::optional<at::Tensor>& eps_out) {
  const StepCoefs c = check_predict_x0(x, model_output, sqrt_alpha_t, sqrt_one_minus_alpha_t, clip, clip_min,
                                       clip_max, prediction, out, eps_out);
  if (x.numel() == 0) return;
  dispatch_float(x.scalar_type(), "predict_x0", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* mp = model_output.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    dispatch_prediction(prediction, [&](auto p) {
      constexpr int64_t P = decltype(p)::value;
      if (eps_out) {
        predict_kernel<P, true>(xp, mp, op, eps_out->data_ptr<scalar_t>(), x.numel(), c, clip);
      } else {
        predict_kernel<P, false>(xp, mp, op, static_cast<scalar_t*>(nullptr), x.numel(), c, clip);
      }
    });
  });
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(ddim_fast, CPU, m) {
  m.impl("predict_x0", &cpu::predict_x0_cpu);
}

}  // namespace ddim_fast
