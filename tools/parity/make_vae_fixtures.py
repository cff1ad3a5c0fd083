"""Writes the VAE-decoder parity fixture that flowfarm-engine's tests compare against.

Reference: diffusers' AutoencoderKL on CPU, float32, with SD3's latent format (16
channels, scaling_factor 1.5305, shift_factor 0.0609, no quant convs), tiny and random,
saved in the diffusers `vae/` layout. The fixture holds a latent as the sampler leaves it
and the image diffusers' StableDiffusion3Pipeline would decode from it
(`vae.decode(latent / scaling_factor + shift_factor)`).

    .venv/bin/python tools/parity/make_vae_fixtures.py crates/flowfarm-engine/tests/fixtures
"""

import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import save_file


def to_ldm(sd: dict, num_up: int) -> dict:
    """The decoder of a diffusers AutoencoderKL state dict in the original (LDM) names
    that SD3 single files carry under `first_stage_model.`; checked below against
    diffusers' own single-file converter."""
    out = {}
    for key, value in sd.items():
        if not key.startswith(("decoder.", "post_quant_conv.")):
            continue
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        for i in range(2):
            new = new.replace(f"mid_block.resnets.{i}.", f"mid.block_{i + 1}.")
        if "mid_block.attentions.0." in new:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
            for a, b in [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]:
                new = new.replace(a, b)
            if value.dim() == 2:
                value = value[:, :, None, None]
        for i in range(num_up):
            new = new.replace(f"up_blocks.{i}.resnets.", f"up.{num_up - 1 - i}.block.")
            new = new.replace(f"up_blocks.{i}.upsamplers.0.", f"up.{num_up - 1 - i}.upsample.")
        out[new] = value
    return out


def main(out: Path) -> None:
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32), layers_per_block=1, latent_channels=16, norm_num_groups=8,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609,
    ).eval()
    gen = torch.Generator().manual_seed(400)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    vae.save_pretrained(out / "vae-tiny" / "vae", safe_serialization=True)
    state = {k: v.detach().clone() for k, v in vae.state_dict().items()}
    ldm = to_ldm(state, len(vae.config.up_block_types))
    # Round trip through diffusers' converter (with a copy of the encoder, which it also maps).
    encoder_ldm = {k: v for k, v in convert_back_encoder(state).items()}
    back = convert_ldm_vae_checkpoint({**{f"first_stage_model.{k}": v for k, v in ldm.items()}, **encoder_ldm}, dict(vae.config))
    for key, value in state.items():
        if key.startswith("decoder."):
            assert torch.equal(back[key].reshape(value.shape), value), key
    # Group count cannot be read off the weights; SD3's is 32, this tiny one's is 8.
    save_file(
        {f"first_stage_model.{k}": v.contiguous() for k, v in ldm.items()},
        str(out / "vae-tiny" / "single_file.safetensors"),
        metadata={"norm_num_groups": str(vae.config.norm_num_groups), "sample_size": str(vae.config.sample_size)},
    )
    latent = torch.randn(1, 16, 8, 12, generator=gen)
    with torch.no_grad():
        image = vae.decode(latent / vae.config.scaling_factor + vae.config.shift_factor).sample
    # A square latent: candle 0.9.2's conv2d got some square shapes wrong.
    square = torch.randn(1, 16, 8, 8, generator=gen)
    with torch.no_grad():
        square_image = vae.decode(square / vae.config.scaling_factor + vae.config.shift_factor).sample
    # A latent larger than a tile (sample_size 32 → 16 latent cells), decoded tiled.
    big = torch.randn(1, 16, 40, 24, generator=gen)
    vae.enable_tiling()
    with torch.no_grad():
        tiled = vae.decode(big / vae.config.scaling_factor + vae.config.shift_factor).sample
    save_file(
        {
            "latent": latent, "image": image.contiguous(), "square_latent": square,
            "square_image": square_image.contiguous(), "big_latent": big, "big_image_tiled": tiled.contiguous(),
        },
        str(out / "vae-tiny_decode.safetensors"),
    )
    print(f"VAE fixture written to {out}: image {tuple(image.shape)}")


def convert_back_encoder(state: dict) -> dict:
    """Encoder weights under LDM-looking keys, only so diffusers' converter finds the
    blocks it expects; the test reads the decoder alone."""
    out = {}
    for key, value in state.items():
        if key.startswith("encoder."):
            new = key.replace("down_blocks.", "down.").replace(".resnets.", ".block.").replace("conv_norm_out", "norm_out")
            new = new.replace("downsamplers.0.", "downsample.").replace("conv_shortcut", "nin_shortcut")
            for i in range(2):
                new = new.replace(f"mid_block.resnets.{i}.", f"mid.block_{i + 1}.")
            out[f"first_stage_model.{new}"] = value
    return out


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "crates/flowfarm-engine/tests/fixtures"))
