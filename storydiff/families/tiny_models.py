"""Every model this project builds offline with seeded random weights, in one place.

Nothing can be downloaded on our CPU machines, so tests, demos and the benchmarks' memory runs use models
built in code. They keep the real architectures' structure — which UNet levels have attention, how many
transformer layers, two text encoders for SDXL, VAEs that downsample by 8, SVD's spatio-temporal blocks and
EDM scheduler — at tiny widths, since our processors pick layers by level and token count; only the widths
are shrunk. ``random-sdxl`` and ``random-flux`` are the exceptions: the real SDXL UNet (2.6 B parameters)
and the real FLUX.1-dev transformer and VAE (11.9 B + 84 M) for GPU memory and speed.

Names: ``tiny-sdxl``, ``tiny-sd15``, ``random-sdxl`` (text-to-image UNets), ``tiny-flux``, ``tiny-sd3``,
``tiny-pixart``, ``random-flux`` (diffusion transformers), ``tiny-svd`` (image-to-video);
``tiny_clip_vision_model`` is the motion predictor's tiny image encoder. The same seed builds the same
weights in every dtype and on every device (built in float32 under a private RNG stream, then cast) —
except ``random-flux``, which is built directly in the requested dtype on the requested device (float32
first would be 48 GB), so its weights depend on both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLTemporalDecoder,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    StableVideoDiffusionPipeline,
    UNet2DConditionModel,
    UNetSpatioTemporalConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from ..support.compat import clip_image_processor_class
from .reserved import TINY_SVD
from .tiny_text import tiny_t5, tiny_t5_tokenizer
from .tiny_wan import BUILDERS as WAN_BUILDERS

# CLIP's context length: prompt-truncation behaviour must match the real models.
_MAX_TOKENS = 77
# Latent side length; the pipelines' default image size is sample_size × vae_scale_factor = 128.
_SAMPLE_SIZE = 16


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte → printable-character table used by byte-level BPE (same order as CLIP's vocab)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _tiny_clip_vocab() -> dict[str, int]:
    """CLIP's vocabulary without merges: every byte, as a word-inner and a word-final (``</w>``) token.

    With no merges, BPE splits each word into single bytes and suffixes the last one with ``</w>``, so these
    514 entries tokenize any text (punctuation, digits, non-ASCII) without falling back to ``unk``. The
    special tokens come last, as in the real vocabulary.
    """
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer built in memory (no merges): the tiny models' and tiny encoders'."""
    # transformers 5's CLIPTokenizer takes the vocabulary and merges directly, so nothing touches disk or hub.
    return CLIPTokenizer(vocab=_tiny_clip_vocab(), merges=[], model_max_length=_MAX_TOKENS)


def tiny_clip_text_config(
    tokenizer: CLIPTokenizer, hidden: int, *, act: str, projection_dim: int, layers: int = 2
) -> CLIPTextConfig:
    """A small CLIP text encoder config for ``tokenizer``."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=projection_dim,
        # Two layers by default: SDXL reads the penultimate hidden state, which should differ from the
        # embeddings in the tiny models' tests.
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=_MAX_TOKENS,
        hidden_act=act,
        # The pooled output is taken at the first eos token, so the ids must be the tokenizer's own.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _ddim_scheduler() -> DDIMScheduler:
    # StoryDiffusion's default sampler, with the SD/SDXL training noise schedule.
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def _tiny_vae(scaling_factor: float) -> AutoencoderKL:
    # Four blocks → three downsamplings → vae_scale_factor 8, as in every real SD/SDXL VAE.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=_SAMPLE_SIZE * 8,
        scaling_factor=scaling_factor,
    )


def _build_tiny_sdxl(device: torch.device) -> StableDiffusionXLPipeline:
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    # Real SDXL: CLIP-L (768, quick_gelu) + OpenCLIP bigG (1280, gelu, projected pooled output); the UNet's
    # cross-attention width is their concatenation. Unequal tiny widths keep a swapped order detectable.
    hidden_1, hidden_2 = 32, 64
    text_encoder = CLIPTextModel(
        tiny_clip_text_config(tokenizer, hidden_1, act="quick_gelu", projection_dim=hidden_1)
    )
    text_encoder_2 = CLIPTextModelWithProjection(
        tiny_clip_text_config(tokenizer_2, hidden_2, act="gelu", projection_dim=hidden_2)
    )
    time_embed_dim = 8  # per micro-conditioning scalar; SDXL has 6 (original size, crop, target size)
    unet = UNet2DConditionModel(
        sample_size=_SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        # diffusers' legacy name: this is the number of heads (real SDXL: 5, 10, 20 heads of dim 64).
        attention_head_dim=(2, 4, 4),
        # Real SDXL: (1, 2, 10); the deepest level keeps more layers than the middle one.
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=hidden_1 + hidden_2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + hidden_2,
        norm_num_groups=8,
    )
    vae = _tiny_vae(scaling_factor=0.13025)
    return _sdxl_pipeline(unet, text_encoder, text_encoder_2, vae, (tokenizer, tokenizer_2))


def _sdxl_pipeline(unet, text_encoder, text_encoder_2, vae, tokenizers) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet,
        scheduler=_ddim_scheduler(),
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
        # The watermark would depend on an optional package being installed and alter outputs.
        add_watermarker=False,
    )


def _build_tiny_sd15(device: torch.device) -> StableDiffusionPipeline:
    tokenizer = tiny_clip_tokenizer()
    hidden = 32  # real SD1.5: CLIP-L, 768
    text_encoder = CLIPTextModel(
        tiny_clip_text_config(tokenizer, hidden, act="quick_gelu", projection_dim=hidden)
    )
    unet = UNet2DConditionModel(
        sample_size=_SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        # Number of heads, constant across levels as in real SD1.5 (8 heads, dims 40/80/160).
        attention_head_dim=2,
        cross_attention_dim=hidden,
        norm_num_groups=8,
    )
    return StableDiffusionPipeline(
        vae=_tiny_vae(scaling_factor=0.18215),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (architecture only; weights stay random).
# "attention_head_dim" is diffusers' legacy name for the number of heads: 320/5 = 640/10 = 1280/20 = 64.
SDXL_UNET_CONFIG = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}


def _build_random_sdxl(device: torch.device) -> StableDiffusionXLPipeline:
    """The real SDXL UNet (random weights) with one-layer text encoders of SDXL's widths and a tiny VAE.

    For memory and speed measurements of the UNet without a download: the UNet, its activations and the
    consistent-attention banks have their real sizes; text encoding and VAE decoding are nearly free.
    """
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    with torch.device(device):  # build the 2.6 B parameters where they will run
        text_encoder = CLIPTextModel(
            tiny_clip_text_config(tokenizer, 768, act="quick_gelu", projection_dim=768, layers=1)
        )
        text_encoder_2 = CLIPTextModelWithProjection(
            tiny_clip_text_config(tokenizer_2, 1280, act="gelu", projection_dim=1280, layers=1)
        )
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
        vae = _tiny_vae(scaling_factor=0.13025)
    return _sdxl_pipeline(unet, text_encoder, text_encoder_2, vae, (tokenizer, tokenizer_2))


# -- Stable Video Diffusion ------------------------------------------------------------------------------

# Real SVD: OpenCLIP ViT-H/14 image embeds of width 1024 = the UNet's cross-attention width.
_EMBED_DIM = 32
# Real SVD's VAE downsamples by 8; so does the tiny one (four blocks), so a 64² video has 8² latents. 32 is
# the narrowest width: the temporal VAE hard-codes GroupNorm with 32 groups.
_VAE_CHANNELS = (32, 32, 32, 32)
# SVD always resizes the conditioning image to 224² for CLIP (pipeline._encode_image), so the tiny vision
# tower must accept 224² too; 32-pixel patches keep it at 49 tokens.
_CLIP_IMAGE_SIZE, _CLIP_PATCH = 224, 32
# Default video side: sample_size latents × 8.
_SVD_SAMPLE_SIZE = 8


def _svd_scheduler() -> EulerDiscreteScheduler:
    # The scheduler config shipped with stabilityai/stable-video-diffusion-img2vid(-xt): v-prediction on
    # continuous (EDM) timesteps with Karras sigmas between 0.002 and 700.
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        interpolation_type="linear",
        use_karras_sigmas=True,
        sigma_min=0.002,
        sigma_max=700.0,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
    )


def _build_tiny_svd(device: torch.device) -> StableVideoDiffusionPipeline:
    time_embed_dim = 8  # per added time id; SVD has three (fps, motion bucket, noise augmentation)
    unet = UNetSpatioTemporalConditionModel(
        sample_size=_SVD_SAMPLE_SIZE,
        in_channels=8,  # noisy latents + the conditioning image's latents, concatenated on channels
        out_channels=4,
        # Real SVD: three cross-attention levels, then a plain one; two levels keep both kinds here.
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=_EMBED_DIM,
        num_attention_heads=(2, 4),
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=3 * time_embed_dim,
        num_frames=8,
    )
    vae = AutoencoderKLTemporalDecoder(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(_VAE_CHANNELS),
        block_out_channels=_VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=4,
        sample_size=_SVD_SAMPLE_SIZE * 8,
    )
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            projection_dim=_EMBED_DIM,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=_CLIP_IMAGE_SIZE,
            patch_size=_CLIP_PATCH,
        )
    )
    feature_extractor = clip_image_processor_class()(crop_size=_CLIP_IMAGE_SIZE, size=_CLIP_IMAGE_SIZE)
    return StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=_svd_scheduler(),
        feature_extractor=feature_extractor,
    )


# -- Diffusion transformers -------------------------------------------------------------------------------


def _flow_scheduler(dynamic: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler

    # FLUX-dev and SD3's shipped configs: flow matching with a shifted sigma schedule (FLUX: shift from the
    # image's token count).
    if dynamic:
        return FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def _dit_vae(latent_channels: int, shift_factor: float | None) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=1.5,
        shift_factor=shift_factor,
        use_quant_conv=shift_factor is None,
        use_post_quant_conv=shift_factor is None,
    )


def _build_tiny_flux(device: torch.device):
    """FLUX.1-dev's structure: CLIP pooled + T5 text, double- then single-stream blocks with RoPE over the
    joint [text; image] sequence, guidance embedding (no CFG batch), 2x2-packed latents, 16 latent
    channels shrunk to 4."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    tokenizer = tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(tiny_clip_text_config(tokenizer, 32, act="quick_gelu", projection_dim=32))
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x 2x2 packing
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    pipe = FluxPipeline(
        scheduler=_flow_scheduler(dynamic=True),
        vae=_dit_vae(4, shift_factor=0.1159),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=tiny_t5(32),
        tokenizer_2=tiny_t5_tokenizer(_MAX_TOKENS),
        transformer=transformer,
    )
    # FluxPipeline's default size is a constant 128 latent pixels (1024²); the other tiny models are 64²
    pipe.default_sample_size = 8
    return pipe


# black-forest-labs/FLUX.1-dev, transformer/config.json (FluxTransformer2DModel, diffusers 0.42): 11.9 B
# parameters.
FLUX_DEV_CONFIG = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
# black-forest-labs/FLUX.1-dev, vae/config.json (AutoencoderKL, 84 M parameters): 16 latent channels, no
# quant convs, latents shifted and scaled.
FLUX_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}
# FLUX.1-dev's T5 prompt length (FluxPipeline's max_sequence_length): the joint sequence is 512 + image.
_FLUX_TEXT_TOKENS = 512


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Within: new parameters and buffers are created in ``dtype`` (``torch.set_default_dtype``)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _build_random_flux(device: torch.device, dtype: torch.dtype):
    """The real FLUX.1-dev transformer and VAE (random weights) with one-layer text encoders of FLUX's widths.

    For memory and speed measurements on a GPU without a download: the transformer (11.9 B parameters, 24 GB
    in bf16), its joint [512 text; image] sequence, the VAE and the consistent-attention banks have their real
    sizes; the text encoders are small but their outputs have the real widths (CLIP pooled 768, T5 4096 over
    512 tokens). Every module is created on ``device`` in ``dtype`` directly (``torch.device`` and the default
    dtype as context): building in float32 and casting, as the tiny models do, would first take 48 GB. On
    the meta device it allocates nothing (the tests check its structure that way).
    """
    from diffusers import FluxPipeline, FluxTransformer2DModel

    tokenizer = tiny_clip_tokenizer()
    with torch.device(device), default_dtype(dtype):
        text_encoder = CLIPTextModel(
            tiny_clip_text_config(tokenizer, 768, act="quick_gelu", projection_dim=768, layers=1)
        )
        text_encoder_2 = tiny_t5(FLUX_DEV_CONFIG["joint_attention_dim"], layers=1)
        transformer = FluxTransformer2DModel(**FLUX_DEV_CONFIG)
        vae = AutoencoderKL(**FLUX_VAE_CONFIG)
    pipe = FluxPipeline(
        scheduler=_flow_scheduler(dynamic=True),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_t5_tokenizer(_FLUX_TEXT_TOKENS),
        transformer=transformer,
    )
    pipe.default_sample_size = 128  # FluxPipeline's own: 128 latent pixels x 8 = 1024²
    return pipe


def _build_tiny_sd3(device: torch.device):
    """SD3.5's structure: two CLIP encoders with projections and T5, joint blocks (image tokens first, text
    appended), RMS q/k norm, and a dual-attention first block (an image-only attn2), CFG as [uncond;
    cond]."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    text_encoder = CLIPTextModelWithProjection(
        tiny_clip_text_config(tokenizer, 32, act="gelu", projection_dim=32)
    )
    text_encoder_2 = CLIPTextModelWithProjection(
        tiny_clip_text_config(tokenizer_2, 32, act="gelu", projection_dim=32)
    )
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,  # T5 width; the two CLIP widths (32 + 32) are padded to it
        caption_projection_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=_flow_scheduler(dynamic=False),
        vae=_dit_vae(4, shift_factor=0.0609),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=tiny_t5(64),
        tokenizer_3=tiny_t5_tokenizer(_MAX_TOKENS),
    )


def _build_tiny_pixart(device: torch.device):
    """PixArt-Σ's structure: T5 text, transformer blocks with image-only self-attention (``attn1``, like a
    UNet's) and cross-attention to the text, adaLN-single, learned sigma (8 output channels)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    return PixArtSigmaPipeline(
        tokenizer=tiny_t5_tokenizer(_MAX_TOKENS),
        text_encoder=tiny_t5(32),
        vae=_tiny_vae(scaling_factor=0.13025),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


def _tiny_qwen_tokenizer():
    """A byte-level ``Qwen2Tokenizer`` (256 byte symbols, no merges) with Qwen's chat-template specials and
    ``<|endoftext|>`` as padding: every character of a prompt is a token, as far as the tiny model goes."""
    from transformers import Qwen2Tokenizer

    vocab = {symbol: index for index, symbol in enumerate(_bytes_to_unicode().values())}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>", model_max_length=1024)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def _build_tiny_qwen_image(device: torch.device):
    """Qwen-Image's structure: a Qwen2.5-VL text encoder (2 layers, M-RoPE), double-stream blocks joining
    text and image for attention with multi-axis RoPE, true CFG as two passes, 2x2-packed latents of a
    video VAE (one frame, 8x like the real one), 16 latent channels shrunk to 4."""
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = _tiny_qwen_tokenizer()
    text = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
        "vocab_size": len(tokenizer),
        "bos_token_id": None,
        "eos_token_id": None,
    }
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 37, "num_heads": 2, "out_hidden_size": 32}
    # Qwen's own bos/eos ids lie outside the tiny vocabulary: none, as in a model without them
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, bos_token_id=None, eos_token_id=None)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,  # 4 latent channels x 2x2 packing
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    pipe = QwenImagePipeline(
        scheduler=_flow_scheduler(dynamic=True),
        vae=vae,
        text_encoder=Qwen2_5_VLForConditionalGeneration(config),
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.default_sample_size = 8  # the real one's 128 latent pixels (1024²) at tiny size: 64²
    return pipe


_BUILDERS = {
    "tiny-sdxl": _build_tiny_sdxl,
    "tiny-sd15": _build_tiny_sd15,
    "random-sdxl": _build_random_sdxl,
    TINY_SVD: _build_tiny_svd,
    "tiny-flux": _build_tiny_flux,
    "tiny-sd3": _build_tiny_sd3,
    "tiny-pixart": _build_tiny_pixart,
    "tiny-qwen-image": _build_tiny_qwen_image,
}
_BUILDERS.update(WAN_BUILDERS)  # tiny_wan.py: the video family's, in a module of their own
# Built on the device in the target dtype directly (too large to build in float32 and cast).
_IN_PLACE_BUILDERS = {"random-flux": _build_random_flux}


def build_tiny_pipeline(
    name: str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    progress_bar: bool = True,
    device: str | torch.device = "cpu",
) -> DiffusionPipeline:
    """Build a reserved model (``reserved.py``, ``Family.reserved``) offline with random weights; the same
    seed gives the same weights.

    Weights are initialised in float32 and then cast, so a seed names the same model in every dtype —
    except ``random-flux``, initialised in ``dtype`` on ``device`` (its weights depend on both; ``device``
    may be ``"meta"`` to inspect it without allocating). ``progress_bar=False`` silences this pipeline's
    progress bar (global logging is left alone).
    """
    if name not in _BUILDERS and name not in _IN_PLACE_BUILDERS:
        names = ", ".join(sorted({*_BUILDERS, *_IN_PLACE_BUILDERS}))
        raise ValueError(f"unknown reserved model {name!r}; choose from {names}")
    # A private RNG stream: seeding must not disturb the caller's global torch RNG.
    device = torch.device(device)
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        if name in _IN_PLACE_BUILDERS:
            pipe = _IN_PLACE_BUILDERS[name](device, dtype)
        else:
            pipe = _BUILDERS[name](device)
    return _finish(pipe, dtype, progress_bar).to(device)


def _finish(pipe: DiffusionPipeline, dtype: torch.dtype, progress_bar: bool) -> DiffusionPipeline:
    """Cast a pipeline built in float32 (so a seed names the same weights in every dtype) to ``dtype``."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # as from_pretrained leaves them: T5's dropout would make text encoding random
    if dtype != torch.float32:
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                # Not ModelMixin.to: in diffusers 0.42 it warns about modules to keep in float32 even when
                # there are none, as for these models.
                torch.nn.Module.to(component, dtype=dtype)
    if not progress_bar:
        pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_clip_vision_model(embed_dim: int = 32, image_size: int = 32, seed: int = 0):
    """A tiny random ``CLIPVisionModelWithProjection`` (the motion predictor's test encoder).

    At CLIP's default initialization a random ViT's output is dominated by the (image-independent) class
    token, so every image gets nearly the same embedding (cosine ≈ 0.9999). A larger initializer factor
    and small patches make the embeddings actually depend on what is where in the image, which the motion
    tests need.
    """
    config = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        projection_dim=embed_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=4,
        initializer_factor=4.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPVisionModelWithProjection(config)


# -- IP-Adapter ---------------------------------------------------------------------------------------------

# IP-Adapter "plus" resamplers: diffusers derives the head count as to_q rows // 64 and converts exactly four
# resampler layers (loaders/unet.py), so the tiny one keeps 64-wide heads and depth 4.
_RESAMPLER_HEAD, _RESAMPLER_DEPTH = 64, 4
IP_ADAPTER_VARIANTS = ("plain", "plus")


def save_tiny_image_encoder(folder, *, embed_dim: int = 32, image_size: int = 32, seed: int = 0):
    """Save ``tiny_clip_vision_model`` as an IP-Adapter image encoder folder (``from_pretrained`` format);
    returns the folder. Its embeddings depend on what is where in the image (see there), so two reference
    images give two different conditionings."""
    from pathlib import Path

    folder = Path(folder)
    tiny_clip_vision_model(embed_dim=embed_dim, image_size=image_size, seed=seed).save_pretrained(folder)
    return folder


def write_tiny_ip_adapter(
    path,
    denoiser,
    image_encoder: CLIPVisionModelWithProjection,
    *,
    variant: str = "plain",
    tokens: int = 4,
    seed: int = 0,
):
    """Write random IP-Adapter weights for ``denoiser`` (a UNet or a FLUX transformer) and
    ``image_encoder`` to ``path`` (.safetensors or .bin) in the original IP-Adapter layout that diffusers'
    ``load_ip_adapter`` converts: an ``image_proj`` part (plain: a linear map of the image embedding to
    ``tokens`` tokens and a LayerNorm; plus — also the layout of plus-face — a perceiver resampler over the
    encoder's penultimate hidden states) and an ``ip_adapter`` part (``to_k_ip`` / ``to_v_ip`` for every
    UNet cross-attention layer, numbered 1, 3, 5, … in processor order; FLUX: with biases, for every
    double-stream block, numbered 0, 1, 2, …; plain only, 4 tokens, as diffusers reads them).

    The key/value maps are drawn at a few times the usual scale so a reference image visibly moves the
    denoiser's output. Returns the path."""
    from pathlib import Path

    from diffusers import FluxTransformer2DModel

    if variant not in IP_ADAPTER_VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(IP_ADAPTER_VARIANTS)}, got {variant!r}")
    flux = isinstance(denoiser, FluxTransformer2DModel)
    if flux and (variant != "plain" or tokens != 4):
        raise ValueError("diffusers loads FLUX IP-Adapters of the plain variant with 4 tokens only")
    path = Path(path)
    cross = denoiser.config.joint_attention_dim if flux else denoiser.config.cross_attention_dim
    vision = image_encoder.config
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    def linear(rows: int, columns: int, gain: float = 1.0) -> torch.Tensor:
        return randn(rows, columns, std=gain / columns**0.5)

    if variant == "plain":
        image_proj = {
            "proj.weight": linear(tokens * cross, vision.projection_dim),
            "proj.bias": randn(tokens * cross, std=0.1),
            "norm.weight": torch.ones(cross),
            "norm.bias": torch.zeros(cross),
        }
    else:
        hidden, inner = _RESAMPLER_HEAD, _RESAMPLER_HEAD  # one head of diffusers' fixed width
        image_proj = {
            "latents": randn(1, tokens, hidden, std=hidden**-0.5),
            "proj_in.weight": linear(hidden, vision.hidden_size),
            "proj_in.bias": torch.zeros(hidden),
            "proj_out.weight": linear(cross, hidden),
            "proj_out.bias": torch.zeros(cross),
            "norm_out.weight": torch.ones(cross),
            "norm_out.bias": torch.zeros(cross),
        }
        for i in range(_RESAMPLER_DEPTH):
            for norm in (f"layers.{i}.0.norm1", f"layers.{i}.0.norm2", f"layers.{i}.1.0"):
                image_proj.update({f"{norm}.weight": torch.ones(hidden), f"{norm}.bias": torch.zeros(hidden)})
            image_proj.update(
                {
                    f"layers.{i}.0.to_q.weight": linear(inner, hidden),
                    f"layers.{i}.0.to_kv.weight": linear(2 * inner, hidden),
                    f"layers.{i}.0.to_out.weight": linear(hidden, inner),
                    f"layers.{i}.1.1.weight": linear(4 * hidden, hidden),
                    f"layers.{i}.1.3.weight": linear(hidden, 4 * hidden),
                }
            )
    ip_adapter = {}
    if flux:
        for key_id in range(len(denoiser.transformer_blocks)):
            for name in ("to_k_ip", "to_v_ip"):
                ip_adapter[f"{key_id}.{name}.weight"] = linear(denoiser.inner_dim, cross, gain=2.0)
                ip_adapter[f"{key_id}.{name}.bias"] = torch.zeros(denoiser.inner_dim)
    key_id = 1
    for name in [] if flux else denoiser.attn_processors:  # diffusers' numbering: all but self-attention
        if not name.endswith("attn1.processor"):
            inner = denoiser.get_submodule(name.removesuffix(".processor")).to_k.out_features
            ip_adapter[f"{key_id}.to_k_ip.weight"] = linear(inner, cross, gain=2.0)
            ip_adapter[f"{key_id}.to_v_ip.weight"] = linear(inner, cross, gain=2.0)
            key_id += 2
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        flat = {f"image_proj.{k}": v for k, v in image_proj.items()}
        flat.update({f"ip_adapter.{k}": v for k, v in ip_adapter.items()})
        save_file({k: v.contiguous() for k, v in flat.items()}, path)
    else:
        torch.save({"image_proj": image_proj, "ip_adapter": ip_adapter}, path)
    return path
