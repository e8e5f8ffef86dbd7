// Argument checks of ddim_fast's transformer-block ops (add_layer_norm, geglu), shared by
// the CPU and CUDA kernels. Both work on rows of the last dimension of a contiguous tensor:
// a transformer block's activation is the (B, L, D) matrix of its tokens.
#pragma once

#include <ATen/core/Tensor.h>

#include "common.h"

namespace ddim_fast {

struct RowsArgs {
  int64_t rows;   // numel / width
  int64_t width;  // the last dimension (add_layer_norm: D; geglu: the output's F, half the input's)
};

inline void check_rows_input(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name, " must be float32, float16 or bfloat16, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() >= 1, op, ": ", name, " must have at least one dimension, got a scalar");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (rows of its last dimension); got strides ",
              t.strides(), " for shape ", t.sizes(), ". Call .contiguous() first.");
}

// A LayerNorm parameter: (D,), contiguous, on x's device, in x's dtype or float32.
inline void check_row_param(const char* op, const char* name, const at::Tensor& x, const std::optional<at::Tensor>& p,
                            int64_t D) {
  if (!p.has_value()) return;
  TORCH_CHECK(p->dim() == 1 && p->size(0) == D, op, ": ", name, " must have shape (", D, ",), got ", p->sizes());
  TORCH_CHECK(p->device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ",
              p->device());
  TORCH_CHECK(p->scalar_type() == x.scalar_type() || p->scalar_type() == at::kFloat, op, ": ", name,
              " must have x's dtype ", x.scalar_type(), " or float32, got ", p->scalar_type());
  TORCH_CHECK(p->is_contiguous(), op, ": ", name, " must be contiguous, got stride ", p->stride(0));
}

// add_layer_norm(x, residual, weight, bias, eps): x and residual of one shape, dtype and
// contiguous layout; weight and bias (D,) or absent, both in x's dtype or both float32.
inline RowsArgs check_add_layer_norm(const at::Tensor& x, const at::Tensor& residual,
                                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                     double eps) {
  const char* op = "add_layer_norm";
  check_rows_input(op, "x", x);
  check_like(op, "residual", x, residual);
  const int64_t D = x.size(-1);
  check_row_param(op, "weight", x, weight, D);
  check_row_param(op, "bias", x, bias, D);
  TORCH_CHECK(!weight || !bias || weight->scalar_type() == bias->scalar_type(), op,
              ": weight and bias must have one dtype, got ", weight ? weight->scalar_type() : at::kFloat, " and ",
              bias ? bias->scalar_type() : at::kFloat);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite number >= 0, got ", eps);
  return RowsArgs{D == 0 ? 0 : x.numel() / D, D};
}

// geglu(h): h's last dimension holds [a, gate], two halves of F each.
inline RowsArgs check_geglu(const at::Tensor& h) {
  const char* op = "geglu";
  check_rows_input(op, "h", h);
  const int64_t width = h.size(-1);
  TORCH_CHECK(width % 2 == 0, op, ": h's last dimension holds [a, gate] and must be even, got ", width);
  const int64_t F = width / 2;
  return RowsArgs{width == 0 ? 0 : h.numel() / width, F};
}

}  // namespace ddim_fast
