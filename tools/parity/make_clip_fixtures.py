"""Writes the CLIP text-encoder parity fixtures that flowfarm-engine's tests compare against.

Reference: transformers' CLIPTextModelWithProjection on CPU, float32, as diffusers'
StableDiffusion3Pipeline uses it: the penultimate hidden states (hidden_states[-2]) and the
projected pooled output (text_embeds). Two tiny random encoders: `clip-l` style (quick_gelu,
pads with the end token) and `clip-g` style (exact gelu, pads with id 0), in the diffusers
`text_encoder/` folder layout.

    .venv/bin/python tools/parity/make_clip_fixtures.py crates/flowfarm-engine/tests/fixtures
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

VOCAB, EOS, BOS = 1000, 999, 998
SEQ = 77


def main(out: Path) -> None:
    for i, (name, act, pad) in enumerate([("clip-l", "quick_gelu", EOS), ("clip-g", "gelu", 0)]):
        torch.manual_seed(500 + i)
        config = CLIPTextConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=2, max_position_embeddings=SEQ, hidden_act=act, projection_dim=24,
            bos_token_id=BOS, eos_token_id=EOS, pad_token_id=pad,
        )
        model = CLIPTextModelWithProjection(config).eval()
        gen = torch.Generator().manual_seed(600 + i)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "layer_norm" in pname and pname.endswith("weight"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(out / name / "text_encoder", safe_serialization=True)
        ids = torch.full((2, SEQ), pad, dtype=torch.long)
        for row, length in enumerate([5, 12]):
            ids[row, 0] = BOS
            ids[row, 1 : length + 1] = torch.randint(0, 990, (length,), generator=gen)
            ids[row, length + 1] = EOS
        with torch.no_grad():
            result = model(ids, output_hidden_states=True)
        save_file(
            {
                "input_ids": ids.to(torch.int64),
                "penultimate": result.hidden_states[-2].contiguous(),
                "text_embeds": result.text_embeds.contiguous(),
            },
            str(out / f"{name}_encode.safetensors"),
        )
    print(f"CLIP fixtures written to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "crates/flowfarm-engine/tests/fixtures"))
