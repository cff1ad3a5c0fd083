"""Writes the MM-DiT parity fixtures that flowfarm-engine's tests compare against.

Reference: diffusers' SD3Transformer2DModel and StableDiffusion3Pipeline on CPU, float32.
For each variant it builds a tiny transformer with random weights in the diffusers folder
layout, runs one forward pass at a non-square size with a CFG batch of 2, and stores the
inputs and outputs. For sd3-medium it also runs a whole 28-step sample (shift 3.0,
guidance 5.0) through the real pipeline from given embeddings and initial latents.

    python3 -m venv .venv && .venv/bin/pip install torch diffusers transformers safetensors
    .venv/bin/python tools/parity/make_mmdit_fixtures.py crates/flowfarm-engine/tests/fixtures

Everything is seeded, so a rerun with the same library versions writes the same files.
"""

import json
import math
import sys
from pathlib import Path

import diffusers
import torch
from diffusers.models import embeddings
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from safetensors.torch import save_file

# Tiny but structurally complete: 3 blocks (first, middle, last/context-pre-only),
# 2 heads of 16 channels (the real models have heads = depth and 64 channels per head).
COMMON = dict(
    sample_size=16,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=3,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=48,
    caption_projection_dim=32,
    pooled_projection_dim=40,
    pos_embed_max_size=24,
)
VARIANTS = {
    "sd3-medium": dict(),
    "sd3.5-large": dict(qk_norm="rms_norm"),
    "sd3.5-medium": dict(qk_norm="rms_norm", dual_attention_layers=(0, 1)),
}
LATENT_H, LATENT_W = 16, 24  # non-square: 8 × 12 patches
TEXT_TOKENS = 10


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Replaces diffusers' init (zeros in places) so every weight matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.2
            if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or "norm_added" in name:
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)


def precise_timestep_embedding(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1,
                               scale=1, max_period=10000):
    """diffusers' get_timestep_embedding computed in float64, rounded once to float32.

    The reference computes t·f in float32 with a vectorised exp: at t = 1000 that moves
    the sinusoids by up to ~6e-5, and random tiny models amplify it to ~3e-5 relative
    in their output. flowfarm computes the sinusoid in float64, so the fixtures carry
    the reference's output both ways: `output` (as shipped) and `output_precise_time`.
    """
    half = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float64) / (half - downscale_freq_shift)
    emb = scale * timesteps[:, None].double() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return emb.float()


def to_single_file(sd: dict, num_layers: int) -> dict:
    """The original (Stability AI) single-file layout of a diffusers state dict:
    fused qkv, `joint_blocks.*`, and scale/shift halves swapped where diffusers swaps
    them. Checked below against diffusers' own single-file converter."""
    sd = dict(sd)
    swap = lambda t: torch.cat(t.chunk(2, dim=0)[::-1], dim=0)  # noqa: E731
    out = {
        "pos_embed": sd.pop("pos_embed.pos_embed"),
        "x_embedder.proj.weight": sd.pop("pos_embed.proj.weight"),
        "x_embedder.proj.bias": sd.pop("pos_embed.proj.bias"),
    }
    for src, dst in [("timestep_embedder", "t_embedder"), ("text_embedder", "y_embedder")]:
        for lin, idx in [("linear_1", 0), ("linear_2", 2)]:
            for kind in ["weight", "bias"]:
                out[f"{dst}.mlp.{idx}.{kind}"] = sd.pop(f"time_text_embed.{src}.{lin}.{kind}")
    for kind in ["weight", "bias"]:
        out[f"context_embedder.{kind}"] = sd.pop(f"context_embedder.{kind}")
        out[f"final_layer.linear.{kind}"] = sd.pop(f"proj_out.{kind}")
        out[f"final_layer.adaLN_modulation.1.{kind}"] = swap(sd.pop(f"norm_out.linear.{kind}"))
    for i in range(num_layers):
        b, j = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        last = i == num_layers - 1
        for kind in ["weight", "bias"]:
            out[f"{j}.x_block.attn.qkv.{kind}"] = torch.cat([sd.pop(f"{b}.attn.to_{x}.{kind}") for x in "qkv"])
            out[f"{j}.context_block.attn.qkv.{kind}"] = torch.cat([sd.pop(f"{b}.attn.add_{x}_proj.{kind}") for x in "qkv"])
            out[f"{j}.x_block.attn.proj.{kind}"] = sd.pop(f"{b}.attn.to_out.0.{kind}")
            out[f"{j}.x_block.adaLN_modulation.1.{kind}"] = sd.pop(f"{b}.norm1.linear.{kind}")
            ctx_mod = sd.pop(f"{b}.norm1_context.linear.{kind}")
            out[f"{j}.context_block.adaLN_modulation.1.{kind}"] = swap(ctx_mod) if last else ctx_mod
            out[f"{j}.x_block.mlp.fc1.{kind}"] = sd.pop(f"{b}.ff.net.0.proj.{kind}")
            out[f"{j}.x_block.mlp.fc2.{kind}"] = sd.pop(f"{b}.ff.net.2.{kind}")
            if not last:
                out[f"{j}.context_block.attn.proj.{kind}"] = sd.pop(f"{b}.attn.to_add_out.{kind}")
                out[f"{j}.context_block.mlp.fc1.{kind}"] = sd.pop(f"{b}.ff_context.net.0.proj.{kind}")
                out[f"{j}.context_block.mlp.fc2.{kind}"] = sd.pop(f"{b}.ff_context.net.2.{kind}")
            if f"{b}.attn2.to_q.{kind}" in sd:
                out[f"{j}.x_block.attn2.qkv.{kind}"] = torch.cat([sd.pop(f"{b}.attn2.to_{x}.{kind}") for x in "qkv"])
                out[f"{j}.x_block.attn2.proj.{kind}"] = sd.pop(f"{b}.attn2.to_out.0.{kind}")
        for src, dst in [("attn.norm_q", "x_block.attn.ln_q"), ("attn.norm_k", "x_block.attn.ln_k"),
                         ("attn.norm_added_q", "context_block.attn.ln_q"), ("attn.norm_added_k", "context_block.attn.ln_k"),
                         ("attn2.norm_q", "x_block.attn2.ln_q"), ("attn2.norm_k", "x_block.attn2.ln_k")]:
            if f"{b}.{src}.weight" in sd:
                out[f"{j}.{dst}.weight"] = sd.pop(f"{b}.{src}.weight")
    assert not sd, f"unmapped: {sorted(sd)}"
    return out


def main(out: Path) -> None:
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__}
    for i, (variant, extra) in enumerate(VARIANTS.items()):
        model = SD3Transformer2DModel(**COMMON, **extra).eval()
        randomize(model, seed=100 + i)
        model.save_pretrained(out / variant / "transformer", safe_serialization=True)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        single = to_single_file(state, COMMON["num_layers"])
        back = convert_sd3_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in single.items()})
        assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state), variant
        # The head count cannot be read off a checkpoint without QK-norm weights when
        # heads are not 64 channels wide (the tiny models); record it as metadata.
        save_file(
            {f"model.diffusion_model.{k}": v.contiguous() for k, v in single.items()},
            str(out / variant / "single_file.safetensors"),
            metadata={"num_heads": str(COMMON["num_attention_heads"])},
        )

        gen = torch.Generator().manual_seed(200 + i)
        inputs = {
            "hidden_states": torch.randn(2, 16, LATENT_H, LATENT_W, generator=gen),
            "encoder_hidden_states": torch.randn(2, TEXT_TOKENS, COMMON["joint_attention_dim"], generator=gen),
            "pooled_projections": torch.randn(2, COMMON["pooled_projection_dim"], generator=gen),
            "timestep": torch.tensor([1000.0, 357.25]),
        }
        with torch.no_grad():
            output = model(**inputs, return_dict=False)[0]
            tensors = {**inputs, "output": output}
            shipped = embeddings.get_timestep_embedding
            embeddings.get_timestep_embedding = precise_timestep_embedding
            try:
                tensors["output_precise_time"] = model(**inputs, return_dict=False)[0]
                if variant == "sd3.5-medium":
                    tensors["output_skip_1"] = model(**inputs, skip_layers=[1], return_dict=False)[0]
            finally:
                embeddings.get_timestep_embedding = shipped
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"{variant}_forward.safetensors"))

    # A whole sample through the real pipeline: 28 steps, shift 3.0, guidance 5.0.
    model = SD3Transformer2DModel.from_pretrained(out / "sd3-medium" / "transformer").eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=model, scheduler=scheduler, vae=None,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None,
    )
    gen = torch.Generator().manual_seed(300)
    cond = torch.randn(1, TEXT_TOKENS, COMMON["joint_attention_dim"], generator=gen)
    uncond = torch.randn(1, TEXT_TOKENS, COMMON["joint_attention_dim"], generator=gen)
    pooled = torch.randn(1, COMMON["pooled_projection_dim"], generator=gen)
    neg_pooled = torch.randn(1, COMMON["pooled_projection_dim"], generator=gen)
    latents = torch.randn(1, 16, LATENT_H, LATENT_W, generator=gen)
    def run():
        with torch.no_grad():
            return pipe(
                prompt_embeds=cond, negative_prompt_embeds=uncond,
                pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=neg_pooled,
                latents=latents.clone(), height=LATENT_H * 8, width=LATENT_W * 8,
                num_inference_steps=28, guidance_scale=5.0, output_type="latent", return_dict=False,
            )[0].contiguous()

    final = run()
    shipped = embeddings.get_timestep_embedding
    embeddings.get_timestep_embedding = precise_timestep_embedding
    try:
        final_precise = run()
    finally:
        embeddings.get_timestep_embedding = shipped
    save_file(
        {
            "cond": cond, "uncond": uncond, "pooled": pooled, "negative_pooled": neg_pooled,
            "initial_latent": latents, "final_latent": final, "final_latent_precise_time": final_precise,
            "sigmas": scheduler.sigmas.to(torch.float32).contiguous(),
        },
        str(out / "sd3-medium_sample.safetensors"),
    )
    (out / "VERSIONS.json").write_text(json.dumps(versions, indent=2) + "\n")
    print(f"fixtures written to {out} with {versions}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "crates/flowfarm-engine/tests/fixtures"))
