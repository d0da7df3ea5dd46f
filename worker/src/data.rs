//! Token shards on disk and the training windows cut from them (T+1 tokens, stride T).

use std::path::{Component, Path, PathBuf};

use cohort_core::shard_file::{self, ShardFileError};

/// Why a shard cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("shard file name {0:?} must be a relative path inside the data directory")]
    BadFileName(String),
    #[error("cannot read shard {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("corrupt shard {path}: {source}")]
    Corrupt {
        path: PathBuf,
        source: ShardFileError,
    },
    #[error(
        "shard {path}: token {index} is {token}, outside the model's vocabulary of {vocab_size} \
         (was the data prepared with another tokenizer?)"
    )]
    TokenOutOfVocab {
        path: PathBuf,
        index: usize,
        token: u32,
        vocab_size: u32,
    },
}

/// `data_dir/file_name`, refusing absolute names and `..` so a coordinator cannot point outside the directory.
pub fn shard_path(data_dir: &Path, file_name: &str) -> Result<PathBuf, DataError> {
    let relative = Path::new(file_name);
    let ok = !file_name.is_empty()
        && relative
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !ok {
        return Err(DataError::BadFileName(file_name.to_string()));
    }
    Ok(data_dir.join(relative))
}

/// Reads and validates a shard; every token must be below the model's `vocab_size`.
pub fn load_shard(path: &Path, vocab_size: u32) -> Result<Vec<u32>, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let (_, tokens) = shard_file::decode(&bytes).map_err(|source| DataError::Corrupt {
        path: path.to_path_buf(),
        source,
    })?;
    if let Some(index) = tokens.iter().position(|&t| t >= vocab_size) {
        return Err(DataError::TokenOutOfVocab {
            path: path.to_path_buf(),
            index,
            token: tokens[index],
            vocab_size,
        });
    }
    Ok(tokens)
}

/// How many training windows `num_tokens` tokens yield for context length `context`.
pub fn window_count(num_tokens: usize, context: usize) -> usize {
    if context == 0 || num_tokens < context + 1 {
        0
    } else {
        (num_tokens - 1) / context
    }
}

/// Windows of `context + 1` tokens with stride `context`: inputs are `w[..context]`,
/// targets `w[1..]`. A tail shorter than `context + 1` tokens is dropped.
pub fn windows(tokens: &[u32], context: usize) -> impl Iterator<Item = &[u32]> + '_ {
    (0..window_count(tokens.len(), context))
        .map(move |i| &tokens[i * context..i * context + context + 1])
}

/// Splits `n` items into `parts` consecutive batches as evenly as possible (the first
/// `n % parts` get one more); with fewer items than parts, one item per batch.
pub fn split_evenly(n: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.min(n).max(1);
    if n == 0 {
        return Vec::new();
    }
    let base = n / parts;
    let extra = n % parts;
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let range = start..start + len;
            start += len;
            range
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_every_target_exactly_once() {
        for context in [1usize, 3, 8] {
            for k in 0..5 {
                for extra in [0usize, 1, 2] {
                    let n = k * context + 1 + extra;
                    let tokens: Vec<u32> = (0..n as u32).collect();
                    let mut seen = vec![0u32; n];
                    for w in windows(&tokens, context) {
                        assert_eq!(w.len(), context + 1);
                        for &target in &w[1..] {
                            seen[target as usize] += 1;
                        }
                    }
                    // With k·T+1 tokens every token after the first is a target exactly once;
                    // a shorter tail (extra > 0 but < T) is dropped.
                    let covered = window_count(n, context) * context;
                    assert_eq!(seen[0], 0);
                    assert!(
                        seen[1..=covered].iter().all(|&c| c == 1),
                        "{context} {k} {extra}"
                    );
                    assert!(seen[covered + 1..].iter().all(|&c| c == 0));
                    if extra == 0 || extra == context {
                        assert_eq!(covered, n - 1);
                    }
                }
            }
        }
    }

    #[test]
    fn inputs_and_targets_are_shifted_by_one() {
        let tokens: Vec<u32> = (10..19).collect();
        let all: Vec<&[u32]> = windows(&tokens, 4).collect();
        assert_eq!(
            all,
            vec![&[10, 11, 12, 13, 14][..], &[14, 15, 16, 17, 18][..]]
        );
    }

    #[test]
    fn batches_split_evenly() {
        assert_eq!(split_evenly(10, 3), vec![0..4, 4..7, 7..10]);
        assert_eq!(split_evenly(2, 5), vec![0..1, 1..2]);
        assert_eq!(split_evenly(4, 4), vec![0..1, 1..2, 2..3, 3..4]);
        assert!(split_evenly(0, 3).is_empty());
    }

    #[test]
    fn bad_files_and_names_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("a.bin");
        std::fs::write(&good, shard_file::encode(&[1, 2, 300], 1000)).unwrap();
        assert_eq!(load_shard(&good, 1000).unwrap(), vec![1, 2, 300]);
        let err = load_shard(&good, 256).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::TokenOutOfVocab {
                    index: 2,
                    token: 300,
                    ..
                }
            ),
            "{err}"
        );
        let bad = dir.path().join("b.bin");
        std::fs::write(&bad, b"not a shard at all, just some bytes!").unwrap();
        let err = load_shard(&bad, 256).unwrap_err();
        assert!(err.to_string().contains("corrupt shard"), "{err}");
        let err = load_shard(&dir.path().join("missing.bin"), 256).unwrap_err();
        assert!(matches!(err, DataError::Read { .. }), "{err}");
        assert!(shard_path(dir.path(), "../etc/passwd").is_err());
        assert!(shard_path(dir.path(), "/etc/passwd").is_err());
        assert!(shard_path(dir.path(), "").is_err());
        assert_eq!(
            shard_path(dir.path(), "train/0001.bin").unwrap(),
            dir.path().join("train/0001.bin")
        );
    }
}
