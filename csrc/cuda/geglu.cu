// CUDA kernel of ddim_fast::geglu: out = a * gelu(gate) for h = [a, gate] along the last
// dimension, the exact (erf) GELU, fp32 arithmetic, 16-byte vector accesses where F and the
// pointers allow. Reads h once and writes out once: 1R+1W where a GELU and a product take
// 3R+2W in two launches.

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../transformer.h"
#include "vec.cuh"

namespace ddim_fast {
namespace cuda {
namespace {

__device__ __forceinline__ float geglu_value(float a, float gate) {
  return a * 0.5f * gate * (1.f + erff(gate * 0.70710678118654752440f));
}

// VEC outputs per thread per iteration; F % VEC == 0, so a vector never crosses a row.
template <typename T, int VEC>
__global__ void geglu_kernel(const T* __restrict__ h, T* __restrict__ out, int64_t n, int64_t F) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * VEC;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC; i < n; i += stride) {
    const int64_t row = i / F;
    const int64_t col = i - row * F;
    const T* a = h + row * 2 * F + col;  // the row's first half; the gate is F further
    if (VEC > 1) {
      const auto av = *reinterpret_cast<const Pack<T, VEC>*>(a);
      const auto gv = *reinterpret_cast<const Pack<T, VEC>*>(a + F);
      Pack<T, VEC> ov;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        ov.v[k] = static_cast<T>(geglu_value(static_cast<float>(av.v[k]), static_cast<float>(gv.v[k])));
      }
      *reinterpret_cast<Pack<T, VEC>*>(out + i) = ov;
    } else {
      out[i] = static_cast<T>(geglu_value(static_cast<float>(a[0]), static_cast<float>(a[F])));
    }
  }
}

at::Tensor geglu_cuda(const at::Tensor& h) {
  const c10::cuda::CUDAGuard guard(h.device());
  const RowsArgs a = check_geglu(h);
  std::vector<int64_t> shape(h.sizes().begin(), h.sizes().end());
  shape.back() = a.width;
  at::Tensor out = at::empty(shape, h.options());
  const int64_t n = out.numel();
  if (n == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  dispatch_float(h.scalar_type(), "geglu", [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = kVecWidth<T>;
    const T* hp = h.const_data_ptr<T>();
    T* op = out.data_ptr<T>();
    const bool vec = a.width % V == 0 && aligned16(hp) && aligned16(op);
    const int64_t per_block = static_cast<int64_t>(kThreads) * (vec ? V : 1);
    const int blocks = static_cast<int>(std::min<int64_t>((n + per_block - 1) / per_block, static_cast<int64_t>(sms) * 16));
    if (vec) {
      geglu_kernel<T, V><<<blocks, kThreads, 0, stream>>>(hp, op, n, a.width);
    } else {
      geglu_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(hp, op, n, a.width);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(ddim_fast, CUDA, m) {
  m.impl("geglu", &cuda::geglu_cuda);
}

}  // namespace ddim_fast
