"""Writes the T5 encoder parity fixture that flowfarm-engine's tests compare against.

Reference: transformers' T5EncoderModel on CPU, float32, T5 v1.1 style (gated GELU, no
tied embeddings) as SD3's text_encoder_3, tiny and random, in the diffusers
`text_encoder_3/` folder layout; its last hidden state for padded token ids.

    .venv/bin/python tools/parity/make_t5_fixtures.py crates/flowfarm-engine/tests/fixtures
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import T5Config, T5EncoderModel


def main(out: Path) -> None:
    torch.manual_seed(700)
    config = T5Config(
        vocab_size=1000, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, is_encoder_decoder=True,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    model = T5EncoderModel(config).eval()
    gen = torch.Generator().manual_seed(701)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out / "t5" / "text_encoder_3", safe_serialization=True)
    ids = torch.zeros((2, 32), dtype=torch.long)
    for row, length in enumerate([6, 20]):
        ids[row, :length] = torch.randint(2, 1000, (length,), generator=gen)
        ids[row, length] = 1  # </s>
    with torch.no_grad():
        hidden = model(ids).last_hidden_state
    save_file({"input_ids": ids, "last_hidden_state": hidden.contiguous()}, str(out / "t5_encode.safetensors"))
    print(f"T5 fixture written to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "crates/flowfarm-engine/tests/fixtures"))
