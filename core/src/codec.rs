//! Tensor payloads on the wire: little-endian f32 or bf16, decoded to f32 and
//! checked to be finite before anything is folded.

use half::bf16;

/// Element encoding of a tensor payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    Bf16,
}

impl DType {
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CodecError {
    #[error("payload of {len} bytes is not a whole number of {dtype:?} values")]
    RaggedPayload { len: usize, dtype: DType },
    #[error("value {index} of the payload is not finite ({value})")]
    NonFinite { index: usize, value: f32 },
}

/// Decodes a payload into `out` (cleared first), rejecting NaN and ±Inf.
pub fn decode_into(dtype: DType, bytes: &[u8], out: &mut Vec<f32>) -> Result<(), CodecError> {
    let width = dtype.size_bytes();
    if !bytes.len().is_multiple_of(width) {
        return Err(CodecError::RaggedPayload {
            len: bytes.len(),
            dtype,
        });
    }
    out.clear();
    out.reserve(bytes.len() / width);
    match dtype {
        DType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        // bf16 is the top half of an f32: widening is a shift, and vectorises.
        DType::Bf16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)),
        ),
    }
    // A separate pass: the decode loop above stays branch-free and vectorises.
    if !out.iter().all(|x| x.is_finite()) {
        let index = out.iter().position(|x| !x.is_finite()).unwrap_or_default();
        return Err(CodecError::NonFinite {
            index,
            value: out[index],
        });
    }
    Ok(())
}

/// Decoded values, known to be finite: built only by [`FiniteValues::new`]
/// or [`FiniteValues::decode`], so the engine can fold them without checking again.
#[derive(Debug, PartialEq)]
pub struct FiniteValues(Vec<f32>);

impl FiniteValues {
    /// Takes `values` if every one is finite; otherwise gives back the index of the first that is not.
    pub fn new(values: Vec<f32>) -> Result<FiniteValues, usize> {
        match values.iter().position(|x| !x.is_finite()) {
            Some(index) => Err(index),
            None => Ok(FiniteValues(values)),
        }
    }

    /// Decodes a payload into `buffer` (reused, to spare an allocation per chunk).
    pub fn decode(
        dtype: DType,
        bytes: &[u8],
        mut buffer: Vec<f32>,
    ) -> Result<FiniteValues, CodecError> {
        decode_into(dtype, bytes, &mut buffer)?;
        Ok(FiniteValues(buffer))
    }

    pub fn as_slice(&self) -> &[f32] {
        &self.0
    }

    /// The buffer back, for reuse.
    pub fn into_inner(self) -> Vec<f32> {
        self.0
    }
}

/// Encodes values as little-endian `dtype` (bf16 rounds to nearest even).
pub fn encode(dtype: DType, values: &[f32]) -> Vec<u8> {
    match dtype {
        DType::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::Bf16 => values
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_bits().to_le_bytes())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trips_exactly() {
        let values = [0.0, -1.5, 3.25e-8, f32::MAX, f32::MIN_POSITIVE];
        let mut out = Vec::new();
        decode_into(DType::F32, &encode(DType::F32, &values), &mut out).unwrap();
        assert_eq!(out, values);
    }

    #[test]
    fn bf16_round_trips_within_its_precision() {
        let values = [0.0, -1.5, 0.1, 1234.5];
        let mut out = Vec::new();
        decode_into(DType::Bf16, &encode(DType::Bf16, &values), &mut out).unwrap();
        for (a, b) in values.iter().zip(&out) {
            assert!((a - b).abs() <= a.abs() * 2f32.powi(-8), "{a} vs {b}");
        }
    }

    #[test]
    fn nan_and_inf_are_rejected_with_their_position() {
        let mut out = Vec::new();
        let err = decode_into(DType::F32, &encode(DType::F32, &[1.0, f32::NAN]), &mut out);
        assert!(matches!(err, Err(CodecError::NonFinite { index: 1, .. })));
        let err = decode_into(
            DType::Bf16,
            &encode(DType::Bf16, &[f32::INFINITY]),
            &mut out,
        );
        assert!(matches!(err, Err(CodecError::NonFinite { index: 0, .. })));
    }

    #[test]
    fn bf16_widening_matches_the_half_crate() {
        let values: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.37).collect();
        let mut out = Vec::new();
        decode_into(DType::Bf16, &encode(DType::Bf16, &values), &mut out).unwrap();
        for (x, y) in values.iter().zip(&out) {
            assert_eq!(bf16::from_f32(*x).to_f32().to_bits(), y.to_bits());
        }
    }

    #[test]
    fn ragged_payload_is_rejected() {
        let mut out = Vec::new();
        assert_eq!(
            decode_into(DType::F32, &[0, 0, 0], &mut out),
            Err(CodecError::RaggedPayload {
                len: 3,
                dtype: DType::F32
            })
        );
    }
}
