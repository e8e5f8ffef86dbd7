// CPU kernels of ddim_fast::ddim_step and ddim_fast::guided_step: the whole DDIM update in
// one pass. Reads x, model_output (and noise); writes out (and x0_out): 3-5 passes over
// memory instead of the ~11 of the eager chain (x0, clamp, two scaled terms, noise, sums).
// guided_step reads the two halves of a guided model call instead of one output and
// combines them first: m = uncond + w * (cond - uncond). A multistep solver's history (the
// previous step's x0, float32) is read into the update and overwritten with this step's x0.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common.h"
#include "vec_util.h"

namespace ddim_fast {
namespace cpu {
namespace {

constexpr int64_t kGrain = 32768;  // elements per task: enough to amortise a thread wake-up

// One element (or one vector of elements) of the update; V is float or Vec.
template <typename V>
inline V step_value(V x, V m, V z, V x0_prev, const StepCoefs& c, int64_t prediction, bool clip, bool clipped_eps,
                    V& x0) {
  const V sa(c.sa), s1m(c.s1m);
  V eps;
  x0_eps_from(prediction, x, m, sa, s1m, x0, eps);
  if (clip) {
    x0 = clamp_v(x0, V(c.lo), V(c.hi));
    if (clipped_eps) eps = (x - sa * x0) / s1m;
  }
  V res = V(c.c_x0) * x0 + V(c.c_eps) * eps;
  if (c.c_xt != 0.f) res = res + V(c.c_xt) * x;
  if (c.c_x0_prev != 0.f) res = res + V(c.c_x0_prev) * x0_prev;
  if (c.sigma != 0.f) res = res + V(c.sigma) * z;
  return res;
}

// The vector loop of one parameterisation P, guided or not. Every optional stream is read
// and written unconditionally: an absent one is a vector of zeros (or of scratch) on this
// task's stack at stride 0, and the coefficients are broadcast there once. A branch per
// vector on whether a stream is there, with coefficients read through a reference that the
// stores to `out` might alias, made this loop 3-4x slower than its own loads and stores
// (an AVX2 EPYC, benchmarks/NOTES.md); adding a zero term changes no result.
// mc: the conditional half of a guided model output (m then is the unconditional half).
// history: the previous step's x0 (read only where c_x0_prev != 0: the first step of a
// multistep run weighs a history that may hold anything by 0), overwritten with this step's.
template <int64_t P, bool Guided, typename scalar_t, typename noise_t>
void step_kernel(const scalar_t* x, const scalar_t* m, const scalar_t* mc, float w, const noise_t* z,
                 scalar_t* out, scalar_t* x0_out, float* history, int64_t n, const StepCoefs c, bool clip,
                 bool clipped_eps) {
  at::parallel_for(0, n, kGrain, [=](int64_t begin, int64_t end) {
    const Vec sa(c.sa), s1m(c.s1m), c_x0(c.c_x0), c_eps(c.c_eps), c_xt(c.c_xt), sigma(c.sigma);
    const Vec c_x0_prev(c.c_x0_prev), lo(c.lo), hi(c.hi), guidance(w);
    const bool has_xt = c.c_xt != 0.f;
    const bool reads_history = history != nullptr && c.c_x0_prev != 0.f;
    noise_t no_noise[kVec] = {};
    float no_history[kVec] = {};
    scalar_t x0_sink[kVec];
    float history_sink[kVec];
    const noise_t* z_in = z ? z : no_noise;
    const int64_t z_stride = z ? 1 : 0;
    const float* history_in = reads_history ? history : no_history;
    const int64_t history_in_stride = reads_history ? 1 : 0;
    float* history_out = history ? history : history_sink;
    const int64_t history_out_stride = history ? 1 : 0;
    scalar_t* x0_dest = x0_out ? x0_out : x0_sink;
    const int64_t x0_stride = x0_out ? 1 : 0;
    int64_t i = begin;
    for (; i + kVec <= end; i += kVec) {
      const Vec xv = load_f(x + i);
      Vec mv = load_f(m + i);
      if constexpr (Guided) mv = mv + guidance * (load_f(mc + i) - mv);
      Vec x0, eps;
      x0_eps_from(P, xv, mv, sa, s1m, x0, eps);
      if (clip) {
        x0 = clamp_v(x0, lo, hi);
        if (clipped_eps) eps = (xv - sa * x0) / s1m;
      }
      Vec res = c_x0 * x0 + c_eps * eps;
      if (has_xt) res = res + c_xt * xv;  // x may be inf where a zero weight would make NaN
      res = res + c_x0_prev * load_f(history_in + i * history_in_stride);
      res = res + sigma * load_f(z_in + i * z_stride);
      store_f(out + i, res);  // out may alias x: element i was read above
      store_f(x0_dest + i * x0_stride, x0);
      store_f(history_out + i * history_out_stride, x0);  // read above
    }
    for (; i < end; ++i) {
      float x0;
      const float zf = z ? static_cast<float>(z[i]) : 0.f;
      const float prev = reads_history ? history[i] : 0.f;
      float mf = static_cast<float>(m[i]);
      if constexpr (Guided) mf = mf + w * (static_cast<float>(mc[i]) - mf);
      const float r = step_value<float>(static_cast<float>(x[i]), mf, zf, prev, c, P, clip, clipped_eps, x0);
      out[i] = static_cast<scalar_t>(r);
      if (x0_out) x0_out[i] = static_cast<scalar_t>(x0);
      if (history) history[i] = x0;
    }
  });
}

// step_kernel with the parameterisation and guidance as compile-time constants.
template <typename scalar_t, typename noise_t>
void dispatch_step(const scalar_t* x, const scalar_t* m, const scalar_t* mc, float w, const noise_t* z,
                   scalar_t* out, scalar_t* x0_out, float* history, int64_t n, const StepCoefs& c,
                   int64_t prediction, bool clip, bool clipped_eps) {
  dispatch_prediction(prediction, [&](auto p) {
    constexpr int64_t P = decltype(p)::value;
    if (mc) {
      step_kernel<P, true>(x, m, mc, w, z, out, x0_out, history, n, c, clip, clipped_eps);
    } else {
      step_kernel<P, false>(x, m, mc, w, z, out, x0_out, history, n, c, clip, clipped_eps);
    }
  });
}

void run_step(const at::Tensor& x, const at::Tensor& model_output, const at::Tensor* cond, float w,
              const StepCoefs& c, const std::optional<at::Tensor>& noise, bool clip, int64_t prediction,
              bool clipped_eps, const at::Tensor& out, const std::optional<at::Tensor>& x0_out,
              const std::optional<at::Tensor>& history) {
  if (x.numel() == 0) return;
  const bool use_noise = noise.has_value() && c.sigma != 0;
  float* hist = history ? history->data_ptr<float>() : nullptr;
  dispatch_float(x.scalar_type(), "ddim_step", [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* x0p = x0_out ? x0_out->data_ptr<scalar_t>() : nullptr;
    const scalar_t* mc = cond ? cond->const_data_ptr<scalar_t>() : nullptr;
    if (use_noise && noise->scalar_type() != x.scalar_type()) {
      dispatch_step<scalar_t, float>(x.const_data_ptr<scalar_t>(), model_output.const_data_ptr<scalar_t>(), mc, w,
                                     noise->const_data_ptr<float>(), out.data_ptr<scalar_t>(), x0p, hist,
                                     x.numel(), c, prediction, clip, clipped_eps);
    } else {
      dispatch_step<scalar_t, scalar_t>(x.const_data_ptr<scalar_t>(), model_output.const_data_ptr<scalar_t>(), mc,
                                        w, use_noise ? noise->const_data_ptr<scalar_t>() : nullptr,
                                        out.data_ptr<scalar_t>(), x0p, hist, x.numel(), c, prediction, clip,
                                        clipped_eps);
    }
  });
}

void ddim_step_cpu(const at::Tensor& x, const at::Tensor& model_output, double sqrt_alpha_t,
                   double sqrt_one_minus_alpha_t, double c_x0, double c_eps, double c_xt, double sigma,
                   const std::optional<at::Tensor>& noise, bool clip, double clip_min, double clip_max,
                   int64_t prediction, bool clipped_eps, const at::Tensor& out,
                   const std::optional<at::Tensor>& x0_out, double c_x0_prev,
                   const std::optional<at::Tensor>& history) {
  const StepCoefs c = check_ddim_step(x, model_output, sqrt_alpha_t, sqrt_one_minus_alpha_t, c_x0, c_eps, c_xt,
                                      sigma, noise, clip, clip_min, clip_max, prediction, out, x0_out, c_x0_prev,
                                      history);
  run_step(x, model_output, nullptr, 0.f, c, noise, clip, prediction, clipped_eps, out, x0_out, history);
}

void guided_step_cpu(const at::Tensor& x, const at::Tensor& uncond, const at::Tensor& cond, double guidance_scale,
                     double sqrt_alpha_t, double sqrt_one_minus_alpha_t, double c_x0, double c_eps, double c_xt,
                     double sigma, const std::optional<at::Tensor>& noise, bool clip, double clip_min,
                     double clip_max, int64_t prediction, bool clipped_eps, const at::Tensor& out,
                     const std::optional<at::Tensor>& x0_out, double c_x0_prev,
                     const std::optional<at::Tensor>& history) {
  const StepCoefs c = check_guided_step(x, uncond, cond, guidance_scale, sqrt_alpha_t, sqrt_one_minus_alpha_t, c_x0,
                                        c_eps, c_xt, sigma, noise, clip, clip_min, clip_max, prediction, out, x0_out,
                                        c_x0_prev, history);
  run_step(x, uncond, &cond, static_cast<float>(guidance_scale), c, noise, clip, prediction, clipped_eps, out,
           x0_out, history);
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(ddim_fast, CPU, m) {
  m.impl("ddim_step", &cpu::ddim_step_cpu);
  m.impl("guided_step", &cpu::guided_step_cpu);
}

}  // namespace ddim_fast
