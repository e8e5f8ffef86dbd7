// CUDA kernel of ddim_fast::add_layer_norm: a transformer layer's residual add and the
// LayerNorm after it, one block per row (a token's D channels), fp32 arithmetic.
//
// The first pass forms s = x + residual, stores it rounded to x's dtype (as a separate add
// would: it is the next residual) and sums the stored values; the second takes the centred
// second moment (an exact two-pass variance) and the third writes y. Each thread re-reads
// only the elements it stored itself, from L1/L2: DRAM sees x and residual read once, s and
// y written once, 2R+2W where an add and a LayerNorm take 3R+2W in two launches.

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../transformer.h"
#include "reduce.cuh"
#include "vec.cuh"

namespace ddim_fast {
namespace cuda {
namespace {

constexpr int kMaxRowThreads = 512;
constexpr int kValuesPerThread = 4;  // a thread's share of a row, when the row is short enough

// W: the parameters' dtype (x's or float); w and b may be null (1 and 0).
template <typename T, typename W>
__global__ void add_layer_norm_kernel(const T* __restrict__ x, const T* __restrict__ r, T* s, T* __restrict__ y,
                                      const W* __restrict__ w, const W* __restrict__ b, int64_t D, float eps) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * D;
  const T* xr = x + base;
  const T* rr = r + base;
  T* sr = s + base;
  T* yr = y + base;
  float sum = 0.f;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const T v = static_cast<T>(static_cast<float>(xr[i]) + static_cast<float>(rr[i]));
    sr[i] = v;
    sum += static_cast<float>(v);  // the stored (rounded) sum, as the norm of a separate add sees it
  }
  const float mean = block_sum(sum) / static_cast<float>(D);
  float m2 = 0.f;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {  // this thread's own stores: no barrier needed
    const float d = static_cast<float>(sr[i]) - mean;
    m2 += d * d;
  }
  const float rstd = rsqrtf(block_sum(m2) / static_cast<float>(D) + eps);
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const float wi = w ? static_cast<float>(w[i]) : 1.f;
    const float bi = b ? static_cast<float>(b[i]) : 0.f;
    yr[i] = static_cast<T>((static_cast<float>(sr[i]) - mean) * rstd * wi + bi);
  }
}

std::tuple<at::Tensor, at::Tensor> add_layer_norm_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                       const std::optional<at::Tensor>& weight,
                                                       const std::optional<at::Tensor>& bias, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  const RowsArgs a = check_add_layer_norm(x, residual, weight, bias, eps);
  at::Tensor s = at::empty_like(x);
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return {s, y};
  // threads: a warp multiple with about kValuesPerThread values each, at most kMaxRowThreads
  const int64_t wanted = (a.width + kValuesPerThread - 1) / kValuesPerThread;
  const int threads = static_cast<int>(std::min<int64_t>(kMaxRowThreads, std::max<int64_t>(32, (wanted + 31) / 32 * 32)));
  TORCH_CHECK(a.rows <= 2147483647LL, "add_layer_norm: at most 2^31 - 1 rows, got ", a.rows);
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool params_f32 = (weight && weight->scalar_type() == at::kFloat) || (bias && bias->scalar_type() == at::kFloat);
  dispatch_float(x.scalar_type(), "add_layer_norm", [&](auto tag) {
    using T = decltype(tag);
    auto launch = [&](auto param_tag) {
      using W = decltype(param_tag);
      add_layer_norm_kernel<T, W><<<static_cast<unsigned>(a.rows), threads, 0, stream>>>(
          x.const_data_ptr<T>(), residual.const_data_ptr<T>(), s.data_ptr<T>(), y.data_ptr<T>(),
          weight ? weight->const_data_ptr<W>() : nullptr, bias ? bias->const_data_ptr<W>() : nullptr, a.width,
          static_cast<float>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (params_f32) {
      launch(float{});
    } else {
      launch(T{});
    }
  });
  return {s, y};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(ddim_fast, CUDA, m) {
  m.impl("add_layer_norm", &cuda::add_layer_norm_cuda);
}

}  // namespace ddim_fast
