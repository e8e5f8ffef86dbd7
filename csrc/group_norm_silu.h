// Argument checks of ddim_fast's GroupNorm ops (group_norm_silu, group_norm_act,
// add_group_norm_act), shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>

#include "common.h"

namespace ddim_fast {

enum class Layout { kNCHW, kChannelsLast };

struct GroupNormArgs {
  int64_t N, C, HW, G;
  Layout layout;
  at::Tensor weight, bias;  // (C,) fp32, contiguous
  at::Tensor add_bias;      // (N, C) or (C,) fp32, contiguous, or undefined
  int64_t add_bias_stride_n = 0;  // C for (N, C), 0 for one (C,) row shared by every sample
};

// `op` names the operator in error messages. A residual, when given, must be laid out like x.
inline GroupNormArgs check_group_norm(const char* op, const at::Tensor& x, int64_t num_groups,
                                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& add_bias, double eps,
                                      const at::Tensor* residual = nullptr) {
  TORCH_CHECK(is_supported_float(x.scalar_type()), op, ": x must be float32, float16 or bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 2, op, ": x must be (N, C, *spatial), got shape ", x.sizes());
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK(num_groups > 0, op, ": num_groups must be positive, got ", num_groups);
  TORCH_CHECK(C % num_groups == 0, op, ": num_groups must divide the number of channels: C = ", C,
              ", num_groups = ", num_groups);
  TORCH_CHECK(eps > 0, op, ": eps must be positive, got ", eps);
  GroupNormArgs a;
  a.N = N;
  a.C = C;
  a.G = num_groups;
  a.HW = N * C == 0 ? 0 : x.numel() / (N * C);
  if (x.is_contiguous()) {
    a.layout = Layout::kNCHW;
  } else if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    a.layout = Layout::kChannelsLast;
  } else {
    TORCH_CHECK(false, op, ": x must be contiguous or channels_last; got strides ", x.strides(), " for shape ",
                x.sizes(), ". Call .contiguous() first.");
  }
  auto fp32 = x.options().dtype(at::kFloat);
  auto param = [&](const std::optional<at::Tensor>& p, const char* name, bool one) {
    if (!p.has_value()) return one ? at::ones({C}, fp32) : at::zeros({C}, fp32);
    TORCH_CHECK(p->dim() == 1 && p->size(0) == C, op, ": ", name, " must have shape (", C, ",), got ",
                p->sizes());
    TORCH_CHECK(p->device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ",
                p->device());
    return p->to(at::kFloat).contiguous();
  };
  a.weight = param(weight, "weight", true);
  a.bias = param(bias, "bias", false);
  if (add_bias.has_value()) {
    const bool row = add_bias->dim() == 1 && add_bias->size(0) == C;
    TORCH_CHECK(row || (add_bias->dim() == 2 && add_bias->size(0) == N && add_bias->size(1) == C), op,
                ": add_bias must have shape (", N, ", ", C, ") or (", C, ",), got ", add_bias->sizes());
    TORCH_CHECK(add_bias->device() == x.device(), op, ": add_bias must be on x's device ", x.device(), ", got ",
                add_bias->device());
    a.add_bias = add_bias->to(at::kFloat).contiguous();
    a.add_bias_stride_n = row ? 0 : C;
  }
  if (residual != nullptr) check_like(op, "residual", x, *residual);
  return a;
}

}  // namespace ddim_fast
