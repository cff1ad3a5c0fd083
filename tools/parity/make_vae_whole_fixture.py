"""Writes the whole-decode reference for a latent larger than a tile.

diffusers' StableDiffusion3Pipeline decodes whole unless tiling is enabled;
flowfarm does the same by default. This takes the tiny VAE and the 40×24
`big_latent` that make_vae_fixtures.py wrote, decodes the latent with
AutoencoderKL (CPU, float32) without tiling, and saves the image as
`big_image_whole` in `vae-tiny_whole_decode.safetensors`.

    .venv/bin/python tools/parity/make_vae_whole_fixture.py crates/flowfarm-engine/tests/fixtures
"""

import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file


def main(fixtures: Path) -> None:
    vae = AutoencoderKL.from_pretrained(fixtures / "vae-tiny" / "vae", torch_dtype=torch.float32).eval()
    big = load_file(fixtures / "vae-tiny_decode.safetensors")["big_latent"]
    with torch.no_grad():
        whole = vae.decode(big / vae.config.scaling_factor + vae.config.shift_factor).sample
    save_file({"big_image_whole": whole.contiguous()}, fixtures / "vae-tiny_whole_decode.safetensors")
    print(f"big_image_whole {tuple(whole.shape)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
