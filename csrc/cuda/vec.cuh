// Vectorised loads and stores for the elementwise CUDA kernels: 16 bytes per access.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace ddim_fast {
namespace cuda {

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements per 16-byte access: 4 floats, 8 halves.
template <typename T>
constexpr int kVecWidth = 16 / sizeof(T);

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

constexpr int kThreads = 256;

}  // namespace cuda
}  // namespace ddim_fast
