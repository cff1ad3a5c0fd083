//! The identity of a model's weights: one hash that is the same for the
//! same weights in every published form.
//!
//! File hashes differ between a diffusers folder, its shards and a single
//! file of the same weights (headers, names, fused projections, dtypes), so
//! the identity is taken over what the model loads instead: every tensor it
//! asks for, under the name the model code gives it, with its shape and its
//! values as F32 (so the F16 weights of a folder and a single file agree).
//! Reading every byte of a 16 GB model at each worker start would cost tens
//! of seconds; small tensors (biases, norms) are read whole and larger ones
//! at [`SAMPLES`] evenly spaced elements, which any fine-tune, re-quantisation
//! or re-randomisation changes.

use sha2::{Digest, Sha256};

use crate::checkpoint::Transform;
use crate::weights::{Requested, TensorFiles};
use crate::EngineError;

/// Tensors up to this many elements are read whole.
pub const WHOLE_UP_TO: usize = 4096;
/// Elements read from each larger tensor.
pub const SAMPLES: usize = 64;

/// A model's weights identity, SHA-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WeightsIdentity(pub [u8; 32]);

impl WeightsIdentity {
    /// Lower-case hex, 64 characters.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The first 10 hex characters, as image tools show a "Model hash".
    pub fn short(&self) -> String {
        self.hex()[..10].to_owned()
    }
}

impl std::fmt::Display for WeightsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.hex())
    }
}

/// Flat positions of a canonical tensor of `elements` elements to read.
fn positions(elements: usize) -> Vec<usize> {
    if elements <= WHOLE_UP_TO {
        return (0..elements).collect();
    }
    (0..SAMPLES).map(|i| i * (elements - 1) / (SAMPLES - 1)).collect()
}

/// Where flat position `i` of the canonical tensor (`rows` rows along dim 0)
/// is stored, given how the canonical tensor is cut out of the stored one.
fn stored_position(i: usize, rows: usize, elements: usize, transform: Transform) -> usize {
    let row_len = elements / rows.max(1);
    let (row, col) = (i / row_len, i % row_len);
    let row = match transform {
        Transform::Same => row,
        Transform::Third(part) => part * rows + row,
        Transform::SwapHalves => (row + rows / 2) % rows,
    };
    row * row_len + col
}

/// The identity of one part: its tensors sorted by name.
///
/// # Errors
/// A tensor that cannot be read.
pub fn component_identity(files: &TensorFiles, requested: &[(Requested, Transform)]) -> Result<WeightsIdentity, EngineError> {
    let mut sorted: Vec<&(Requested, Transform)> = requested.iter().collect();
    sorted.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    let mut hasher = Sha256::new();
    for (r, transform) in sorted {
        // Trailing 1-dims differ between layouts (a 1×1 conv stored as a linear).
        let mut shape = r.shape.clone();
        while shape.len() > 1 && shape.last() == Some(&1) {
            shape.pop();
        }
        hasher.update(r.name.as_bytes());
        hasher.update([0]);
        for d in &shape {
            hasher.update((*d as u64).to_le_bytes());
        }
        let elements: usize = r.shape.iter().product();
        let rows = r.shape.first().copied().unwrap_or(1);
        let at: Vec<usize> = positions(elements).into_iter().map(|i| stored_position(i, rows, elements, *transform)).collect();
        for v in files.values_at(&r.key, &at)? {
            // -0.0 and 0.0 are the same weight.
            let v = if v == 0.0 { 0.0f32 } else { v };
            hasher.update(v.to_le_bytes());
        }
    }
    Ok(WeightsIdentity(hasher.finalize().into()))
}

/// The identity of a model from its parts' identities, in the parts' order;
/// an absent part (no T5) counts as such.
pub fn model_identity(parts: &[(&str, Option<WeightsIdentity>)]) -> WeightsIdentity {
    let mut hasher = Sha256::new();
    for (name, id) in parts {
        hasher.update(name.as_bytes());
        match id {
            Some(id) => hasher.update(id.0),
            None => hasher.update(b"absent"),
        }
    }
    WeightsIdentity(hasher.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_positions_follow_the_cut() {
        // A fused qkv of 6 rows of 2: k is stored rows 2..4, so k's row 1 is stored row 3.
        assert_eq!(stored_position(3, 2, 4, Transform::Third(1)), 3 * 2 + 1);
        assert_eq!(stored_position(0, 4, 8, Transform::SwapHalves), 4);
        assert_eq!(stored_position(5, 4, 8, Transform::SwapHalves), 1);
        assert_eq!(stored_position(7, 4, 8, Transform::Same), 7);
        assert_eq!(positions(10), (0..10).collect::<Vec<_>>());
        let big = positions(1_000_000);
        assert_eq!((big.len(), big[0], big[SAMPLES - 1]), (SAMPLES, 0, 999_999));
    }
}
