"""Writes the bundled tiny model (models/flowfarm-tiny) in the forms the published SD3
and SD3.5 weights are distributed in, made by the tools that make the real ones:

- `diffusers-sharded/`: `StableDiffusion3Pipeline.save_pretrained` with a small
  `max_shard_size`, so the transformer, the VAE and the text encoders are split into
  shards with a `*.safetensors.index.json` each (as T5-XXL is in SD3-medium's release);
- `diffusers-fp16/`: the same weights rounded to float16, saved twice into one folder:
  with `variant="fp16"` (`*.fp16.safetensors`, float16) and without (float32 files holding
  the same float16 values), as hub repositories carry both;
- `sd35-encoders/`: SD3.5-style separate encoder files beside a single file, with
  transformers names at the top level: `clip_l.safetensors`, `clip_g.safetensors`,
  `t5xxl_fp16.safetensors` and `t5xxl_fp8_e4m3fn.safetensors` (every 2-D T5 weight cast
  to float8 e4m3fn by torch, the 1-D layer norms kept in float16).

The single files themselves (transformer + VAE, with and without encoders) are written by
the Rust tests from `diffusers-fp16/` with flowfarm's converter, whose layout the parity
fixtures check against diffusers' own single-file converter.

    .venv/bin/python tools/parity/make_published_forms.py models/flowfarm-tiny crates/flowfarm-engine/tests/fixtures/published
"""

import json
import shutil
import sys
from pathlib import Path

import diffusers
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file, save_file


def main(model: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    pipe = StableDiffusion3Pipeline.from_pretrained(model, torch_dtype=torch.float32)

    pipe.save_pretrained(out / "diffusers-sharded", safe_serialization=True, max_shard_size="64KB")
    for part in ["transformer", "vae", "text_encoder_3"]:
        indexes = list((out / "diffusers-sharded" / part).glob("*.index.json"))
        assert indexes, f"{part} was not sharded"

    half = StableDiffusion3Pipeline.from_pretrained(model, torch_dtype=torch.float16)
    half.save_pretrained(out / "diffusers-fp16", safe_serialization=True, variant="fp16")
    widened = StableDiffusion3Pipeline.from_pretrained(out / "diffusers-fp16", variant="fp16", torch_dtype=torch.float32)
    widened.save_pretrained(out / "diffusers-fp16", safe_serialization=True)
    variant_files = sorted(str(p.relative_to(out)) for p in (out / "diffusers-fp16").rglob("*.fp16.safetensors"))
    assert len(variant_files) == 5, variant_files

    enc = out / "sd35-encoders"
    enc.mkdir()
    src = out / "diffusers-fp16"
    for folder, name in [("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"), ("text_encoder_3", "t5xxl_fp16")]:
        tensors = load_file(src / folder / "model.fp16.safetensors")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(enc / f"{name}.safetensors"))
    t5 = load_file(src / "text_encoder_3" / "model.fp16.safetensors")
    fp8 = {k: (v.to(torch.float8_e4m3fn) if v.dim() == 2 else v).contiguous() for k, v in t5.items()}
    save_file(fp8, str(enc / "t5xxl_fp8_e4m3fn.safetensors"))
    cast = sum(1 for v in fp8.values() if v.dtype == torch.float8_e4m3fn)

    (out / "VERSIONS.json").write_text(
        json.dumps({"torch": torch.__version__, "diffusers": diffusers.__version__}, indent=2) + "\n"
    )
    print(f"written to {out}: {len(variant_files)} fp16 variant files, T5 with {cast} of {len(fp8)} tensors in float8")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
