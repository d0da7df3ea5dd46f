//! A federated site's labeled examples for a classification job (`train.jsonl`,
//! `test.jsonl`: one `{"text": "...", "label": k}` object per line), tokenized with the
//! job's tokenizer; like the site's text, they never leave it.

use std::path::Path;

use serde::Deserialize;

use crate::text::{read_split_files, LocalDataError, TokenizerKind};

/// The labeled training examples, in the data directory.
pub const TRAIN_FILE: &str = "train.jsonl";
/// The labeled held-out examples, in the data directory.
pub const TEST_FILE: &str = "test.jsonl";

/// One example: its tokens (at most the model's context length) and its class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub tokens: Vec<u32>,
    pub label: u32,
}

/// The site's examples; each split holds at least one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabeledExamples {
    pub train: Vec<Example>,
    pub test: Vec<Example>,
    /// Examples whose text was longer than the context and was cut to its first tokens.
    pub truncated: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    text: String,
    label: u32,
}

/// Parses one split; `truncated` counts examples cut to `context` tokens.
fn parse_split(
    path: &Path,
    text: &str,
    tokenizer: TokenizerKind,
    context: usize,
    num_classes: u32,
    truncated: &mut usize,
) -> Result<Vec<Example>, LocalDataError> {
    let malformed = |line: usize, reason: String| LocalDataError::Malformed {
        path: path.to_path_buf(),
        line,
        reason,
    };
    let mut examples = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let record: Record = serde_json::from_str(line).map_err(|e| {
            malformed(
                number,
                format!("expected {{\"text\": \"...\", \"label\": k}}: {e}"),
            )
        })?;
        if record.label >= num_classes {
            return Err(malformed(
                number,
                format!(
                    "label {} is not a class of this job (0..{num_classes})",
                    record.label
                ),
            ));
        }
        let mut tokens = tokenizer.encode(&record.text);
        if tokens.is_empty() {
            return Err(malformed(number, "the text is empty".to_string()));
        }
        if tokens.len() > context {
            tokens.truncate(context);
            *truncated += 1;
        }
        examples.push(Example {
            tokens,
            label: record.label,
        });
    }
    if examples.is_empty() {
        return Err(LocalDataError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(examples)
}

impl LabeledExamples {
    /// Parses and tokenizes the two splits (named `train_name`, `test_name` in errors),
    /// cutting each example to its first `context` tokens.
    pub fn from_jsonl(
        tokenizer: TokenizerKind,
        context: usize,
        num_classes: u32,
        (train_name, train): (&Path, &str),
        (test_name, test): (&Path, &str),
    ) -> Result<LabeledExamples, LocalDataError> {
        let mut truncated = 0;
        let train = parse_split(
            train_name,
            train,
            tokenizer,
            context,
            num_classes,
            &mut truncated,
        )?;
        let test = parse_split(
            test_name,
            test,
            tokenizer,
            context,
            num_classes,
            &mut truncated,
        )?;
        Ok(LabeledExamples {
            train,
            test,
            truncated,
        })
    }

    /// Reads `dir/train.jsonl` and `dir/test.jsonl`.
    pub fn load(
        dir: &Path,
        tokenizer: TokenizerKind,
        context: usize,
        num_classes: u32,
    ) -> Result<LabeledExamples, LocalDataError> {
        let [train, test] = read_split_files(dir, [TRAIN_FILE, TEST_FILE])?;
        LabeledExamples::from_jsonl(
            tokenizer,
            context,
            num_classes,
            (&train.0, &train.1),
            (&test.0, &test.1),
        )
    }

    /// How many examples of each class a split holds.
    pub fn class_counts(examples: &[Example], num_classes: u32) -> Vec<usize> {
        let mut counts = vec![0; num_classes as usize];
        for example in examples {
            counts[example.label as usize] += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(train: &str, test: &str) -> Result<LabeledExamples, LocalDataError> {
        LabeledExamples::from_jsonl(
            TokenizerKind::Byte,
            8,
            2,
            (Path::new("train.jsonl"), train),
            (Path::new("test.jsonl"), test),
        )
    }

    #[test]
    fn examples_are_tokenized_and_cut_to_the_context() {
        let train =
            "{\"text\": \"good\", \"label\": 1}\n\n{\"text\": \"a very bad film\", \"label\": 0}\n";
        let test = "{\"label\": 1, \"text\": \"fine\"}";
        let examples = parse(train, test).unwrap();
        assert_eq!(examples.train.len(), 2);
        assert_eq!(examples.train[0].tokens, b"good".map(u32::from).to_vec());
        assert_eq!(examples.train[0].label, 1);
        assert_eq!(
            examples.train[1].tokens,
            b"a very b".map(u32::from).to_vec()
        );
        assert_eq!(examples.truncated, 1);
        assert_eq!(examples.test.len(), 1);
        assert_eq!(
            LabeledExamples::class_counts(&examples.train, 2),
            vec![1, 1]
        );
    }

    #[test]
    fn malformed_examples_name_their_file_and_line() {
        let good = "{\"text\": \"ok\", \"label\": 0}";
        for (train, needle) in [
            (
                "{\"text\": \"ok\", \"label\": 2}",
                "line 1: label 2 is not a class",
            ),
            ("{\"text\": \"ok\"}", "line 1: expected"),
            (
                "{\"text\": \"ok\", \"label\": 0}\nnot json",
                "line 2: expected",
            ),
            ("{\"text\": \"ok\", \"label\": -1}", "line 1: expected"),
            (
                "{\"text\": \"\", \"label\": 0}",
                "line 1: the text is empty",
            ),
            (
                "{\"text\": \"ok\", \"label\": 0, \"extra\": 1}",
                "unknown field",
            ),
            ("\n\n", "is empty"),
        ] {
            let err = parse(train, good).unwrap_err().to_string();
            assert!(err.contains("train.jsonl"), "{err}");
            assert!(err.contains(needle), "{train:?}: {err}");
        }
        let err = parse(good, "").unwrap_err().to_string();
        assert!(err.contains("test.jsonl") && err.contains("empty"), "{err}");
    }

    #[test]
    fn examples_are_read_from_the_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        let err = LabeledExamples::load(dir.path(), TokenizerKind::Byte, 8, 2).unwrap_err();
        assert!(err.to_string().contains("train.jsonl"), "{err}");
        std::fs::write(
            dir.path().join(TRAIN_FILE),
            "{\"text\": \"ab\", \"label\": 1}\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join(TEST_FILE),
            "{\"text\": \"cd\", \"label\": 0}\n",
        )
        .unwrap();
        let examples = LabeledExamples::load(dir.path(), TokenizerKind::Byte, 8, 2).unwrap();
        assert_eq!((examples.train.len(), examples.test.len()), (1, 1));
    }
}
