// CPU kernel of ddim_fast::group_norm_silu: (bias add +) GroupNorm + SiLU.
// Reads x twice (statistics, then output) and writes y once, instead of GroupNorm's
// two reads and one write plus SiLU's read and write (and the bias add's read and write).
//
// Statistics are per (n, group) in fp32 from chunks flushed to double, over values
// shifted by the channel's first element, so that a large mean does not cancel the
// variance away.

#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../group_norm_silu.h"
#include "vec_util.h"

namespace ddim_fast {
namespace cpu {
namespace {

constexpr int64_t kChunk = 1024;  // fp32 partial sums are flushed to double this often

inline Vec silu_v(Vec v) { return v / (Vec(1.f) + v.neg().exp_u20()); }  // exp_u20: ~20 ulp, several times faster than exp()
inline float silu_f(float v) { return v / (1.f + std::exp(-v)); }

// Sum and sum of squares of (p[i] - k) for i < n, accumulated in fp32 per chunk, in double
// across chunks.
template <typename T>
inline void shifted_moments(const T* p, int64_t n, float k, double& s, double& ss) {
  s = 0;
  ss = 0;
  const Vec kv(k);
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t c1 = std::min(n, c0 + kChunk);
    // two accumulator pairs: the adds of one do not wait on the other's
    Vec sv(0.f), ssv(0.f), sv2(0.f), ssv2(0.f);
    int64_t i = c0;
    for (; i + 2 * kVec <= c1; i += 2 * kVec) {
      const Vec v = load_f(p + i) - kv;
      const Vec w = load_f(p + i + kVec) - kv;
      sv = sv + v;
      ssv = at::vec::fmadd(v, v, ssv);
      sv2 = sv2 + w;
      ssv2 = at::vec::fmadd(w, w, ssv2);
    }
    for (; i + kVec <= c1; i += kVec) {
      const Vec v = load_f(p + i) - kv;
      sv = sv + v;
      ssv = at::vec::fmadd(v, v, ssv);
    }
    sv = sv + sv2;
    ssv = ssv + ssv2;
    float st = 0.f, sst = 0.f;
    for (; i < c1; ++i) {
      const float v = static_cast<float>(p[i]) - k;
      st += v;
      sst += v * v;
    }
    s += at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, sv) + st;
    ss += at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, ssv) + sst;
  }
}

// scale/shift per (n, c) from the per-channel moments about k_c, such that
// y = silu(x * scale + shift).
inline void finish_group(const double* s, const double* ss, const float* k, int64_t n, int64_t g,
                         const GroupNormArgs& a, double count_per_channel, double eps, float* scale,
                         float* shift) {
  const int64_t D = a.C / a.G;
  const float* w = a.weight.const_data_ptr<float>();
  const float* b = a.bias.const_data_ptr<float>();
  const float* ab = a.add_bias.defined() ? a.add_bias.const_data_ptr<float>() + n * a.C : nullptr;
  double sum = 0, sumsq = 0;
  for (int64_t d = 0; d < D; ++d) {
    const int64_t c = g * D + d;
    // moments of x + ab_c from moments of x - k_c: shift by m = k_c + ab_c
    const double m = static_cast<double>(k[c]) + (ab ? ab[c] : 0.0);
    sum += s[c] + count_per_channel * m;
    sumsq += ss[c] + 2.0 * m * s[c] + count_per_channel * m * m;
  }
  const double count = count_per_channel * D;
  const double mean = sum / count;
  const double var = std::max(sumsq / count - mean * mean, 0.0);
  const double rstd = 1.0 / std::sqrt(var + eps);
  for (int64_t d = 0; d < D; ++d) {
    const int64_t c = g * D + d;
    const double sc = rstd * w[c];
    scale[n * a.C + c] = static_cast<float>(sc);
    shift[n * a.C + c] = static_cast<float>(((ab ? ab[c] : 0.0) - mean) * sc + b[c]);
  }
}

template <typename T>
inline void apply_row(const T* x, T* y, int64_t n, const float* scale, const float* shift, bool per_element) {
  // per_element: scale/shift vary along the row (channels_last); else one value for the row.
  int64_t i = 0;
  if (per_element) {
    for (; i + kVec <= n; i += kVec) {
      store_f(y + i, silu_v(load_f(x + i) * Vec::loadu(scale + i) + Vec::loadu(shift + i)));
    }
    for (; i < n; ++i) y[i] = static_cast<T>(silu_f(static_cast<float>(x[i]) * scale[i] + shift[i]));
  } else {
    const Vec sv(*scale), hv(*shift);
    for (; i + kVec <= n; i += kVec) store_f(y + i, silu_v(load_f(x + i) * sv + hv));
    for (; i < n; ++i) y[i] = static_cast<T>(silu_f(static_cast<float>(x[i]) * *scale + *shift));
  }
}

// apply_row (one value of scale/shift) on row x -> y while taking the moments of the next
// task's row xn (same length) about kn: the output pass is bound by SiLU's arithmetic and
// the statistics pass by reading memory, so doing both in one loop overlaps the two.
template <typename T>
inline void apply_row_with_moments(const T* x, T* y, int64_t n, float scale, float shift, const T* xn, float kn,
                                   double& s, double& ss) {
  s = 0;
  ss = 0;
  const Vec sv(scale), hv(shift), kv(kn);
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t c1 = std::min(n, c0 + kChunk);
    Vec mv(0.f), mmv(0.f);
    int64_t i = c0;
    for (; i + kVec <= c1; i += kVec) {
      const Vec v = load_f(xn + i) - kv;
      mv = mv + v;
      mmv = at::vec::fmadd(v, v, mmv);
      store_f(y + i, silu_v(load_f(x + i) * sv + hv));
    }
    float st = 0.f, sst = 0.f;
    for (; i < c1; ++i) {
      const float v = static_cast<float>(xn[i]) - kn;
      st += v;
      sst += v * v;
      y[i] = static_cast<T>(silu_f(static_cast<float>(x[i]) * scale + shift));
    }
    s += at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, mv) + st;
    ss += at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, mmv) + sst;
  }
}

template <typename T>
void nchw_kernel(const T* x, T* y, const GroupNormArgs& a, double eps) {
  const int64_t N = a.N, C = a.C, G = a.G, D = C / G, HW = a.HW;
  std::vector<float> scale(N * C), shift(N * C);
  // one task per (n, group): statistics over its D*HW values, then the output. Within a
  // thread's range of tasks, the output pass of one task carries the statistics pass of
  // the next (software pipelining); only the first task's statistics run on their own.
  at::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> s(C), ss(C);
    std::vector<float> k(C);
    auto row = [&](int64_t ng, int64_t d) { return (ng / G * C + ng % G * D + d) * HW; };
    for (int64_t d = 0; d < D; ++d) {
      const T* p = x + row(begin, d);
      const int64_t c = begin % G * D + d;
      k[c] = static_cast<float>(p[0]);
      shifted_moments(p, HW, k[c], s[c], ss[c]);
    }
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / G, g = ng % G;
      finish_group(s.data(), ss.data(), k.data(), n, g, a, static_cast<double>(HW), eps, scale.data(),
                   shift.data());
      // s, ss, k of this task are consumed: the next task may reuse the entries
      const bool next = ng + 1 < end;
      const int64_t gn = (ng + 1) % G;
      for (int64_t d = 0; d < D; ++d) {
        const int64_t c = g * D + d, off = row(ng, d);
        if (next) {
          const int64_t cn = gn * D + d;
          const T* pn = x + row(ng + 1, d);
          k[cn] = static_cast<float>(pn[0]);
          apply_row_with_moments(x + off, y + off, HW, scale[n * C + c], shift[n * C + c], pn, k[cn], s[cn], ss[cn]);
        } else {
          apply_row(x + off, y + off, HW, &scale[n * C + c], &shift[n * C + c], false);
        }
      }
    }
  });
}

template <typename T>
void channels_last_kernel(const T* x, T* y, const GroupNormArgs& a, double eps) {
  const int64_t N = a.N, C = a.C, G = a.G, HW = a.HW;
  constexpr int64_t kPix = 64;  // pixels per statistics task
  const int64_t chunks = (HW + kPix - 1) / kPix;
  // per-chunk per-channel moments about k_c (the channel's value at pixel 0)
  std::vector<double> s(N * chunks * C), ss(N * chunks * C);
  at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sf(C), ssf(C), k(C);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks, ch = task % chunks;
      const T* xn = x + n * HW * C;
      for (int64_t c = 0; c < C; ++c) k[c] = static_cast<float>(xn[c]);
      std::fill(sf.begin(), sf.end(), 0.f);
      std::fill(ssf.begin(), ssf.end(), 0.f);
      const int64_t p1 = std::min(HW, (ch + 1) * kPix);
      for (int64_t p = ch * kPix; p < p1; ++p) {
        const T* row = xn + p * C;
        int64_t c = 0;
        for (; c + kVec <= C; c += kVec) {
          const Vec v = load_f(row + c) - Vec::loadu(k.data() + c);
          (Vec::loadu(sf.data() + c) + v).store(sf.data() + c);
          (Vec::loadu(ssf.data() + c) + v * v).store(ssf.data() + c);
        }
        for (; c < C; ++c) {
          const float v = static_cast<float>(row[c]) - k[c];
          sf[c] += v;
          ssf[c] += v * v;
        }
      }
      double* so = s.data() + task * C;
      double* sso = ss.data() + task * C;
      for (int64_t c = 0; c < C; ++c) {
        so[c] = sf[c];
        sso[c] = ssf[c];
      }
    }
  });
  std::vector<float> scale(N * C), shift(N * C);
  {
    std::vector<double> st(C), sst(C);
    std::vector<float> k(C);
    for (int64_t n = 0; n < N; ++n) {
      std::fill(st.begin(), st.end(), 0.0);
      std::fill(sst.begin(), sst.end(), 0.0);
      for (int64_t ch = 0; ch < chunks; ++ch) {
        for (int64_t c = 0; c < C; ++c) {
          st[c] += s[(n * chunks + ch) * C + c];
          sst[c] += ss[(n * chunks + ch) * C + c];
        }
      }
      for (int64_t c = 0; c < C; ++c) k[c] = static_cast<float>(x[n * HW * C + c]);
      for (int64_t g = 0; g < G; ++g) {
        finish_group(st.data(), sst.data(), k.data(), n, g, a, static_cast<double>(HW), eps, scale.data(),
                     shift.data());
      }
    }
  }
  at::parallel_for(0, N * HW, 16, [&](int64_t begin, int64_t end) {
    for (int64_t np = begin; np < end; ++np) {
      const int64_t n = np / HW;
      apply_row(x + np * C, y + np * C, C, &scale[n * C], &shift[n * C], true);
    }
  });
}

at::Tensor group_norm_silu_cpu(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& add_bias,
                               double eps) {
  const GroupNormArgs a = check_group_norm_silu(x, num_groups, weight, bias, add_bias, eps);
  at::Tensor y = at::empty_like(x);  // keeps x's memory format
  if (x.numel() == 0) return y;
  dispatch_float(x.scalar_type(), "group_norm_silu", [&](auto tag) {
    using T = decltype(tag);
    if (a.layout == Layout::kNCHW) {
      nchw_kernel<T>(x.const_data_ptr<T>(), y.data_ptr<T>(), a, eps);
    } else {
      channels_last_kernel<T>(x.const_data_ptr<T>(), y.data_ptr<T>(), a, eps);
    }
  });
  return y;
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(ddim_fast, CPU, m) {
  m.impl("group_norm_silu", &cpu::group_norm_silu_cpu);
}

}  // namespace ddim_fast
