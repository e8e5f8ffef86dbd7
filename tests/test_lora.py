"""LoRA adapters on Stable Diffusion's UNet (PEFT, as diffusers adds them): folded into plain
layers (models/lora.py merged_view) so the UNet runs lean, and a change after accelerate (a
switch of adapters, a new adapter weight, fuse_lora, a deleted or added adapter, a base weight
changed through .data) taken in place (LeanConditionUNet.refresh): the samplers, the prepared
model's buffers and time tables (their storages) and the captured loop are kept, and
`fast(...)` still gives `pipe(...)`'s images to 1e-4 (fp32 on the CPU).

The adapters have random non-zero A and B (init_lora_weights=False), so each one moves the
images; every check first asserts that the change moved pipe's images, so a fast pipeline that
kept its old weights would fail."""

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")  # the test pipelines' text encoder and tokenizer

from peft import LoHaConfig, LoraConfig  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402

import ddim_fast  # noqa: E402
from ddim_fast.apps.census.memory import StoragePeak  # noqa: E402
from ddim_fast.models.lora import merged_view  # noqa: E402
from ddim_fast.models.sd_lean import LeanConditionUNet  # noqa: E402
from .conftest import max_err, requires_triton_interpreter  # noqa: E402
from .tiny_pipelines import TINY_SDXL_UNET, TINY_UNET, sd_pipeline  # noqa: E402

# diffusers' add_adapter of a second adapter: PEFT's notice that the model has several
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")

TOL = 1e-4
MOVED = 1e-2  # how far a change must move pipe's images for the check to mean something
TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0",  # self- and cross-attention
    "ff.net.0.proj", "ff.net.2",  # the feed-forward: GEGLU's projection, then the output linear
    "proj_in", "proj_out",  # the transformer's 1x1 convolutions in and out
    "conv1", "conv2", "time_emb_proj",  # the ResNet blocks: 3x3 convolutions and the time projection
]  # fmt: skip


def _add_adapter(unet, name: str, seed: int, targets=TARGETS, **config) -> None:
    """A LoRA adapter of rank 4 with random A and B (seeded), made the active one."""
    torch.manual_seed(seed)
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=list(targets), init_lora_weights=False, **config)
    unet.add_adapter(lora, adapter_name=name)


def _unet_with_adapters(dtype=torch.float32):
    """The tiny SD UNet with adapters "a" and "b" ("b" active)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET).eval().to(dtype)
    _add_adapter(unet, "a", seed=1)
    _add_adapter(unet, "b", seed=2)
    return unet


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def pipe(tokenizer_folder):
    """The tiny StableDiffusionPipeline with adapters "a" and "b" on its UNet ("b" active)."""
    pipe = sd_pipeline(tokenizer_folder)
    _add_adapter(pipe.unet, "a", seed=1)
    _add_adapter(pipe.unet, "b", seed=2)
    return pipe


def _images(call, **kwargs) -> np.ndarray:
    return call("a cat", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


def _check_images(pipe, fast, **kwargs) -> np.ndarray:
    """fast's images against pipe's; fast runs first, because pipe's own forward changes its
    UNet in one state (disabled adapters with merged ones: PEFT's forward unmerges them)."""
    out = _images(fast, **kwargs)
    ref = _images(pipe, **kwargs)
    assert np.abs(out - ref).max() < TOL
    return ref


def _prepared_model(fast):
    """The UNet as the fast pipeline's samplers run it (prepared by the calls before)."""
    return fast.sampler.prepared_model(torch.device("cpu"))


def _prepared(fast) -> tuple:
    """(the prepared model, the storages of its buffers and time tables, the samplers)."""
    model = _prepared_model(fast)
    storages = [b.data_ptr() for b in model.buffers()] + [t.data_ptr() for t in model._tables._tables.values()]
    return model, storages, list(fast._samplers.values())


def _assert_kept_in_place(fast, before: tuple) -> None:
    model, storages, samplers = _prepared(fast)
    assert model is before[0] and isinstance(model, LeanConditionUNet)
    assert fast.sampler.lean_note is None
    assert storages == before[1]
    assert len(samplers) == len(before[2]) and all(now is then for now, then in zip(samplers, before[2]))


def _lora_layers(unet) -> dict:
    return {name: m for name, m in unet.named_modules() if isinstance(m, BaseTunerLayer)}


def _perturb_base_weights_(unet) -> None:
    """A change of the base convolutions through .data, as PEFT's merge writes: no version bump."""
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.dim() == 4 and "lora_" not in name:
                p.data += 0.05 * torch.randn(p.shape, generator=generator)


# --- the fast pipeline after changes of the adapters ----------------------------------------------

# (what is done to pipe.unet, whether it moves the images from the step before)
CHANGES = {
    "switch a, b, a": [
        (lambda unet: unet.set_adapters("a"), True),
        (lambda unet: unet.set_adapters("b"), True),
        (lambda unet: unet.set_adapters("a"), True),
    ],
    "one adapter with weight 0.3": [(lambda unet: unet.set_adapters(["a"], weights=[0.3]), True)],
    "both with two weights": [(lambda unet: unet.set_adapters(["a", "b"], weights=[0.6, -0.4]), True)],
    "disable, enable": [
        (lambda unet: unet.disable_lora(), True),
        (lambda unet: unet.enable_lora(), True),
    ],
    "fuse at 0.5, unfuse": [
        (lambda unet: unet.fuse_lora(lora_scale=0.5), True),  # scales b by 0.5, then merges it into W
        (lambda unet: unet.unfuse_lora(), False),  # W again, b unmerged at the scale of 0.5
    ],
    "fuse, disable, enable": [
        (lambda unet: unet.fuse_lora(), False),
        (lambda unet: unet.disable_lora(), True),  # merged and disabled: what the forward unmerges
        (lambda unet: unet.enable_lora(), True),
    ],
    "delete the active adapter": [(lambda unet: unet.delete_adapters("b"), True)],  # "a" becomes the active one
    "a third adapter added": [(lambda unet: _add_adapter(unet, "c", seed=3, targets=["to_q", "conv1"]), True)],
    "a base weight changed through .data": [(_perturb_base_weights_, True)],
}


@pytest.mark.parametrize("steps", list(CHANGES.values()), ids=list(CHANGES))
def test_adapter_changes_are_taken_in_place_and_give_the_pipelines_images(pipe, steps):
    fast = ddim_fast.accelerate(pipe)
    previous = _check_images(pipe, fast)
    assert fast.sampler.lean_note is None  # LoRA layers and all: the lean UNet
    before = _prepared(fast)
    for change, moves in steps:
        change(pipe.unet)
        ref = _check_images(pipe, fast)
        assert (np.abs(ref - previous).max() > MOVED) == moves
        _assert_kept_in_place(fast, before)
        previous = ref


def test_the_pipelines_fuse_lora_is_taken_in_place(pipe):
    fast = ddim_fast.accelerate(pipe)
    first = _check_images(pipe, fast)
    before = _prepared(fast)
    pipe.fuse_lora(components=["unet"], lora_scale=0.5)
    assert np.abs(_check_images(pipe, fast) - first).max() > MOVED
    pipe.unfuse_lora(components=["unet"])
    _check_images(pipe, fast)
    _assert_kept_in_place(fast, before)


def test_adapters_added_after_accelerate_to_a_unet_without_any(tokenizer_folder):
    pipe = sd_pipeline(tokenizer_folder)
    fast = ddim_fast.accelerate(pipe)
    previous = _check_images(pipe, fast)
    before = _prepared(fast)
    for name, seed in (("a", 1), ("b", 2)):
        _add_adapter(pipe.unet, name, seed=seed)
        ref = _check_images(pipe, fast)
        assert np.abs(ref - previous).max() > MOVED
        previous = ref
    pipe.unet.set_adapters(["a", "b"], weights=[0.5, 0.5])
    _check_images(pipe, fast)
    _assert_kept_in_place(fast, before)
    _check_images(pipe, fast, eta=1.0)  # a new sampler (of another η), of the same prepared model
    assert _prepared_model(fast) is before[0]


def test_a_dora_adapter_runs_without_the_lean_rewrite_with_a_note(pipe, capsys):
    fast = ddim_fast.accelerate(pipe)
    _check_images(pipe, fast)
    lean_model = _prepared_model(fast)
    _add_adapter(pipe.unet, "d", seed=4, targets=["to_q", "conv1"], use_dora=True)
    _check_images(pipe, fast)
    note = fast.sampler.lean_note
    assert "adapter 'd' is a LoRA variant" in note and note in capsys.readouterr().err
    assert not isinstance(_prepared_model(fast), LeanConditionUNet)
    pipe.unet.set_adapters("a")  # DoRA no longer active: lean again, in a new prepared model
    _check_images(pipe, fast)
    assert fast.sampler.lean_note is None
    assert isinstance(_prepared_model(fast), LeanConditionUNet)
    assert _prepared_model(fast) is not lean_model


@requires_triton_interpreter
def test_a_lora_switch_keeps_the_emulated_captured_loop(pipe):
    """The captured loop's code, uncaptured (cuda_graph="emulate"): after a switch it replays
    with the buffers and the time table it holds, refreshed in place."""
    fast = ddim_fast.accelerate(pipe, cuda_graph="emulate")
    previous = _check_images(pipe, fast, eta=1.0)
    before = _prepared(fast)
    (sampler,) = fast._samplers.values()
    entries = dict(sampler._graphs._entries)
    (loop,) = entries.values()
    table = loop.table
    for adapters in ("a", ["a", "b"]):
        pipe.unet.set_adapters(adapters)
        ref = _check_images(pipe, fast, eta=1.0)
        assert np.abs(ref - previous).max() > MOVED
        assert dict(sampler._graphs._entries) == entries and loop.table is table
        _assert_kept_in_place(fast, before)
        previous = ref


# --- merged_view itself ---------------------------------------------------------------------------


def _two_weighted(unet):
    unet.set_adapters(["a", "b"], weights=[0.6, -0.4])


def _a_merged(unet):
    unet.set_adapters("a")
    unet.fuse_lora()


def _disabled_with_a_merged(unet):
    _a_merged(unet)
    unet.disable_lora()


def _disabled(unet):
    unet.disable_lora()


def _layer_input(layer, dtype) -> torch.Tensor:
    base = layer.base_layer
    generator = torch.Generator().manual_seed(5)
    if isinstance(base, nn.Conv2d):
        return torch.randn(2, base.in_channels, 5, 7, generator=generator).to(dtype)  # odd spatial size
    return torch.randn(2, 3, base.in_features, generator=generator).to(dtype)


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("state", [_two_weighted, _a_merged, _disabled_with_a_merged, _disabled])
def test_merged_view_applies_the_weight_peft_forward_applies(state, dtype, rtol):
    unet = _unet_with_adapters(dtype)
    state(unet)
    view, note = merged_view(unet)
    assert note is None
    plain_layers = dict(view.named_modules())
    kinds = set()
    for name, layer in _lora_layers(unet).items():
        plain = plain_layers[name]
        assert type(plain) is type(layer.base_layer) and plain.bias is layer.base_layer.bias
        x = _layer_input(layer, dtype)
        with torch.no_grad():
            expected = layer(x)  # disabled with a merged adapter: unmerges (the view is made already)
            got = plain(x)
        assert got.dtype == dtype
        assert max_err(got, expected) <= rtol * (1 + expected.abs().max().item())
        kinds.add((type(plain), tuple(getattr(plain, "kernel_size", ()))))
    assert kinds == {(nn.Linear, ()), (nn.Conv2d, (1, 1)), (nn.Conv2d, (3, 3))}  # every kind of fold


def test_merged_view_leaves_the_unet_as_it_was_and_shares_its_other_tensors():
    unet = _unet_with_adapters()
    _two_weighted(unet)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    types = {name: type(m) for name, m in unet.named_modules()}
    flags = {name: (list(m.merged_adapters), list(m.active_adapters), m.disable_adapters, dict(m.scaling)) for name, m in _lora_layers(unet).items()}
    view, note = merged_view(unet)
    assert note is None and view is not unet
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items()) and len(unet.state_dict()) == len(state)
    assert {name: type(m) for name, m in unet.named_modules()} == types
    assert {name: (list(m.merged_adapters), list(m.active_adapters), m.disable_adapters, dict(m.scaling)) for name, m in _lora_layers(unet).items()} == flags
    assert not any(isinstance(m, BaseTunerLayer) for m in view.modules())
    view_parameters = dict(view.named_parameters())
    for name, p in unet.named_parameters():
        if "lora_" in name or name.endswith(".base_layer.weight"):  # the adapters, and the folded weights
            continue
        assert view_parameters[name.replace(".base_layer.", ".")] is p  # biases and every other layer's: shared
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = unet(x, t, c).sample
        got = view(x, t, c).sample
    assert max_err(got, expected) <= 1e-5 * (1 + expected.abs().max().item())


def test_merged_view_of_a_unet_without_adapters_is_the_unet():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**TINY_UNET)
    assert merged_view(unet) == (unet, None)


@pytest.mark.parametrize(
    "config, says",
    [
        (LoraConfig(r=4, target_modules=["to_q"], use_dora=True, init_lora_weights=False), "adapter 'x' is a LoRA variant (DoraLinearVariant)"),
        (LoraConfig(r=4, target_modules=["to_out.0"], lora_bias=True, init_lora_weights=False), "adapter 'x' has its own bias"),
        (LoHaConfig(r=4, target_modules=["to_v"]), "a peft.tuners.loha.layer.Linear tuner layer"),
    ],
    ids=["dora", "lora-bias", "loha"],
)
def test_a_layer_that_does_not_fold_leaves_the_unet_with_a_note_naming_it(config, says):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**TINY_UNET).eval()
    unet.add_adapter(config, adapter_name="x")
    view, note = merged_view(unet)
    assert view is unet
    assert says in note and "down_blocks.0.attentions.0.transformer_blocks.0.attn1." in note


# --- LeanConditionUNet.refresh --------------------------------------------------------------------


def _move_every_parameter_(unet) -> None:
    """Every parameter of the UNet (LoRA factors and 1-D ones included) changed through .data."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in unet.parameters():
            p.data += 0.05 * torch.randn(p.shape, generator=generator).to(p.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", [TINY_UNET, TINY_SDXL_UNET], ids=["sd", "sdxl"])
def test_refresh_copies_the_new_weights_into_the_same_buffers_and_time_tables(config, dtype):
    """After a LoRA added, then after every parameter moved: each buffer and time table holds
    what a new lean model of the UNet holds, in its own storage and strides."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).eval()
    lean = LeanConditionUNet.from_unet(unet, dtype=dtype)
    timesteps = [999, 500, 1]
    table = lean.time_table(timesteps)
    storages = [b.data_ptr() for b in lean.buffers()]
    strides = [b.stride() for b in lean.buffers()]
    for change in (lambda: _add_adapter(unet, "a", seed=1), lambda: _move_every_parameter_(unet)):
        before = [b.clone() for b in lean.buffers()]
        change()
        assert lean.refresh(unet)
        expected = LeanConditionUNet.from_unet(merged_view(unet)[0], dtype=dtype)
        names = [name for name, _ in lean.named_buffers()]
        assert names == [name for name, _ in expected.named_buffers()]
        assert [b.data_ptr() for b in lean.buffers()] == storages
        assert [b.stride() for b in lean.buffers()] == strides
        for name, b, e in zip(names, lean.buffers(), expected.buffers()):
            assert torch.equal(b, e), name
        moved = {name for name, b, old in zip(names, lean.buffers(), before) if not torch.equal(b, old)}
        assert moved  # the change reached the lean model
        assert lean.time_table(timesteps) is table
        assert torch.equal(table, expected.time_table(timesteps))
    assert moved == set(names)  # every parameter moved: every buffer did


@pytest.mark.parametrize("with_lora", [False, True], ids=["values-changed", "lora-added"])
@pytest.mark.parametrize("config", [TINY_UNET, TINY_SDXL_UNET], ids=["sd", "sdxl"])
def test_refresh_holds_no_second_copy_of_the_weights(config, with_lora):
    """A refresh fills each buffer from the UNet's tensors: at most the folded weights of the
    LoRA layers (the UNet's dtype) and transients are alive beside the lean model, where a
    second lean model (a full copy of its weights) was before."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).eval()
    lean = LeanConditionUNet.from_unet(unet)
    lean_bytes = sum(b.nbytes for b in lean.buffers())
    folded_bytes = 0
    if with_lora:
        _add_adapter(unet, "a", seed=1)
        folded_bytes = sum(layer.base_layer.weight.nbytes for layer in _lora_layers(unet).values())
    else:
        _perturb_base_weights_(unet)
    counter = StoragePeak()
    with counter:
        assert lean.refresh(unet)
    assert torch.equal(lean.conv_in_w, unet.conv_in.weight.contiguous(memory_format=torch.channels_last))
    assert counter.peak - folded_bytes < 0.3 * lean_bytes  # a second copy: 1.05 of lean_bytes


def _other_widths(unet):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**dict(TINY_UNET, block_out_channels=(16, 32)))


def _other_norm_eps(unet):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**dict(TINY_UNET, norm_eps=1e-3))  # the same buffers; a plain attribute differs


def _classic_attention(unet):
    from diffusers.models.attention_processor import AttnProcessor

    unet.set_attn_processor(AttnProcessor())  # no longer runs lean
    return unet


@pytest.mark.parametrize("change", [_other_widths, _other_norm_eps, _classic_attention])
def test_refresh_refuses_another_structure_and_changes_nothing(change):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET).eval()
    lean = LeanConditionUNet.from_unet(unet)
    table = lean.time_table([999, 1]).clone()
    buffers = [b.clone() for b in lean.buffers()]
    assert not lean.refresh(change(unet))
    assert all(torch.equal(b, before) for b, before in zip(lean.buffers(), buffers))
    assert torch.equal(lean.time_table([999, 1]), table)


def test_refresh_weights_leaves_a_new_dtype_of_the_model_to_a_new_sampler():
    from diffusers import UNet2DConditionModel

    from ddim_fast import FastSampler, Schedule

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET).eval()
    sampler = FastSampler(unet, Schedule.linear(), steps=2)
    assert sampler.refresh_weights()  # nothing prepared yet: nothing to do
    cond = {"encoder_hidden_states": torch.randn(1, 5, 32)}
    sampler.sample(torch.randn(1, 4, 8, 8), model_kwargs=cond)
    assert sampler.refresh_weights()
    unet.double()  # the sampling dtype follows the model's: fp64 now, which the fp32 buffers are not
    assert not sampler.refresh_weights()



def test_the_refresh_memory_script_records_both_changes(tmp_path):
    import json

    from benchmarks import refresh_memory

    out = tmp_path / "refresh-memory.json"
    assert refresh_memory.main(["--unet", "tiny", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["unet"] == "tiny" and result["lean_bytes"] > 0 and 0 < result["folded_of_lean"] < 1
    assert 0 < result["values changed"]["peak_of_lean"] < 0.3
    assert result["folded_of_lean"] < result["lora added"]["peak_of_lean"] < result["folded_of_lean"] + 0.3


def test_a_deferred_copy_refuses_parts_that_do_not_concatenate():
    from ddim_fast.models.lean import _copy, deferred_copies, fill_copy

    with deferred_copies() as sources:
        with pytest.raises(ValueError, match="do not concatenate"):
            _copy([torch.zeros(2, 3), torch.zeros(2, 1)], torch.float32)  # a fill would broadcast the second
        placeholder = _copy([torch.ones(2, 3), torch.full((1, 3), 2.0)], torch.bfloat16)
    assert placeholder.shape == (3, 3) and placeholder.dtype == torch.bfloat16 and placeholder.isnan().all()
    target = torch.full((3, 3), -1.0, dtype=torch.bfloat16)
    fill_copy(target, placeholder, sources)
    assert torch.equal(target, torch.tensor([[1.0] * 3, [1.0] * 3, [2.0] * 3], dtype=torch.bfloat16))
