"""Times one diffusers SD3Transformer2DModel forward on the configs of
flowfarm-engine's `step` bench and prints the ratio flowfarm / diffusers where
the bench's figures exist (target/flowfarm-bench/step.json, or step-gpu.json
with --device cuda).

CPU (the issue's figure): 6 blocks × 384 hidden, F32, batch 2, 154 text
tokens, 32×32 and 64×64 latents, the same thread count as the bench:

    cargo bench -p flowfarm-engine --bench step
    .venv/bin/python tools/bench/diffusers_step.py

GPU: the same small model plus SD3-medium's sizes (24 × 1536) at 64×64 and
128×128 latents, in the dtypes given:

    FLOWFARM_BENCH_DEVICE=cuda:0 FLOWFARM_BENCH_DTYPES=f32,bf16 \\
        cargo bench -p flowfarm-engine --features cuda --bench step
    python3 tools/bench/diffusers_step.py --device cuda --dtypes f32,bf16
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}

parser = argparse.ArgumentParser()
parser.add_argument("--device", default="cpu")
parser.add_argument("--dtypes", default="f32")
args = parser.parse_args()
device = torch.device(args.device)
on_gpu = device.type == "cuda"

threads = os.cpu_count() or 1
torch.set_num_threads(threads)
torch.manual_seed(0)

cases = [("6×384", dict(num_layers=6, num_attention_heads=6, caption_projection_dim=384, pos_embed_max_size=96), [32, 64])]
if on_gpu:
    cases.append(("sd3-medium", dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192), [64, 128]))

ours = {}
result_file = Path(__file__).resolve().parents[2] / "target/flowfarm-bench" / ("step-gpu.json" if on_gpu else "step.json")
if result_file.exists():
    data = json.loads(result_file.read_text())
    ours = {(r.get("model", "6×384"), r.get("dtype", "f32"), r["latent"]): r["median_ms"] for r in data["results"]}
    if not on_gpu and data.get("threads") != threads:
        print(f"note: flowfarm ran with {data.get('threads')} threads, diffusers with {threads}")


def sync():
    if on_gpu:
        torch.cuda.synchronize()


for label, sizes, sides in cases:
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name.strip()]
        model = SD3Transformer2DModel(
            sample_size=64, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
            joint_attention_dim=4096, pooled_projection_dim=2048, **sizes,
        ).to(device=device, dtype=dtype).eval()
        where = torch.cuda.get_device_name(device) if on_gpu else f"{threads} threads"
        print(f"diffusers SD3Transformer2DModel {label}, {dtype_name}, batch 2, 154 text tokens, {where} (torch {torch.__version__}):")
        for side in sides:
            runs = 20 if on_gpu or side == 32 else 8
            x = torch.randn(2, 16, side, side, device=device, dtype=dtype)
            ctx = torch.randn(2, 154, 4096, device=device, dtype=dtype)
            pooled = torch.randn(2, 2048, device=device, dtype=dtype)
            t = torch.tensor([700.0, 700.0], device=device)
            with torch.no_grad():
                model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t)
                times = []
                for _ in range(runs):
                    sync()
                    start = time.perf_counter()
                    model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t)
                    sync()
                    times.append((time.perf_counter() - start) * 1e3)
            median = statistics.median(times)
            line = f"  {side}×{side} latent: median {median:.2f} ms"
            key = (label, dtype_name.strip(), side)
            if key in ours:
                line += f"   flowfarm {ours[key]:.2f} ms   ratio flowfarm/diffusers {ours[key] / median:.2f}"
            print(line, flush=True)
        del model
