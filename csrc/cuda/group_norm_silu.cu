// CUDA kernels of ddim_fast's GroupNorm ops: (residual add +) (bias add +) GroupNorm
// (+ SiLU), NCHW or channels_last, fp32 arithmetic, vector loads and stores (up to 16
// bytes) wherever the layout allows. Two plans:
//
// - one pass, when a group has at most kOnePassMax values: one block per (n, group)
//   holds the whole group in registers, takes its mean, then its centred second moment
//   from the registers (an exact two-pass variance, no cancellation), and writes y.
//   Reads x once and writes y once, where aten's GroupNorm + SiLU read 3 and write 2.
// - split, for larger groups: each group's vectors are cut into chunks so that there
//   are blocks for every SM whatever the batch; a stats kernel writes each chunk's sums
//   about a shift (the group's first value, so a large mean does not cancel the
//   variance), a normalise kernel adds a group's chunk sums and writes its chunk.
//   Reads x twice (the second mostly from L2), writes y once.
//
// With a residual, the first read forms s = x + residual, stores it (rounded to x's
// dtype, as a separate add would) and the norm uses the stored sum.

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "../group_norm_silu.h"
#include "reduce.cuh"
#include "vec.cuh"

namespace ddim_fast {
namespace cuda {
namespace {

constexpr int kMaxThreads = 512;
constexpr int kValuesPerThread = 32;  // fp32 registers per thread holding the group
constexpr int64_t kOnePassMax = static_cast<int64_t>(kMaxThreads) * kValuesPerThread;
constexpr int kSplitThreads = 256;

__device__ __forceinline__ float act(float h, bool silu) { return silu ? h / (1.f + __expf(-h)) : h; }

// Where vector iv of a group starts, relative to the group's first element, and the
// channel (in the group) of its first value. A vector never crosses a channel (NCHW:
// HW % VEC == 0) or a pixel (channels_last: D % VEC == 0); in channels_last its VEC
// values are VEC consecutive channels. Group sizes fit 32 bits (checked at launch).
template <bool CL, int VEC>
__device__ __forceinline__ int64_t vec_offset(uint32_t iv, uint32_t D, uint32_t HW, int64_t C, uint32_t& d0) {
  if constexpr (CL) {
    const uint32_t per_pixel = D / VEC;
    const uint32_t p = iv / per_pixel;
    d0 = (iv - p * per_pixel) * VEC;
    return static_cast<int64_t>(p) * C + d0;
  }
  d0 = iv * VEC / HW;
  return static_cast<int64_t>(iv) * VEC;
}

template <bool CL>
__device__ __forceinline__ int64_t group_base(int64_t n, int64_t g, int64_t D, int64_t HW, int64_t C) {
  return CL ? n * HW * C + g * D : (n * C + g * D) * HW;
}

// Loads vector iv of the norm's input into v (fp32, add_bias added), storing x + r to s
// when there is a residual.
template <typename T, int VEC, bool CL>
__device__ __forceinline__ void load_input(const T* x, const T* r, T* s, const float* abg, int64_t off, uint32_t d0,
                                           float (&v)[VEC]) {
  const auto xv = *reinterpret_cast<const Pack<T, VEC>*>(x + off);
  if (r != nullptr) {
    const auto rv = *reinterpret_cast<const Pack<T, VEC>*>(r + off);
    Pack<T, VEC> sv;
#pragma unroll
    for (int k = 0; k < VEC; ++k) sv.v[k] = static_cast<T>(static_cast<float>(xv.v[k]) + static_cast<float>(rv.v[k]));
    *reinterpret_cast<Pack<T, VEC>*>(s + off) = sv;
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = static_cast<float>(sv.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = static_cast<float>(xv.v[k]);
  }
  if (abg != nullptr) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] += abg[CL ? d0 + k : d0];
  }
}

// y = act((v - mean) * rstd * w + b) for one vector.
template <typename T, int VEC, bool CL>
__device__ __forceinline__ void store_output(T* y, int64_t off, uint32_t d0, const float (&v)[VEC], float mean,
                                             float rstd, const float* wg, const float* bg, bool silu) {
  Pack<T, VEC> out;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const uint32_t d = CL ? d0 + k : d0;
    out.v[k] = static_cast<T>(act((v[k] - mean) * (rstd * wg[d]) + bg[d], silu));
  }
  *reinterpret_cast<Pack<T, VEC>*>(y + off) = out;
}

struct GnPointers {
  const float* w;
  const float* b;
  const float* ab;  // (N, C) or (C,) rows, or null
  int64_t ab_stride_n;
};

// The group a block works on (blockIdx.x = n * G + g), addressed as vectors of VEC.
template <bool CL, int VEC>
struct Group {
  uint32_t g, D, HW, nvec;
  int64_t C, base;   // channels; offset of the group's first element
  const float* abg;  // add_bias of the group's channels, or null

  __device__ Group(const GnPointers& q, int64_t C_, uint32_t HW_, uint32_t G) : HW(HW_), C(C_) {
    const uint32_t n = blockIdx.x / G;
    g = blockIdx.x % G;
    D = static_cast<uint32_t>(C) / G;
    nvec = D * HW / VEC;
    base = group_base<CL>(n, g, D, HW, C);
    abg = q.ab ? q.ab + n * q.ab_stride_n + g * D : nullptr;
  }
  // element offset of vector iv, and the channel (in the group) of its first value
  __device__ int64_t offset(uint32_t iv, uint32_t& d0) const { return base + vec_offset<CL, VEC>(iv, D, HW, C, d0); }
  __device__ float count() const { return static_cast<float>(D) * static_cast<float>(HW); }
};

template <typename T, int VEC, bool CL>
__global__ void __launch_bounds__(kMaxThreads)
    gn_one_pass_kernel(const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ s, T* __restrict__ y,
                       GnPointers q, int64_t C, uint32_t HW, uint32_t G, float eps, bool silu) {
  constexpr int kVecs = kValuesPerThread / VEC;
  const Group<CL, VEC> grp(q, C, HW, G);
  float v[kVecs][VEC];  // vector threadIdx.x + i * blockDim.x of the group, while i < kVecs
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const uint32_t iv = threadIdx.x + i * blockDim.x;
    if (iv < grp.nvec) {
      uint32_t d0;
      const int64_t off = grp.offset(iv, d0);
      load_input<T, VEC, CL>(x, r, s, grp.abg, off, d0, v[i]);
#pragma unroll
      for (int k = 0; k < VEC; ++k) sum += v[i][k];
    }
  }
  const float mean = block_sum(sum) / grp.count();
  float m2 = 0.f;
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    if (threadIdx.x + i * blockDim.x < grp.nvec) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) m2 += (v[i][k] - mean) * (v[i][k] - mean);
    }
  }
  const float rstd = rsqrtf(block_sum(m2) / grp.count() + eps);
  // the offsets again rather than kept: kVecs more 64-bit registers for one division each
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const uint32_t iv = threadIdx.x + i * blockDim.x;
    if (iv < grp.nvec) {
      uint32_t d0;
      const int64_t off = grp.offset(iv, d0);
      store_output<T, VEC, CL>(y, off, d0, v[i], mean, rstd, q.w + grp.g * grp.D, q.b + grp.g * grp.D, silu);
    }
  }
}

// Chunk `blockIdx.y` of group `blockIdx.x`: its sums of v - k and (v - k)² into
// part[(n*G + g) * split + chunk], k the group's first input value.
template <typename T, int VEC, bool CL>
__global__ void __launch_bounds__(kSplitThreads)
    gn_partial_sums_kernel(const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ s, GnPointers q,
                           float2* __restrict__ part, int64_t C, uint32_t HW, uint32_t G, uint32_t chunk_vecs) {
  const Group<CL, VEC> grp(q, C, HW, G);
  const int64_t base = grp.base;
  const T first = r ? static_cast<T>(static_cast<float>(x[base]) + static_cast<float>(r[base])) : x[base];
  const float shift = static_cast<float>(first) + (grp.abg ? grp.abg[0] : 0.f);
  const uint32_t end = min(grp.nvec, (blockIdx.y + 1) * chunk_vecs);
  float sum = 0.f, sumsq = 0.f;
  for (uint32_t iv = blockIdx.y * chunk_vecs + threadIdx.x; iv < end; iv += blockDim.x) {
    uint32_t d0;
    const int64_t off = grp.offset(iv, d0);
    float v[VEC];
    load_input<T, VEC, CL>(x, r, s, grp.abg, off, d0, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float dv = v[k] - shift;
      sum += dv;
      sumsq += dv * dv;
    }
  }
  sum = block_sum(sum);
  sumsq = block_sum(sumsq);
  if (threadIdx.x == 0) part[static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y] = make_float2(sum, sumsq);
}

template <typename T, int VEC, bool CL>
__global__ void __launch_bounds__(kSplitThreads)
    gn_normalize_kernel(const T* __restrict__ src, T* __restrict__ y, GnPointers q, const float2* __restrict__ part,
                        int64_t C, uint32_t HW, uint32_t G, uint32_t chunk_vecs, float eps, bool silu) {
  const Group<CL, VEC> grp(q, C, HW, G);
  const float shift = static_cast<float>(src[grp.base]) + (grp.abg ? grp.abg[0] : 0.f);  // as the stats kernel took it
  float sum = 0.f, sumsq = 0.f;
  for (uint32_t c = threadIdx.x; c < gridDim.y; c += blockDim.x) {
    const float2 p = part[static_cast<int64_t>(blockIdx.x) * gridDim.y + c];
    sum += p.x;
    sumsq += p.y;
  }
  const float mean_k = block_sum(sum) / grp.count();  // mean - shift
  const float var = fmaxf(block_sum(sumsq) / grp.count() - mean_k * mean_k, 0.f);
  const float rstd = rsqrtf(var + eps);
  const float mean = mean_k + shift;
  const uint32_t end = min(grp.nvec, (blockIdx.y + 1) * chunk_vecs);
  for (uint32_t iv = blockIdx.y * chunk_vecs + threadIdx.x; iv < end; iv += blockDim.x) {
    uint32_t d0;
    const int64_t off = grp.offset(iv, d0);
    float v[VEC];
    load_input<T, VEC, CL>(src, nullptr, nullptr, grp.abg, off, d0, v);
    store_output<T, VEC, CL>(y, off, d0, v, mean, rstd, q.w + grp.g * grp.D, q.b + grp.g * grp.D, silu);
  }
}

// y = act(group_norm(x [+ residual] + add_bias)); s receives x + residual when given.
void run(const GroupNormArgs& a, const at::Tensor& x, const at::Tensor* residual, at::Tensor* s, at::Tensor& y,
         double eps, bool silu) {
  if (x.numel() == 0) return;
  const int64_t D = a.C / a.G, count = D * a.HW;
  TORCH_CHECK(count < (int64_t{1} << 31) && a.N * a.G < (int64_t{1} << 31), "group_norm: groups of ", count,
              " values (", a.N * a.G, " groups) are beyond the CUDA kernel's 32-bit indexing");
  auto stream = at::cuda::getCurrentCUDAStream();
  const GnPointers q{a.weight.const_data_ptr<float>(), a.bias.const_data_ptr<float>(),
                     a.add_bias.defined() ? a.add_bias.const_data_ptr<float>() : nullptr, a.add_bias_stride_n};
  const bool cl = a.layout == Layout::kChannelsLast;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  dispatch_float(x.scalar_type(), "group_norm", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.const_data_ptr<T>();
    const T* rp = residual ? residual->const_data_ptr<T>() : nullptr;
    T* sp = s ? s->data_ptr<T>() : nullptr;
    T* yp = y.data_ptr<T>();
    auto launch = [&](auto vec_tag, auto cl_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      constexpr bool CL = decltype(cl_tag)::value;
      const uint32_t nvec = static_cast<uint32_t>(count / VEC);
      const uint32_t HW = static_cast<uint32_t>(a.HW), G = static_cast<uint32_t>(a.G);
      const unsigned groups = static_cast<unsigned>(a.N * a.G);
      if (count <= kOnePassMax) {
        const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, (nvec + 31) / 32 * 32));
        gn_one_pass_kernel<T, VEC, CL><<<groups, threads, 0, stream>>>(xp, rp, sp, yp, q, a.C, HW, G,
                                                                       static_cast<float>(eps), silu);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      // enough chunks for two blocks per SM, each of at least 4 vectors per thread
      const int64_t min_chunk = int64_t{4} * kSplitThreads;
      const int64_t want = std::max<int64_t>(1, (2 * sms + groups - 1) / groups);
      const int64_t split0 = std::max<int64_t>(1, std::min<int64_t>(want, nvec / min_chunk));
      const uint32_t chunk_vecs = static_cast<uint32_t>((nvec + split0 - 1) / split0);
      const unsigned split = (nvec + chunk_vecs - 1) / chunk_vecs;
      at::Tensor part = at::empty({static_cast<int64_t>(groups) * split * 2}, x.options().dtype(at::kFloat));
      float2* pp = reinterpret_cast<float2*>(part.data_ptr<float>());
      const dim3 grid(groups, split);
      gn_partial_sums_kernel<T, VEC, CL><<<grid, kSplitThreads, 0, stream>>>(xp, rp, sp, q, pp, a.C, HW, G, chunk_vecs);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      gn_normalize_kernel<T, VEC, CL><<<grid, kSplitThreads, 0, stream>>>(rp ? sp : xp, yp, q, pp, a.C, HW, G,
                                                                          chunk_vecs, static_cast<float>(eps), silu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    // the widest vector (up to 16 bytes) that divides a channel's run of values and
    // that every pointer is aligned to
    const int64_t run_len = cl ? D : a.HW;  // values of one channel that lie together
    auto fits = [&](int vec) {
      const size_t bytes = static_cast<size_t>(vec) * sizeof(T);
      auto ok = [&](const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0; };
      return run_len % vec == 0 && ok(xp) && ok(rp) && ok(sp) && ok(yp);
    };
    auto with_layout = [&](auto vec_tag) {
      if (cl) {
        launch(vec_tag, std::true_type{});
      } else {
        launch(vec_tag, std::false_type{});
      }
    };
    if constexpr (sizeof(T) == 2) {  // 16 bytes: 8 halves
      if (fits(8)) return with_layout(std::integral_constant<int, 8>{});
    }
    if (fits(4)) return with_layout(std::integral_constant<int, 4>{});
    if (fits(2)) return with_layout(std::integral_constant<int, 2>{});
    with_layout(std::integral_constant<int, 1>{});
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
