// CUDA kernels of ddim_fast's GroupNorm ops: (residual add +) (bias add +) GroupNorm
// (+ SiLU), NCHW or channels_last, one block per (n, group). Statistics in fp32 as
// shifted sums (about the group's first value, so a large mean does not cancel the
// variance), reduced with warp shuffles; then one output pass. Reads x twice (the second
// mostly from L2), writes y once. With a residual, the statistics pass writes
// s = x + residual (rounded to x's dtype) and the output pass reads s back: each thread
// reads back only the elements it wrote, so no barrier is needed in between.

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

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

template <typename T, bool CHANNELS_LAST, bool HAS_RES, bool SILU>
__global__ void group_norm_kernel(const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ s,
                                  T* __restrict__ y, const float* __restrict__ w, const float* __restrict__ b,
                                  const float* __restrict__ ab, int64_t ab_stride_n, int64_t C, int64_t HW,
                                  int64_t G, float eps) {
  const int64_t n = blockIdx.x / G, g = blockIdx.x % G, D = C / G;
  const int64_t count = D * HW;
  const int64_t base = CHANNELS_LAST ? n * HW * C + g * D : (n * C + g * D) * HW;
  const float* abn = ab ? ab + n * ab_stride_n + g * D : nullptr;
  // the norm's input at element off: x, or the stored (rounded) sum x + r
  auto input = [&](int64_t off) {
    if constexpr (HAS_RES) {
      return static_cast<float>(static_cast<T>(static_cast<float>(x[off]) + static_cast<float>(r[off])));
    }
    return static_cast<float>(x[off]);
  };
  const float k = input(base) + (abn ? abn[0] : 0.f);  // the shift
  float sum = 0.f, sumsq = 0.f;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    int64_t d;
    const int64_t off = base + group_offset<CHANNELS_LAST>(i, D, HW, C, d);
    const float in = input(off);
    if constexpr (HAS_RES) s[off] = static_cast<T>(in);
    const float v = in + (abn ? abn[d] : 0.f) - k;
    sum += v;
    sumsq += v * v;
  }
  block_sum2(sum, sumsq);
  const float mean_k = sum / count;  // mean - k
  const float var = fmaxf(sumsq / count - mean_k * mean_k, 0.f);
  const float rstd = rsqrtf(var + eps);
  const float mean = mean_k + k;
  const T* src = HAS_RES ? s : x;  // this thread's own elements of s, written above
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    int64_t d;
    const int64_t off = base + group_offset<CHANNELS_LAST>(i, D, HW, C, d);
    const int64_t c = g * D + d;
    const float sc = rstd * w[c];
    float h = (static_cast<float>(src[off]) + (abn ? abn[d] : 0.f) - mean) * sc + b[c];
    if constexpr (SILU) h = h / (1.f + __expf(-h));
    y[off] = static_cast<T>(h);
  }
}

// y = act(group_norm(x [+ residual] + add_bias)); s receives x + residual when given.
void run(const GroupNormArgs& a, const at::Tensor& x, const at::Tensor* residual, at::Tensor* s, at::Tensor& y,
         double eps, bool silu) {
  if (x.numel() == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  const float* ab = a.add_bias.defined() ? a.add_bias.const_data_ptr<float>() : nullptr;
  const int blocks = static_cast<int>(a.N * a.G);
  dispatch_float(x.scalar_type(), "group_norm", [&](auto tag) {
    using T = decltype(tag);
    const T* r = residual ? residual->const_data_ptr<T>() : nullptr;
    T* sp = s ? s->data_ptr<T>() : nullptr;
    auto launch = [&](auto cl, auto res, auto act) {
      group_norm_kernel<T, decltype(cl)::value, decltype(res)::value, decltype(act)::value>
          <<<blocks, kGnThreads, 0, stream>>>(x.const_data_ptr<T>(), r, sp, y.data_ptr<T>(),
                                              a.weight.const_data_ptr<float>(), a.bias.const_data_ptr<float>(), ab,
                                              a.add_bias_stride_n, a.C, a.HW, a.G, static_cast<float>(eps));
    };
    auto with_act = [&](auto cl, auto res) {
      if (silu) {
        launch(cl, res, std::true_type{});
      } else {
        launch(cl, res, std::false_type{});
      }
    };
    auto with_res = [&](auto cl) {
      if (residual) {
        with_act(cl, std::true_type{});
      } else {
        with_act(cl, std::false_type{});
      }
    };
    if (a.layout == Layout::kChannelsLast) {
      with_res(std::true_type{});
    } else {
      with_res(std::false_type{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor group_norm_act_cuda(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& add_bias,
                               double eps, bool silu) {
  const c10::cuda::CUDAGuard guard(x.device());
  const GroupNormArgs a = check_group_norm("group_norm_act", x, num_groups, weight, bias, add_bias, eps);
  at::Tensor y = at::empty_like(x);  // keeps x's memory format
  run(a, x, nullptr, nullptr, y, eps, silu);
  return y;
}

at::Tensor group_norm_silu_cuda(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& add_bias,
                                double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  const GroupNormArgs a = check_group_norm("group_norm_silu", x, num_groups, weight, bias, add_bias, eps);
  at::Tensor y = at::empty_like(x);
  run(a, x, nullptr, nullptr, y, eps, /*silu=*/true);
  return y;
}

std::tuple<at::Tensor, at::Tensor> add_group_norm_act_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                           int64_t num_groups,
                                                           const std::optional<at::Tensor>& weight,
                                                           const std::optional<at::Tensor>& bias,
                                                           const std::optional<at::Tensor>& add_bias, double eps,
                                                           bool silu) {
  const c10::cuda::CUDAGuard guard(x.device());
  const GroupNormArgs a =
      check_group_norm("add_group_norm_act", x, num_groups, weight, bias, add_bias, eps, &residual);
  at::Tensor s = at::empty_like(x);
  at::Tensor y = at::empty_like(x);
  run(a, x, &residual, &s, y, eps, silu);
  return {s, y};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(ddim_fast, CUDA, m) {
  m.impl("group_norm_silu", &cuda::group_norm_silu_cuda);
  m.impl("group_norm_act", &cuda::group_norm_act_cuda);
  m.impl("add_group_norm_act", &cuda::add_group_norm_act_cuda);
}

}  // namespace ddim_fast
