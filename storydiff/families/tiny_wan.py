"""Offline random-weight Wan 2.x pipelines (``wan.py``'s reserved names), built like ``tiny_models.py``'s.

The real models' structure at toy width: a UMT5 text encoder, ``WanTransformer3DModel`` with (1, 2, 2)
patches, 3D RoPE and RMS q/k norms across heads, Wan's causal video VAE (8x in space, 4x in time) with 4
latent channels, and the UniPC flow-matching scheduler the real ones ship. Variants:

* ``tiny-wan``: text to video (Wan 2.1 T2V);
* ``tiny-wan2.2``: two experts switched at ``boundary_ratio`` 0.875 (Wan 2.2 A14B T2V);
* ``tiny-wan-i2v``: image to video with a CLIP image encoder, whose tokens enter through ``attn2``'s added
  K/V (Wan 2.1 I2V): the text is padded to 512 tokens, which its processors assume;
* ``tiny-wan-flf2v``: the same for first–last-frame clips (Wan 2.1 FLF2V: the image embedder takes both
  images' tokens, ``pos_embed_seq_len``);
* ``tiny-wan2.2-i2v``: image to video with two experts and no image encoder (Wan 2.2 A14B I2V).

Image-to-video transformers take 12 channels: the noise (4), the first-frame mask (4: one per frame of a
latent frame) and the condition's latents (4).
"""

from __future__ import annotations

import torch

from .tiny_text import tiny_t5_tokenizer

# the real pipelines' default clip (81 frames) at tiny size: 9 frames = 3 latent frames
TINY_SHOT_FRAMES = 9
TINY_SIDE_LATENT = 4  # 32 pixels
CLIP_TOKENS = 17  # the tiny CLIP's 4 x 4 patches and its class token


def _text_encoder(vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
    )
    return UMT5EncoderModel(config)


def _transformer(in_channels: int, image_dim: int | None = None, image_pairs: bool = False):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=24,  # RoPE channels: 8 time, 8 height, 8 width
        in_channels=in_channels,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        image_dim=image_dim,
        added_kv_proj_dim=None if image_dim is None else 48,
        rope_max_seq_len=32,
        pos_embed_seq_len=2 * CLIP_TOKENS if image_pairs else None,
    )


def _vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=3,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )


def _scheduler():
    from diffusers import UniPCMultistepScheduler

    # the real Wan pipelines' scheduler config (flow matching through UniPC, shift 3 at 480p)
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )


def _image_encoder():
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    processor = CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32})
    return CLIPVisionModel(config), processor


def build_tiny_wan(
    device: torch.device,
    *,
    image_to_video: bool = False,
    experts: int = 1,
    image_encoder: bool = False,
    image_pairs: bool = False,
):
    from diffusers import WanImageToVideoPipeline, WanPipeline

    # 2.1 I2V splits image tokens from text at 512 inside its processors: its text must be 512 long
    tokenizer = tiny_t5_tokenizer(512 if image_encoder else 32)
    in_channels = 12 if image_to_video else 4
    image_dim = 32 if image_encoder else None
    transformers = [_transformer(in_channels, image_dim, image_pairs) for _ in range(experts)]
    parts = {
        "tokenizer": tokenizer,
        "text_encoder": _text_encoder(len(tokenizer)),
        "vae": _vae(),
        "scheduler": _scheduler(),
        "transformer": transformers[0],
        "transformer_2": transformers[1] if experts == 2 else None,
        "boundary_ratio": 0.875 if experts == 2 else None,
    }
    if image_to_video:
        encoder, processor = _image_encoder() if image_encoder else (None, None)
        pipe = WanImageToVideoPipeline(**parts, image_encoder=encoder, image_processor=processor)
    else:
        pipe = WanPipeline(**parts)
    pipe.default_sample_size = TINY_SIDE_LATENT
    pipe.default_num_frames = TINY_SHOT_FRAMES
    return pipe


BUILDERS = {
    "tiny-wan": lambda device: build_tiny_wan(device),
    "tiny-wan2.2": lambda device: build_tiny_wan(device, experts=2),
    "tiny-wan-i2v": lambda device: build_tiny_wan(device, image_to_video=True, image_encoder=True),
    "tiny-wan-flf2v": lambda device: build_tiny_wan(
        device, image_to_video=True, image_encoder=True, image_pairs=True
    ),
    "tiny-wan2.2-i2v": lambda device: build_tiny_wan(device, image_to_video=True, experts=2),
}
