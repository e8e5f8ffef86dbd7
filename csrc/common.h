// Shared checks and the math of x0/eps from a model output, for every backend.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cmath>
#include <optional>
#include <type_traits>

namespace ddim_fast {

// What the model outputs (the `prediction` argument of the ops).
enum Prediction : int64_t { kEps = 0, kX0 = 1, kV = 2 };

inline void check_prediction(const char* op, int64_t prediction) {
  TORCH_CHECK(prediction >= kEps && prediction <= kV, op,
              ": prediction must be 0 (eps), 1 (x0) or 2 (v), got ", prediction);
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Calls f(scalar_t{}) for the storage dtypes the native kernels take: fp32, fp16, bf16.
// (float64 goes to the PyTorch backend, which computes in float64.)
template <typename F>
inline void dispatch_float(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, op, ": expected float32, float16 or bfloat16, got ", t);
  }
}

// Same strides wherever a dimension has more than one element.
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// `other` must match `x` in shape, device and (unless allow_float32) dtype, and have its
// memory layout, so that one flat index addresses the same element in both.
inline void check_like(const char* op, const char* name, const at::Tensor& x, const at::Tensor& other,
                       bool allow_float32 = false) {
  TORCH_CHECK(other.sizes() == x.sizes(), op, ": ", name, " must have x's shape ", x.sizes(), ", got ",
              other.sizes());
  TORCH_CHECK(other.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ",
              other.device());
  TORCH_CHECK(other.scalar_type() == x.scalar_type() || (allow_float32 && other.scalar_type() == at::kFloat),
              op, ": ", name, " must have x's dtype ", x.scalar_type(),
              allow_float32 ? " (or float32)" : "", ", got ", other.scalar_type());
  TORCH_CHECK(same_layout(x, other), op, ": ", name, " must have x's memory layout (strides ", x.strides(),
              "), got strides ", other.strides());
}

inline void check_dense(const char* op, const at::Tensor& x) {
  TORCH_CHECK(is_supported_float(x.scalar_type()), op,
              ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.is_non_overlapping_and_dense(), op,
              ": x must be dense (contiguous or channels_last, no gaps or overlaps); got strides ", x.strides(),
              " for shape ", x.sizes(), ". Call .contiguous() first.");
}

// The coefficients of one step, in fp32 (the kernels' arithmetic type).
struct StepCoefs {
  float sa;      // sqrt(alpha_t)
  float s1m;     // sqrt(1 - alpha_t)
  float c_x0;    // weight of x0 in the update
  float c_eps;   // weight of eps
  float c_xt;    // weight of x_t
  float sigma;   // weight of the noise
  float lo, hi;  // clamp range of x0
  float c_x0_prev = 0.f;  // weight of the previous step's x0 (a multistep solver's history)
};

// f(std::integral_constant<int64_t, P>{}) with the parameterisation P as a compile-time
// constant, so that a vector loop holds one parameterisation's arithmetic and no branch on it.
template <typename F>
inline void dispatch_prediction(int64_t prediction, F&& f) {
  switch (prediction) {
    case kEps: f(std::integral_constant<int64_t, kEps>{}); break;
    case kX0: f(std::integral_constant<int64_t, kX0>{}); break;
    default: f(std::integral_constant<int64_t, kV>{}); break;
  }
}

// x0 and eps from the model output `m` at x, for each parameterisation. Works for a
// scalar float and for a vector type V with the usual arithmetic.
template <typename V>
C10_HOST_DEVICE inline void x0_eps_from(int64_t prediction, V x, V m, V sa, V s1m, V& x0, V& eps) {
  if (prediction == kEps) {
    eps = m;
    x0 = (x - s1m * m) / sa;
  } else if (prediction == kX0) {
    x0 = m;
    eps = (x - sa * m) / s1m;
  } else {  // v: x0 = sqrt(a) x - sqrt(1-a) v, eps = sqrt(a) v + sqrt(1-a) x
    x0 = sa * x - s1m * m;
    eps = sa * m + s1m * x;
  }
}

// Checks of ddim_step's arguments, shared by every backend; the coefficients in fp32.
inline StepCoefs check_ddim_step(const at::Tensor& x, const at::Tensor& model_output, double sqrt_alpha_t,
                                 double sqrt_one_minus_alpha_t, double c_x0, double c_eps, double c_xt, double sigma,
                                 const std::optional<at::Tensor>& noise, bool clip, double clip_min,
                                 double clip_max, int64_t prediction, const at::Tensor& out,
                                 const std::optional<at::Tensor>& x0_out, double c_x0_prev,
                                 const std::optional<at::Tensor>& history) {
  const char* op = "ddim_step";
  check_dense(op, x);
  check_prediction(op, prediction);
  check_like(op, "model_output", x, model_output);
  check_like(op, "out", x, out);
  TORCH_CHECK(sigma >= 0, op, ": sigma must be >= 0, got ", sigma);
  TORCH_CHECK(sigma == 0 || noise.has_value(), op, ": sigma is ", sigma, " > 0 but no noise tensor was given");
  if (noise) check_like(op, "noise", x, *noise, /*allow_float32=*/true);
  if (x0_out) check_like(op, "x0_out", x, *x0_out);
  TORCH_CHECK(c_x0_prev == 0 || history.has_value(), op, ": c_x0_prev is ", c_x0_prev,
              " but no history tensor (the previous step's x0) was given");
  if (history) {
    TORCH_CHECK(history->scalar_type() == at::kFloat, op, ": history must be float32, got ", history->scalar_type());
    check_like(op, "history", x, *history, /*allow_float32=*/true);
    // read and rewritten in place: another operand in its memory would be read or written out of order
    at::assert_no_overlap(*history, x);
    at::assert_no_overlap(*history, model_output);
    at::assert_no_overlap(*history, out);
    if (x0_out) at::assert_no_overlap(*history, *x0_out);
  }
  TORCH_CHECK(!clip || clip_min <= clip_max, op, ": clip range must have clip_min <= clip_max, got [", clip_min,
              ", ", clip_max, "]");
  return StepCoefs{static_cast<float>(sqrt_alpha_t), static_cast<float>(sqrt_one_minus_alpha_t),
                   static_cast<float>(c_x0),         static_cast<float>(c_eps),
                   static_cast<float>(c_xt),         static_cast<float>(sigma),
                   static_cast<float>(clip_min),     static_cast<float>(clip_max),
                   static_cast<float>(c_x0_prev)};
}

// Checks of guided_step's: ddim_step's with the model output in two halves (uncond, cond)
// of x's shape and layout, and a finite guidance scale.
inline StepCoefs check_guided_step(const at::Tensor& x, const at::Tensor& uncond, const at::Tensor& cond,
                                   double guidance_scale, double sqrt_alpha_t, double sqrt_one_minus_alpha_t,
                                   double c_x0, double c_eps, double c_xt, double sigma,
                                   const std::optional<at::Tensor>& noise, bool clip, double clip_min,
                                   double clip_max, int64_t prediction, const at::Tensor& out,
                                   const std::optional<at::Tensor>& x0_out, double c_x0_prev,
                                   const std::optional<at::Tensor>& history) {
  check_dense("guided_step", x);
  check_like("guided_step", "uncond", x, uncond);
  check_like("guided_step", "cond", x, cond);
  TORCH_CHECK(std::isfinite(guidance_scale), "guided_step: guidance_scale must be finite, got ", guidance_scale);
  return check_ddim_step(x, uncond, sqrt_alpha_t, sqrt_one_minus_alpha_t, c_x0, c_eps, c_xt, sigma, noise, clip,
                         clip_min, clip_max, prediction, out, x0_out, c_x0_prev, history);
}

// Checks of predict_x0's arguments, shared by every backend.
inline StepCoefs check_predict_x0(const at::Tensor& x, const at::Tensor& model_output, double sqrt_alpha_t,
                                  double sqrt_one_minus_alpha_t, bool clip, double clip_min, double clip_max,
                                  int64_t prediction, const at::Tensor& out,
                                  const std::optional<at::Tensor>& eps_out) {
  const char* op = "predict_x0";
  check_dense(op, x);
  check_prediction(op, prediction);
  check_like(op, "model_output", x, model_output);
  check_like(op, "out", x, out);
  if (eps_out) check_like(op, "eps_out", x, *eps_out);
  TORCH_CHECK(!clip || clip_min <= clip_max, op, ": clip range must have clip_min <= clip_max, got [", clip_min,
              ", ", clip_max, "]");
  return StepCoefs{static_cast<float>(sqrt_alpha_t), static_cast<float>(sqrt_one_minus_alpha_t), 0.f, 0.f, 0.f, 0.f,
                   static_cast<float>(clip_min), static_cast<float>(clip_max)};
}

}  // namespace ddim_fast
