//! PNG output with the render parameters inside, so every image says how to
//! render it again.
//!
//! Two UTF-8 text chunks (iTXt) go before the pixels:
//! - `parameters`: one human-readable summary in the layout many image tools
//!   and galleries already show (`prompt`, a `Negative prompt:` line, then
//!   `Steps: …, Sampler: …, CFG scale: …, Seed: …, Size: WxH, Model: …, Shift: …`);
//! - `flowfarm`: the same fields as JSON, which [`read_parameters`] reads back exactly.
//!
//! Encoding settings are fixed, so equal pixels and parameters give equal bytes.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::EngineError;

/// Keyword of the JSON chunk.
pub const JSON_KEYWORD: &str = "flowfarm";
/// Keyword of the human-readable chunk.
pub const SUMMARY_KEYWORD: &str = "parameters";

/// Everything needed to render an image again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RenderParameters {
    pub prompt: String,
    pub negative_prompt: String,
    pub model: String,
    /// The weights' identity, short form ([`crate::WeightsIdentity::short`]),
    /// shown as image tools show a "Model hash".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_hash: Option<String>,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance: f32,
    pub seed: u64,
    /// Timestep shift α.
    pub shift: f64,
    /// e.g. `euler-flow-matching`.
    pub sampler: String,
    /// `all` or `clip-only`.
    pub text_encoders: String,
    /// How the VAE decoded it: `whole` or `tiled`; None in images written
    /// before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae_decode: Option<String>,
}

impl RenderParameters {
    fn summary(&self) -> String {
        let mut text = self.prompt.clone();
        if !self.negative_prompt.is_empty() {
            text.push_str(&format!("\nNegative prompt: {}", self.negative_prompt));
        }
        let hash = self.model_hash.as_ref().map(|h| format!("Model hash: {h}, ")).unwrap_or_default();
        text.push_str(&format!(
            "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, {hash}Model: {}, Shift: {}, Text encoders: {}",
            self.steps, self.sampler, self.guidance, self.seed, self.width, self.height, self.model, self.shift, self.text_encoders
        ));
        if let Some(decode) = &self.vae_decode {
            text.push_str(&format!(", VAE decode: {decode}"));
        }
        text
    }
}

fn png_error(e: impl std::fmt::Display) -> EngineError {
    EngineError::Input(format!("PNG: {e}"))
}

/// Encodes interleaved 8-bit RGB pixels as a PNG carrying `parameters`.
///
/// # Errors
/// [`EngineError::Input`] if `rgb` is not `width × height × 3` bytes or the
/// encoder refuses.
pub fn encode(width: u32, height: u32, rgb: &[u8], parameters: &RenderParameters) -> Result<Vec<u8>, EngineError> {
    let expected = width as usize * height as usize * 3;
    if rgb.len() != expected {
        return Err(EngineError::Input(format!("{} bytes of pixels for {width}×{height} RGB, expected {expected}", rgb.len())));
    }
    let json = serde_json::to_string(parameters).map_err(png_error)?;
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_compression(png::Compression::Default);
        encoder.add_itxt_chunk(SUMMARY_KEYWORD.into(), parameters.summary()).map_err(png_error)?;
        encoder.add_itxt_chunk(JSON_KEYWORD.into(), json).map_err(png_error)?;
        let mut writer = encoder.write_header().map_err(png_error)?;
        writer.write_image_data(rgb).map_err(png_error)?;
        writer.finish().map_err(png_error)?;
    }
    Ok(out)
}

/// The parameters stored by [`encode`], if the PNG has them.
///
/// # Errors
/// [`EngineError::Input`] for bytes that are not a PNG or a malformed chunk.
pub fn read_parameters(bytes: &[u8]) -> Result<Option<RenderParameters>, EngineError> {
    let reader = png::Decoder::new(Cursor::new(bytes)).read_info().map_err(png_error)?;
    for chunk in &reader.info().utf8_text {
        if chunk.keyword == JSON_KEYWORD {
            let text = chunk.get_text().map_err(png_error)?;
            return serde_json::from_str(&text).map(Some).map_err(png_error);
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> RenderParameters {
        RenderParameters {
            prompt: "a lighthouse at dusk, ünïcödé ☀".into(),
            negative_prompt: "blurry".into(),
            model: "sd3-medium".into(),
            model_hash: Some("0123456789".into()),
            width: 4,
            height: 2,
            steps: 28,
            guidance: 7.0,
            seed: 9_007_199_254_740_993,
            shift: 3.0,
            sampler: "euler-flow-matching".into(),
            text_encoders: "all".into(),
            vae_decode: Some("tiled".into()),
        }
    }

    #[test]
    fn parameters_round_trip_and_bytes_are_reproducible() {
        let rgb: Vec<u8> = (0..24).map(|i| (i * 10) as u8).collect();
        let png = encode(4, 2, &rgb, &params()).unwrap();
        assert_eq!(read_parameters(&png).unwrap(), Some(params()));
        assert_eq!(png, encode(4, 2, &rgb, &params()).unwrap(), "same input, same bytes");

        let mut reader = png::Decoder::new(Cursor::new(&png)).read_info().unwrap();
        let mut pixels = vec![0; reader.output_buffer_size()];
        reader.next_frame(&mut pixels).unwrap();
        assert_eq!(pixels, rgb);
        let summary = reader.info().utf8_text.iter().find(|c| c.keyword == SUMMARY_KEYWORD).unwrap().get_text().unwrap();
        assert!(
            summary.contains("Negative prompt: blurry")
                && summary.contains("Seed: 9007199254740993, Size: 4x2, Model hash: 0123456789, Model: sd3-medium")
                && summary.ends_with(", VAE decode: tiled"),
            "{summary}"
        );
    }

    #[test]
    fn wrong_pixel_counts_are_refused() {
        assert!(encode(4, 2, &[0; 23], &params()).unwrap_err().to_string().contains("expected 24"));
        assert!(read_parameters(b"not a png").is_err());
    }
}
