"""Random-weight diffusers pipelines built from configs (nothing downloaded), as diffusers' own
tests build theirs: a tiny DDIMPipeline, a StableDiffusionPipeline (tiny, or with SD-1.5's
sizes for the GPU benchmark) and a tiny StableDiffusionXLPipeline, with byte-level
CLIPTokenizers that have no merges (every character is a token) written to a folder."""

import json
import os

import torch

from ddim_fast.apps.census.models import SD15_UNET


def _byte_chars() -> list:
    """The 256 characters a byte-level BPE vocabulary starts from (GPT-2's byte to unicode map:
    printable bytes as themselves, the others shifted past 255)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def byte_tokenizer(folder: str, max_length: int = 16):
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=max_length)


def ddim_pipeline(seed: int = 0, *, clip_sample: bool = True, channels: int = 3):
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=clip_sample)
    pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# SD-1.5's sizes: UNet (the census's own dict), VAE and CLIP text encoder (vocabulary aside: the byte tokenizer's)
SD15_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)
TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
TINY_VAE = dict(
    block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    latent_channels=4,
    norm_num_groups=8,
    sample_size=16,
)
TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)


def sd_pipeline(folder: str, seed: int = 0, *, prediction_type: str = "epsilon", linear_projection: bool = False, size: str = "tiny"):
    """A StableDiffusionPipeline with a DDIMScheduler (SD's: scaled-linear betas, leading
    spacing with offset 1, no clipping). size "tiny" (16x16 images) or "sd15" (SD-1.5's
    UNet, VAE and text encoder, 512x512 images); linear_projection=True with v-prediction is
    SD-2.x-shaped."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = byte_tokenizer(folder, max_length=77 if size == "sd15" else 16)
    torch.manual_seed(seed)
    unet_config, vae_config, text_config = (SD15_UNET, SD15_VAE, SD15_TEXT) if size == "sd15" else (TINY_UNET, TINY_VAE, TINY_TEXT)
    unet = UNet2DConditionModel(**unet_config, use_linear_projection=linear_projection).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, **vae_config).eval()
    config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        **text_config,
    )
    text_encoder = CLIPTextModel(config).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def img2img_pipeline(text_to_image):
    """The StableDiffusionImg2ImgPipeline of a StableDiffusionPipeline's components."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**text_to_image.components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# SDXL's structure at a tiny size (diffusers' own SDXL tests): text and time embeddings added
# (addition_embed_type="text_time"), two transformer layers in the second block, linear projections
TINY_SDXL_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    transformer_layers_per_block=(1, 2),
    projection_class_embeddings_input_dim=80,  # the pooled text embedding (32) and 6 time ids x 8
    cross_attention_dim=64,  # both text encoders' hidden states, side by side
    norm_num_groups=8,
)


def sdxl_pipeline(folder: str, seed: int = 0, *, prediction_type: str = "epsilon"):
    """A tiny StableDiffusionXLPipeline with SDXL's EulerDiscreteScheduler config (scaled-linear
    betas, leading spacing with offset 1) and its two text encoders (the second with a
    projection: the pooled embedding)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = byte_tokenizer(os.path.join(folder, "tokenizer"))
    tokenizer_2 = byte_tokenizer(os.path.join(folder, "tokenizer_2"))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, **TINY_VAE).eval()
    config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=32,
        hidden_act="gelu",
        **TINY_TEXT,
    )
    text_encoder = CLIPTextModel(config).eval()
    text_encoder_2 = CLIPTextModelWithProjection(config).eval()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
