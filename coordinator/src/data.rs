//! Training data on disk: `prepare` turns text files into token shards plus a
//! `manifest.json`; the coordinator loads the manifest to schedule shards.

use std::io::Write;
use std::path::{Path, PathBuf};

use cohort_core::engine::ShardInfo;
use cohort_core::ids::ShardId;
use cohort_core::shard_file;
use serde::{Deserialize, Serialize};

pub const MANIFEST: &str = "manifest.json";

/// How text becomes token ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    /// One token per byte (vocabulary 256): no files, suits tiny CPU models.
    Byte,
    /// GPT-2's BPE (`r50k_base`, vocabulary 50,257), embedded in tiktoken-rs.
    Gpt2,
}

impl TokenizerKind {
    pub fn vocab_size(self) -> u32 {
        match self {
            TokenizerKind::Byte => 256,
            TokenizerKind::Gpt2 => 50_257,
        }
    }

    /// Token ids of one document, followed by the document separator.
    fn encode_document(self, text: &str, out: &mut Vec<u32>) {
        match self {
            TokenizerKind::Byte => {
                out.extend(text.bytes().map(u32::from));
                out.extend(b"\n\n".iter().map(|&b| u32::from(b)));
            }
            TokenizerKind::Gpt2 => {
                let bpe = tiktoken_rs::r50k_base_singleton();
                out.extend(bpe.encode_ordinary(text));
                out.push(50_256); // <|endoftext|>
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestShard {
    pub file_name: String,
    pub num_tokens: u64,
}

/// What `prepare` wrote, read back by the coordinator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataManifest {
    pub tokenizer: TokenizerKind,
    pub vocab_size: u32,
    /// The context length the shards were cut for (shards hold k·T + 1 tokens).
    pub context_length: u32,
    pub train: Vec<ManifestShard>,
    pub val: Vec<ManifestShard>,
    pub source_files: usize,
    pub dropped_tokens: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("no manifest.json (run `cohort-coordinator prepare` first): {0}")]
    MissingManifest(std::io::Error),
    #[error("manifest.json is malformed: {0}")]
    BadManifest(serde_json::Error),
    #[error("shard {file}: {message}")]
    Shard { file: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no input text found in {0:?}")]
    NoInput(Vec<PathBuf>),
    #[error("{0}")]
    Invalid(String),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_owned(),
        source,
    }
}

impl DataManifest {
    /// Loads the manifest and checks every shard's header against it.
    pub fn load(dir: &Path) -> Result<DataManifest, DataError> {
        let text =
            std::fs::read_to_string(dir.join(MANIFEST)).map_err(DataError::MissingManifest)?;
        let manifest: DataManifest = serde_json::from_str(&text).map_err(DataError::BadManifest)?;
        if manifest.train.is_empty() {
            return Err(DataError::Invalid(
                "the manifest lists no training shards".into(),
            ));
        }
        for shard in manifest.train.iter().chain(&manifest.val) {
            let shard_error = |message: String| DataError::Shard {
                file: shard.file_name.clone(),
                message,
            };
            let path = dir.join(&shard.file_name);
            let mut header = [0u8; shard_file::HEADER_LEN];
            let mut file = std::fs::File::open(&path).map_err(|e| shard_error(e.to_string()))?;
            std::io::Read::read_exact(&mut file, &mut header)
                .map_err(|e| shard_error(e.to_string()))?;
            let header =
                shard_file::decode_header(&header).map_err(|e| shard_error(e.to_string()))?;
            if header.num_tokens != shard.num_tokens || header.vocab_size != manifest.vocab_size {
                return Err(shard_error(format!(
                    "header says {} tokens (vocabulary {}), the manifest {} (vocabulary {})",
                    header.num_tokens, header.vocab_size, shard.num_tokens, manifest.vocab_size
                )));
            }
            let expected_len =
                shard_file::HEADER_LEN as u64 + header.num_tokens * header.token_bytes as u64;
            let actual_len = file
                .metadata()
                .map_err(|e| shard_error(e.to_string()))?
                .len();
            if actual_len != expected_len {
                return Err(shard_error(format!(
                    "file is {actual_len} bytes, expected {expected_len}"
                )));
            }
        }
        Ok(manifest)
    }

    pub fn train_shards(&self) -> Vec<ShardInfo> {
        self.train
            .iter()
            .enumerate()
            .map(|(i, s)| ShardInfo {
                id: ShardId(i as u64),
                file_name: s.file_name.clone(),
                num_tokens: s.num_tokens,
            })
            .collect()
    }

    /// Held-out shards get ids after the training ones.
    pub fn eval_shards(&self) -> Vec<ShardInfo> {
        let base = self.train.len() as u64;
        self.val
            .iter()
            .enumerate()
            .map(|(i, s)| ShardInfo {
                id: ShardId(base + i as u64),
                file_name: s.file_name.clone(),
                num_tokens: s.num_tokens,
            })
            .collect()
    }
}

/// Options of `cohort-coordinator prepare`.
#[derive(Clone, Debug)]
pub struct PrepareOptions {
    pub inputs: Vec<PathBuf>,
    pub output: PathBuf,
    pub tokenizer: TokenizerKind,
    pub context_length: u32,
    /// Approximate tokens per shard; rounded to k·context_length + 1.
    pub shard_tokens: u64,
    /// Every n-th shard is held out for evaluation.
    pub val_every: usize,
    pub show_progress: bool,
}

fn collect_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, DataError> {
    let mut files = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let mut stack = vec![input.clone()];
            while let Some(dir) = stack.pop() {
                for entry in std::fs::read_dir(&dir).map_err(io_error(&dir))? {
                    let path = entry.map_err(io_error(&dir))?.path();
                    if path.is_dir() {
                        stack.push(path);
                    } else if path.extension().is_some_and(|e| e == "txt" || e == "md") {
                        files.push(path);
                    }
                }
            }
        } else {
            std::fs::metadata(input).map_err(io_error(input))?;
            files.push(input.clone());
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(DataError::NoInput(inputs.to_vec()));
    }
    Ok(files)
}

/// Tokenises the inputs into shard files and a manifest in `options.output`.
pub fn prepare(options: &PrepareOptions) -> Result<DataManifest, DataError> {
    if options.context_length == 0 {
        return Err(DataError::Invalid(
            "--context-length must be at least 1".into(),
        ));
    }
    if options.val_every < 2 {
        return Err(DataError::Invalid("--val-every must be at least 2".into()));
    }
    let files = collect_inputs(&options.inputs)?;
    let total_bytes: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let progress = if options.show_progress {
        indicatif::ProgressBar::new(total_bytes)
    } else {
        indicatif::ProgressBar::hidden()
    };
    progress.set_style(
        indicatif::ProgressStyle::with_template("tokenizing {bar:40} {bytes}/{total_bytes} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut tokens = Vec::new();
    for file in &files {
        let bytes = std::fs::read(file).map_err(io_error(file))?;
        let text = String::from_utf8_lossy(&bytes);
        options.tokenizer.encode_document(&text, &mut tokens);
        progress.inc(bytes.len() as u64);
    }
    progress.finish_with_message(format!("{} tokens", tokens.len()));

    let t = options.context_length as u64;
    let per_shard = (options.shard_tokens / t).max(1) * t + 1;
    std::fs::create_dir_all(&options.output).map_err(io_error(&options.output))?;
    let mut shards: Vec<&[u32]> = tokens.chunks(per_shard as usize).collect();
    let mut dropped = 0u64;
    // The last shard keeps whole windows only.
    if let Some(last) = shards.pop() {
        let windows = (last.len() as u64).saturating_sub(1) / t;
        let keep = if windows == 0 { 0 } else { windows * t + 1 };
        dropped += last.len() as u64 - keep;
        if keep > 0 {
            shards.push(&last[..keep as usize]);
        }
    }
    if shards.len() < 2 {
        return Err(DataError::Invalid(format!(
            "{} tokens make {} shard(s) of {per_shard} tokens; need at least 2 (one is held out): lower --shard-tokens",
            tokens.len(),
            shards.len()
        )));
    }
    let vocab = options.tokenizer.vocab_size();
    let mut manifest = DataManifest {
        tokenizer: options.tokenizer,
        vocab_size: vocab,
        context_length: options.context_length,
        train: Vec::new(),
        val: Vec::new(),
        source_files: files.len(),
        dropped_tokens: dropped,
    };
    let held_out = |i: usize| i % options.val_every == options.val_every - 1;
    let any_held_out = (0..shards.len()).any(held_out);
    for (i, shard) in shards.iter().enumerate() {
        let is_val = held_out(i) || (!any_held_out && i == shards.len() - 1);
        let list = if is_val {
            &mut manifest.val
        } else {
            &mut manifest.train
        };
        let file_name = format!(
            "{}-{:05}.tok",
            if is_val { "val" } else { "train" },
            list.len()
        );
        write_atomically(
            &options.output.join(&file_name),
            &shard_file::encode(shard, vocab),
        )?;
        list.push(ManifestShard {
            file_name,
            num_tokens: shard.len() as u64,
        });
    }
    let json = serde_json::to_vec_pretty(&manifest).map_err(DataError::BadManifest)?;
    write_atomically(&options.output.join(MANIFEST), &json)?;
    Ok(manifest)
}

/// Writes a file so that readers see the old content or the new, never a torn one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    replace_atomically(path, |tmp| {
        let mut file = std::fs::File::create(tmp)?;
        file.write_all(bytes)
    })
}

/// Lets `write` fill a temporary file beside `path`, then fsyncs it, renames
/// it over `path` and fsyncs the directory.
pub fn replace_atomically(
    path: &Path,
    write: impl FnOnce(&Path) -> std::io::Result<()>,
) -> Result<(), DataError> {
    let tmp = path.with_extension("tmp");
    write(&tmp).map_err(io_error(&tmp))?;
    std::fs::File::open(&tmp)
        .and_then(|file| file.sync_all())
        .map_err(io_error(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_error(path))?;
    if let Some(dir) = path.parent() {
        if let Ok(dir) = std::fs::File::open(dir) {
            // Makes the rename itself durable; not all filesystems allow it.
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(input: PathBuf, output: PathBuf, tokenizer: TokenizerKind) -> PrepareOptions {
        PrepareOptions {
            inputs: vec![input],
            output,
            tokenizer,
            context_length: 16,
            shard_tokens: 100,
            val_every: 4,
            show_progress: false,
        }
    }

    #[test]
    fn byte_shards_hold_the_text_in_order_with_a_held_out_split() {
        let dir = tempfile::tempdir().unwrap();
        let text: String = (0..300)
            .map(|i| format!("line {i} of the corpus. "))
            .collect();
        std::fs::write(dir.path().join("a.txt"), &text).unwrap();
        let out = dir.path().join("data");
        let manifest = prepare(&options(
            dir.path().join("a.txt"),
            out.clone(),
            TokenizerKind::Byte,
        ))
        .unwrap();
        assert!(!manifest.val.is_empty() && manifest.train.len() > manifest.val.len());
        assert_eq!(DataManifest::load(&out).unwrap(), manifest);
        // Train and val shards interleave in the original order: rebuild the text.
        let (mut train, mut val) = (manifest.train.iter(), manifest.val.iter());
        let mut rebuilt = Vec::new();
        for i in 0..manifest.train.len() + manifest.val.len() {
            let shard = if i % 4 == 3 { val.next() } else { train.next() }.unwrap();
            assert_eq!((shard.num_tokens - 1) % 16, 0, "shards hold k*T+1 tokens");
            let (_, tokens) =
                shard_file::decode(&std::fs::read(out.join(&shard.file_name)).unwrap()).unwrap();
            rebuilt.extend(tokens.iter().map(|&t| t as u8));
        }
        let original = format!("{text}\n\n");
        assert_eq!(
            rebuilt.len() as u64 + manifest.dropped_tokens,
            original.len() as u64
        );
        assert_eq!(&original.as_bytes()[..rebuilt.len()], &rebuilt[..]);
    }

    #[test]
    fn gpt2_tokens_round_trip_through_the_bpe() {
        let dir = tempfile::tempdir().unwrap();
        let text = "We the People of the United States, in Order to form a more perfect Union. "
            .repeat(40);
        std::fs::write(dir.path().join("a.txt"), &text).unwrap();
        let out = dir.path().join("data");
        let manifest = prepare(&options(
            dir.path().join("a.txt"),
            out.clone(),
            TokenizerKind::Gpt2,
        ))
        .unwrap();
        assert_eq!(manifest.vocab_size, 50_257);
        let (header, tokens) =
            shard_file::decode(&std::fs::read(out.join(&manifest.train[0].file_name)).unwrap())
                .unwrap();
        assert_eq!(header.token_bytes, 2);
        let decoded = tiktoken_rs::r50k_base_singleton().decode(&tokens).unwrap();
        assert!(text.starts_with(&decoded), "{decoded:?}");
    }

    #[test]
    fn a_damaged_shard_is_reported_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), "x".repeat(2000)).unwrap();
        let out = dir.path().join("data");
        let manifest = prepare(&options(
            dir.path().join("a.txt"),
            out.clone(),
            TokenizerKind::Byte,
        ))
        .unwrap();
        let victim = out.join(&manifest.train[1].file_name);
        let bytes = std::fs::read(&victim).unwrap();
        std::fs::write(&victim, &bytes[..bytes.len() - 1]).unwrap();
        let err = DataManifest::load(&out).unwrap_err().to_string();
        assert!(err.contains(&manifest.train[1].file_name), "{err}");
    }

    #[test]
    fn too_little_text_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), "tiny").unwrap();
        let err = prepare(&options(
            dir.path().join("a.txt"),
            dir.path().join("d"),
            TokenizerKind::Byte,
        ))
        .unwrap_err();
        assert!(err.to_string().contains("need at least 2"), "{err}");
        let err = prepare(&options(
            dir.path().join("missing"),
            dir.path().join("d"),
            TokenizerKind::Byte,
        ))
        .unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
