"""Write a diffusers SD1.5 / SDXL pipeline as one original-format (Stability / LDM) checkpoint file.

Users' single-file checkpoints (Juggernaut XL, DreamShaper, ...) keep the key layout of the original
training code; ``from_single_file`` converts it back. The tests need such files without a download, so this
module does the reverse conversion for the tiny models: UNet under ``model.diffusion_model.``, VAE under
``first_stage_model.``, CLIP text encoders under ``cond_stage_model.transformer.`` (SD1.x) or
``conditioner.embedders.0.transformer.`` (SDXL) and SDXL's OpenCLIP encoder under
``conditioner.embedders.1.model.`` (fused attention in-projections, transposed text projection). And
random LoRA files in diffusers' key layout (``write_random_lora``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_TOP = {"conv_norm_out": "norm_out"}
_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
# down_blocks.<level>.resnets.<j>.<rest>, and the like
_UNET_BLOCK = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|\w+samplers)\.(\d+)\.(.*)")
_VAE_BLOCK = re.compile(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|\w+samplers)\.(\d+)\.(.*)")


def _resnet(rest: str) -> str:
    name, param = rest.rsplit(".", 1)
    return f"{_RESNET[name]}.{param}"


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    """The UNet's weights under the original ``input_blocks`` / ``middle_block`` / ``output_blocks`` names.

    The original numbers every block of every level in one sequence: per level ``layers_per_block``
    (resnet, attention) pairs, then the downsampler in a block of its own; going up, ``layers_per_block + 1``
    pairs per level with the upsampler appended to the last one.
    """
    per_level = unet.config.layers_per_block + 1
    has_attention = ["CrossAttn" in t for t in unet.config.up_block_types]
    out = {}
    for key, value in unet.state_dict().items():
        top, _, param = key.rpartition(".")
        if top in _UNET_TOP:
            out[f"{_UNET_TOP[top]}.{param}"] = value
            continue
        m = _UNET_BLOCK.match(key)
        if m:
            way, level, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            if kind == "resnets":
                name = f"0.{_resnet(rest)}"
            elif kind == "attentions":
                name = f"1.{rest}"
            elif kind == "downsamplers":  # a block of its own, after the level's layers
                name, j = f"0.op.{rest.removeprefix('conv.')}", per_level - 1
            else:  # the upsampler joins the level's last block, after its attention if it has one
                name, j = f"{2 if has_attention[level] else 1}.{rest}", per_level - 1
            if way == "down":  # input_blocks.0 is conv_in
                out[f"input_blocks.{1 + level * per_level + j}.{name}"] = value
            else:
                out[f"output_blocks.{level * per_level + j}.{name}"] = value
            continue
        m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
        if not m:
            raise KeyError(f"no original-format name for UNet key {key!r}")
        if m[1] == "resnets":  # resnet, attention, resnet
            out[f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}"] = value
        else:
            out[f"middle_block.1.{m[3]}"] = value
    return out


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    """The VAE's weights under the original names (decoder levels numbered from the bottom; the mid-block
    attention's projections are 1x1 convolutions there)."""
    levels = len(vae.config.up_block_types)
    out = {}
    for key, value in vae.state_dict().items():
        new = key
        for old, ldm in _VAE_TOP.items():
            new = new.replace(f".{old}.", f".{ldm}.")
        m = _VAE_BLOCK.match(key)
        if m:
            part, way, level, kind, j, rest = m[1], m[2], int(m[3]), m[4], m[5], m[6]
            level = level if way == "down" else levels - 1 - level
            if kind == "resnets":
                new = f"{part}.{way}.{level}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                new = f"{part}.{way}.{level}.{way}sample.{rest}"
        m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
        if m and m[2] == "resnets":
            new = f"{m[1]}.mid.block_{int(m[3]) + 1}.{m[4].replace('conv_shortcut', 'nin_shortcut')}"
        elif m:
            name, param = m[4].rsplit(".", 1)
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[name]}.{param}"
            if value.dim() == 2:
                value = value[:, :, None, None]
        out[new] = value
    return out


def clip_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    """A transformers CLIP text encoder's weights as the original stores them (``text_model.`` inside)."""
    return {"text_model." + k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}


def open_clip_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    """SDXL's second text encoder in OpenCLIP's layout: q, k, v fused into ``in_proj``, the text
    projection stored transposed, ``resblocks`` for layers."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {"text_projection": state.pop("text_projection.weight").T.contiguous()}
    for key, ldm in _OPEN_CLIP_TOP.items():
        out[ldm] = state.pop(key)
    for i in range(text_encoder.config.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for param in ("weight", "bias"):
            qkv = [state.pop(f"{src}self_attn.{p}_proj.{param}") for p in "qkv"]
            out[f"{dst}attn.in_proj_{param}"] = torch.cat(qkv)
            out[f"{dst}attn.out_proj.{param}"] = state.pop(f"{src}self_attn.out_proj.{param}")
            for name, ldm in _OPEN_CLIP_LAYER.items():
                out[f"{dst}{ldm}.{param}"] = state.pop(f"{src}{name}.{param}")
    if state:
        raise KeyError(f"no OpenCLIP name for {sorted(state)}")
    return out


def pipeline_to_ldm(pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
    """All of an SD1.x or SDXL pipeline's weights in one original-format state dict."""
    parts = {"model.diffusion_model.": unet_to_ldm(pipe.unet), "first_stage_model.": vae_to_ldm(pipe.vae)}
    if isinstance(pipe, StableDiffusionXLPipeline):
        parts["conditioner.embedders.0.transformer."] = clip_to_ldm(pipe.text_encoder)
        parts["conditioner.embedders.1.model."] = open_clip_to_ldm(pipe.text_encoder_2)
    else:
        parts["cond_stage_model.transformer."] = clip_to_ldm(pipe.text_encoder)
    return {prefix + k: v.detach().contiguous() for prefix, part in parts.items() for k, v in part.items()}


def write_single_file(pipe: DiffusionPipeline, path: Path) -> Path:
    """``pipe`` as one original-format ``.safetensors`` checkpoint at ``path``."""
    save_file(pipeline_to_ldm(pipe), str(path))
    return path


def write_random_lora(
    unet: torch.nn.Module, path: Path, seed: int, rank: int, prefix: str = "unet"
) -> dict[str, tuple]:
    """A random LoRA on every attention projection, in diffusers' key layout (keys under ``prefix``: the
    pipeline's denoiser attribute); returns {module: (A, B)}."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for name, module in unet.named_modules():
        if re.search(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$", name):
            # Deltas of about the weights' own size: a visible change, activations that stay moderate.
            factors[name] = (
                torch.randn(rank, module.in_features, generator=g) / module.in_features**0.5,
                torch.randn(module.out_features, rank, generator=g) * 0.1,
            )
    tensors = {f"{prefix}.{n}.lora_A.weight": a for n, (a, _) in factors.items()}
    tensors |= {f"{prefix}.{n}.lora_B.weight": b for n, (_, b) in factors.items()}
    save_file(tensors, path)
    return factors
