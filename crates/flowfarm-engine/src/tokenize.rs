//! Prompt tokenizers, through the tokenizers crate: a `tokenizer.json` where
//! the folder has one, else CLIP's `vocab.json` + `merges.txt` pair with
//! CLIP's normaliser, pre-tokeniser and start/end tokens. Every prompt comes
//! out padded and truncated to a fixed length, as the reference pipeline
//! tokenizes (77 for CLIP; 256 by default for T5 in SD3).

use std::path::Path;

use serde_json::{json, Value};
use tokenizers::{PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::EngineError;

/// Length SD3 pads and truncates CLIP prompts to.
pub const CLIP_MAX_LENGTH: usize = 77;

/// A tokenizer that gives fixed-length id sequences.
pub struct PromptTokenizer {
    inner: Tokenizer,
    max_length: usize,
}

/// CLIP's tokenizer pipeline around a BPE vocabulary and merges. The start,
/// end and pad tokens are special tokens, matched before BPE, as
/// transformers registers them (SD3's CLIP-G pads with "!", so a "!" in a
/// prompt becomes that token too).
fn clip_tokenizer_json(vocab: Value, merges: Vec<String>, pad_token: &str) -> Result<Value, String> {
    let id = |token: &str| vocab.get(token).and_then(Value::as_u64).ok_or_else(|| format!("vocab.json has no `{token}`"));
    let special = |token: &str| -> Result<Value, String> {
        Ok(
            json!({ "id": id(token)?, "content": token, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true }),
        )
    };
    let (bos, eos) = (id("<|startoftext|>")?, id("<|endoftext|>")?);
    let mut added = vec![special("<|startoftext|>")?, special("<|endoftext|>")?];
    if pad_token != "<|endoftext|>" && pad_token != "<|startoftext|>" {
        added.insert(0, special(pad_token)?);
    }
    Ok(json!({
        "version": "1.0",
        "added_tokens": added,
        "normalizer": { "type": "Sequence", "normalizers": [
            { "type": "NFC" },
            { "type": "Replace", "pattern": { "Regex": "\\s+" }, "content": " " },
            { "type": "Lowercase" }
        ]},
        "pre_tokenizer": { "type": "Sequence", "pretokenizers": [
            { "type": "Split", "pattern": { "Regex": "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+" }, "behavior": "Removed", "invert": true },
            { "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false }
        ]},
        "post_processor": { "type": "RobertaProcessing", "sep": ["<|endoftext|>", eos], "cls": ["<|startoftext|>", bos], "trim_offsets": false, "add_prefix_space": false },
        "decoder": { "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true },
        "model": { "type": "BPE", "dropout": null, "unk_token": "<|endoftext|>", "continuing_subword_prefix": "", "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges }
    }))
}

impl PromptTokenizer {
    /// Opens a tokenizer folder (`tokenizer.json`, or `vocab.json` +
    /// `merges.txt` for CLIP) and fixes the length. The pad token is the
    /// `pad_token` of `tokenizer_config.json` when there is one, else the end token.
    ///
    /// # Errors
    /// [`EngineError::Checkpoint`] for missing or malformed files.
    pub fn open(dir: impl AsRef<Path>, max_length: usize) -> Result<Self, EngineError> {
        let dir = dir.as_ref();
        let config_path = dir.join("tokenizer_config.json");
        let pad_token = if config_path.is_file() {
            let config: Value = crate::read_json(&config_path, "a tokenizer config")?;
            match config.get("pad_token") {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_owned),
                _ => None,
            }
        } else {
            None
        };
        let pad_token = pad_token.unwrap_or_else(|| "<|endoftext|>".to_owned());
        let json_path = dir.join("tokenizer.json");
        let mut inner = if json_path.is_file() {
            Tokenizer::from_file(&json_path).map_err(|e| EngineError::checkpoint(&json_path, e.to_string()))?
        } else {
            let vocab = crate::read_json::<Value>(&dir.join("vocab.json"), "a vocabulary")?;
            let merges_path = dir.join("merges.txt");
            let merges = std::fs::read_to_string(&merges_path)
                .map_err(|source| EngineError::Io { path: merges_path.display().to_string(), source })?;
            let merges: Vec<String> =
                merges.lines().filter(|l| !l.starts_with("#version") && !l.trim().is_empty()).map(str::to_owned).collect();
            let spec = clip_tokenizer_json(vocab, merges, &pad_token).map_err(|e| EngineError::checkpoint(dir, e))?;
            spec.to_string().parse::<Tokenizer>().map_err(|e| EngineError::checkpoint(dir, e.to_string()))?
        };
        let pad_id = inner
            .token_to_id(&pad_token)
            .ok_or_else(|| EngineError::checkpoint(dir, format!("pad token `{pad_token}` is not in the vocabulary")))?;
        inner
            .with_truncation(Some(TruncationParams {
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| EngineError::checkpoint(dir, e.to_string()))?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token,
        }));
        Ok(PromptTokenizer { inner, max_length })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Token ids of `prompt`, exactly `max_length` of them.
    ///
    /// # Errors
    /// [`EngineError::Input`] if the tokenizer fails on the text.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>, EngineError> {
        let encoding = self.inner.encode(prompt, true).map_err(|e| EngineError::Input(format!("tokenizing: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }
}
