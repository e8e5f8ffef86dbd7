// Loads and stores of fp32 vectors from any storage dtype, on top of at::vec.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <tuple>
#include <type_traits>

namespace ddim_fast {
namespace cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();

template <typename T>
inline Vec load_f(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    Vec v;
    at::vec::load_to_float<T>(p, v);
    return v;
  }
}

template <typename T>
inline void store_f(T* p, Vec v) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p);
  } else {
    // A reduced-precision vector holds two fp32 vectors: convert (v, v) with round to
    // nearest even, as static_cast<T> does, and store the first half.
    at::vec::convert_from_float<T>(v, v).store(p, kVec);
  }
}

// Two fp32 vectors' worth of values (kPair) in one full-width access: a reduced-precision
// vector holds 2 * kVec values, and converting a whole one costs a fraction of converting
// two halves (store_f's partial store goes through a temporary buffer).
constexpr int64_t kPair = 2 * kVec;

template <typename T>
inline void load_pair(const T* p, Vec& a, Vec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + kVec);
  } else {
    static_assert(at::vec::Vectorized<T>::size() == kPair, "a reduced-precision vector holds two fp32 vectors");
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
  }
}

template <typename T>
inline void store_pair(T* p, Vec a, Vec b) {
  if constexpr (std::is_same_v<T, float>) {
    a.store(p);
    b.store(p + kVec);
  } else {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
}

inline Vec clamp_v(Vec v, Vec lo, Vec hi) { return at::vec::clamp(v, lo, hi); }
inline float clamp_v(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

}  // namespace cpu
}  // namespace ddim_fast
