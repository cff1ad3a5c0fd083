"""Times one diffusers SD3Transformer2DModel forward on the config of
flowfarm-engine's `step` bench (6 blocks × 384 hidden, F32, batch 2, 154 text
tokens, 32×32 and 64×64 latents) with the same thread count, and prints the
ratio flowfarm / diffusers when target/flowfarm-bench/step.json exists.

    cargo bench -p flowfarm-engine --bench step
    .venv/bin/python tools/bench/diffusers_step.py
"""

import json
import os
import statistics
import time
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel

threads = os.cpu_count() or 1
torch.set_num_threads(threads)
torch.manual_seed(0)
model = SD3Transformer2DModel(
    sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=6,
    attention_head_dim=64, num_attention_heads=6, joint_attention_dim=4096,
    caption_projection_dim=384, pooled_projection_dim=2048, pos_embed_max_size=96,
).eval()

ours = {}
result_file = Path(__file__).resolve().parents[2] / "target/flowfarm-bench/step.json"
if result_file.exists():
    data = json.loads(result_file.read_text())
    ours = {r["latent"]: r["median_ms"] for r in data["results"]}
    if data.get("threads") != threads:
        print(f"note: flowfarm ran with {data.get('threads')} threads, diffusers with {threads}")

print(f"diffusers SD3Transformer2DModel, F32, batch 2, 154 text tokens, {threads} threads (torch {torch.__version__}):")
for side, runs in [(32, 20), (64, 8)]:
    x = torch.randn(2, 16, side, side)
    ctx = torch.randn(2, 154, 4096)
    pooled = torch.randn(2, 2048)
    t = torch.tensor([700.0, 700.0])
    with torch.no_grad():
        model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t)
            times.append((time.perf_counter() - start) * 1e3)
    median = statistics.median(times)
    line = f"  {side}×{side} latent: median {median:.1f} ms"
    if side in ours:
        line += f"   flowfarm {ours[side]:.1f} ms   ratio flowfarm/diffusers {ours[side] / median:.2f}"
    print(line)
