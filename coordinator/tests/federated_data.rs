//! `prepare-federated` on the committed Shakespeare and sentiment fixtures:
//! the files each client site gets, the enrollment the coordinator reads,
//! determinism, the refusals that keep tokens from being clobbered, and the
//! refusals of malformed sentiment files.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use cohort_coordinator::federated_data::sentiment::{self, prepare_sentiment, SentimentOptions};
use cohort_coordinator::federated_data::{
    prepare_federated, token_sha256, Enrollment, FederatedDataError, FederatedOptions,
    ENROLLMENT_FILE, TEST_FILE, TEST_JSONL_FILE, TOKEN_FILE, TRAIN_FILE, TRAIN_JSONL_FILE,
};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/fixtures/shakespeare")
}

fn options(out: &Path) -> FederatedOptions {
    FederatedOptions {
        plays: fixture(),
        out: out.to_owned(),
        clients: 8,
        min_chars: 300,
        test_fraction: 0.1,
        seed: 0,
        force: false,
    }
}

#[test]
fn eight_clients_get_their_splits_a_private_token_and_an_enrollment_entry() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("federated");
    let report = prepare_federated(&options(&out)).unwrap();
    assert_eq!(report.plays, 3);
    assert_eq!(report.clients.len(), 8);

    let enrollment_text = std::fs::read_to_string(out.join(ENROLLMENT_FILE)).unwrap();
    assert!(enrollment_text.starts_with(
        "# Cohort federated enrollment: one entry per client site. \
         Only the SHA-256 of each token is stored here.\n[[client]]\nname = \""
    ));
    let enrollment = Enrollment::parse(&enrollment_text).unwrap();
    let enrolled: Vec<&str> = enrollment.clients.iter().map(|c| c.name.as_str()).collect();
    let reported: Vec<&str> = report.clients.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(enrolled, reported);
    assert_eq!(
        enrolled.iter().collect::<BTreeSet<_>>().len(),
        8,
        "names are unique"
    );
    // The first three come from the fixture's three plays (three genres).
    let plays: BTreeSet<&str> = report.clients[..3]
        .iter()
        .map(|c| c.play_title.as_str())
        .collect();
    assert_eq!(plays.len(), 3, "{reported:?}");

    let mut tokens = BTreeSet::new();
    for (client, entry) in report.clients.iter().zip(&enrollment.clients) {
        assert!(
            client
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "{}",
            client.name
        );
        let client_dir = out.join(&client.name);
        let train = std::fs::read_to_string(client_dir.join(TRAIN_FILE)).unwrap();
        let test = std::fs::read_to_string(client_dir.join(TEST_FILE)).unwrap();
        assert!(client.train_chars >= 1 && client.test_chars >= 1);
        assert!(client.train_chars + client.test_chars >= 300);
        assert!(train.chars().count() >= client.train_chars);
        assert!(test.chars().count() >= client.test_chars);
        assert!(!train.contains("**") && !train.contains('_') && !test.contains('['));

        let token_path = client_dir.join(TOKEN_FILE);
        let token = std::fs::read_to_string(&token_path).unwrap();
        assert_eq!(token.len(), 64, "32 bytes as hex, no newline: {token:?}");
        assert!(token
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_eq!(entry.token_sha256, token_sha256(&token));
        assert!(
            !enrollment_text.contains(&token),
            "the token itself is not enrolled"
        );
        tokens.insert(token);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&token_path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", token_path.display());
        }
    }
    assert_eq!(tokens.len(), 8, "every client has its own token");
}

#[test]
fn the_same_seed_picks_the_same_clients_and_splits_with_new_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let first = prepare_federated(&options(&dir.path().join("a"))).unwrap();
    let second = prepare_federated(&options(&dir.path().join("b"))).unwrap();
    assert_eq!(first.clients, second.clients);
    for client in &first.clients {
        let read = |run: &str, file: &str| {
            std::fs::read_to_string(dir.path().join(run).join(&client.name).join(file)).unwrap()
        };
        assert_eq!(read("a", TRAIN_FILE), read("b", TRAIN_FILE));
        assert_eq!(read("a", TEST_FILE), read("b", TEST_FILE));
        assert_ne!(read("a", TOKEN_FILE), read("b", TOKEN_FILE));
    }
}

#[test]
fn a_non_empty_output_is_refused_without_force_and_replaced_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("federated");
    let first = prepare_federated(&options(&out)).unwrap();
    let old_token =
        std::fs::read_to_string(out.join(&first.clients[0].name).join(TOKEN_FILE)).unwrap();

    let err = prepare_federated(&options(&out)).unwrap_err();
    assert!(
        matches!(err, FederatedDataError::OutputNotEmpty(_)),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join(&first.clients[0].name).join(TOKEN_FILE)).unwrap(),
        old_token,
        "a refused run leaves the tokens alone"
    );

    // With --force a smaller selection replaces the old one entirely.
    let second = prepare_federated(&FederatedOptions {
        clients: 6,
        force: true,
        ..options(&out)
    })
    .unwrap();
    let dirs: BTreeSet<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name != ENROLLMENT_FILE)
        .collect();
    let expected: BTreeSet<String> = second.clients.iter().map(|c| c.name.clone()).collect();
    assert_eq!(dirs, expected);
    assert_ne!(
        std::fs::read_to_string(out.join(&first.clients[0].name).join(TOKEN_FILE)).unwrap(),
        old_token
    );

    // Files prepare-federated did not write are never deleted.
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let err = prepare_federated(&FederatedOptions {
        force: true,
        ..options(&out)
    })
    .unwrap_err();
    assert!(
        matches!(err, FederatedDataError::ForeignOutput { .. }),
        "{err}"
    );
    assert!(out.join("notes.txt").exists());
}

#[test]
fn refuses_missing_plays_and_more_clients_than_eligible() {
    let dir = tempfile::tempdir().unwrap();
    let err = prepare_federated(&FederatedOptions {
        plays: dir.path().join("nowhere"),
        ..options(&dir.path().join("out"))
    })
    .unwrap_err();
    assert!(matches!(err, FederatedDataError::MissingPlays(_)), "{err}");

    let err = prepare_federated(&FederatedOptions {
        clients: 500,
        ..options(&dir.path().join("out"))
    })
    .unwrap_err();
    assert!(
        matches!(
            err,
            FederatedDataError::TooFewEligibleClients { asked: 500, .. }
        ),
        "{err}"
    );
    let err = prepare_federated(&FederatedOptions {
        min_chars: 1_000_000,
        ..options(&dir.path().join("out"))
    })
    .unwrap_err();
    assert!(
        matches!(err, FederatedDataError::NoEligibleClients { .. }),
        "{err}"
    );
    assert!(
        !dir.path().join("out").exists(),
        "nothing is written before the selection succeeds"
    );
}

#[test]
fn the_cli_prints_a_summary_row_per_client_and_exits_2_on_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("federated");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_cohort-coordinator"))
            .arg("prepare-federated")
            .arg("--plays")
            .arg(fixture())
            .arg("--out")
            .arg(&out)
            .args(["--clients", "6", "--min-chars", "300", "--seed", "1"])
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let output = run();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("client") && lines[0].ends_with("test chars"));
    assert_eq!(lines.len(), 1 + 6 + 1, "{stdout}");

    let again = run();
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
}

// ---------------------------------------------------------------------------
// --sentiment: the committed slice of the labelled sentences

fn sentiment_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/fixtures/sentiment")
}

fn sentiment_options(dir: &Path, out: &Path) -> SentimentOptions {
    SentimentOptions {
        dir: dir.to_owned(),
        out: out.to_owned(),
        clients: 8,
        test_fraction: sentiment::DEFAULT_TEST_FRACTION,
        seed: 0,
        force: false,
    }
}

/// A site file's lines as (text, label); every line must be exactly
/// `{"text": string, "label": 0|1}`.
fn read_jsonl(path: &Path) -> Vec<(String, u8)> {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.ends_with('\n'), "{}", path.display());
    text.lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}: {line}: {e}", path.display()));
            let object = value.as_object().expect("one object per line");
            assert_eq!(object.len(), 2, "{line}");
            let text = object["text"]
                .as_str()
                .expect("text is a string")
                .to_owned();
            let label = object["label"].as_u64().expect("label is a number");
            assert!(label <= 1, "{line}");
            (text, label as u8)
        })
        .collect()
}

/// The fixture's usable records of one domain as (text, label).
fn fixture_sentences(domain: &str) -> Vec<(String, u8)> {
    let text = std::fs::read_to_string(sentiment_fixture().join(format!("{domain}.json"))).unwrap();
    let records: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    records
        .iter()
        .filter(|r| !r["text"].as_str().unwrap_or("").trim().is_empty())
        .map(|r| {
            (
                r["text"].as_str().unwrap().to_owned(),
                r["class"].as_u64().unwrap() as u8,
            )
        })
        .collect()
}

/// Checks each site's token file against `enrollment.toml` (same format
/// and rules as the Shakespeare sites) and returns the enrolled names.
fn check_enrollment(out: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(out.join(ENROLLMENT_FILE)).unwrap();
    assert!(text.starts_with(
        "# Cohort federated enrollment: one entry per client site. \
         Only the SHA-256 of each token is stored here.\n[[client]]\nname = \""
    ));
    let enrollment = Enrollment::parse(&text).unwrap();
    let mut tokens = BTreeSet::new();
    for entry in &enrollment.clients {
        let token_path = out.join(&entry.name).join(TOKEN_FILE);
        let token = std::fs::read_to_string(&token_path).unwrap();
        assert_eq!(token.len(), 64, "32 bytes as hex, no newline: {token:?}");
        assert_eq!(entry.token_sha256, token_sha256(&token));
        assert!(!text.contains(&token), "the token itself is not enrolled");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&token_path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", token_path.display());
        }
        tokens.insert(token);
    }
    assert_eq!(tokens.len(), enrollment.clients.len(), "one token per site");
    enrollment.clients.into_iter().map(|c| c.name).collect()
}

#[test]
fn eight_sentiment_sites_split_by_domain_lose_and_repeat_no_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sentiment");
    let report = prepare_sentiment(&sentiment_options(&sentiment_fixture(), &out)).unwrap();

    let names: Vec<&str> = report.sites.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["imdb-1", "yelp-1", "amazon-1", "imdb-2", "yelp-2", "amazon-2", "imdb-3", "yelp-3"]
    );
    assert_eq!(check_enrollment(&out), names);
    // The fixture: 120 sentences (60/60) and the trailing empty record per domain.
    for domain in &report.domains {
        assert_eq!(
            (domain.records, domain.sentences, domain.dropped_empty),
            (121, 120, 1)
        );
        assert_eq!(domain.dropped_duplicates, 0);
    }
    let sites: Vec<usize> = report.domains.iter().map(|d| d.sites).collect();
    assert_eq!(sites, [3, 3, 2]);
    for site in &report.sites {
        assert!(site.name.starts_with(&format!("{}-", site.domain)));
        // 120 / 3 = 40 (8 held out), 120 / 2 = 60 (12 held out).
        let expected = if site.domain == "amazon" {
            (48, 12)
        } else {
            (32, 8)
        };
        assert_eq!((site.train, site.test), expected, "{}", site.name);
    }

    for domain in sentiment::DOMAINS {
        let mut written = Vec::new();
        for site in report.sites.iter().filter(|s| s.domain == domain) {
            let site_dir = out.join(&site.name);
            let mut files: Vec<String> = std::fs::read_dir(&site_dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            files.sort();
            assert_eq!(files, [TEST_JSONL_FILE, TOKEN_FILE, TRAIN_JSONL_FILE]);
            let train = read_jsonl(&site_dir.join(TRAIN_JSONL_FILE));
            let test = read_jsonl(&site_dir.join(TEST_JSONL_FILE));
            assert_eq!((train.len(), test.len()), (site.train, site.test));
            let positives = |lines: &[(String, u8)]| lines.iter().filter(|(_, l)| *l == 1).count();
            assert_eq!(positives(&train), site.train_positive);
            assert_eq!(positives(&test), site.test_positive);
            let train_texts: BTreeSet<&str> = train.iter().map(|(t, _)| t.as_str()).collect();
            assert!(
                test.iter().all(|(t, _)| !train_texts.contains(t.as_str())),
                "{}: train and test overlap",
                site.name
            );
            written.extend(train);
            written.extend(test);
        }
        // Every usable sentence of the domain, text byte for byte with its
        // label, in exactly one site's exactly one split.
        let mut expected = fixture_sentences(domain);
        assert_eq!(expected.len(), 120);
        written.sort();
        expected.sort();
        assert_eq!(written, expected, "{domain}");
    }
}

#[test]
fn the_same_seed_gives_the_same_sentiment_sites_and_another_seed_others() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, seed: u64| {
        let out = dir.path().join(name);
        prepare_sentiment(&SentimentOptions {
            seed,
            ..sentiment_options(&sentiment_fixture(), &out)
        })
        .unwrap();
        out
    };
    let (a, b, c) = (run("a", 5), run("b", 5), run("c", 6));
    let read =
        |out: &Path, file: &str| std::fs::read_to_string(out.join("yelp-2").join(file)).unwrap();
    assert_eq!(read(&a, TRAIN_JSONL_FILE), read(&b, TRAIN_JSONL_FILE));
    assert_eq!(read(&a, TEST_JSONL_FILE), read(&b, TEST_JSONL_FILE));
    assert_ne!(read(&a, TOKEN_FILE), read(&b, TOKEN_FILE));
    assert_ne!(read(&a, TRAIN_JSONL_FILE), read(&c, TRAIN_JSONL_FILE));
}

#[test]
fn one_writer_for_both_sources_force_replaces_a_shakespeare_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("federated");
    let plays = prepare_federated(&options(&out)).unwrap();
    let err = prepare_sentiment(&sentiment_options(&sentiment_fixture(), &out)).unwrap_err();
    assert!(
        matches!(err, FederatedDataError::OutputNotEmpty(_)),
        "{err}"
    );
    prepare_sentiment(&SentimentOptions {
        force: true,
        ..sentiment_options(&sentiment_fixture(), &out)
    })
    .unwrap();
    assert!(!out.join(&plays.clients[0].name).exists());
    assert_eq!(check_enrollment(&out).len(), 8);
    // And back.
    prepare_federated(&FederatedOptions {
        force: true,
        ..options(&out)
    })
    .unwrap();
    assert!(!out.join("imdb-1").exists());
}

/// A copy of the fixture in which `domain.json` holds `json`.
fn broken_fixture(root: &Path, domain: &str, json: Option<&str>) -> PathBuf {
    let dir = root.join(format!("broken-{domain}"));
    std::fs::create_dir_all(&dir).unwrap();
    for name in sentiment::DOMAINS {
        let file = format!("{name}.json");
        std::fs::copy(sentiment_fixture().join(&file), dir.join(&file)).unwrap();
    }
    match json {
        Some(json) => std::fs::write(dir.join(format!("{domain}.json")), json).unwrap(),
        None => std::fs::remove_file(dir.join(format!("{domain}.json"))).unwrap(),
    }
    dir
}

#[test]
fn malformed_sentiment_input_is_refused_with_a_clear_error_and_nothing_written() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("out");
    let prepare = |dir: &Path| {
        prepare_sentiment(&sentiment_options(dir, &out))
            .unwrap_err()
            .to_string()
    };

    let err = prepare(&root.path().join("nowhere"));
    assert!(
        err.contains("nowhere/imdb.json does not exist") && err.contains("bootstrap.sh --corpus"),
        "{err}"
    );
    let err = prepare(&broken_fixture(root.path(), "yelp", None));
    assert!(err.contains("yelp.json does not exist"), "{err}");

    let err = prepare(&broken_fixture(
        root.path(),
        "amazon",
        Some(r#"[{"text":"Works.","class":1},"#),
    ));
    assert!(
        err.contains("amazon.json is not a JSON array of {\"text\", \"class\"} records"),
        "{err}"
    );

    let err = prepare(&broken_fixture(
        root.path(),
        "imdb",
        Some(r#"[{"text":"Fine.","class":1},{"text":"Meh.","class":2}]"#),
    ));
    assert!(
        err.contains("imdb.json: record 1 (counting from 0): \"class\" must be 0 or 1, got 2"),
        "{err}"
    );

    // 29 usable sentences for yelp's three sites (10 each needed).
    let records: Vec<String> = (0..29)
        .map(|i| format!(r#"{{"text":"Sentence {i}.","class":{}}}"#, i % 2))
        .chain([r#"{"text":"","class":null}"#.to_owned()])
        .collect();
    let small = broken_fixture(
        root.path(),
        "yelp",
        Some(&format!("[{}]", records.join(","))),
    );
    let err = prepare(&small);
    assert!(
        err.contains("the yelp domain has 29 usable sentences, but its 3 sites need at least 30"),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written for refused input");
    // Six sites (two per domain) fit.
    prepare_sentiment(&SentimentOptions {
        clients: 6,
        ..sentiment_options(&small, &out)
    })
    .unwrap();
}

fn coordinator() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cohort-coordinator"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("COHORT_") {
            command.env_remove(name);
        }
    }
    command.arg("prepare-federated").env("RUST_LOG", "warn");
    command
}

#[test]
fn the_cli_prepares_sentiment_sites_from_the_flag_or_its_variable() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sentiment");
    let output = coordinator()
        .arg("--sentiment")
        .arg(sentiment_fixture())
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("site") && lines[0].ends_with("positive test"));
    assert!(
        lines[1].starts_with("imdb-1  ") && lines[1].contains("  32  "),
        "{stdout}"
    );
    assert_eq!(lines.len(), 1 + 8 + 3 + 1, "{stdout}");
    assert!(
        lines[9].starts_with("imdb: 121 records, 120 sentences used by 3 sites (1 empty"),
        "{stdout}"
    );
    assert_eq!(lines[12], "8 sites from 3 domains");

    // The variable, and a test fraction of its own.
    let output = coordinator()
        .env("COHORT_FEDERATED_SENTIMENT", sentiment_fixture())
        .env("COHORT_FEDERATED_OUT", dir.path().join("by-env"))
        .args(["--clients", "3", "--test-fraction", "0.5"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        read_jsonl(&dir.path().join("by-env/amazon-1").join(TEST_JSONL_FILE)).len(),
        60
    );

    // One source at a time, and --min-chars belongs to the plays.
    for args in [
        vec!["--sentiment", "x", "--plays", "y", "--out", "z"],
        vec!["--sentiment", "x", "--min-chars", "5", "--out", "z"],
        vec!["--out", "z"],
    ] {
        let output = coordinator().args(&args).output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("cannot be used with") || stderr.contains("required"),
            "{args:?}: {stderr}"
        );
    }
}
