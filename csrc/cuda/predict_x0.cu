// CUDA kernel of ddim_fast::predict_x0: x0 from the model output plus clamp, one pass.
// Reads x, model_output; writes x0 (and eps recomputed from the clamped x0).

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

struct PredictArgs {
  float sa, s1m, lo, hi;
  int64_t prediction;
  bool clip;
};

__device__ __forceinline__ void predict_value(float x, float m, const PredictArgs& a, float& x0, float& eps) {
  x0_eps_from(a.prediction, x, m, a.sa, a.s1m, x0, eps);
  if (a.clip) {
    x0 = fminf(fmaxf(x0, a.lo), a.hi);
    eps = (x - a.sa * x0) / a.s1m;  // eps consistent with the clamped x0
  }
}

template <typename T, int VEC>
__global__ void predict_x0_kernel(const T* __restrict__ x, const T* __restrict__ m, T* __restrict__ x0_out,
                                  T* __restrict__ eps_out, int64_t n, PredictArgs a) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * VEC;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC; i < n; i += stride) {
    if (VEC > 1 && i + VEC <= n) {
      const auto xv = *reinterpret_cast<const Pack<T, VEC>*>(x + i);
      const auto mv = *reinterpret_cast<const Pack<T, VEC>*>(m + i);
      Pack<T, VEC> x0v, ev;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        float x0, eps;
        predict_value(static_cast<float>(xv.v[k]), static_cast<float>(mv.v[k]), a, x0, eps);
        x0v.v[k] = static_cast<T>(x0);
        ev.v[k] = static_cast<T>(eps);
      }
      *reinterpret_cast<Pack<T, VEC>*>(x0_out + i) = x0v;
      if (eps_out) *reinterpret_cast<Pack<T, VEC>*>(eps_out + i) = ev;
    } else {
      for (int64_t j = i; j < std::min<int64_t>(i + VEC, n); ++j) {
        float x0, eps;
        predict_value(static_cast<float>(x[j]), static_cast<float>(m[j]), a, x0, eps);
        x0_out[j] = static_cast<T>(x0);
        if (eps_out) eps_out[j] = static_cast<T>(eps);
      }
    }
  }
}

void predict_x0_cuda(const at::Tensor& x, const at::Tensor& model_output, double sqrt_alpha_t,
                     double sqrt_one_minus_alpha_t, bool clip, double clip_min, double clip_max, int64_t prediction,
                     const at::Tensor& out, const std::optional<at::Tensor>& eps_out) {
  const StepCoefs c = check_predict_x0(x, model_output, sqrt_alpha_t, sqrt_one_minus_alpha_t, clip, clip_min,
                                       clip_max, prediction, out, eps_out);
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const PredictArgs a{c.sa, c.s1m, c.lo, c.hi, prediction, clip};
  const int64_t n = x.numel();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_float(x.scalar_type(), "predict_x0", [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = kVecWidth<T>;
    const T* xp = x.const_data_ptr<T>();
    const T* mp = model_output.const_data_ptr<T>();
    T* op_ = out.data_ptr<T>();
    T* ep = eps_out ? eps_out->data_ptr<T>() : nullptr;
    const bool vec = aligned16(xp) && aligned16(mp) && aligned16(op_) && (!ep || aligned16(ep));
    const int64_t per_block = static_cast<int64_t>(kThreads) * (vec ? V : 1);
    const int blocks = static_cast<int>(std::min<int64_t>((n + per_block - 1) / per_block, static_cast<int64_t>(sms) * 16));
    if (vec) {
      predict_x0_kernel<T, V><<<blocks, kThreads, 0, stream>>>(xp, mp, op_, ep, n, a);
    } else {
      predict_x0_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(xp, mp, op_, ep, n, a);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(ddim_fast, CUDA, m) {
  m.impl("predict_x0", &cuda::predict_x0_cuda);
}

}  // namespace ddim_fast
