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
from safetensors.torch import save_file


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


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "crates/flowfarm-engine/tests/fixtures"))
