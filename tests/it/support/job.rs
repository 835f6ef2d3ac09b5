//! One test's source and target databases and state directory, and how to run kuaka on them.

use std::process::Command;

use super::postgres::{query_rows, replication_slot_count};
use super::{RunOutput, assert_same_data, assert_same_schema, fixture, kuaka, pg, psql_file, run};

/// One test's source and target databases and its own state dir.
pub struct Job {
    pub source_db: String,
    pub target_db: String,
    pub source: String,
    pub target: String,
    pub state: tempfile::TempDir,
}

impl Job {
    /// Fresh `<name>_src` and `<name>_dst` databases; `load` fills the source.
    pub fn new(name: &str, load: impl FnOnce(&str)) -> Job {
        let source_db = format!("{name}_src");
        let target_db = format!("{name}_dst");
        let source = pg().create_db(&source_db);
        let target = pg().create_db(&target_db);
        load(&source);
        let state = tempfile::Builder::new()
            .prefix("kuaka-it-state-")
            .tempdir()
            .expect("state");
        Job {
            source_db,
            target_db,
            source,
            target,
            state,
        }
    }

    /// A job between databases made elsewhere (e.g. on a private server).
    pub fn between(source_db: &str, source: String, target_db: &str, target: String) -> Job {
        Job {
            source_db: source_db.to_owned(),
            target_db: target_db.to_owned(),
            source,
            target,
            state: tempfile::Builder::new()
                .prefix("kuaka-it-state-")
                .tempdir()
                .expect("state"),
        }
    }

    pub fn with_fixture(name: &str, fixture_name: &str) -> Job {
        Job::new(name, |url| psql_file(url, &fixture(fixture_name)))
    }

    pub fn state_dir(&self) -> &str {
        self.state.path().to_str().expect("utf-8 temp path")
    }

    /// `kuaka run --source .. --target .. --state .. --snapshot-only <extra>`
    pub fn run_command(&self, extra: &[&str]) -> Command {
        let mut command = kuaka();
        command
            .args(["run", "--source", &self.source, "--target", &self.target])
            .args(["--state", self.state_dir(), "--snapshot-only"])
            .args(extra);
        command
    }

    /// `kuaka run` with change capture (no `--snapshot-only`).
    pub fn stream_command(&self, extra: &[&str]) -> Command {
        let mut command = kuaka();
        command
            .args(["run", "--source", &self.source, "--target", &self.target])
            .args(["--state", self.state_dir()])
            .args(extra);
        command
    }

    /// `kuaka run --until caught-up <extra>`: must succeed.
    pub fn sync(&self, extra: &[&str]) -> RunOutput {
        let output = run({
            let mut c = self.stream_command(&["--until", "caught-up"]);
            c.args(extra);
            c
        });
        output.assert_success();
        output
    }

    /// Start a streaming run in the background and wait until its target is consistent.
    pub fn stream_in_background(&self, extra: &[&str]) -> super::Background {
        let mut background = super::Background::spawn(self.stream_command(extra));
        super::wait_until(
            "the streaming run to reach the streaming phase",
            std::time::Duration::from_secs(120),
            || {
                assert!(
                    background.is_running(),
                    "kuaka exited early:\n{}",
                    background.stderr()
                );
                self.phase() == "streaming"
            },
        );
        background
    }

    /// The job's phase from `kuaka status --json` ("" before the job exists).
    pub fn phase(&self) -> String {
        let output = {
            let mut command = kuaka();
            command.args(["status", "--state", self.state_dir(), "--json"]);
            command.output().expect("kuaka status")
        };
        serde_json::from_slice::<serde_json::Value>(&output.stdout)
            .ok()
            .and_then(|v| v["phase"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// `kuaka clean`: the slot and publication are gone afterwards.
    pub fn clean(&self) {
        run({
            let mut command = kuaka();
            command.args(["clean", "--state", self.state_dir()]);
            command.args(["--source", &self.source, "--target", &self.target]);
            command
        })
        .assert_success();
        self.assert_no_slot_left();
        assert_eq!(
            query_rows(
                &self.source,
                "SELECT pubname FROM pg_publication WHERE pubname LIKE 'kuaka%'"
            )
            .len(),
            0,
            "kuaka clean left a publication on the source"
        );
    }

    pub fn run(&self, extra: &[&str]) -> RunOutput {
        run(self.run_command(extra))
    }

    pub fn run_with_failpoint(&self, failpoint: &str, extra: &[&str]) -> RunOutput {
        let mut command = self.run_command(extra);
        command.env("KUAKA_FAILPOINT", failpoint);
        run(command)
    }

    /// Same rows, same schema, and no replication slot left behind on the source.
    pub fn assert_migrated(&self) {
        assert_same_data(&self.source, &self.target);
        assert_same_schema(&self.source, &self.target);
        self.assert_no_slot_left();
    }

    pub fn assert_no_slot_left(&self) {
        assert_eq!(
            replication_slot_count(&self.source, &self.source_db),
            0,
            "a replication slot was left on the source after a snapshot-only run: {:?}",
            query_rows(
                &self.source,
                "SELECT slot_name, database, active FROM pg_replication_slots"
            )
        );
    }

    /// Total committed rows in the target's user tables (0 while nothing was copied yet).
    pub fn target_row_count(&self) -> i64 {
        super::total_rows(&self.target)
    }

    pub fn status_json(&self) -> serde_json::Value {
        let output = run({
            let mut command = kuaka();
            command.args(["status", "--state", self.state_dir(), "--json"]);
            command
        });
        output.assert_success();
        serde_json::from_str(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "kuaka status --json did not print JSON ({e}):\n{}",
                output.stdout
            )
        })
    }
}
