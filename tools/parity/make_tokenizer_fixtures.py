"""Writes tiny CLIP tokenizers and the token ids transformers gives for a set of prompts.

Two tokenizers in the diffusers layout (`tokenizer/`, `tokenizer_2/`): a byte-level BPE
with CLIP's conventions (lower-casing, `</w>` word ends, start and end tokens), the first
padding with the end token as SD3's CLIP-L tokenizer does, the second with "!" as its CLIP-G
tokenizer does. Both the vocab.json + merges.txt pair and the tokenizer.json are written.
Ids use SD3's settings: padding to 77, truncation at 77.

    .venv/bin/python tools/parity/make_tokenizer_fixtures.py crates/flowfarm-engine/tests/fixtures
"""

import json
import sys
import tempfile
from pathlib import Path

import transformers
from transformers import CLIPTokenizer

PROMPTS = [
    "a photo of the cat on the mat",
    "  The  Lighthouse at DUSK,\tvolumetric light!!  ",
    "ünïcödé ☀ and emoji 🐈",
    "",
    "the " * 120,
]


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def main(out: Path) -> None:
    chars = bytes_to_unicode()
    vocab_list = chars + [c + "</w>" for c in chars]
    merges = [("t", "h"), ("th", "e</w>"), ("a", "t</w>"), ("o", "n</w>"), ("c", "a"), ("ca", "t</w>"), ("l", "i"), ("g", "h")]
    vocab_list += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    ids = {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        for folder, pad in [("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")]:
            tok = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), pad_token=pad)
            target = out / "clip-tokenizers" / folder
            tok.save_pretrained(target)
            for name in ["vocab.json", "merges.txt"]:
                (target / name).write_text((Path(tmp) / name).read_text())
            ids[folder] = [tok(p, padding="max_length", max_length=77, truncation=True).input_ids for p in PROMPTS]
    (out / "clip-tokenizers" / "expected.json").write_text(json.dumps({"transformers": transformers.__version__, "prompts": PROMPTS, "ids": ids}, ensure_ascii=False, indent=1) + "\n")
    print(f"tokenizer fixtures written to {out / 'clip-tokenizers'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "crates/flowfarm-engine/tests/fixtures"))
