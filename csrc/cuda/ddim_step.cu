// CUDA kernels of ddim_fast::ddim_step and ddim_fast::guided_step: the whole DDIM update in
// one pass, 16-byte vector loads, fp32 arithmetic. Reads x, model_output (and noise);
// writes out (and x0_out): 3-5 passes over memory instead of the eager chain's ~11.
// guided_step reads a guided call's two halves and forms uncond + w * (cond - uncond) first.
// A multistep solver's history (the previous step's x0, float32) is read into the update and
// overwritten with this step's x0.

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../common.h"
#include "vec.cuh"

namespace ddim_fast {
namespace cuda {
namespace {

struct StepArgs {
  StepCoefs c;
  int64_t prediction;
  bool clip, clipped_eps, has_noise;
  float w;  // guidance scale (read when the conditional half is given)
};

__device__ __forceinline__ float step_value(float x, float m, float z, float x0_prev, const StepArgs& a,
                                            float& x0) {
  float eps;
  x0_eps_from(a.prediction, x, m, a.c.sa, a.c.s1m, x0, eps);
  if (a.clip) {
    x0 = fminf(fmaxf(x0, a.c.lo), a.c.hi);
    if (a.clipped_eps) eps = (x - a.c.sa * x0) / a.c.s1m;
  }
  float r = a.c.c_x0 * x0 + a.c.c_eps * eps + a.c.c_xt * x;
  if (a.c.c_x0_prev != 0.f) r += a.c.c_x0_prev * x0_prev;  // as every backend: a weight of 0 reads nothing
  if (a.has_noise) r += a.c.sigma * z;
  return r;
}

// VEC elements per thread per iteration (VEC = 1 for misaligned pointers).
// mc: the conditional half of a guided model output (m is then the unconditional half), or null.
// history: the previous step's x0, overwritten with this step's, or null.
template <typename T, typename NT, int VEC>
__global__ void ddim_step_kernel(const T* __restrict__ x, const T* __restrict__ m, const T* __restrict__ mc,
                                 const NT* __restrict__ z, T* out, T* x0_out, float* history, int64_t n,
                                 StepArgs a) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * VEC;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC; i < n; i += stride) {
    if (VEC > 1 && i + VEC <= n) {
      const auto xv = *reinterpret_cast<const Pack<T, VEC>*>(x + i);
      const auto mv = *reinterpret_cast<const Pack<T, VEC>*>(m + i);
      Pack<T, VEC> cv;
      if (mc) cv = *reinterpret_cast<const Pack<T, VEC>*>(mc + i);
      Pack<T, VEC> ov, x0v;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        float x0;
        const float zf = a.has_noise ? static_cast<float>(z[i + k]) : 0.f;
        const float prev = history ? history[i + k] : 0.f;
        float mf = static_cast<float>(mv.v[k]);
        if (mc) mf = mf + a.w * (static_cast<float>(cv.v[k]) - mf);
        ov.v[k] = static_cast<T>(step_value(static_cast<float>(xv.v[k]), mf, zf, prev, a, x0));
        x0v.v[k] = static_cast<T>(x0);
        if (history) history[i + k] = x0;  // read above, by this thread
      }
      *reinterpret_cast<Pack<T, VEC>*>(out + i) = ov;  // out may alias x: read above
      if (x0_out) *reinterpret_cast<Pack<T, VEC>*>(x0_out + i) = x0v;
    } else {
      for (int64_t j = i; j < std::min<int64_t>(i + VEC, n); ++j) {
        float x0;
        const float zf = a.has_noise ? static_cast<float>(z[j]) : 0.f;
        const float prev = history ? history[j] : 0.f;
        float mf = static_cast<float>(m[j]);
        if (mc) mf = mf + a.w * (static_cast<float>(mc[j]) - mf);
        out[j] = static_cast<T>(step_value(static_cast<float>(x[j]), mf, zf, prev, a, x0));
        if (x0_out) x0_out[j] = static_cast<T>(x0);
        if (history) history[j] = x0;
      }
    }
  }
}

template <typename T, typename NT>
void launch(const T* x, const T* m, const T* mc, const NT* z, T* out, T* x0_out, float* history, int64_t n,
            const StepArgs& a) {
  constexpr int V = kVecWidth<T>;
  const bool vec = aligned16(x) && aligned16(m) && (!mc || aligned16(mc)) && aligned16(out) &&
                   (!x0_out || aligned16(x0_out));
  const int64_t per_block = static_cast<int64_t>(kThreads) * (vec ? V : 1);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int blocks = static_cast<int>(std::min<int64_t>((n + per_block - 1) / per_block, static_cast<int64_t>(sms) * 16));
  auto stream = at::cuda::getCurrentCUDAStream();
  if (vec) {
    ddim_step_kernel<T, NT, V><<<blocks, kThreads, 0, stream>>>(x, m, mc, z, out, x0_out, history, n, a);
  } else {
    ddim_step_kernel<T, NT, 1><<<blocks, kThreads, 0, stream>>>(x, m, mc, z, out, x0_out, history, n, a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void run_step(const at::Tensor& x, const at::Tensor& model_output, const at::Tensor* cond, float w,
              const StepCoefs& c, const std::optional<at::Tensor>& noise, bool clip, int64_t prediction,
              bool clipped_eps, const at::Tensor& out, const std::optional<at::Tensor>& x0_out,
              const std::optional<at::Tensor>& history) {
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  float* hist = history ? history->data_ptr<float>() : nullptr;
  StepArgs a;
  a.c = c;
  a.prediction = prediction;
  a.clip = clip;
  a.clipped_eps = clipped_eps;
  a.has_noise = noise.has_value() && c.sigma != 0;
  a.w = w;
  dispatch_float(x.scalar_type(), "ddim_step", [&](auto tag) {
    using T = decltype(tag);
    T* x0p = x0_out ? x0_out->data_ptr<T>() : nullptr;
    const T* mc = cond ? cond->const_data_ptr<T>() : nullptr;
    if (a.has_noise && noise->scalar_type() != x.scalar_type()) {
      launch<T, float>(x.const_data_ptr<T>(), model_output.const_data_ptr<T>(), mc, noise->const_data_ptr<float>(),
                       out.data_ptr<T>(), x0p, hist, x.numel(), a);
    } else {
      launch<T, T>(x.const_data_ptr<T>(), model_output.const_data_ptr<T>(), mc,
                   a.has_noise ? noise->const_data_ptr<T>() : nullptr, out.data_ptr<T>(), x0p, hist, x.numel(), a);
    }
  });
}

void ddim_step_cuda(const at::Tensor& x, const at::Tensor& model_output, double sqrt_alpha_t,
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

void guided_step_cuda(const at::Tensor& x, const at::Tensor& uncond, const at::Tensor& cond, double guidance_scale,
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
}  // namespace cuda

TORCH_LIBRARY_IMPL(ddim_fast, CUDA, m) {
  m.impl("ddim_step", &cuda::ddim_step_cuda);
  m.impl("guided_step", &cuda::guided_step_cuda);
}

}  // namespace ddim_fast
