"""The reference sampler: the plain eager loop of the official DDIM code.

It follows ermongroup/ddim's `generalized_steps` (η in [0, 1]) and `ddpm_steps`
(η = "ddpm_noisy") step for step, with tensor arithmetic in x's dtype, so that it is what
users compare against and what the fast sampler must match. The other solvers run as their
papers write them, not from the coefficient rows that FastSampler's fused step reads:
DPM-Solver++(2M) as Lu et al. (2022) (λ, h, r, the multistep D); Euler and Euler ancestral
in the variance-exploding frame of Karras et al. (2022) (the denoised sample, the
derivative d, σ_up and σ_down), converting to and from it at the ends; LCM as Luo et al.
(2023) (the consistency function's c_skip and c_out, fresh noise). It is deliberately
plain: no fused kernels, no preallocation, one model call and a handful of small ops per step.

Noise order (shared with FastSampler, so both agree for any η with the same generator):
x_T, when not given, is `torch.randn((B, C, H, W), generator=g)` in float32; then each
step that adds noise (σ > 0; for Euler ancestral σ_up > 0) draws one
`torch.randn(x.shape, generator=g)` in float32, in sampling order. The last step (to x0)
adds none and draws nothing.
"""

from __future__ import annotations

import math

import torch

from ..core.options import make_options
from ..core.schedule import Schedule
from ..core.levels import sigma_of_alpha
from ..core.solvers import dpmpp_2m, euler, euler_ancestral, lcm, plan_of_levels
from ..core.solvers.ddim import inversion_plan
from ..models.prepare import model_dtype
from . import common as S
from .conditioning import cast_kwargs, combine, make_conditioning
from .noise import NoiseStream, initial_noise, noise_like
from .spec import timestep_dtype


class ReferenceSampler:
    """DDIM sampling as the official code does it.

    model: any callable model(x, t) -> eps (or x0, or v, per `prediction`); t is an int64
    tensor of shape (B,) on x's device; outputs with a `.sample` attribute are accepted.
    schedule: a ddim_fast.Schedule. steps: S, the number of model calls. eta: in [0, 1]
    (0: deterministic DDIM, 1: DDPM's posterior variance) or "ddpm_noisy" (σ̂ with the
    DDPM posterior mean). skip: the timestep grid ("uniform", "quad", "leading",
    "trailing", "linspace" or a list). clip_x0: False, True (±1), r or (lo, hi).
    check_finite: raise as soon as a step makes NaN or Inf (a host sync per step).
    steps_offset: for skip="leading". use_clipped_model_output: with a clamp, recompute
    eps from the clamped x̂₀ (diffusers' option; the official code does not clamp).
    solver: "ddim" (default), "dpmpp_2m" (DPM-Solver++(2M)), "euler", "euler_ancestral" or
    "lcm" (see FastSampler); encode() stays DDIM's. sigmas: None or "karras" (Karras noise
    levels, for dpmpp_2m and the Euler solvers). eta=None: the solver's own.
    """

    def __init__(
        self,
        model,
        schedule: Schedule,
        steps: int = 50,
        eta=None,
        skip="uniform",
        clip_x0=False,
        prediction: str = "eps",
        check_finite: bool = False,
        *,
        steps_offset: int = 0,
        use_clipped_model_output: bool = False,
        solver: str = "ddim",
        sigmas=None,
    ):
        S.check_model(model, "ReferenceSampler")
        S.warn_if_training(model, "ReferenceSampler")
        self.model = model
        self._model_dtype = model_dtype(model)
        self.schedule = schedule
        self.options = make_options(schedule, steps, eta, skip, clip_x0, prediction, check_finite, steps_offset, use_clipped_model_output, solver, sigmas)
        # validates alpha_t > 0 on the grid now, not an hour into a run
        self._plan = plan_of_levels(self.options.solver, self.options.levels, self.options.eta)

    @property
    def timesteps(self) -> list:
        """The model timesteps in sampling order."""
        return list(self._plan.timesteps)

    @staticmethod
    def _level(a: float, x: torch.Tensor) -> torch.Tensor:
        """ᾱ as the official code holds it: in a float32 table (float64 for float64 x), then in
        x's dtype."""
        table_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return torch.tensor(a, dtype=table_dtype, device=x.device).to(x.dtype)

    def _timesteps(self, t_i, n: int, device) -> torch.Tensor:
        """(n,) timesteps t_i: int64 on the integer grid, float32 where some timestep of the run
        is fractional (as diffusers' Euler schedulers pass them)."""
        return torch.full((n,), t_i, dtype=timestep_dtype(self._plan.timesteps), device=device)

    def _model_input(self, x):
        # an fp16/bf16 model gets its own dtype; the loop's arithmetic stays in x's
        return x if self._model_dtype is None or x.dtype == self._model_dtype else x.to(self._model_dtype)

    def _x0_eps(self, x, out, at):
        p = self.options.prediction
        if p == "eps":
            return (x - out * (1 - at).sqrt()) / at.sqrt(), out
        if p == "x0":
            return out, (x - at.sqrt() * out) / (1 - at).sqrt()
        return at.sqrt() * x - (1 - at).sqrt() * out, at.sqrt() * out + (1 - at).sqrt() * x

    @torch.no_grad()
    def sample(
        self,
        x_T=None,
        *,
        batch_size=None,
        generator=None,
        shape=None,
        return_x0: bool = False,
        return_trajectory: bool = False,
        model_kwargs=None,
        guidance_scale=None,
        uncond_kwargs=None,
        guidance_rescale=None,
        noise_dtype=None,
    ):
        """Sample x0 from x_T (drawn from `generator` when not given).

        generator: a torch.Generator, or a list of B of them, one per sample, as diffusers'
        pipelines take it (sample i's x_T and step noise from generator i). noise_dtype: the
        dtype torch.randn draws in (default float32; diffusers' pipelines draw in their
        UNet's dtype), the values then used as float32.

        model_kwargs: passed as model(x, t, **model_kwargs); tensors in it are per sample
        (batched along dim 0 with x). guidance_scale w with uncond_kwargs: classifier-free
        guidance, one model call per step on [x, x] with [uncond, cond] and
        ε = ε_u + w·(ε_c − ε_u); guidance_rescale φ in [0, 1] as diffusers defines it
        (sampling/conditioning.py).

        Returns the sample (B, C, H, W), or a SamplerOutput(sample, x0_preds, trajectory)
        when return_x0 or return_trajectory is set.
        """
        o = self.options
        stream = NoiseStream.of(generator, noise_dtype)
        x = initial_noise(self.model, x_T, batch_size, stream, shape, None, None)
        stream.check_batch(x.shape[0])
        cond = self._conditioning(x, model_kwargs, guidance_scale, uncond_kwargs, guidance_rescale)
        n = x.shape[0]
        x0_preds = [] if return_x0 else None
        xs = [x] if return_trajectory else None
        if n == 0:
            return S.SamplerOutput(x, x0_preds, xs) if (return_x0 or return_trajectory) else x
        solver_loop = {dpmpp_2m.NAME: self._dpmpp_2m, euler.NAME: self._euler, euler_ancestral.NAME: self._euler, lcm.NAME: self._lcm}.get(o.solver)
        if solver_loop is not None:
            x = solver_loop(x, cond, x0_preds, xs, stream)
            return S.SamplerOutput(x, x0_preds, xs) if (return_x0 or return_trajectory) else x
        levels = o.levels
        for i, t_i in enumerate(levels.timesteps):
            t = self._timesteps(t_i, n, x.device)
            at, at_next = self._level(levels.alphas[i], x), self._level(levels.alphas[i + 1], x)
            et = self._model_output(x, t, cond, i, t_i)
            x0_t, et = self._x0_eps(x, et, at)
            if o.clip is not None:
                x0_t = x0_t.clamp(*o.clip)
                if o.use_clipped_model_output:
                    et = (x - at.sqrt() * x0_t) / (1 - at).sqrt()
            if return_x0:
                x0_preds.append(x0_t)
            noise = noise_like(x, stream).to(x.dtype) if self._plan.draws_noise(i) else None
            if o.ddpm_noisy:  # ddpm_steps: DDPM posterior mean, variance beta_t
                beta_t = 1 - at / at_next
                mean = ((at_next.sqrt() * beta_t) * x0_t + ((1 - beta_t).sqrt() * (1 - at_next)) * x) / (1.0 - at)
                x = mean if noise is None else mean + torch.exp(0.5 * beta_t.log()) * noise
            else:  # generalized_steps
                c1 = o.eta * ((1 - at / at_next) * (1 - at_next) / (1 - at)).sqrt()
                c2 = ((1 - at_next) - c1**2).sqrt()
                if noise is None:
                    x = at_next.sqrt() * x0_t + c2 * et
                else:
                    x = at_next.sqrt() * x0_t + c1 * noise + c2 * et
            if o.check_finite:
                S.check_finite(x, i, t_i)
            if return_trajectory:
                xs.append(x)
        if return_x0 or return_trajectory:
            return S.SamplerOutput(x, x0_preds, xs)
        return x

    def _dpmpp_2m(self, x, cond, x0_preds, xs, stream):
        """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2, the midpoint form diffusers runs), in
        x's dtype: with α = sqrt(ᾱ), σ = sqrt(1 - ᾱ), λ = log(α / σ), from s0 to t (s1 before s0)

            h = λ_t - λ_s0;  first order:  x_t = (σ_t / σ_s0) x - α_t (e^{-h} - 1) x̂₀
            r = (λ_s0 - λ_s1) / h;  D = (1 + 1/(2r)) x̂₀ - 1/(2r) x̂₀_prev
            second order:  x_t = (σ_t / σ_s0) x - α_t (e^{-h} - 1) D

        first order at the first step and at the last when S < 15 or it lands on ᾱ = 1
        (dpmpp_2m.second_order: diffusers' rule)."""
        o = self.options
        levels = o.levels
        steps = levels.steps
        x0_prev = None
        lam_prev = None
        for i, s0 in enumerate(levels.timesteps):
            t = self._timesteps(s0, x.shape[0], x.device)
            # the scalars in float64: in fp16, ᾱ near 1 rounds to 1 and σ to 0
            a_s0, a_t = levels.alphas[i], levels.alphas[i + 1]
            alpha_s0, sigma_s0 = math.sqrt(a_s0), math.sqrt(1 - a_s0)
            alpha_t, sigma_t = math.sqrt(a_t), math.sqrt(1 - a_t)
            lam_s0 = math.log(alpha_s0 / sigma_s0)
            lam_t = math.log(alpha_t / sigma_t) if sigma_t > 0 else math.inf
            h = lam_t - lam_s0
            out = self._model_output(x, t, cond, i, s0)
            x0_t, _ = self._x0_eps(x, out, torch.tensor(a_s0, dtype=x.dtype, device=x.device))
            if o.clip is not None:
                x0_t = x0_t.clamp(*o.clip)
            if x0_preds is not None:
                x0_preds.append(x0_t)
            if x0_prev is None or not dpmpp_2m.second_order(i, steps, a_s0, a_t):
                d = x0_t
            else:
                r = (lam_s0 - lam_prev) / h
                d = (1 + 1 / (2 * r)) * x0_t - (1 / (2 * r)) * x0_prev
            x = (sigma_t / sigma_s0) * x - (alpha_t * math.expm1(-h)) * d  # expm1(-h) = e^{-h} - 1
            x0_prev, lam_prev = x0_t, lam_s0
            if o.check_finite:
                S.check_finite(x, i, s0)
            if xs is not None:
                xs.append(x)
        return x

    def _euler(self, x, cond, x0_preds, xs, stream):
        """Euler (Karras et al. 2022, Algorithm 1 without churn) or, for euler_ancestral, its
        ancestral form (k-diffusion's sample_euler_ancestral), in the variance-exploding frame
        x̃ = x sqrt(1 + σ²), as diffusers' Euler schedulers keep the sample; the model sees
        x̃ / sqrt(1 + σ²) (their scale_model_input). Per step, from σ to σ':

            x̂₀ from the model output (eps: x̃ - σ ε; v: -σ v / sqrt(1 + σ²) + x̃ / (1 + σ²))
            d = (x̃ - x̂₀) / σ
            Euler:     x̃' = x̃ + (σ' - σ) d
            ancestral: x̃' = x̃ + (σ_down - σ) d + σ_up z

        The result goes back to the variance-preserving frame of the last level (x̃ itself when
        it is σ = 0). Scalars in float64, tensors in x's dtype."""
        o = self.options
        levels = o.levels
        ancestral = o.solver == euler_ancestral.NAME
        sigmas = [sigma_of_alpha(a) for a in levels.alphas]
        x_ve = x * math.sqrt(1 + sigmas[0] ** 2)
        for i, t_i in enumerate(levels.timesteps):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            t = self._timesteps(t_i, x.shape[0], x.device)
            out = self._model_output(x_ve / math.sqrt(1 + sigma**2), t, cond, i, t_i)
            if o.prediction == "eps":
                denoised = x_ve - sigma * out
            elif o.prediction == "v":
                denoised = out * (-sigma / math.sqrt(sigma**2 + 1)) + x_ve / (sigma**2 + 1)
            else:
                denoised = out
            if o.clip is not None:
                denoised = denoised.clamp(*o.clip)
            if x0_preds is not None:
                x0_preds.append(denoised)
            derivative = (x_ve - denoised) / sigma
            if ancestral:
                sigma_down, sigma_up = euler_ancestral.ancestral_sigmas(sigma, sigma_next, o.eta)
                x_ve = x_ve + derivative * (sigma_down - sigma)
                if self._plan.draws_noise(i):
                    x_ve = x_ve + noise_like(x_ve, stream).to(x.dtype) * sigma_up
            else:
                x_ve = x_ve + derivative * (sigma_next - sigma)
            if o.check_finite:
                S.check_finite(x_ve, i, t_i)
            if xs is not None:
                xs.append(x_ve / math.sqrt(1 + sigma_next**2))
        return x_ve / math.sqrt(1 + sigmas[-1] ** 2)

    def _lcm(self, x, cond, x0_preds, xs, stream):
        """LCM's multistep sampling (Luo et al. 2023, Algorithm 1): at each step the consistency
        function f = c_skip(t) x + c_out(t) x̂₀ (lcm.boundary_scalings), then, but at the last
        step, f noised to the next timestep s with fresh noise: sqrt(ᾱ_s) f + sqrt(1 - ᾱ_s) z."""
        o = self.options
        levels = o.levels
        steps = levels.steps
        for i, t_i in enumerate(levels.timesteps):
            t = self._timesteps(t_i, x.shape[0], x.device)
            out = self._model_output(x, t, cond, i, t_i)
            x0_t, _ = self._x0_eps(x, out, self._level(levels.alphas[i], x))
            if o.clip is not None:
                x0_t = x0_t.clamp(*o.clip)
            if x0_preds is not None:
                x0_preds.append(x0_t)
            c_skip, c_out = lcm.boundary_scalings(float(t_i))
            denoised = c_out * x0_t + c_skip * x
            if i < steps - 1:
                a_next = levels.alphas[i + 1]
                x = math.sqrt(a_next) * denoised + math.sqrt(1 - a_next) * noise_like(x, stream).to(x.dtype)
            else:
                x = denoised
            if o.check_finite:
                S.check_finite(x, i, t_i)
            if xs is not None:
                xs.append(x)
        return x

    def _conditioning(self, x, model_kwargs, guidance_scale, uncond_kwargs, guidance_rescale):
        cond = make_conditioning(x, model_kwargs, guidance_scale, uncond_kwargs, guidance_rescale)
        # an fp16/bf16 model gets its float conditioning in its dtype, as it gets x
        return cast_kwargs(cond, self._model_dtype) if self._model_dtype is not None else cond

    def _model_output(self, x, t, cond, i, t_i):
        """The model's output at x (B, ...) and t (B,), in x's dtype: guided, the combination
        of its two halves on the doubled batch."""
        if cond.guided:
            out = S.call_model(self.model, self._model_input(torch.cat([x, x])), torch.cat([t, t]), **cond.kwargs)
            if i == 0:
                S.check_model_output(out, torch.cat([x, x]), i, t_i)
            return combine(out.to(x.dtype), cond)
        out = S.call_model(self.model, self._model_input(x), t, **cond.kwargs)
        if i == 0:
            S.check_model_output(out, x, i, t_i)
        return out.to(x.dtype)

    @torch.no_grad()
    def encode(self, x0, *, return_trajectory: bool = False, model_kwargs=None, guidance_scale=None, uncond_kwargs=None, guidance_rescale=None):
        """DDIM inversion (η = 0): x0 -> x_T along the same grid, forward in t.

        Each step s -> t evaluates the model at t on x_s, then x_t = sqrt(α_t) x̂₀ +
        sqrt(1 - α_t) eps with x̂₀ = (x_s - sqrt(1 - α_s) eps) / sqrt(α_s). The model sees
        model_kwargs; no guidance unless guidance_scale and uncond_kwargs are given (as in sample).
        Returns x_T, or (x_T, trajectory) when return_trajectory is set.
        """
        x = S.check_input(self.model, x0, "x0")
        cond = self._conditioning(x, model_kwargs, guidance_scale, uncond_kwargs, guidance_rescale)
        plan = inversion_plan(self.options.levels)  # DDIM's, whatever the solver
        levels = list(reversed(self.options.levels.alphas))  # where sampling ends, then at each t of the plan
        xs = [x] if return_trajectory else None
        n = x.shape[0]
        if n > 0:
            for i, t_i in enumerate(plan.timesteps):
                t = self._timesteps(t_i, n, x.device)
                a_s, a_t = self._level(levels[i], x), self._level(levels[i + 1], x)
                out = self._model_output(x, t, cond, i, t_i)
                _, et = self._x0_eps(x, out, a_t)  # eps at the model's timestep
                x0_t = (x - (1 - a_s).sqrt() * et) / a_s.sqrt()
                x = a_t.sqrt() * x0_t + (1 - a_t).sqrt() * et
                if self.options.check_finite:
                    S.check_finite(x, i, t_i, "encoding")
                if return_trajectory:
                    xs.append(x)
        return (x, xs) if return_trajectory else x

    def __repr__(self) -> str:
        o = self.options
        return f"ReferenceSampler(steps={o.steps}, eta={o.eta!r}, skip={o.skip!r}, clip_x0={o.clip}, prediction={o.prediction!r}, solver={o.solver!r})"
