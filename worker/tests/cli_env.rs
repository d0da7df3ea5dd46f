//! Every flag of `cohort-worker` (all subcommands) has its `COHORT_*`
//! variable, and the table in deploy/README.md lists exactly those flags.

// One parser for both binaries' tables; it lives with the coordinator's test.
#[path = "../../coordinator/tests/support/cli_env_table.rs"]
mod cli_env_table;

#[test]
fn worker_flags_match_the_deploy_readme_table() {
    cli_env_table::assert_flags_match_readme(
        "cohort-worker",
        std::path::Path::new(env!("CARGO_BIN_EXE_cohort-worker")),
    );
}
