//! Federated client data for sentiment classification: the UCI Sentiment
//! Labelled Sentences (Kotzias et al., KDD 2015; CC BY 4.0), 1,000 sentences
//! from each of three domains (movie reviews from IMDb, restaurant reviews
//! from Yelp, product reviews from Amazon), labelled 0 (negative) or 1
//! (positive). `scripts/bootstrap.sh --corpus` puts them in
//! `~/.cache/cohort/corpus/sentiment/{imdb,yelp,amazon}.json`, each a JSON
//! array of `{"text": "...", "class": 0|1}` records.
//!
//! `prepare-federated --sentiment DIR` splits them into sites by domain, so
//! that the sites' data are naturally non-IID:
//! - [`parse_domain`]: one domain file to sentences. Records whose text is
//!   empty or only whitespace (the files end with one `{"text": "",
//!   "class": null}`) are dropped and counted, and so are repeats of a
//!   sentence already seen in the domain (same text up to surrounding
//!   whitespace, same class), so that no sentence can sit in both a train
//!   and a test set. A record that is not an object, a text that is not a
//!   string, a class that is not 0 or 1 and a sentence given both classes
//!   are refused.
//! - [`sites_per_domain`]: sites go to the domains round-robin in the order
//!   of [`DOMAINS`] (8 sites: imdb 3, yelp 3, amazon 2).
//! - [`split_sites`]: each domain's sentences are shuffled with a seed of
//!   their own (drawn from `--seed`) and cut into contiguous slices of equal
//!   size (±1), one per site; a site's test set is the last `test_fraction`
//!   of its slice (rounded, at least one sentence on each side).
//!
//! Each site gets `train.jsonl` and `test.jsonl`, one `{"text": ..., "label":
//! 0|1}` object per line with the text exactly as in the source, plus the
//! token and enrollment entry every source gets ([`super::write_sites`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use super::{
    check_test_fraction, io_error, render_table, write_sites, FederatedDataError, SiteFiles,
    SplitMix64, TEST_JSONL_FILE, TRAIN_JSONL_FILE,
};

/// The domains, in the order sites are dealt to them; `<domain>.json` each.
pub const DOMAINS: [&str; 3] = ["imdb", "yelp", "amazon"];
/// Default of `--test-fraction` with `--sentiment`: a site of about 330
/// sentences (8 sites) holds out about 67.
pub const DEFAULT_TEST_FRACTION: f64 = 0.2;
/// The fewest sentences a site may get: a domain with fewer than this many
/// per site is refused rather than cut into sites too small to evaluate.
pub const MIN_SITE_SENTENCES: usize = 10;

/// One labelled sentence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Sentence {
    /// As in the source, surrounding whitespace included.
    pub text: String,
    /// 0: negative, 1: positive.
    pub label: u8,
}

/// One domain file, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainData {
    pub domain: String,
    /// The usable sentences, in file order.
    pub sentences: Vec<Sentence>,
    /// Records in the file.
    pub records: usize,
    /// Records dropped for an empty text.
    pub dropped_empty: usize,
    /// Records dropped as repeats of an earlier sentence.
    pub dropped_duplicates: usize,
}

fn record_error(path: &Path, index: usize, reason: String) -> FederatedDataError {
    FederatedDataError::SentimentRecord {
        path: path.to_owned(),
        index,
        reason,
    }
}

/// Parses one domain file's JSON (`path` only names it in errors); see the
/// module docs for what is dropped and what is refused.
pub fn parse_domain(
    path: &Path,
    domain: &str,
    json: &str,
) -> Result<DomainData, FederatedDataError> {
    let records: Vec<Value> =
        serde_json::from_str(json).map_err(|source| FederatedDataError::SentimentJson {
            path: path.to_owned(),
            source,
        })?;
    let mut data = DomainData {
        domain: domain.to_owned(),
        sentences: Vec::new(),
        records: records.len(),
        dropped_empty: 0,
        dropped_duplicates: 0,
    };
    // Trimmed text -> (record index, label) of its first occurrence.
    let mut seen: BTreeMap<String, (usize, u8)> = BTreeMap::new();
    for (index, record) in records.into_iter().enumerate() {
        let Value::Object(mut fields) = record else {
            return Err(record_error(
                path,
                index,
                format!("expected an object {{\"text\", \"class\"}}, got {record}"),
            ));
        };
        let text = match fields.remove("text") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(text)) => text,
            Some(other) => {
                return Err(record_error(
                    path,
                    index,
                    format!("\"text\" must be a string, got {other}"),
                ))
            }
        };
        if text.trim().is_empty() {
            data.dropped_empty += 1;
            continue;
        }
        let label = match fields.get("class") {
            Some(Value::Number(n)) if n.as_u64() == Some(0) => 0u8,
            Some(Value::Number(n)) if n.as_u64() == Some(1) => 1u8,
            Some(other) => {
                return Err(record_error(
                    path,
                    index,
                    format!("\"class\" must be 0 or 1, got {other}"),
                ))
            }
            None => {
                return Err(record_error(
                    path,
                    index,
                    "\"class\" is missing (it must be 0 or 1)".to_owned(),
                ))
            }
        };
        match seen.get(text.trim()) {
            Some(&(_, first_label)) if first_label == label => {
                data.dropped_duplicates += 1;
                continue;
            }
            Some(&(first_index, first_label)) => {
                return Err(record_error(
                    path,
                    index,
                    format!(
                        "the sentence of record {first_index} again, with class {label} \
                         instead of {first_label}"
                    ),
                ))
            }
            None => {
                seen.insert(text.trim().to_owned(), (index, label));
            }
        }
        data.sentences.push(Sentence { text, label });
    }
    Ok(data)
}

/// How many of `clients` sites each domain of [`DOMAINS`] gets, round-robin.
pub fn sites_per_domain(clients: usize) -> [usize; 3] {
    let mut counts = [0; 3];
    for site in 0..clients {
        counts[site % DOMAINS.len()] += 1;
    }
    counts
}

/// One site's share of its domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteSplit {
    /// `<domain>-<n>`, n counting from 1 within the domain.
    pub name: String,
    pub domain: String,
    pub train: Vec<Sentence>,
    pub test: Vec<Sentence>,
}

/// Test sentences of a site of `n` (≥ 2): `test_fraction` of them, rounded,
/// and at least one on each side.
pub fn test_count(n: usize, test_fraction: f64) -> usize {
    ((n as f64 * test_fraction).round() as usize).clamp(1, n.saturating_sub(1).max(1))
}

/// Cuts `domains` (in the order of [`DOMAINS`]) into `clients` sites; see the
/// module docs. The sites come in the order they were dealt (`imdb-1`,
/// `yelp-1`, `amazon-1`, `imdb-2`, ...), so the first three cover every
/// domain. The same data, `clients`, `test_fraction` and `seed` always give
/// the same sites.
pub fn split_sites(
    domains: &[DomainData],
    clients: usize,
    test_fraction: f64,
    seed: u64,
) -> Result<Vec<SiteSplit>, FederatedDataError> {
    if clients == 0 {
        return Err(FederatedDataError::Invalid(
            "--clients must be at least 1".to_owned(),
        ));
    }
    check_test_fraction(test_fraction)?;
    if domains.len() != DOMAINS.len() {
        return Err(FederatedDataError::Invalid(format!(
            "expected the {} domains {DOMAINS:?}, got {}",
            DOMAINS.len(),
            domains.len()
        )));
    }
    let counts = sites_per_domain(clients);
    // One seed per domain, so that a domain's shuffle does not depend on
    // how many sentences the others have.
    let mut seeds = SplitMix64(seed);
    let mut per_domain: Vec<Vec<SiteSplit>> = Vec::with_capacity(domains.len());
    for (data, &sites) in domains.iter().zip(&counts) {
        let domain_seed = seeds.next();
        let needed = sites * MIN_SITE_SENTENCES;
        if data.sentences.len() < needed {
            return Err(FederatedDataError::TooFewSentences {
                domain: data.domain.clone(),
                usable: data.sentences.len(),
                sites,
                needed,
                per_site: MIN_SITE_SENTENCES,
            });
        }
        let mut order: Vec<&Sentence> = data.sentences.iter().collect();
        SplitMix64(domain_seed).shuffle(&mut order);
        let n = order.len();
        let mut splits = Vec::with_capacity(sites);
        for site in 0..sites {
            let slice = &order[site * n / sites..(site + 1) * n / sites];
            let test = test_count(slice.len(), test_fraction);
            let (train, held_out) = slice.split_at(slice.len() - test);
            splits.push(SiteSplit {
                name: format!("{}-{}", data.domain, site + 1),
                domain: data.domain.clone(),
                train: train.iter().map(|&s| s.clone()).collect(),
                test: held_out.iter().map(|&s| s.clone()).collect(),
            });
        }
        per_domain.push(splits);
    }
    let mut dealt = Vec::with_capacity(clients);
    let mut iters: Vec<_> = per_domain.into_iter().map(Vec::into_iter).collect();
    for site in 0..clients {
        if let Some(split) = iters[site % DOMAINS.len()].next() {
            dealt.push(split);
        }
    }
    Ok(dealt)
}

/// One line of `train.jsonl` / `test.jsonl`.
#[derive(Serialize)]
struct Line<'a> {
    text: &'a str,
    label: u8,
}

/// Sentences as JSON Lines: `{"text": ..., "label": 0|1}` per line (UTF-8,
/// text unchanged, only what JSON needs escaped).
pub fn render_jsonl(sentences: &[Sentence]) -> String {
    let mut text = String::new();
    for sentence in sentences {
        let line = Line {
            text: &sentence.text,
            label: sentence.label,
        };
        text.push_str(&serde_json::to_string(&line).expect("a string and a number serialize"));
        text.push('\n');
    }
    text
}

/// Options of `cohort-coordinator prepare-federated --sentiment`.
#[derive(Clone, Debug)]
pub struct SentimentOptions {
    /// Holds `imdb.json`, `yelp.json` and `amazon.json`.
    pub dir: PathBuf,
    pub out: PathBuf,
    pub clients: usize,
    pub test_fraction: f64,
    pub seed: u64,
    /// Replace a previous prepare-federated output in `out`.
    pub force: bool,
}

/// What was written for one site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreparedSite {
    pub name: String,
    pub domain: String,
    pub train: usize,
    pub test: usize,
    /// Sentences labelled 1 in each split.
    pub train_positive: usize,
    pub test_positive: usize,
}

/// What was read from one domain file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainSummary {
    pub domain: String,
    pub records: usize,
    pub sentences: usize,
    pub dropped_empty: usize,
    pub dropped_duplicates: usize,
    pub sites: usize,
}

/// The outcome of [`prepare_sentiment`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentimentReport {
    pub domains: Vec<DomainSummary>,
    pub sites: Vec<PreparedSite>,
}

/// Reads `DIR/<domain>.json` for every domain of [`DOMAINS`].
pub fn load_domains(dir: &Path) -> Result<Vec<DomainData>, FederatedDataError> {
    DOMAINS
        .iter()
        .map(|domain| {
            let path = dir.join(format!("{domain}.json"));
            if !path.is_file() {
                return Err(FederatedDataError::MissingSentimentFile(path));
            }
            let json = std::fs::read_to_string(&path).map_err(io_error(&path))?;
            parse_domain(&path, domain, &json)
        })
        .collect()
}

/// Reads the three domains, cuts them into sites and writes each site's
/// `train.jsonl`, `test.jsonl` and token, then the enrollment file. Nothing
/// is written unless the input is sound.
pub fn prepare_sentiment(
    options: &SentimentOptions,
) -> Result<SentimentReport, FederatedDataError> {
    check_test_fraction(options.test_fraction)?;
    let domains = load_domains(&options.dir)?;
    let splits = split_sites(
        &domains,
        options.clients,
        options.test_fraction,
        options.seed,
    )?;
    let files: Vec<SiteFiles> = splits
        .iter()
        .map(|split| SiteFiles {
            name: split.name.clone(),
            files: vec![
                (TRAIN_JSONL_FILE, render_jsonl(&split.train).into_bytes()),
                (TEST_JSONL_FILE, render_jsonl(&split.test).into_bytes()),
            ],
        })
        .collect();
    write_sites(&options.out, options.force, &files)?;
    let counts = sites_per_domain(options.clients);
    let positive = |sentences: &[Sentence]| sentences.iter().filter(|s| s.label == 1).count();
    Ok(SentimentReport {
        domains: domains
            .iter()
            .zip(counts)
            .map(|(data, sites)| DomainSummary {
                domain: data.domain.clone(),
                records: data.records,
                sentences: data.sentences.len(),
                dropped_empty: data.dropped_empty,
                dropped_duplicates: data.dropped_duplicates,
                sites,
            })
            .collect(),
        sites: splits
            .iter()
            .map(|split| PreparedSite {
                name: split.name.clone(),
                domain: split.domain.clone(),
                train: split.train.len(),
                test: split.test.len(),
                train_positive: positive(&split.train),
                test_positive: positive(&split.test),
            })
            .collect(),
    })
}

fn share(part: usize, whole: usize) -> String {
    if whole == 0 {
        "-".to_owned()
    } else {
        format!("{:.1}%", 100.0 * part as f64 / whole as f64)
    }
}

/// The summary `prepare-federated --sentiment` prints: one row per site
/// (domain, train and test sentences, share of positives in each), then
/// one line per domain with what was dropped.
pub fn render_summary(report: &SentimentReport) -> String {
    let rows: Vec<Vec<String>> = report
        .sites
        .iter()
        .map(|site| {
            vec![
                site.name.clone(),
                site.domain.clone(),
                site.train.to_string(),
                site.test.to_string(),
                share(site.train_positive, site.train),
                share(site.test_positive, site.test),
            ]
        })
        .collect();
    let mut text = render_table(
        &[
            ("site", false),
            ("domain", false),
            ("train", true),
            ("test", true),
            ("positive train", true),
            ("positive test", true),
        ],
        &rows,
    );
    for domain in &report.domains {
        let _ = writeln!(
            text,
            "{}: {} records, {} sentences used by {} sites ({} empty and {} repeated dropped)",
            domain.domain,
            domain.records,
            domain.sentences,
            domain.sites,
            domain.dropped_empty,
            domain.dropped_duplicates
        );
    }
    let _ = writeln!(
        text,
        "{} sites from {} domains",
        report.sites.len(),
        report.domains.iter().filter(|d| d.sites > 0).count()
    );
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<DomainData, FederatedDataError> {
        parse_domain(Path::new("x.json"), "x", json)
    }

    #[test]
    fn drops_empty_and_repeated_records_and_keeps_text_as_is() {
        let data = parse(
            r#"[{"text":"Good.  ","class":1},{"text":"Bad, \"really\" — bad.","class":0},
                {"text":" Good.","class":1},{"text":"   ","class":0},{},
                {"text":"Fine.","class":1,"extra":true},{"text":"","class":null}]"#,
        )
        .unwrap();
        assert_eq!(data.records, 7);
        assert_eq!(data.dropped_empty, 3);
        assert_eq!(data.dropped_duplicates, 1);
        assert_eq!(
            data.sentences,
            [
                Sentence {
                    text: "Good.  ".into(),
                    label: 1
                },
                Sentence {
                    text: "Bad, \"really\" — bad.".into(),
                    label: 0
                },
                Sentence {
                    text: "Fine.".into(),
                    label: 1
                },
            ]
        );
        assert_eq!(
            render_jsonl(&data.sentences[..2]),
            "{\"text\":\"Good.  \",\"label\":1}\n\
             {\"text\":\"Bad, \\\"really\\\" — bad.\",\"label\":0}\n"
        );
    }

    #[test]
    fn refuses_malformed_records_naming_the_record() {
        let cases = [
            (r#"{"text":"a","class":1}"#, "not a JSON array"),
            (r#"[{"text":"a","class":1}"#, "not a JSON array"),
            (r#"[{"text":"a","class":1},["b",0]]"#, "record 1"),
            (
                r#"[{"text":"a","class":2}]"#,
                "\"class\" must be 0 or 1, got 2",
            ),
            (r#"[{"text":"a","class":"1"}]"#, "must be 0 or 1"),
            (r#"[{"text":"a","class":1.0}]"#, "must be 0 or 1"),
            (r#"[{"text":"a","class":null}]"#, "must be 0 or 1"),
            (r#"[{"text":"a"}]"#, "\"class\" is missing"),
            (r#"[{"text":7,"class":1}]"#, "\"text\" must be a string"),
            (
                r#"[{"text":"a","class":1},{"text":"a ","class":0}]"#,
                "the sentence of record 0 again, with class 0 instead of 1",
            ),
        ];
        for (json, expected) in cases {
            let err = parse(json).unwrap_err().to_string();
            assert!(err.contains(expected), "{json}: {err}");
            assert!(err.contains("x.json"), "{json}: {err}");
        }
    }

    #[test]
    fn sites_are_dealt_round_robin() {
        assert_eq!(sites_per_domain(8), [3, 3, 2]);
        assert_eq!(sites_per_domain(3), [1, 1, 1]);
        assert_eq!(sites_per_domain(1), [1, 0, 0]);
        assert_eq!(test_count(333, 0.2), 67);
        assert_eq!(test_count(2, 0.01), 1);
        assert_eq!(test_count(2, 0.99), 1);
    }

    fn domain(name: &str, n: usize) -> DomainData {
        DomainData {
            domain: name.into(),
            sentences: (0..n)
                .map(|i| Sentence {
                    text: format!("{name} {i}"),
                    label: (i % 2) as u8,
                })
                .collect(),
            records: n,
            dropped_empty: 0,
            dropped_duplicates: 0,
        }
    }

    #[test]
    fn split_is_seeded_disjoint_and_complete() {
        let domains = [
            domain("imdb", 100),
            domain("yelp", 101),
            domain("amazon", 50),
        ];
        let sites = split_sites(&domains, 8, 0.2, 3).unwrap();
        let names: Vec<&str> = sites.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["imdb-1", "yelp-1", "amazon-1", "imdb-2", "yelp-2", "amazon-2", "imdb-3", "yelp-3"]
        );
        assert_eq!(sites, split_sites(&domains, 8, 0.2, 3).unwrap());
        assert_ne!(sites, split_sites(&domains, 8, 0.2, 4).unwrap());
        for data in &domains {
            let mut texts: Vec<&str> = sites
                .iter()
                .filter(|s| s.domain == data.domain)
                .flat_map(|s| s.train.iter().chain(&s.test))
                .map(|s| s.text.as_str())
                .collect();
            texts.sort_unstable();
            let mut expected: Vec<&str> = data.sentences.iter().map(|s| s.text.as_str()).collect();
            expected.sort_unstable();
            assert_eq!(texts, expected, "{}", data.domain);
        }
        let sizes: Vec<(usize, usize)> = sites
            .iter()
            .map(|s| (s.train.len(), s.test.len()))
            .collect();
        // imdb 100 = 33 + 33 + 34, yelp 101 = 33 + 34 + 34, amazon 25 + 25.
        assert_eq!(
            sizes,
            [
                (26, 7),
                (26, 7),
                (20, 5),
                (26, 7),
                (27, 7),
                (20, 5),
                (27, 7),
                (27, 7)
            ]
        );
    }

    #[test]
    fn a_domain_too_small_for_its_sites_is_refused() {
        let domains = [domain("imdb", 30), domain("yelp", 29), domain("amazon", 20)];
        assert!(split_sites(&domains, 6, 0.2, 0).is_ok());
        let err = split_sites(&domains, 8, 0.2, 0).unwrap_err();
        assert!(
            matches!(
                &err,
                FederatedDataError::TooFewSentences { domain, usable: 29, sites: 3, needed: 30, .. }
                    if domain == "yelp"
            ),
            "{err}"
        );
        assert!(split_sites(&domains, 0, 0.2, 0).is_err());
        assert!(split_sites(&domains, 3, 1.0, 0).is_err());
    }
}
