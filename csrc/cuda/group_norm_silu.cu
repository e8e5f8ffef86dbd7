// CUDA kernel of ddim_fast::group_norm_silu: (bias add +) GroupNorm + SiLU, NCHW or
// channels_last, one block per (n, group). Statistics in fp32 as shifted sums (about
// the group's first value, so a large mean does not cancel the variance), reduced with
// warp shuffles; then one output pass. Reads x twice (the second mostly from L2), writes
// y once.

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../group_norm_silu.h"
#include "vec.cuh"

namespace ddim_fast {
namespace cuda {
namespace {

constexpr int kGnThreads = 512;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block of two values; every thread gets the result.
__device__ __forceinline__ void block_sum2(float& a, float& b) {
  __shared__ float sa[32], sb[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    sa[warp] = a;
    sb[warp] = b;
  }
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  a = lane < warps ? sa[lane] : 0.f;
  b = lane < warps ? sb[lane] : 0.f;
  a = warp_sum(a);
  b = warp_sum(b);
}

// Element i of the group (i < D*HW): channel c = g*D + d, pixel p.
template <bool CHANNELS_LAST>
__device__ __forceinline__ int64_t group_offset(int64_t i, int64_t D, int64_t HW, int64_t C, int64_t& d) {
  if (CHANNELS_LAST) {  // i runs over (p, d): D contiguous channels, then the next pixel
    const int64_t p = i / D;
    d = i - p * D;
    return p * C + d;
  }
  d = i / HW;  // i runs over (d, p): the group is one contiguous block
  return i;
}

template <typename T, bool CHANNELS_LAST>
__global__ void group_norm_silu_kernel(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ w,
                                       const float* __restrict__ b, const float* __restrict__ ab, int64_t C,
                                       int64_t HW, int64_t G, float eps) {
  const int64_t n = blockIdx.x / G, g = blockIdx.x % G, D = C / G;
  const int64_t count = D * HW;
  const int64_t base = CHANNELS_LAST ? n * HW * C + g * D : (n * C + g * D) * HW;
  const float* abn = ab ? ab + n * C + g * D : nullptr;
  const float k = static_cast<float>(x[base]) + (abn ? abn[0] : 0.f);  // the shift
  float s = 0.f, ss = 0.f;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    int64_t d;
    const int64_t off = group_offset<CHANNELS_LAST>(i, D, HW, C, d);
    const float v = static_cast<float>(x[base + off]) + (abn ? abn[d] : 0.f) - k;
    s += v;
    ss += v * v;
  }
  block_sum2(s, ss);
  const float mean_k = s / count;  // mean - k
  const float var = fmaxf(ss / count - mean_k * mean_k, 0.f);
  const float rstd = rsqrtf(var + eps);
  const float mean = mean_k + k;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    int64_t d;
    const int64_t off = group_offset<CHANNELS_LAST>(i, D, HW, C, d);
    const int64_t c = g * D + d;
    const float sc = rstd * w[c];
    const float h = (static_cast<float>(x[base + off]) + (abn ? abn[d] : 0.f) - mean) * sc + b[c];
    y[base + off] = static_cast<T>(h / (1.f + __expf(-h)));
  }
}

at::Tensor group_norm_silu_cuda(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& add_bias,
                                double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  const GroupNormArgs a = check_group_norm_silu(x, num_groups, weight, bias, add_bias, eps);
  at::Tensor y = at::empty_like(x);  // keeps x's memory format
  if (x.numel() == 0) return y;
  auto stream = at::cuda::getCurrentCUDAStream();
  const float* ab = a.add_bias.defined() ? a.add_bias.const_data_ptr<float>() : nullptr;
  const int blocks = static_cast<int>(a.N * a.G);
  dispatch_float(x.scalar_type(), "group_norm_silu", [&](auto tag) {
    using T = decltype(tag);
    if (a.layout == Layout::kChannelsLast) {
      group_norm_silu_kernel<T, true><<<blocks, kGnThreads, 0, stream>>>(
          x.const_data_ptr<T>(), y.data_ptr<T>(), a.weight.const_data_ptr<float>(), a.bias.const_data_ptr<float>(),
          ab, a.C, a.HW, a.G, static_cast<float>(eps));
    } else {
      group_norm_silu_kernel<T, false><<<blocks, kGnThreads, 0, stream>>>(
          x.const_data_ptr<T>(), y.data_ptr<T>(), a.weight.const_data_ptr<float>(), a.bias.const_data_ptr<float>(),
          ab, a.C, a.HW, a.G, static_cast<float>(eps));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(ddim_fast, CUDA, m) {
  m.impl("group_norm_silu", &cuda::group_norm_silu_cuda);
}

}  // namespace ddim_fast
