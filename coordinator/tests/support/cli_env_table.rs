//! Shared by `coordinator/tests/cli_env.rs` and `worker/tests/cli_env.rs`:
//! the flags a binary's `--help` lists, with their `COHORT_*` variables and
//! defaults, must be exactly the rows of the table in `deploy/README.md`.
//!
//! The help side is read from the real binary, every subcommand included
//! (found from the `Commands:` list, so new ones are checked without editing
//! the tests). The table side is the Markdown table whose header starts with
//! `| Binary | Subcommands | Flag | Variable | Default |`. Subcommands may be
//! `all`; a flag that deliberately has no variable says `none`, with the
//! reason in the Notes column.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// `(subcommand, flag)`: the subcommand path ("" for the top level, "a b" for
/// nested ones) and the long flag with its dashes.
pub type FlagKey = (String, String);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlagInfo {
    /// The `COHORT_*` variable, or `None` when the flag has none.
    pub variable: Option<String>,
    /// The default as `--help` prints it, or `None`.
    pub default: Option<String>,
}

const TABLE_HEADER: &str = "| Binary | Subcommands | Flag | Variable | Default |";

/// Flags clap adds to every command; they have no variable on purpose.
const BUILT_IN_FLAGS: [&str; 2] = ["--help", "--version"];

fn help_text(binary: &Path, subcommand: &str) -> String {
    let mut command = Command::new(binary);
    command.args(subcommand.split_whitespace()).arg("--help");
    // Set variables would show up as `[env: NAME=value]`; keep the output stable.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("COHORT_") {
            command.env_remove(name);
        }
    }
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} {subcommand} --help: {e}", binary.display()));
    assert!(
        output.status.success(),
        "{} {subcommand} --help exited with {}:\n{}",
        binary.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("help is UTF-8")
}

/// The lines of the section that starts with `header` (e.g. "Options:"), up
/// to the next unindented line. Long help separates entries with blank lines.
fn section<'a>(help: &'a str, header: &str) -> Vec<&'a str> {
    help.lines()
        .skip_while(|line| line.trim_end() != header)
        .skip(1)
        .take_while(|line| line.trim().is_empty() || line.starts_with(' '))
        .filter(|line| !line.trim().is_empty())
        .collect()
}

fn subcommands(help: &str) -> Vec<String> {
    section(help, "Commands:")
        .iter()
        // Command names sit at two spaces; wrapped descriptions sit deeper.
        .filter(|line| line.starts_with("  ") && !line.starts_with("   "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

/// The long flag an option line starts with: `  -h, --help`, `      --job <JOB>`.
fn option_flag(line: &str) -> Option<String> {
    let indent = line.len() - line.trim_start().len();
    if !(2..=6).contains(&indent) {
        return None;
    }
    let mut rest = line.trim_start();
    if rest.starts_with('-') && !rest.starts_with("--") {
        // A short flag first: "-h, --help".
        rest = rest.split_once(", ").map_or("", |(_, long)| long);
    }
    let flag = rest.split([' ', '\t']).next()?;
    (flag.starts_with("--") && flag.len() > 2).then(|| flag.to_owned())
}

/// The text inside `[tag: ...]` in `text`, if any.
fn bracket_value<'a>(text: &'a str, tag: &str) -> Option<&'a str> {
    let start = text.find(&format!("[{tag}: "))? + tag.len() + 3;
    let end = text[start..].find(']')? + start;
    Some(&text[start..end])
}

fn options(help: &str) -> Vec<(String, FlagInfo)> {
    let mut entries: Vec<(String, String)> = Vec::new();
    for line in section(help, "Options:") {
        match option_flag(line) {
            Some(flag) => entries.push((flag, line.to_owned())),
            None => {
                if let Some((_, text)) = entries.last_mut() {
                    text.push(' ');
                    text.push_str(line.trim());
                }
            }
        }
    }
    entries
        .into_iter()
        .filter(|(flag, _)| !BUILT_IN_FLAGS.contains(&flag.as_str()))
        .map(|(flag, text)| {
            // `[env: NAME=]`, or `[env: NAME]` with hide_env_values.
            let variable = bracket_value(&text, "env")
                .map(|v| v.split('=').next().unwrap_or_default().to_owned());
            let default = bracket_value(&text, "default").map(str::to_owned);
            (flag, FlagInfo { variable, default })
        })
        .collect()
}

/// Every flag of `binary` and of all its subcommands, nested ones included.
pub fn flags_from_help(binary: &Path) -> BTreeMap<FlagKey, FlagInfo> {
    let mut flags = BTreeMap::new();
    let mut pending = vec![String::new()];
    while let Some(subcommand) = pending.pop() {
        let help = help_text(binary, &subcommand);
        for (flag, info) in options(&help) {
            flags.insert((subcommand.clone(), flag), info);
        }
        for child in subcommands(&help) {
            pending.push(format!("{subcommand} {child}").trim().to_owned());
        }
    }
    flags
}

/// The subcommand paths of `binary` ("" for the top level).
fn command_paths(help_flags: &BTreeMap<FlagKey, FlagInfo>) -> Vec<String> {
    let mut paths: Vec<String> = help_flags.keys().map(|(s, _)| s.clone()).collect();
    paths.dedup();
    paths
}

fn cell(text: &str) -> String {
    text.trim().trim_matches('`').trim().to_owned()
}

/// The rows of the README table for `binary_name`, `all` expanded to `all_paths`.
pub fn flags_from_table(
    readme: &str,
    binary_name: &str,
    all_paths: &[String],
) -> BTreeMap<FlagKey, FlagInfo> {
    let mut lines = readme.lines().skip_while(|l| !l.starts_with(TABLE_HEADER));
    assert!(
        lines.next().is_some(),
        "deploy/README.md has no table starting with {TABLE_HEADER:?}"
    );
    let mut rows = BTreeMap::new();
    for line in lines.skip(1).take_while(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.trim().trim_matches('|').split('|').collect();
        assert!(
            cells.len() >= 5,
            "a table row needs at least 5 cells: {line}"
        );
        if cell(cells[0]) != binary_name {
            continue;
        }
        let subcommand_cell = cell(cells[1]);
        let paths: Vec<String> = if subcommand_cell == "all" {
            all_paths.to_vec()
        } else {
            subcommand_cell.split(',').map(cell).collect()
        };
        let flag = cell(cells[2]);
        let variable = match cell(cells[3]) {
            v if v.starts_with("COHORT_") => Some(v),
            v if v == "none" => {
                let reason = cells.get(5).map_or(String::new(), |c| cell(c));
                assert!(
                    !reason.is_empty(),
                    "a flag without a variable needs the reason in the Notes column: {line}"
                );
                None
            }
            v => panic!("variable cell must be COHORT_* or none, not {v:?}: {line}"),
        };
        let default = match cell(cells[4]) {
            d if d.is_empty() || d == "-" => None,
            d => Some(d),
        };
        for path in paths {
            let key = (path, flag.clone());
            let info = FlagInfo {
                variable: variable.clone(),
                default: default.clone(),
            };
            assert!(
                rows.insert(key.clone(), info).is_none(),
                "{binary_name} {key:?} is listed twice in deploy/README.md"
            );
        }
    }
    rows
}

fn describe(key: &FlagKey, info: &FlagInfo) -> String {
    let (subcommand, flag) = key;
    format!(
        "{subcommand:?} {flag} variable={} default={}",
        info.variable.as_deref().unwrap_or("none"),
        info.default.as_deref().unwrap_or("-")
    )
}

/// Fails with a list of every difference between `binary`'s flags and the
/// README table's rows for `binary_name`, and for flags without a variable
/// that the table does not mark `none`.
pub fn assert_flags_match_readme(binary_name: &str, binary: &Path) {
    let readme_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/README.md");
    let readme = std::fs::read_to_string(&readme_path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", readme_path.display()));
    let help = flags_from_help(binary);
    assert!(!help.is_empty(), "{binary_name} --help lists no flags");
    let table = flags_from_table(&readme, binary_name, &command_paths(&help));

    let mut problems = Vec::new();
    for (key, info) in &help {
        match table.get(key) {
            None => problems.push(format!("missing from the table: {}", describe(key, info))),
            Some(row) if row != info => problems.push(format!(
                "differs: --help says {}, the table says {}",
                describe(key, info),
                describe(key, row)
            )),
            Some(_) => {}
        }
        if let Some(variable) = &info.variable {
            if !variable.starts_with("COHORT_") {
                problems.push(format!("not a COHORT_* variable: {}", describe(key, info)));
            }
        }
    }
    for (key, row) in &table {
        if !help.contains_key(key) {
            problems.push(format!("not a flag of the binary: {}", describe(key, row)));
        }
    }
    assert!(
        problems.is_empty(),
        "{binary_name}'s flags and the table in deploy/README.md have drifted apart:\n  {}",
        problems.join("\n  ")
    );
}
