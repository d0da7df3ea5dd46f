//! `prepare-federated` on the committed Shakespeare fixture: the files each
//! client site gets, the enrollment the coordinator reads, determinism, and
//! the refusals that keep tokens from being clobbered.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use cohort_coordinator::federated_data::{
    prepare_federated, token_sha256, Enrollment, FederatedDataError, FederatedOptions,
    ENROLLMENT_FILE, TEST_FILE, TOKEN_FILE, TRAIN_FILE,
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
