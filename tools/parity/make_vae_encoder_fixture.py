"""Writes the VAE-encoder parity fixture that flowfarm-engine's tests compare against.

Reference: diffusers' AutoencoderKL on CPU, float32, with the tiny VAE that
make_vae_fixtures.py wrote (its weights include the encoder). Two seeded images in
[-1, 1], one square and one not (32×32 and 48×32 pixels, sides multiples of the
VAE's factor), encoded with `vae.encode(image).latent_dist`: the fixture holds each
image and its distribution's mean and log-variance, and the sampler latents
StableDiffusion3Pipeline-style code takes from the mean,
(mean − shift_factor) · scaling_factor.

    .venv/bin/python tools/parity/make_vae_encoder_fixture.py crates/flowfarm-engine/tests/fixtures
"""

import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file


def main(fixtures: Path) -> None:
    vae = AutoencoderKL.from_pretrained(fixtures / "vae-tiny" / "vae", torch_dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(29)
    out = {}
    for name, (h, w) in {"square": (32, 32), "wide": (32, 48)}.items():
        image = torch.rand((1, 3, h, w), generator=generator) * 2.0 - 1.0
        with torch.no_grad():
            dist = vae.encode(image).latent_dist
        latent = (dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        out[f"{name}_image"] = image.contiguous()
        out[f"{name}_mean"] = dist.mean.contiguous()
        out[f"{name}_logvar"] = dist.logvar.contiguous()
        out[f"{name}_latent"] = latent.contiguous()
        print(f"{name}: image {tuple(image.shape)} -> mean {tuple(dist.mean.shape)}")
    save_file(out, fixtures / "vae-tiny_encode.safetensors")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
