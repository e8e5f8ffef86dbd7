// Operator schemas of ddim_fast, declared once. Each backend registers its kernels in
// its own file: csrc/cpu/<op>.cpp (TORCH_LIBRARY_IMPL(ddim_fast, CPU, m)) and
// csrc/cuda/<op>.cu (TORCH_LIBRARY_IMPL(ddim_fast, CUDA, m)). Fake kernels for
// torch.compile are registered from Python (ddim_fast/ops/fake.py).
//
// Scalars come as doubles (Python floats); kernels compute in fp32 whatever the storage.
// `prediction` is what the model outputs: 0 = eps, 1 = x0, 2 = v (see common.h).

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(ddim_fast, m) {
  // One DDIM/DDPM update, in one pass over memory:
  //   x0  = x0_from(x, model_output; sqrt_alpha_t, sqrt_one_minus_alpha_t), clamped if `clip`
  //   eps = eps_from(...)  (recomputed from the clamped x0 if clipped_eps)
  //   out = c_x0 * x0 + c_eps * eps + c_xt * x + c_x0_prev * history + sigma * noise
  // `out` may be `x` itself. `x0_out`, when given, receives x0. `history` (float32, a multistep
  // solver's previous x0) is read, then overwritten with this step's x0.
  m.def(
      "ddim_step(Tensor x, Tensor model_output, float sqrt_alpha_t, float sqrt_one_minus_alpha_t, "
      "float c_x0, float c_eps, float c_xt, float sigma, Tensor? noise, bool clip, float clip_min, "
      "float clip_max, int prediction, bool clipped_eps, Tensor(a!) out, Tensor(b!)? x0_out, "
      "float c_x0_prev=0., Tensor(c!)? history=None) -> ()");
  // ddim_step on a guided model call's two halves (classifier-free guidance): the model
  // output is uncond + guidance_scale * (cond - uncond), formed in the same pass.
  m.def(
      "guided_step(Tensor x, Tensor uncond, Tensor cond, float guidance_scale, float sqrt_alpha_t, "
      "float sqrt_one_minus_alpha_t, float c_x0, float c_eps, float c_xt, float sigma, Tensor? noise, bool clip, "
      "float clip_min, float clip_max, int prediction, bool clipped_eps, Tensor(a!) out, Tensor(b!)? x0_out, "
      "float c_x0_prev=0., Tensor(c!)? history=None) -> ()");
  // x0 from the model output, clamped if `clip`; `eps_out`, when given, receives eps
  // recomputed from the clamped x0 (diffusers' use_clipped_model_output).
  m.def(
      "predict_x0(Tensor x, Tensor model_output, float sqrt_alpha_t, float sqrt_one_minus_alpha_t, "
      "bool clip, float clip_min, float clip_max, int prediction, Tensor(a!) out, Tensor(b!)? eps_out) -> ()");
  // silu(group_norm(x + add_bias[..., None, None], num_groups, weight, bias, eps)), statistics
  // in fp32. x is (N, C, *spatial), NCHW or channels_last; add_bias is (N, C), (C,) (one row
  // for every sample) or absent.
  m.def(
      "group_norm_silu(Tensor x, int num_groups, Tensor? weight, Tensor? bias, Tensor? add_bias, "
      "float eps) -> Tensor");
  // The same with the SiLU optional: act(group_norm(x + add_bias)), act = SiLU or identity.
  m.def(
      "group_norm_act(Tensor x, int num_groups, Tensor? weight, Tensor? bias, Tensor? add_bias, "
      "float eps, bool silu) -> Tensor");
  // A residual add first: s = x + residual (written: a UNet still needs it as the next skip),
  // y = act(group_norm(s + add_bias)). Returns (s, y); residual has x's shape, dtype and layout.
  m.def(
      "add_group_norm_act(Tensor x, Tensor residual, int num_groups, Tensor? weight, Tensor? bias, "
      "Tensor? add_bias, float eps, bool silu) -> (Tensor, Tensor)");
  // A transformer layer's residual add and the LayerNorm after it, over the last dimension:
  // s = x + residual (written, rounded to x's dtype: the next residual), y = layer_norm(s,
  // weight, bias, eps), statistics in fp32. Returns (s, y); x and residual contiguous, of one
  // shape and dtype; weight and bias (D,) in x's dtype or float32, or absent (1 and 0).
  m.def("add_layer_norm(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor)");
  // GEGLU after its projection: h = [a, gate] along the last dimension (contiguous), out =
  // a * gelu(gate) with the exact (erf) GELU, in fp32 and rounded once.
  m.def("geglu(Tensor h) -> Tensor");
}

// `import ddim_fast._C` loads this library, and with it the registrations above.
static struct PyModuleDef ddim_fast_c_module = {PyModuleDef_HEAD_INIT, "_C", "ddim_fast native operators", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  return PyModule_Create(&ddim_fast_c_module);
}
