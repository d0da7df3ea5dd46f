//! A federated site's raw local text (`train.txt`, `test.txt`), tokenized with the job's
//! tokenizer; it never leaves the site.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::data;

/// The local training text, in the data directory.
pub const TRAIN_FILE: &str = "train.txt";
/// The local held-out text, in the data directory.
pub const TEST_FILE: &str = "test.txt";

/// How text becomes token ids (the job's `Tokenizer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenizerKind {
    /// The UTF-8 bytes.
    Byte,
    /// GPT-2's BPE (`r50k_base`).
    Gpt2,
}

impl TokenizerKind {
    /// The smallest model vocabulary that holds every id the tokenizer produces.
    pub fn vocab_size(self) -> u32 {
        match self {
            TokenizerKind::Byte => 256,
            TokenizerKind::Gpt2 => 50_257,
        }
    }

    /// Token ids of `text` (no special tokens).
    pub fn encode(self, text: &str) -> Vec<u32> {
        match self {
            TokenizerKind::Byte => text.bytes().map(u32::from).collect(),
            TokenizerKind::Gpt2 => tiktoken_rs::r50k_base_singleton().encode_ordinary(text),
        }
    }
}

impl fmt::Display for TokenizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenizerKind::Byte => "byte-level",
            TokenizerKind::Gpt2 => "GPT-2",
        })
    }
}

/// Why the local data cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LocalDataError {
    #[error("--data {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not UTF-8 text (invalid byte at offset {offset})")]
    NotUtf8 { path: PathBuf, offset: usize },
    #[error("{path} is empty")]
    Empty { path: PathBuf },
    #[error("{path} line {line}: {reason}")]
    Malformed {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error(
        "{dir} holds neither train.txt and test.txt (text) nor train.jsonl and test.jsonl \
         (labeled examples)"
    )]
    NoData { dir: PathBuf },
    #[error(
        "{path} holds {tokens} tokens, fewer than one window of {needed} (the model's context \
         length {context} + 1); the site needs more text"
    )]
    TooShort {
        path: PathBuf,
        tokens: usize,
        needed: usize,
        context: usize,
    },
}

/// The site's tokenized text; each split holds at least one window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalText {
    pub train: Vec<u32>,
    pub test: Vec<u32>,
}

impl LocalText {
    /// Tokenizes `train` and `test` (named `train_name`, `test_name` in errors) and checks
    /// that each holds at least one window of `context + 1` tokens.
    pub fn from_texts(
        tokenizer: TokenizerKind,
        context: usize,
        (train_name, train): (&Path, &str),
        (test_name, test): (&Path, &str),
    ) -> Result<LocalText, LocalDataError> {
        let split = |path: &Path, text: &str| {
            if text.trim().is_empty() {
                return Err(LocalDataError::Empty {
                    path: path.to_path_buf(),
                });
            }
            let tokens = tokenizer.encode(text);
            if data::window_count(tokens.len(), context) == 0 {
                return Err(LocalDataError::TooShort {
                    path: path.to_path_buf(),
                    tokens: tokens.len(),
                    needed: context + 1,
                    context,
                });
            }
            Ok(tokens)
        };
        Ok(LocalText {
            train: split(train_name, train)?,
            test: split(test_name, test)?,
        })
    }

    /// Reads and tokenizes `dir/train.txt` and `dir/test.txt`.
    pub fn load(
        dir: &Path,
        tokenizer: TokenizerKind,
        context: usize,
    ) -> Result<LocalText, LocalDataError> {
        let [train, test] = read_split_files(dir, [TRAIN_FILE, TEST_FILE])?;
        LocalText::from_texts(tokenizer, context, (&train.0, &train.1), (&test.0, &test.1))
    }
}

/// Checks, before joining, that `dir` holds a non-empty `train.txt` and `test.txt`, or
/// a non-empty `train.jsonl` and `test.jsonl` (which one the job needs, and the
/// tokenizing, come with the job).
pub fn preflight(dir: &Path) -> Result<(), LocalDataError> {
    if !dir.is_dir() {
        return Err(LocalDataError::NotADirectory(dir.to_path_buf()));
    }
    let pairs = [
        [TRAIN_FILE, TEST_FILE],
        [crate::labeled::TRAIN_FILE, crate::labeled::TEST_FILE],
    ];
    let Some(names) = pairs
        .into_iter()
        .find(|names| names.iter().any(|name| dir.join(name).exists()))
    else {
        return Err(LocalDataError::NoData {
            dir: dir.to_path_buf(),
        });
    };
    for name in names {
        let path = dir.join(name);
        let metadata = std::fs::metadata(&path).map_err(|source| LocalDataError::Read {
            path: path.clone(),
            source,
        })?;
        if metadata.len() == 0 {
            return Err(LocalDataError::Empty { path });
        }
    }
    Ok(())
}

/// Reads a site's two split files `names` in `dir`: each path and its text.
pub(crate) fn read_split_files(
    dir: &Path,
    names: [&str; 2],
) -> Result<[(PathBuf, String); 2], LocalDataError> {
    if !dir.is_dir() {
        return Err(LocalDataError::NotADirectory(dir.to_path_buf()));
    }
    let read = |name: &str| {
        let path = dir.join(name);
        read_text(&path).map(|text| (path, text))
    };
    Ok([read(names[0])?, read(names[1])?])
}

fn read_text(path: &Path) -> Result<String, LocalDataError> {
    let bytes = std::fs::read(path).map_err(|source| LocalDataError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    String::from_utf8(bytes).map_err(|e| LocalDataError::NotUtf8 {
        path: path.to_path_buf(),
        offset: e.utf8_error().valid_up_to(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizers_give_bytes_or_gpt2_ids() {
        assert_eq!(TokenizerKind::Byte.encode("hé"), vec![104, 195, 169]);
        let ids = TokenizerKind::Gpt2.encode("Hello world");
        assert_eq!(ids, vec![15496, 995]);
        assert!(ids.iter().all(|&t| t < TokenizerKind::Gpt2.vocab_size()));
    }

    #[test]
    fn local_text_is_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let err = LocalText::load(&dir.path().join("nope"), TokenizerKind::Byte, 4).unwrap_err();
        assert!(matches!(err, LocalDataError::NotADirectory(_)), "{err}");
        let err = LocalText::load(dir.path(), TokenizerKind::Byte, 4).unwrap_err();
        assert!(err.to_string().contains("train.txt"), "{err}");
        assert!(matches!(err, LocalDataError::Read { .. }), "{err}");
        let err = preflight(dir.path()).unwrap_err();
        assert!(err.to_string().contains("train.txt"), "{err}");

        std::fs::write(dir.path().join(TRAIN_FILE), "  \n").unwrap();
        std::fs::write(dir.path().join(TEST_FILE), "abcdefgh").unwrap();
        let err = LocalText::load(dir.path(), TokenizerKind::Byte, 4).unwrap_err();
        assert!(matches!(err, LocalDataError::Empty { .. }), "{err}");

        std::fs::write(dir.path().join(TRAIN_FILE), "abc").unwrap();
        let err = LocalText::load(dir.path(), TokenizerKind::Byte, 4).unwrap_err();
        assert!(
            matches!(
                err,
                LocalDataError::TooShort {
                    tokens: 3,
                    needed: 5,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("fewer than one window"), "{err}");

        std::fs::write(dir.path().join(TRAIN_FILE), b"abc\xffdefgh").unwrap();
        let err = LocalText::load(dir.path(), TokenizerKind::Byte, 4).unwrap_err();
        assert!(
            matches!(err, LocalDataError::NotUtf8 { offset: 3, .. }),
            "{err}"
        );

        std::fs::write(dir.path().join(TRAIN_FILE), "abcdefghij").unwrap();
        preflight(dir.path()).unwrap();
        let text = LocalText::load(dir.path(), TokenizerKind::Byte, 4).unwrap();
        assert_eq!(text.train.len(), 10);
        assert_eq!(text.test, b"abcdefgh".map(u32::from).to_vec());
        std::fs::remove_file(dir.path().join(TEST_FILE)).unwrap();
        let err = LocalText::load(dir.path(), TokenizerKind::Byte, 4).unwrap_err();
        assert!(err.to_string().contains("test.txt"), "{err}");
    }
}
