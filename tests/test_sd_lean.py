"""Stable Diffusion's UNet, lean (models/sd_lean.py): diffusers' guided DDIM loop matched on
tiny SD-1.5-, SD-2.x- (linear projections, v-prediction) and SDXL-shaped UNets; the census
of one step at SD-1.5's structure; the captured loop's once-per-run prompt work; and the
UNets the rewrite does not fit, which run as before, with a note. Skipped without diffusers."""

import contextlib
import copy

import pytest
import torch

from ddim_fast import FastSampler, ReferenceSampler, Schedule
from ddim_fast.apps.census.opcount import COPIES, ops_per_step

from .conftest import max_err, requires_triton_interpreter
from .test_ops import native_cpu

pytest.importorskip("diffusers", reason="diffusers is an optional dependency (pip install ddim-fast[diffusers])")
from diffusers import DDIMScheduler, UNet2DConditionModel  # noqa: E402

from ddim_fast.models.diffusers_lean import TabledUNet2D  # noqa: E402
from ddim_fast.models.sd_lean import LeanConditionUNet, lean_refusal  # noqa: E402

# SD-1.5's block structure at a tenth of its width (320 -> 32), as the issue counts it
SD15_TENTH = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 128, 128),
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  cross_attention_dim=64, attention_head_dim=8)
# SD-2.x: linear projections, heads per level, upcast_attention (SD 2.1), v-prediction
SD2_TINY = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=24, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True, norm_num_groups=16)
# SDXL: text_time added embeddings, several transformer layers per block, no attention at the top level
SDXL_TINY = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                 cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
                 addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8, norm_num_groups=16)
SD_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _unet(config, seed=0):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config).eval()
    with torch.no_grad():  # an output of a size that makes errors visible
        unet.conv_out.weight.mul_(10)
    return unet


def _conditions(config, batch, seed=1, length=7):
    """(cond, uncond) model kwargs for a UNet of `config`: a context, and SDXL's added ones."""
    def one(s):
        kw = {"encoder_hidden_states": torch.randn(batch, length, config["cross_attention_dim"], generator=_gen(s))}
        if config.get("addition_embed_type") == "text_time":
            text = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
            kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, text, generator=_gen(s + 10)), "time_ids": torch.rand(batch, 6, generator=_gen(s + 20)) * 1024}
        return kw

    return one(seed), one(seed + 1)


def _doubled(uncond, cond):
    """[uncond, cond] along the batch, nested dicts included."""
    if isinstance(cond, dict):
        return {k: _doubled(uncond[k], cond[k]) for k in cond}
    return torch.cat([uncond, cond])


def _diffusers_guided_loop(unet, scheduler, x, steps, w, cond, uncond):
    """diffusers' pipelines' loop: one call on [x, x] with [uncond, cond], ε_u + w (ε_c − ε_u), DDIMScheduler.step."""
    scheduler.set_timesteps(steps)
    kw = _doubled(uncond, cond)
    for t in scheduler.timesteps:
        with torch.no_grad():
            out = unet(torch.cat([x, x]), t, **kw).sample
        eps_u, eps_c = out.chunk(2)
        x = scheduler.step(eps_u + w * (eps_c - eps_u), t, x, eta=0.0).prev_sample
    return x


SHAPES = {"sd15": (SD15_TENTH, "epsilon"), "sd2": (SD2_TINY, "v_prediction"), "sdxl": (SDXL_TINY, "epsilon")}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_lean_sd_unet_matches_diffusers_guided_ddim(shape):
    config, prediction = SHAPES[shape]
    unet = _unet(config)
    assert lean_refusal(unet) is None
    scheduler = DDIMScheduler(num_train_timesteps=1000, prediction_type=prediction, **SD_SCHEDULER)
    x_T = torch.randn(2, 4, 8, 8, generator=_gen(0))
    cond, uncond = _conditions(config, 2)
    expected = _diffusers_guided_loop(unet, scheduler, x_T.clone(), 6, 7.5, cond, uncond)
    schedule, options = Schedule.from_diffusers_config(scheduler.config)
    sampler = FastSampler(unet, schedule, steps=6, **options)
    got = sampler.sample(x_T, model_kwargs=cond, guidance_scale=7.5, uncond_kwargs=uncond)
    assert isinstance(sampler.prepared_model(x_T.device), LeanConditionUNet) and sampler.lean_note is None
    assert max_err(got, expected) <= 1e-4 * (1 + expected.abs().max().item())
    other = FastSampler(unet, schedule, steps=6, **options).sample(x_T, model_kwargs=uncond, guidance_scale=7.5, uncond_kwargs=cond)
    assert max_err(other, expected) > 1e-2  # the prompt reached the model


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_lean_forward_is_the_unet_s(shape):
    """forward(x, t, ...) of the lean model, per sample timesteps, against diffusers' own in fp32."""
    config, _ = SHAPES[shape]
    unet = _unet(config)
    lean = LeanConditionUNet.from_unet(unet)
    x = torch.randn(3, 4, 8, 8, generator=_gen(0))
    t = torch.tensor([999, 500, 3])
    cond, _ = _conditions(config, 3)
    with torch.no_grad():
        expected = unet(x, t, **cond).sample
        got = lean(x.contiguous(memory_format=torch.channels_last), t, **cond)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert max_err(got, expected) <= 1e-5 * (1 + expected.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", ["sd15", "sdxl"])
def test_lean_sd_unet_in_low_precision_tracks_the_float64_reference(dtype, shape):
    """η = 1, guided, channels_last: held to the error of PyTorch's own loop at that
    precision (diffusers' UNet cast to dtype), plus the rounding of storing the sample."""
    config, _ = SHAPES[shape]
    unet = _unet(config)
    x_T = torch.randn(2, 4, 8, 8, generator=_gen(0))
    cond, uncond = _conditions(config, 2)
    kw = dict(model_kwargs=cond, guidance_scale=3.0, uncond_kwargs=uncond)
    schedule = Schedule.linear()
    got = FastSampler(unet, schedule, steps=4, eta=1.0, dtype=dtype).sample(x_T, generator=_gen(5), **kw)
    assert got.dtype == dtype
    ref64 = ReferenceSampler(copy.deepcopy(unet).double(), schedule, steps=4, eta=1.0).sample(x_T.double(), generator=_gen(5), **kw)
    own = max_err(ReferenceSampler(copy.deepcopy(unet).to(dtype), schedule, steps=4, eta=1.0).sample(x_T, generator=_gen(5), **kw), ref64)  # an fp32 loop
    assert 0 < own
    assert max_err(got, ref64) <= 2 * own + torch.finfo(dtype).eps * ref64.abs().max().item()


@native_cpu  # the count is of the native ops: without them each fused op is PyTorch's two or more
def test_census_of_one_step_at_sd15_structure():
    """The issue's count: SD-1.5's structure at a tenth of its width, guided, bf16. The
    fused path as it was (TabledUNet2D, lean=False counted beside it) ran 566 ops per
    step with NCHW activations after every transformer block."""
    unet = _unet(SD15_TENTH)
    x_T = torch.randn(1, 4, 8, 8, generator=_gen(0))
    cond, uncond = _conditions(SD15_TENTH, 1, length=77)
    kw = dict(model_kwargs=cond, guidance_scale=7.5, uncond_kwargs=uncond)
    lean, not_cl = ops_per_step(lambda s: FastSampler(unet, Schedule.linear(), steps=s, dtype="bf16"), x_T, **kw)
    # 377: the goal is 380. Each of the 16 transformer layers: its norm2 and norm3
    # with the residual add before them in one ops.add_layer_norm, GEGLU in one ops.geglu, and
    # one plain LayerNorm (norm1, after proj_in: no add before it)
    assert sum(lean.values()) <= 380, sorted(lean.items(), key=lambda kv: -kv[1])
    assert lean["ddim_fast::add_layer_norm"] == 32 and lean["ddim_fast::geglu"] == 16 and lean["aten::layer_norm"] == 16, lean
    assert "aten::gelu" not in lean and "aten::mul.Tensor" not in lean, lean
    assert not_cl == {}, not_cl
    assert sum(v for k, v in lean.items() if k in COPIES) <= 1, lean  # the guided loop's copy of x into the second half
    assert lean.get("aten::linear", 0) <= 7 * 16 and lean.get("aten::conv2d", 0) <= 49 and "aten::div.Tensor" not in lean, lean
    classic, _ = ops_per_step(lambda s: FastSampler(unet, Schedule.linear(), steps=s, dtype="bf16", lean=False), x_T, **kw)
    assert sum(classic.values()) - sum(lean.values()) >= 130


@requires_triton_interpreter
def test_a_new_prompt_replays_the_emulated_loop():
    """cuda_graph="emulate": the captured loop's own code on the CPU. run_inputs (K and V of
    the prompt) runs once per run before the steps, from the loop's static kwargs, so a second
    prompt of the same shape reuses the loop and gets its own samples; η > 0, channels_last."""
    unet = _unet(SD15_TENTH)
    x_T = torch.randn(2, 4, 8, 8, generator=_gen(0))
    sampler = FastSampler(unet, Schedule.linear(), steps=4, eta=1.0, cuda_graph="emulate")
    for seed in (1, 3):
        cond, uncond = _conditions(SD15_TENTH, 2, seed=seed)
        kw = dict(model_kwargs=cond, guidance_scale=5.0, uncond_kwargs=uncond)
        got = sampler.sample(x_T, generator=_gen(7), **kw)
        ref = ReferenceSampler(unet, Schedule.linear(), steps=4, eta=1.0).sample(x_T, generator=_gen(7), **kw)
        assert max_err(got, ref) <= 1e-4 * (1 + ref.abs().max().item())
    assert len(sampler._graphs) == 1
    (loop,) = sampler._graphs._entries.values()
    assert loop._run_inputs is not None and loop.step_kwargs.keys() == {"kv"}


@requires_triton_interpreter
def test_the_emulated_loop_in_bf16_tracks_the_float64_reference():
    """The captured loop's own code on the CPU in what a user gets: bf16, channels_last,
    guided, η = 1, the lean transformer layers (ops.add_layer_norm, ops.geglu) in every step;
    held to PyTorch's own bf16 loop's error, as the eager lean path is."""
    unet = _unet(SD15_TENTH)
    x_T = torch.randn(2, 4, 8, 8, generator=_gen(0))
    cond, uncond = _conditions(SD15_TENTH, 2)
    kw = dict(model_kwargs=cond, guidance_scale=3.0, uncond_kwargs=uncond)
    schedule = Schedule.linear()
    sampler = FastSampler(unet, schedule, steps=4, eta=1.0, dtype="bf16", cuda_graph="emulate")
    got = sampler.sample(x_T, generator=_gen(5), **kw)
    assert got.dtype == torch.bfloat16 and isinstance(sampler.prepared_model(x_T.device), LeanConditionUNet)
    ref64 = ReferenceSampler(copy.deepcopy(unet).double(), schedule, steps=4, eta=1.0).sample(x_T.double(), generator=_gen(5), **kw)
    own = max_err(ReferenceSampler(copy.deepcopy(unet).to(torch.bfloat16), schedule, steps=4, eta=1.0).sample(x_T, generator=_gen(5), **kw), ref64)
    assert 0 < own
    assert max_err(got, ref64) <= 2 * own + torch.finfo(torch.bfloat16).eps * ref64.abs().max().item()


@requires_triton_interpreter
@pytest.mark.parametrize("mode", ["step", "loop"])
def test_capture_runs_the_prompt_work_once_per_replay_before_the_steps(mode, monkeypatch):
    """What a CUDA graph would hold, traced with stand-ins for torch.cuda.CUDAGraph and
    torch.cuda.graph (no GPU here): "step" captures run_inputs as its own graph first, and
    the step graphs read its outputs; "loop" runs it inside the loop's graph before the
    steps; a run replays it once, before the steps."""
    log = []

    class Graph:
        def register_generator_state(self, generator):
            pass

        def replay(self):
            log.append(("replay", self))

    @contextlib.contextmanager
    def graph(g, pool=None):
        log.append(("capture", g))
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    unet = _unet(SD15_TENTH)
    x_T = torch.randn(1, 4, 8, 8, generator=_gen(0))
    cond, uncond = _conditions(SD15_TENTH, 1)
    kw = dict(model_kwargs=cond, guidance_scale=5.0, uncond_kwargs=uncond)
    sampler = FastSampler(unet, Schedule.linear(), steps=3, cuda_graph="emulate")
    sampler.sample(x_T, **kw)
    (loop,) = sampler._graphs._entries.values()
    model = loop._model
    run_inputs, forward_rows = loop._run_inputs, model.forward_rows
    loop._run_inputs = lambda table, kwargs: log.append("run_inputs") or run_inputs(table, kwargs)
    model.forward_rows = lambda x, rows, kv: log.append(("step", kv)) or forward_rows(x, rows, kv=kv)
    log.clear()
    with torch.inference_mode():  # as sample() runs the loop
        loop.capture(mode, pool=None)
    kv = loop.step_kwargs["kv"]
    if mode == "step":
        assert list(loop.graphs) == ["prologue", False]
        assert log == [("capture", loop.graphs["prologue"]), "run_inputs", ("capture", loop.graphs[False]), ("step", kv)]
    else:
        assert log == [("capture", loop.graphs["loop"]), "run_inputs"] + [("step", kv)] * 3
    log.clear()
    sampler.sample(x_T, **kw)  # replays (the stand-ins compute nothing)
    if mode == "step":
        assert log == [("replay", loop.graphs["prologue"])] + [("replay", loop.graphs[False])] * 3
    else:
        assert log == [("replay", loop.graphs["loop"])]


def _custom_processor(unet):
    from diffusers.models.attention_processor import AttnProcessor

    unet.set_attn_processor(AttnProcessor())  # the classic processor: another code path than SDPA's
    return unet


def _lora_like(unet):
    class LoRALinear(torch.nn.Linear):  # stands in for peft's layer: not an nn.Linear as such
        pass

    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    lora = LoRALinear(attn.to_q.in_features, attn.to_q.out_features, bias=False)
    lora.load_state_dict(attn.to_q.state_dict())
    attn.to_q = lora
    return unet


@pytest.mark.parametrize("change, says", [(_custom_processor, "custom attention processor (AttnProcessor)"), (_lora_like, "LoRA")])
def test_a_unet_the_rewrite_does_not_fit_runs_as_before_with_a_note(change, says, capsys):
    unet = change(_unet(SD15_TENTH))
    assert says in lean_refusal(unet)
    x_T = torch.randn(2, 4, 8, 8, generator=_gen(0))
    cond, uncond = _conditions(SD15_TENTH, 2)
    kw = dict(model_kwargs=cond, guidance_scale=4.0, uncond_kwargs=uncond)
    sampler = FastSampler(unet, Schedule.linear(), steps=3)
    got = sampler.sample(x_T, **kw)
    assert isinstance(sampler.prepared_model(x_T.device), TabledUNet2D)
    assert says in sampler.lean_note and says in capsys.readouterr().err
    ref = ReferenceSampler(unet, Schedule.linear(), steps=3).sample(x_T, **kw)
    assert max_err(got, ref) <= 1e-4 * (1 + ref.abs().max().item())


def test_lean_sd_unet_refuses_what_it_cannot_take():
    unet = _unet(SDXL_TINY)
    lean = LeanConditionUNet.from_unet(unet)
    x = torch.randn(1, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    cond, _ = _conditions(SDXL_TINY, 1)
    with pytest.raises(ValueError, match="added_cond_kwargs"):
        lean(x, torch.tensor([5]), encoder_hidden_states=cond["encoder_hidden_states"])
    with pytest.raises(TypeError, match="cross_attention_kwargs"):
        lean.run_inputs(lean.time_table([5]), {**cond, "cross_attention_kwargs": {}})
    with pytest.raises(ValueError, match="multiples of 2"):
        lean(torch.randn(1, 4, 7, 8), torch.tensor([5]), **cond)
    freeu = _unet(SD15_TENTH)
    freeu.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    assert "FreeU" in lean_refusal(freeu)
