"""Writes flowfarm's bundled model (models/flowfarm-tiny: a whole tiny SD3 pipeline in the
diffusers folder layout, random weights) and, as fixtures, what diffusers'
StableDiffusion3Pipeline renders with it from a prompt, a negative prompt and a given
initial latent: the tokens, the conditioning, the final latent and the decoded pixels.

Every part is tiny and random but wired as SD3 wires them: CLIP-L (quick_gelu) and
CLIP-G (gelu, pads with "!") with projections, a T5 encoder, the MM-DiT, the 16-channel
VAE, FlowMatchEulerDiscreteScheduler with shift 3.0. The T5 tokenizer is a small word-level
tokenizer.json (the pipeline only needs ids; SD3's real one is a SentencePiece unigram).

    .venv/bin/python tools/parity/make_pipeline_fixtures.py crates/flowfarm-engine/tests/fixtures models/flowfarm-tiny
"""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, PreTrainedTokenizerFast, T5Config, T5EncoderModel

sys.path.insert(0, str(Path(__file__).parent))
from make_mmdit_fixtures import precise_timestep_embedding  # noqa: E402
from make_tokenizer_fixtures import bytes_to_unicode  # noqa: E402
from diffusers.models import embeddings  # noqa: E402

PROMPT = "the cat on the mat, at dusk"
NEGATIVE = "blurry"
T5_LENGTH = 16


def randomize(model, seed, scale=0.2):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("norm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=gen))


def clip_files(tmp: Path):
    chars = bytes_to_unicode()
    merges = [("t", "h"), ("th", "e</w>"), ("a", "t</w>"), ("o", "n</w>"), ("c", "a"), ("ca", "t</w>")]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (tmp / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return len(vocab)


def main(out: Path, root: Path) -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vocab_size = clip_files(tmp)
        tok1 = CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77)
        tok2 = CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), pad_token="!", model_max_length=77)
    eos = tok1.convert_tokens_to_ids("<|endoftext|>")
    bos = tok1.convert_tokens_to_ids("<|startoftext|>")
    te1 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=16, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=24, bos_token_id=bos, eos_token_id=eos, pad_token_id=0)).eval()
    words = ["<pad>", "</s>", "<unk>"] + sorted(set(PROMPT.replace(",", " ,").split() + NEGATIVE.split()))
    t5_tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t5_tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    t5_tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok3 = PreTrainedTokenizerFast(tokenizer_object=t5_tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    te3 = T5EncoderModel(T5Config(
        vocab_size=len(words), d_model=48, d_kv=16, d_ff=64, num_layers=2, num_heads=2, relative_attention_num_buckets=32,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=32, pooled_projection_dim=40,
        pos_embed_max_size=24).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32), layers_per_block=1, latent_channels=16, norm_num_groups=8,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609).eval()
    # The transformer's scale keeps velocities moderate over the steps (at 0.2 the
    # random latents grow to ~300 and every rounding difference with them).
    for seed, model in enumerate([te1, te2, te3, transformer, vae]):
        randomize(model, 800 + seed, scale={id(vae): 0.1, id(transformer): 0.05}.get(id(model), 0.2))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=te1, tokenizer=tok1, text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=te3, tokenizer_3=tok3)
    pipe.save_pretrained(root, safe_serialization=True)

    latent = torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(900))
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=64, width=96, num_inference_steps=8,
                  guidance_scale=5.0, max_sequence_length=T5_LENGTH)
    with torch.no_grad():
        cond, uncond, pooled, neg_pooled = pipe.encode_prompt(
            prompt=PROMPT, prompt_2=None, prompt_3=None, negative_prompt=NEGATIVE, max_sequence_length=T5_LENGTH)
        final = pipe(**common, latents=latent.clone(), output_type="latent", return_dict=False)[0]
        pixels = pipe(**common, latents=latent.clone(), output_type="np", return_dict=False)[0]
        shipped = embeddings.get_timestep_embedding
        embeddings.get_timestep_embedding = precise_timestep_embedding
        try:
            final_precise = pipe(**common, latents=latent.clone(), output_type="latent", return_dict=False)[0]
        finally:
            embeddings.get_timestep_embedding = shipped
    rgb = (pixels[0] * 255).round().astype(np.uint8)
    save_file(
        {
            "initial_latent": latent, "final_latent": final.contiguous(),
            "final_latent_precise_time": final_precise.contiguous(),
            "context": cond.contiguous(), "negative_context": uncond.contiguous(),
            "pooled": pooled.contiguous(), "negative_pooled": neg_pooled.contiguous(),
            "rgb": torch.from_numpy(rgb.copy()).contiguous(),
        },
        str(out / "pipeline-tiny_render.safetensors"),
    )
    (out / "pipeline-tiny_render.json").write_text(json.dumps(
        {"prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": 8, "guidance": 5.0, "shift": 3.0, "t5_length": T5_LENGTH}, indent=1) + "\n")
    print(f"pipeline fixture written to {root}: context {tuple(cond.shape)}, image {rgb.shape}")


if __name__ == "__main__":
    main(
        Path(sys.argv[1] if len(sys.argv) > 1 else "crates/flowfarm-engine/tests/fixtures"),
        Path(sys.argv[2] if len(sys.argv) > 2 else "models/flowfarm-tiny"),
    )
