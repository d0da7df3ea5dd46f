//! Every flag of `cohort-coordinator` (all subcommands) has its `COHORT_*`
//! variable, and the table in deploy/README.md lists exactly those flags.

#[path = "support/cli_env_table.rs"]
mod cli_env_table;

#[test]
fn coordinator_flags_match_the_deploy_readme_table() {
    cli_env_table::assert_flags_match_readme(
        "cohort-coordinator",
        std::path::Path::new(env!("CARGO_BIN_EXE_cohort-coordinator")),
    );
}
