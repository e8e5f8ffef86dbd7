"""Fake (meta) kernels of the native ops, so they trace under torch.compile.

Registered once the extension has defined the ops (ops.extension loads this).
"""

import torch


def register() -> None:
    @torch.library.register_fake("ddim_fast::ddim_step")
    def _ddim_step(x, model_output, sqrt_alpha_t, sqrt_one_minus_alpha_t, c_x0, c_eps, c_xt, sigma, noise, clip, clip_min, clip_max, prediction, clipped_eps, out, x0_out, c_x0_prev=0.0, history=None):
        torch._check(model_output.shape == x.shape, lambda: f"ddim_step: model_output must have x's shape {tuple(x.shape)}")
        torch._check(out.shape == x.shape, lambda: f"ddim_step: out must have x's shape {tuple(x.shape)}")
        return None

    if hasattr(torch.ops.ddim_fast, "guided_step"):  # not in a build older than the op (the ops layer then falls back)
        _register_guided_step()
    if hasattr(torch.ops.ddim_fast, "add_layer_norm"):
        _register_transformer_ops()

    @torch.library.register_fake("ddim_fast::predict_x0")
    def _predict_x0(x, model_output, sqrt_alpha_t, sqrt_one_minus_alpha_t, clip, clip_min, clip_max, prediction, out, eps_out):
        torch._check(out.shape == x.shape, lambda: f"predict_x0: out must have x's shape {tuple(x.shape)}")
        return None

    @torch.library.register_fake("ddim_fast::group_norm_silu")
    def _group_norm_silu(x, num_groups, weight, bias, add_bias, eps):
        torch._check(x.dim() >= 2, lambda: f"group_norm_silu: x must be (N, C, *spatial), got {tuple(x.shape)}")
        return torch.empty_like(x)

    @torch.library.register_fake("ddim_fast::group_norm_act")
    def _group_norm_act(x, num_groups, weight, bias, add_bias, eps, silu):
        torch._check(x.dim() >= 2, lambda: f"group_norm_act: x must be (N, C, *spatial), got {tuple(x.shape)}")
        return torch.empty_like(x)

    @torch.library.register_fake("ddim_fast::add_group_norm_act")
    def _add_group_norm_act(x, residual, num_groups, weight, bias, add_bias, eps, silu):
        torch._check(x.dim() >= 2, lambda: f"add_group_norm_act: x must be (N, C, *spatial), got {tuple(x.shape)}")
        torch._check(residual.shape == x.shape, lambda: f"add_group_norm_act: residual must have x's shape {tuple(x.shape)}")
        return torch.empty_like(x), torch.empty_like(x)


def _register_guided_step() -> None:
    @torch.library.register_fake("ddim_fast::guided_step")
    def _guided_step(x, uncond, cond, guidance_scale, sqrt_alpha_t, sqrt_one_minus_alpha_t, c_x0, c_eps, c_xt, sigma, noise, clip, clip_min, clip_max, prediction, clipped_eps, out, x0_out, c_x0_prev=0.0, history=None):
        torch._check(uncond.shape == x.shape and cond.shape == x.shape, lambda: f"guided_step: uncond and cond must have x's shape {tuple(x.shape)}")
        torch._check(out.shape == x.shape, lambda: f"guided_step: out must have x's shape {tuple(x.shape)}")
        return None


def _register_transformer_ops() -> None:
    @torch.library.register_fake("ddim_fast::add_layer_norm")
    def _add_layer_norm(x, residual, weight, bias, eps):
        torch._check(residual.shape == x.shape, lambda: f"add_layer_norm: residual must have x's shape {tuple(x.shape)}")
        return torch.empty_like(x), torch.empty_like(x)

    @torch.library.register_fake("ddim_fast::geglu")
    def _geglu(h):
        torch._check(h.dim() >= 1 and h.shape[-1] % 2 == 0, lambda: f"geglu: h's last dimension must be even, got shape {tuple(h.shape)}")
        return h.new_empty((*h.shape[:-1], h.shape[-1] // 2))
