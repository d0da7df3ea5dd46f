//! The token shard file: a 32-byte header followed by little-endian token ids.
//!
//! ```text
//! offset size field
//!      0    8 magic  "COHORTTK"
//!      8    4 format version (1), u32 LE
//!     12    4 bytes per token (2 or 4), u32 LE
//!     16    4 vocabulary size, u32 LE
//!     20    4 reserved (0)
//!     24    8 number of tokens, u64 LE
//!     32    … token ids, u16 or u32 LE
//! ```
//! Two bytes per token whenever the vocabulary fits (GPT-2's 50,257 does).

pub const MAGIC: &[u8; 8] = b"COHORTTK";
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardHeader {
    pub token_bytes: u32,
    pub vocab_size: u32,
    pub num_tokens: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShardFileError {
    #[error("file is {0} bytes, shorter than the {HEADER_LEN}-byte header")]
    TooShort(usize),
    #[error("not a Cohort token shard (bad magic)")]
    BadMagic,
    #[error("unsupported shard format version {0}")]
    UnsupportedVersion(u32),
    #[error("unsupported token width {0} bytes")]
    TokenWidth(u32),
    #[error("header says {expected} tokens but the file holds {actual}")]
    LengthMismatch { expected: u64, actual: u64 },
    #[error("token {index} is {token}, outside the vocabulary of {vocab_size}")]
    TokenOutOfRange {
        index: usize,
        token: u32,
        vocab_size: u32,
    },
}

fn token_bytes_for(vocab_size: u32) -> u32 {
    if vocab_size <= 1 << 16 {
        2
    } else {
        4
    }
}

/// Serialises `tokens` (all `< vocab_size`) into a shard file's bytes.
pub fn encode(tokens: &[u32], vocab_size: u32) -> Vec<u8> {
    let width = token_bytes_for(vocab_size);
    let mut out = Vec::with_capacity(HEADER_LEN + tokens.len() * width as usize);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&width.to_le_bytes());
    out.extend_from_slice(&vocab_size.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    for &token in tokens {
        debug_assert!(token < vocab_size);
        if width == 2 {
            out.extend_from_slice(&(token as u16).to_le_bytes());
        } else {
            out.extend_from_slice(&token.to_le_bytes());
        }
    }
    out
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

pub fn decode_header(bytes: &[u8]) -> Result<ShardHeader, ShardFileError> {
    if bytes.len() < HEADER_LEN {
        return Err(ShardFileError::TooShort(bytes.len()));
    }
    if &bytes[..8] != MAGIC {
        return Err(ShardFileError::BadMagic);
    }
    let version = u32_at(bytes, 8);
    if version != FORMAT_VERSION {
        return Err(ShardFileError::UnsupportedVersion(version));
    }
    let token_bytes = u32_at(bytes, 12);
    if token_bytes != 2 && token_bytes != 4 {
        return Err(ShardFileError::TokenWidth(token_bytes));
    }
    let num_tokens = u64::from_le_bytes(bytes[24..32].try_into().expect("8 bytes"));
    Ok(ShardHeader {
        token_bytes,
        vocab_size: u32_at(bytes, 16),
        num_tokens,
    })
}

/// Decodes a whole shard file, checking its length and every token id.
pub fn decode(bytes: &[u8]) -> Result<(ShardHeader, Vec<u32>), ShardFileError> {
    let header = decode_header(bytes)?;
    let body = &bytes[HEADER_LEN..];
    let actual = (body.len() / header.token_bytes as usize) as u64;
    if !body.len().is_multiple_of(header.token_bytes as usize) || actual != header.num_tokens {
        return Err(ShardFileError::LengthMismatch {
            expected: header.num_tokens,
            actual,
        });
    }
    let tokens: Vec<u32> = if header.token_bytes == 2 {
        body.chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as u32)
            .collect()
    } else {
        body.chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    if let Some(index) = tokens.iter().position(|&t| t >= header.vocab_size) {
        return Err(ShardFileError::TokenOutOfRange {
            index,
            token: tokens[index],
            vocab_size: header.vocab_size,
        });
    }
    Ok((header, tokens))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_narrow_and_wide_tokens() {
        for vocab in [256u32, 50_257, 100_000] {
            let tokens: Vec<u32> = (0..1000).map(|i| (i * 7919) % vocab).collect();
            let bytes = encode(&tokens, vocab);
            let (header, decoded) = decode(&bytes).unwrap();
            assert_eq!(decoded, tokens);
            assert_eq!(header.token_bytes, if vocab <= 65_536 { 2 } else { 4 });
        }
    }

    #[test]
    fn damaged_files_are_rejected_with_a_reason() {
        let bytes = encode(&[1, 2, 3], 256);
        assert_eq!(decode(&bytes[..10]), Err(ShardFileError::TooShort(10)));
        assert_eq!(
            decode(&bytes[..bytes.len() - 2]),
            Err(ShardFileError::LengthMismatch {
                expected: 3,
                actual: 2
            })
        );
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert_eq!(decode(&bad), Err(ShardFileError::BadMagic));
        let mut out_of_range = bytes.clone();
        out_of_range[16..20].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(
            decode(&out_of_range),
            Err(ShardFileError::TokenOutOfRange {
                index: 1,
                token: 2,
                vocab_size: 2
            })
        );
    }
}
