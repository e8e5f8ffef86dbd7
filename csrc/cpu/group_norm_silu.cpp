// CPU kernels of ddim_fast's GroupNorm ops: (residual add +) (bias add +) GroupNorm
// (+ SiLU). Reads x twice (statistics, then output) and writes y once, instead of
// GroupNorm's two reads and one write plus SiLU's read and write (and the bias add's read
// and write). With a residual, a first pass writes s = x + residual (rounded to x's dtype,
// as a separate add would store it) and the rest reads s: one op instead of two.
//
// Statistics are per (n, group) in fp32 from chunks flushed to double, over values
// shifted by one of the group's own values (NCHW: the group's first; channels_last: each
// channel's first), so that a large mean does not cancel the variance away.

#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../group_norm_silu.h"
#include "vec_util.h"

namespace ddim_fast {
namespace cpu {
namespace {

constexpr int64_t kChunk = 1024;  // fp32 partial sums are flushed to double this often

// silu(v) = v / (1 + e^-v), e^-v = 2^t with t = -v log2(e) = n + r: n = round(t), so that
// r = t - n in [-1/2, 1/2] is exact, 2^r a degree-5 polynomial (fitted to minimise the
// relative error on that interval: 7.5e-8) and 2^n the float whose exponent bits are
// n + 127, made as the integer (n + 127) * 2^23. t is clamped to [-126, 126], where 2^n is
// a normal float: no masks. Above v = 87, 1 + 2^t is 1 as it should be; below v = -87 the
// result is v / 2^126 in place of v e^v, an absolute error under |v| * 1.2e-38. Relative
// error against float64 at most 1.2e-6 for |v| < 20 and 4e-6 beyond (exp_u20 with a
// division: 3.3e-6), in a third fewer instructions; SiLU is most of this kernel's time.
inline Vec silu_v(Vec v) {
  const Vec t = at::vec::clamp(v * Vec(-1.4426950408889634f), Vec(-126.f), Vec(126.f));
  const Vec n = t.round();
  const Vec r = t - n;
  Vec two_r = at::vec::fmadd(Vec(1.3276471520144231e-3f), r, Vec(9.675541330699089e-3f));
  two_r = at::vec::fmadd(two_r, r, Vec(5.550713274959705e-2f));
  two_r = at::vec::fmadd(two_r, r, Vec(2.40221197239335e-1f));
  two_r = at::vec::fmadd(two_r, r, Vec(6.931469670638662e-1f));
  two_r = at::vec::fmadd(two_r, r, Vec(1.f));
  constexpr float kMantissa = 8388608.f;  // 2^23: one unit of the exponent field
  const Vec exponent_bits = at::vec::fmadd(n, Vec(kMantissa), Vec(127.f * kMantissa));  // exact integers
  const Vec two_n = at::vec::cast<float>(at::vec::convert_to_int_of_same_size(exponent_bits));
  return v / at::vec::fmadd(two_r, two_n, Vec(1.f));
}
inline float silu_f(float v) { return v / (1.f + std::exp(-v)); }

template <bool SILU>
inline Vec act_v(Vec v) {
  if constexpr (SILU) return silu_v(v);
  return v;
}
template <bool SILU>
inline float act_f(float v) {
  if constexpr (SILU) return silu_f(v);
  return v;
}

// out[i] = a[i] + b[i] for i < n, in fp32 and rounded to T (what a separate add stores).
template <typename T>
inline void add_rows(const T* a, const T* b, T* out, int64_t n) {
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) store_f(out + i, load_f(a + i) + load_f(b + i));
  for (; i < n; ++i) out[i] = static_cast<T>(static_cast<float>(a[i]) + static_cast<float>(b[i]));
}

// scale/shift per (n, c) from the per-channel moments about k_c, such that
// y = act(x * scale + shift).
inline void finish_group(const double* s, const double* ss, const float* k, int64_t n, int64_t g,
                         const GroupNormArgs& a, double count_per_channel, double eps, float* scale,
                         float* shift) {
  const int64_t D = a.C / a.G;
  const float* w = a.weight.const_data_ptr<float>();
  const float* b = a.bias.const_data_ptr<float>();
  const float* ab = a.add_bias.defined() ? a.add_bias.const_data_ptr<float>() + n * a.add_bias_stride_n : nullptr;
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

template <typename T, bool SILU>
inline void apply_row(const T* x, T* y, int64_t n, const float* scale, const float* shift, bool per_element) {
  // per_element: scale/shift vary along the row (channels_last); else one value for the row.
  int64_t i = 0;
  if (per_element) {
    for (; i + kVec <= n; i += kVec) {
      store_f(y + i, act_v<SILU>(load_f(x + i) * Vec::loadu(scale + i) + Vec::loadu(shift + i)));
    }
    for (; i < n; ++i) y[i] = static_cast<T>(act_f<SILU>(static_cast<float>(x[i]) * scale[i] + shift[i]));
  } else {
    const Vec sv(*scale), hv(*shift);
    for (; i + kVec <= n; i += kVec) store_f(y + i, act_v<SILU>(load_f(x + i) * sv + hv));
    for (; i < n; ++i) y[i] = static_cast<T>(act_f<SILU>(static_cast<float>(x[i]) * *scale + *shift));
  }
}

// Moments of one group's values about a shift, accumulated in fp32 vectors and flushed to
// double once kChunk values are pending (at most ~2*kChunk/kVec values per lane ever sit in
// an fp32 partial sum). The rows of a group go into one accumulator, so a group costs one
// horizontal reduction however short its rows (8x8 rows: one instead of one per channel).
struct GroupMoments {
  Vec s{0.f}, ss{0.f};
  float st = 0.f, sst = 0.f;  // scalar tails
  int64_t pending = 0;
  double sum = 0, sumsq = 0;

  void add(Vec v) {
    s = s + v;
    ss = at::vec::fmadd(v, v, ss);
  }
  void add(float v) {
    st += v;
    sst += v * v;
  }
  void flush() {
    sum += at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, s) + st;
    sumsq += at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, ss) + sst;
    s = ss = Vec(0.f);
    st = sst = 0.f;
    pending = 0;
  }
  void counted(int64_t n) {
    pending += n;
    if (pending >= kChunk) flush();
  }
};

// Adds (p[i] - k) for i < n to m.
template <typename T>
inline void accumulate_row(const T* p, int64_t n, float k, GroupMoments& m) {
  const Vec kv(k);
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t c1 = std::min(n, c0 + kChunk);
    GroupMoments m2;  // a second vector pair: the adds of one do not wait on the other's
    int64_t i = c0;
    for (; i + 2 * kVec <= c1; i += 2 * kVec) {
      m.add(load_f(p + i) - kv);
      m2.add(load_f(p + i + kVec) - kv);
    }
    for (; i + kVec <= c1; i += kVec) m.add(load_f(p + i) - kv);
    m.s = m.s + m2.s;
    m.ss = m.ss + m2.ss;
    for (; i < c1; ++i) m.add(static_cast<float>(p[i]) - k);
    m.counted(c1 - c0);
  }
}

// apply_row (one value of scale/shift) on row x -> y while adding the next group's row xn
// (same length) about kn to mn: the output pass is bound by SiLU's arithmetic and the
// statistics pass by reading memory, so doing both in one loop overlaps the two.
template <typename T, bool SILU>
inline void apply_row_with_moments(const T* x, T* y, int64_t n, float scale, float shift, const T* xn, float kn,
                                   GroupMoments& mn) {
  const Vec sv(scale), hv(shift), kv(kn);
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t c1 = std::min(n, c0 + kChunk);
    int64_t i = c0;
    for (; i + kVec <= c1; i += kVec) {
      mn.add(load_f(xn + i) - kv);
      store_f(y + i, act_v<SILU>(load_f(x + i) * sv + hv));
    }
    for (; i < c1; ++i) {
      mn.add(static_cast<float>(xn[i]) - kn);
      y[i] = static_cast<T>(act_f<SILU>(static_cast<float>(x[i]) * scale + shift));
    }
    mn.counted(c1 - c0);
  }
}

// x: the input; with a residual r, sum_out = x + r is written first and the norm reads it.
template <typename T, bool SILU>
void nchw_kernel(const T* x, const T* r, T* sum_out, T* y, const GroupNormArgs& a, double eps) {
  const int64_t N = a.N, C = a.C, G = a.G, D = C / G, HW = a.HW;
  const float* w = a.weight.const_data_ptr<float>();
  const float* b = a.bias.const_data_ptr<float>();
  const float* ab = a.add_bias.defined() ? a.add_bias.const_data_ptr<float>() : nullptr;
  const int64_t ab_n = a.add_bias_stride_n;
  const T* xin = x;
  if (r != nullptr) x = sum_out;  // the norm's input from here on
  const double count = static_cast<double>(D * HW);
  // Task ng = (n, group) owns the contiguous block x[ng * D * HW, (ng + 1) * D * HW): the
  // moments of h = x + ab_c over it, about k = h at the block's first element (so that a
  // mean far from 0 does not cancel the variance away), then the output. Within a thread's
  // range of tasks, the output pass of one task carries the statistics pass of the next
  // (software pipelining); only the first task's statistics run on their own.
  auto block = [&](int64_t ng) { return x + ng * D * HW; };
  auto ab_of = [&](int64_t ng, int64_t d) { return ab ? ab[ng / G * ab_n + ng % G * D + d] : 0.f; };
  auto shift_of = [&](int64_t ng) { return static_cast<float>(block(ng)[0]) + ab_of(ng, 0); };
  at::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
    if (r != nullptr) {  // this range's blocks of the sum, before any of them is read
      add_rows(xin + begin * D * HW, r + begin * D * HW, sum_out + begin * D * HW, (end - begin) * D * HW);
    }
    std::vector<float> scale(D), shift(D);
    GroupMoments m;
    float k = shift_of(begin);
    // h - k = x - (k - ab_c): one subtraction per value, as without add_bias
    for (int64_t d = 0; d < D; ++d) accumulate_row(block(begin) + d * HW, HW, k - ab_of(begin, d), m);
    for (int64_t ng = begin; ng < end; ++ng) {
      m.flush();
      const double mean_k = m.sum / count;  // mean of h - k
      const double var = std::max(m.sumsq / count - mean_k * mean_k, 0.0);
      const double rstd = 1.0 / std::sqrt(var + eps);
      const double mean = k + mean_k;
      const int64_t c0 = ng % G * D;
      for (int64_t d = 0; d < D; ++d) {
        // y = act((x + ab_c - mean) * rstd * w_c + b_c) = act(x * scale + shift)
        const double sc = rstd * w[c0 + d];
        scale[d] = static_cast<float>(sc);
        shift[d] = static_cast<float>((ab_of(ng, d) - mean) * sc + b[c0 + d]);
      }
      const T* xb = block(ng);
      T* yb = y + ng * D * HW;
      if (ng + 1 < end) {
        GroupMoments mn;
        const float kn = shift_of(ng + 1);
        for (int64_t d = 0; d < D; ++d) {
          apply_row_with_moments<T, SILU>(xb + d * HW, yb + d * HW, HW, scale[d], shift[d],
                                          block(ng + 1) + d * HW, kn - ab_of(ng + 1, d), mn);
        }
        m = mn;
        k = kn;
      } else {
        for (int64_t d = 0; d < D; ++d) {
          apply_row<T, SILU>(xb + d * HW, yb + d * HW, HW, &scale[d], &shift[d], false);
        }
      }
    }
  });
}

// x: the input; with a residual r, each row of sum_out = x + r is written as the
// statistics pass reaches it, and read back (the norm's input is the stored sum).
template <typename T, bool SILU>
void channels_last_kernel(const T* x, const T* r, T* sum_out, T* y, const GroupNormArgs& a, double eps) {
  const int64_t N = a.N, C = a.C, G = a.G, HW = a.HW;
  const T* src = r != nullptr ? sum_out : x;  // what the statistics and output passes read
  constexpr int64_t kPix = 64;  // pixels per statistics task
  const int64_t chunks = (HW + kPix - 1) / kPix;
  // per-chunk per-channel moments about k_c (the channel's value at pixel 0)
  std::vector<double> s(N * chunks * C), ss(N * chunks * C);
  at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sf(C), ssf(C), k(C);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks, ch = task % chunks;
      const T* xn = x + n * HW * C;
      if (r != nullptr) {  // the shift: the sum at pixel 0, rounded as stored (whichever task stores it)
        const T* rn = r + n * HW * C;
        for (int64_t c = 0; c < C; ++c) {
          k[c] = static_cast<float>(static_cast<T>(static_cast<float>(xn[c]) + static_cast<float>(rn[c])));
        }
      } else {
        for (int64_t c = 0; c < C; ++c) k[c] = static_cast<float>(xn[c]);
      }
      std::fill(sf.begin(), sf.end(), 0.f);
      std::fill(ssf.begin(), ssf.end(), 0.f);
      const int64_t p1 = std::min(HW, (ch + 1) * kPix);
      for (int64_t p = ch * kPix; p < p1; ++p) {
        const T* row = xn + p * C;
        if (r != nullptr) {
          T* srow = sum_out + n * HW * C + p * C;
          add_rows(row, r + n * HW * C + p * C, srow, C);
          row = srow;
        }
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
      for (int64_t c = 0; c < C; ++c) k[c] = static_cast<float>(src[n * HW * C + c]);
      for (int64_t g = 0; g < G; ++g) {
        finish_group(st.data(), sst.data(), k.data(), n, g, a, static_cast<double>(HW), eps, scale.data(),
                     shift.data());
      }
    }
  }
  at::parallel_for(0, N * HW, 16, [&](int64_t begin, int64_t end) {
    for (int64_t np = begin; np < end; ++np) {
      const int64_t n = np / HW;
      apply_row<T, SILU>(src + np * C, y + np * C, C, &scale[n * C], &shift[n * C], true);
    }
  });
}

// y = act(group_norm(x [+ residual] + add_bias)); s receives x + residual when given.
void run(const GroupNormArgs& a, const at::Tensor& x, const at::Tensor* residual, at::Tensor* s, at::Tensor& y,
         double eps, bool silu) {
  if (x.numel() == 0) return;
  dispatch_float(x.scalar_type(), "group_norm", [&](auto tag) {
    using T = decltype(tag);
    const T* r = residual ? residual->const_data_ptr<T>() : nullptr;
    T* sp = s ? s->data_ptr<T>() : nullptr;
    auto go = [&](auto silu_tag) {
      constexpr bool SILU = decltype(silu_tag)::value;
      if (a.layout == Layout::kNCHW) {
        nchw_kernel<T, SILU>(x.const_data_ptr<T>(), r, sp, y.data_ptr<T>(), a, eps);
      } else {
        channels_last_kernel<T, SILU>(x.const_data_ptr<T>(), r, sp, y.data_ptr<T>(), a, eps);
      }
    };
    if (silu) {
      go(std::true_type{});
    } else {
      go(std::false_type{});
    }
  });
}

at::Tensor group_norm_act_cpu(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& add_bias,
                              double eps, bool silu) {
  const GroupNormArgs a = check_group_norm("group_norm_act", x, num_groups, weight, bias, add_bias, eps);
  at::Tensor y = at::empty_like(x);  // keeps x's memory format
  run(a, x, nullptr, nullptr, y, eps, silu);
  return y;
}

at::Tensor group_norm_silu_cpu(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& add_bias,
                               double eps) {
  const GroupNormArgs a = check_group_norm("group_norm_silu", x, num_groups, weight, bias, add_bias, eps);
  at::Tensor y = at::empty_like(x);
  run(a, x, nullptr, nullptr, y, eps, /*silu=*/true);
  return y;
}

std::tuple<at::Tensor, at::Tensor> add_group_norm_act_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                          int64_t num_groups,
                                                          const std::optional<at::Tensor>& weight,
                                                          const std::optional<at::Tensor>& bias,
                                                          const std::optional<at::Tensor>& add_bias, double eps,
                                                          bool silu) {
  const GroupNormArgs a =
      check_group_norm("add_group_norm_act", x, num_groups, weight, bias, add_bias, eps, &residual);
  at::Tensor s = at::empty_like(x);
  at::Tensor y = at::empty_like(x);
  run(a, x, &residual, &s, y, eps, silu);
  return {s, y};
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(ddim_fast, CPU, m) {
  m.impl("group_norm_silu", &cpu::group_norm_silu_cpu);
  m.impl("group_norm_act", &cpu::group_norm_act_cpu);
  m.impl("add_group_norm_act", &cpu::add_group_norm_act_cpu);
}

}  // namespace ddim_fast
