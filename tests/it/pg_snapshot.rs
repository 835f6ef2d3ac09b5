//! PostgreSQL to PostgreSQL snapshot (`kuaka run --snapshot-only`): the copy must match the
//! source under independent checks (per-table checksums, catalog comparison), survive crashes at
//! every failpoint and from outside, and fail clearly.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::job::Job;
use crate::support::postgres::{PASSWORD_ROLE_PASSWORD, PgServer, query_rows};
use crate::support::{
    Background, assert_same_data, assert_same_schema, fixture, free_port, kuaka, pg,
    pg_table_checksums, psql, psql_file, query_one, run, spawn_until_rows_arrive, wait_until,
};

fn pagila_dir() -> std::path::PathBuf {
    crate::support::dataset_dir("pagila", "pagila-schema.sql")
}

/// Gunzip a file into a temp file (the `gzip` binary; no extra dev-dependency).
fn gunzip(path: &Path) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    let status = Command::new("gzip")
        .args(["-dc"])
        .arg(path)
        .stdout(file.reopen().expect("reopen temp file"))
        .status()
        .expect("run gzip");
    assert!(status.success(), "gzip -dc {} failed", path.display());
    file
}

fn lines(url: &str, sql: &str) -> Vec<String> {
    query_rows(url, sql)
        .into_iter()
        .map(|row| row.join("|"))
        .collect()
}

#[test]
fn pagila_pg_to_pg() {
    let job = Job::new("pagila", |url| {
        psql_file(url, &pagila_dir().join("pagila-schema.sql"));
        let data = gunzip(&pagila_dir().join("pagila-data.sql.gz"));
        psql_file(url, data.path());
    });
    job.run(&["--jobs", "4"]).assert_success();

    assert_same_data(&job.source, &job.target);
    job.assert_no_slot_left();

    let sequences = "SELECT schemaname, sequencename, last_value FROM pg_sequences \
                     WHERE schemaname <> 'kuaka' ORDER BY 1, 2";
    let source_sequences = lines(&job.source, sequences);
    assert!(
        source_sequences.len() >= 10,
        "pagila has sequences: {source_sequences:?}"
    );
    assert_eq!(
        source_sequences,
        lines(&job.target, sequences),
        "sequence values differ"
    );

    let partitions = "SELECT c.relname, c.relkind, pg_get_expr(c.relpartbound, c.oid) \
                      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                      WHERE n.nspname = 'public' AND (c.relname = 'payment' OR c.oid IN \
                        (SELECT inhrelid FROM pg_inherits WHERE inhparent = 'public.payment'::regclass)) \
                      ORDER BY 1";
    let target_partitions = lines(&job.target, partitions);
    assert!(
        target_partitions
            .iter()
            .any(|line| line.starts_with("payment|p|")),
        "payment is not a partitioned table on the target: {target_partitions:?}"
    );
    assert_eq!(
        lines(&job.source, partitions),
        target_partitions,
        "payment partitions differ"
    );

    let triggers = "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid \
                    JOIN pg_namespace n ON n.oid = c.relnamespace \
                    WHERE NOT t.tgisinternal AND n.nspname <> 'kuaka'";
    let source_triggers = query_one(&job.source, triggers);
    assert_ne!(source_triggers, "0", "pagila has triggers");
    assert_eq!(
        source_triggers,
        query_one(&job.target, triggers),
        "trigger count differs"
    );

    let status = job.status_json();
    let status_text = status.to_string();
    assert!(
        status_text.contains("payment") || status_text.contains("actor"),
        "kuaka status --json does not mention the tables: {status_text}"
    );

    // Last, because its report is the longest.
    assert_same_schema(&job.source, &job.target);
}

#[test]
fn type_matrix() {
    let job = Job::with_fixture("type_matrix", "type_matrix.sql");
    assert_eq!(
        query_one(&job.source, "SELECT count(*) FROM type_matrix"),
        "10"
    );
    job.run(&["--chunk-rows", "2", "--jobs", "2"])
        .assert_success();
    job.assert_migrated();
    crate::verify::assert_verified(job.state.path());
}

// ---- crash tests -------------------------------------------------------------------------

const CRASH_ARGS: &[&str] = &["--chunk-rows", "1000", "--jobs", "2"];

/// Run with each failpoint in turn (each run must SIGKILL itself), then once more without:
/// that run must finish and leave the same data as the source.
fn crash_and_resume(name: &str, failpoints: &[&str]) {
    let job = Job::with_fixture(name, "crash_source.sql");
    for failpoint in failpoints {
        job.run_with_failpoint(failpoint, CRASH_ARGS)
            .assert_killed_by_sigkill();
    }
    job.run(CRASH_ARGS).assert_success();
    job.assert_migrated();
}

/// The crash tests' source copied without any crash: separates copy bugs from resume bugs.
#[test]
fn crash_source_without_crash() {
    crash_and_resume("crash_none", &[]);
}

/// Chunk ranges over a two-column or a non-integer primary key must neither overlap nor leave
/// gaps: rows with the same first column spread over several chunks, and key values whose text
/// order differs from their order (`'10' < '9'`, `'-1' < '-2'`).
#[test]
fn composite_primary_key_chunks() {
    let job = Job::new("composite_pk", |url| {
        psql(
            url,
            "CREATE TABLE pairs (a bigint NOT NULL, b date NOT NULL, v text, PRIMARY KEY (a, b)); \
             INSERT INTO pairs SELECT i / 3, date '2023-01-01' + i % 3, md5(i::text) \
             FROM generate_series(1, 15000) i; \
             CREATE TABLE numeric_key (id numeric PRIMARY KEY, v text); \
             INSERT INTO numeric_key SELECT i - 5000, md5(i::text) \
             FROM generate_series(1, 15000) i; \
             CREATE TABLE pairs_desc (a text, b integer, PRIMARY KEY (b, a)); \
             INSERT INTO pairs_desc SELECT 'k' || (i % 3), i FROM generate_series(1, 5000) i;",
        );
    });
    job.run(&["--chunk-rows", "1000", "--jobs", "2"])
        .assert_success();
    job.assert_migrated();
}

#[test]
fn crash_at_snapshot_after_schema() {
    crash_and_resume("crash_after_schema", &["snapshot.after_schema"]);
}

#[test]
fn crash_at_snapshot_chunk_before_commit() {
    crash_and_resume(
        "crash_chunk_before_commit",
        &["snapshot.chunk.before_commit:5"],
    );
}

#[test]
fn crash_at_snapshot_chunk_after_commit() {
    // The chunk is committed on the target but not recorded: the rerun must not duplicate it
    // (events_log has no primary key, so a duplicate would show in the checksum).
    crash_and_resume(
        "crash_chunk_after_commit",
        &["snapshot.chunk.after_commit:5"],
    );
}

#[test]
fn crash_at_snapshot_chunk_after_commit_first_chunk() {
    crash_and_resume(
        "crash_chunk_after_commit_1",
        &["snapshot.chunk.after_commit"],
    );
}

#[test]
fn crash_at_snapshot_before_post_data() {
    crash_and_resume("crash_before_post_data", &["snapshot.before_post_data"]);
}

#[test]
fn crash_at_snapshot_post_data_after_step() {
    crash_and_resume(
        "crash_post_data_after_step",
        &["snapshot.post_data.after_step:2"],
    );
}

#[test]
fn crash_twice_then_finish() {
    crash_and_resume(
        "crash_twice",
        &[
            "snapshot.chunk.after_commit:3",
            "snapshot.post_data.after_step:2",
        ],
    );
}

#[test]
fn crash_twice_in_chunks_then_finish() {
    crash_and_resume(
        "crash_twice_chunks",
        &[
            "snapshot.chunk.before_commit:4",
            "snapshot.chunk.after_commit:6",
        ],
    );
}

#[test]
fn crash_by_external_sigkill() {
    let job = Job::with_fixture("crash_external", "crash_source.sql");
    // 55k rows at 20k rows/s: about 3 s of copying, long enough to be killed in the middle.
    let mut args = CRASH_ARGS.to_vec();
    args.extend(["--max-rows-per-sec", "20000"]);
    let background = spawn_until_rows_arrive(job.run_command(&args), &job.target);
    let killed = background.kill();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&killed.status),
        Some(9),
        "kuaka finished before the kill; --max-rows-per-sec did not slow it down enough"
    );
    let copied_before_kill = job.target_row_count();
    eprintln!("rows on the target when killed: about {copied_before_kill}");
    job.run(CRASH_ARGS).assert_success();
    job.assert_migrated();
}

/// SIGTERM (and SIGINT) stop at a checkpoint: exit 130 with a message saying how to resume,
/// and the rerun finishes with exactly the source's data.
#[test]
fn sigterm_stops_cleanly_and_resumes() {
    let job = Job::with_fixture("sigterm", "crash_source.sql");
    let mut args = CRASH_ARGS.to_vec();
    args.extend(["--max-rows-per-sec", "20000"]);
    let background = spawn_until_rows_arrive(job.run_command(&args), &job.target);
    let status = Command::new("kill")
        .args(["-TERM", &background.pid().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(status.success());
    let stopped = background.wait(Duration::from_secs(30));
    assert_eq!(stopped.status.code(), Some(130), "{}", stopped.all_output());
    assert!(
        stopped
            .stderr
            .contains("run the same command again to resume"),
        "{}",
        stopped.stderr
    );
    let status = job.status_json();
    assert_eq!(status["phase"], "copying", "{status}");
    job.run(CRASH_ARGS).assert_success();
    job.assert_migrated();
}

/// Extension types: the target gets CREATE EXTENSION, citext/hstore columns copy in text
/// format, a citext primary key is split into chunks, and a trigram index is rebuilt.
#[test]
fn extension_types() {
    let job = Job::with_fixture("extension_types", "extensions.sql");
    job.run(&["--chunk-rows", "500", "--jobs", "2"])
        .assert_success();
    job.assert_migrated();
    let chunks = job.status_json()["tables"][0]["chunks_total"]
        .as_i64()
        .unwrap_or(0);
    assert!(
        chunks > 1,
        "the citext key should have been split, got {chunks} chunks"
    );
    assert_eq!(
        query_one(
            &job.target,
            "SELECT count(*) FROM pg_extension WHERE extname IN ('citext', 'hstore', 'pg_trgm')"
        ),
        "3"
    );
}

/// The connection holding the exported snapshot dies mid-copy: kuaka exports a new snapshot and
/// carries on from the target's chunk markers, within the same run.
#[test]
fn lost_snapshot_connection_is_renewed() {
    let job = Job::with_fixture("lost_snapshot", "crash_source.sql");
    let mut args = CRASH_ARGS.to_vec();
    args.extend(["--max-rows-per-sec", "20000"]);
    let background = spawn_until_rows_arrive(job.run_command(&args), &job.target);
    let terminated = query_one(
        &job.source,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = 'kuaka snapshot coordinator' AND datname = current_database()",
    );
    assert_eq!(
        terminated, "1",
        "the coordinator connection should have been found"
    );
    let finished = background.wait(Duration::from_secs(60));
    finished.assert_success();
    assert!(
        finished.stderr.contains("continuing with a new snapshot"),
        "{}",
        finished.stderr
    );
    job.assert_migrated();
}

/// The source restarts in the middle of the copy: workers reconnect, the snapshot is renewed,
/// and the run finishes with the source's data without a rerun.
#[test]
fn source_restart_during_the_copy() {
    let source_server = PgServer::start_private();
    let source = source_server.create_db("source_restart_src");
    psql_file(&source, &fixture("crash_source.sql"));
    let target = pg().create_db("source_restart_dst");
    let state = tempfile::tempdir().expect("state");
    let mut command = kuaka();
    command
        .args([
            "run",
            "--snapshot-only",
            "--source",
            &source,
            "--target",
            &target,
        ])
        .arg("--state")
        .arg(state.path())
        .args([
            "--chunk-rows",
            "1000",
            "--jobs",
            "2",
            "--max-rows-per-sec",
            "15000",
        ]);
    let background = spawn_until_rows_arrive(command, &target);
    source_server.restart();
    let finished = background.wait(Duration::from_secs(120));
    finished.assert_success();
    assert!(
        finished.stderr.contains("continuing with a new snapshot"),
        "{}",
        finished.stderr
    );
    assert_same_data(&source, &target);
    assert_same_schema(&source, &target);
}

/// A hot standby as the source (it spares the primary): the snapshot is exported on the standby
/// and the copy equals the primary's data.
#[test]
fn hot_standby_as_source() {
    let job = Job::with_fixture("standby", "crash_source.sql");
    let standby_port = pg().start_standby();
    let standby_source = job
        .source
        .replace(&format!(":{}/", pg().port), &format!(":{standby_port}/"));
    assert_eq!(
        query_one(&standby_source, "SELECT pg_is_in_recovery()"),
        "t"
    );
    let state = tempfile::tempdir().expect("state");
    let mut command = kuaka();
    command
        .args([
            "run",
            "--snapshot-only",
            "--source",
            &standby_source,
            "--target",
            &job.target,
        ])
        .arg("--state")
        .arg(state.path())
        .args(["--chunk-rows", "5000", "--jobs", "2"]);
    run(command).assert_success();
    assert_same_data(&job.source, &job.target);
    assert_same_schema(&job.source, &job.target);
}

/// Objects kuaka does not recreate are named up front, by kind, with what to do.
#[test]
fn objects_not_copied_are_reported() {
    let job = Job::new("not_copied", |url| {
        psql(
            url,
            "CREATE TABLE t (a int PRIMARY KEY, b int); \
             CREATE STATISTICS t_ab ON a, b FROM t; \
             CREATE FUNCTION lt(int, int) RETURNS boolean LANGUAGE sql AS 'SELECT $1 < $2'; \
             CREATE OPERATOR <<< (LEFTARG = int, RIGHTARG = int, FUNCTION = lt); \
             CREATE POLICY p ON t USING (a > 0);",
        );
    });
    let output = job.run(&[]);
    output.assert_success();
    let all = output.all_output();
    for expected in [
        "extended statistics public.t_ab is not copied",
        "operator public.<<< is not copied",
        "row-level security policy \"p\" on public.t is not copied",
    ] {
        assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
    }
    assert_same_data(&job.source, &job.target);
}

/// The target restarts in the middle of the copy: workers reconnect, ask the target which chunks
/// committed, copy the rest, and the run finishes without a rerun.
#[test]
fn target_restart_during_the_copy() {
    let target_server = PgServer::start_private();
    let source = pg().create_db("target_restart_src");
    psql_file(&source, &fixture("crash_source.sql"));
    let target = target_server.create_db("target_restart_dst");
    let state = tempfile::tempdir().expect("state");
    let mut command = kuaka();
    command
        .args([
            "run",
            "--snapshot-only",
            "--source",
            &source,
            "--target",
            &target,
        ])
        .arg("--state")
        .arg(state.path())
        .args([
            "--chunk-rows",
            "1000",
            "--jobs",
            "2",
            "--max-rows-per-sec",
            "15000",
        ]);
    let background = spawn_until_rows_arrive(command, &target);
    target_server.restart();
    let finished = background.wait(Duration::from_secs(120));
    finished.assert_success();
    assert!(
        finished.stderr.contains("retrying"),
        "the restart should have interrupted a chunk:\n{}",
        finished.stderr
    );
    assert_same_data(&source, &target);
    assert_same_schema(&source, &target);
}

// ---- edge tables ---------------------------------------------------------------------------

#[test]
fn edge_tables() {
    let job = Job::with_fixture("edge_tables", "edge_tables.sql");
    let output = job.run(&["--chunk-rows", "7", "--jobs", "2"]);
    output.assert_success();
    job.assert_migrated();
    let all_output = output.all_output();
    let warned = all_output.lines().any(|line| {
        let lower = line.to_lowercase();
        line.contains("no_pk_table") && (lower.contains("primary key") || lower.contains("warn"))
    });
    assert!(
        warned,
        "no warning about no_pk_table having no primary key in:\n{all_output}"
    );
    let body_length = query_one(
        &job.target,
        "SELECT length(body) FROM wide_value WHERE id = 1",
    );
    assert_eq!(body_length, (5 * 1024 * 1024).to_string());
    let columns = query_one(
        &job.target,
        "SELECT count(*) FROM information_schema.columns WHERE table_name = 'wide_200'",
    );
    assert_eq!(columns, "200");
}

// ---- errors --------------------------------------------------------------------------------

#[test]
fn errors_are_clear_unreachable_source() {
    let target = pg().create_db("unreachable_dst");
    let port = free_port();
    let state = tempfile::tempdir().expect("state");
    let source = format!("postgres://postgres:Hunter2-secret@127.0.0.1:{port}/nowhere");
    let output = run({
        let mut command = kuaka();
        command
            .args([
                "run",
                "--source",
                &source,
                "--target",
                &target,
                "--snapshot-only",
            ])
            .arg("--state")
            .arg(state.path());
        command
    });
    output.assert_exit_code(2);
    let all_output = output.all_output();
    assert!(
        all_output.contains(&format!("127.0.0.1:{port}")),
        "the error does not name the source endpoint 127.0.0.1:{port}:\n{all_output}"
    );
    assert!(
        !all_output.contains("Hunter2-secret"),
        "the password leaked:\n{all_output}"
    );
}

#[test]
fn errors_are_clear_wrong_password() {
    let source_db = "bad_password_src";
    pg().create_db(source_db);
    let target = pg().create_db("bad_password_dst");
    let state = tempfile::tempdir().expect("state");
    // The password is the word "wrong": it must appear nowhere in the output.
    let wrong_password = "wrong";
    let source = pg().url_with_password(source_db, wrong_password);
    let output = run({
        let mut command = kuaka();
        command
            .args([
                "run",
                "--source",
                &source,
                "--target",
                &target,
                "--snapshot-only",
            ])
            .arg("--state")
            .arg(state.path());
        command
    });
    output.assert_exit_code(2);
    let all_output = output.all_output();
    assert!(
        !all_output.contains(wrong_password),
        "the password leaked:\n{all_output}"
    );
    assert!(
        all_output.to_lowercase().contains("authentication"),
        "the error does not mention authentication:\n{all_output}"
    );
}

#[test]
fn errors_are_clear_target_not_empty() {
    let job = Job::new("target_not_empty", |url| {
        psql(
            url,
            "CREATE TABLE t_conflict (id integer PRIMARY KEY, v text); \
             INSERT INTO t_conflict SELECT i, 'source ' || i FROM generate_series(1, 100) i; \
             CREATE TABLE t_other (id integer PRIMARY KEY); \
             INSERT INTO t_other SELECT generate_series(1, 10);",
        );
    });
    psql(
        &job.target,
        "CREATE TABLE t_conflict (id integer PRIMARY KEY, v text); \
         INSERT INTO t_conflict VALUES (1, 'target 1'), (2, 'target 2'), (3, 'target 3');",
    );
    let before = pg_table_checksums(&job.target);

    let output = job.run(&[]);
    output.assert_exit_code(2);
    let all_output = output.all_output();
    assert!(
        all_output.contains("t_conflict"),
        "the error does not name the table:\n{all_output}"
    );
    assert!(
        all_output.contains("--target-exists"),
        "the error does not mention --target-exists:\n{all_output}"
    );
    let after = pg_table_checksums(&job.target);
    assert_eq!(
        before.get("public.t_conflict"),
        after.get("public.t_conflict"),
        "the refused run changed the target table"
    );

    let state = tempfile::tempdir().expect("state");
    let output = run({
        let mut command = kuaka();
        command
            .args([
                "run",
                "--source",
                &job.source,
                "--target",
                &job.target,
                "--snapshot-only",
            ])
            .arg("--state")
            .arg(state.path())
            .args(["--target-exists", "drop"]);
        command
    });
    output.assert_success();
    job.assert_migrated();
}

#[test]
fn errors_are_clear_password_from_env() {
    let job = Job::new("password_env", |url| {
        psql(
            url,
            "CREATE TABLE secrets_ok (id integer PRIMARY KEY, v text); \
             INSERT INTO secrets_ok SELECT i, md5(i::text) FROM generate_series(1, 500) i;",
        );
    });
    let source = format!(
        "postgres://kuaka_pw@127.0.0.1:{}/{}",
        pg().port,
        job.source_db
    );
    let output = run({
        let mut command = kuaka();
        command
            .args([
                "run",
                "--source",
                &source,
                "--target",
                &job.target,
                "--snapshot-only",
            ])
            .args(["--state", job.state_dir()])
            .args(["--source-password-env", "KUAKA_IT_SOURCE_PASSWORD"])
            .env("KUAKA_IT_SOURCE_PASSWORD", PASSWORD_ROLE_PASSWORD);
        command
    });
    output.assert_success();
    assert!(
        !output.all_output().contains(PASSWORD_ROLE_PASSWORD),
        "the password from the environment was printed"
    );
    job.assert_migrated();
}

#[test]
fn errors_are_clear_concurrent_run_refused() {
    let job = Job::new("concurrent_run", |url| {
        psql(
            url,
            "CREATE TABLE slow (id integer PRIMARY KEY, v text); \
             INSERT INTO slow SELECT i, md5(i::text) FROM generate_series(1, 3000) i;",
        );
    });
    let args = ["--chunk-rows", "100", "--max-rows-per-sec", "200"];
    let mut first = Background::spawn(job.run_command(&args));
    wait_until(
        "the first run to create its state dir",
        Duration::from_secs(30),
        || {
            assert!(
                first.is_running(),
                "the first run exited early:\n{}",
                first.stderr()
            );
            std::fs::read_dir(job.state.path()).is_ok_and(|mut entries| entries.next().is_some())
        },
    );
    let second = job.run(&args);
    assert!(
        first.is_running(),
        "the first run ended while the second one ran"
    );
    second.assert_exit_code(2);
    let message = second.all_output().to_lowercase();
    assert!(
        ["lock", "in use", "another", "already running"]
            .iter()
            .any(|word| message.contains(word)),
        "the refusal does not say the state dir is locked or in use:\n{message}"
    );
    first.kill();
}

// ---- plan ----------------------------------------------------------------------------------

#[test]
fn plan_touches_nothing() {
    let job = Job::with_fixture("plan_only", "crash_source.sql");
    let source_checksums = pg_table_checksums(&job.source);
    let output = run({
        let mut command = kuaka();
        command.args(["plan", "--source", &job.source, "--target", &job.target]);
        command
    });
    output.assert_success();
    assert!(
        output.stdout.contains("CREATE TABLE"),
        "plan prints no CREATE TABLE"
    );
    for table in [
        "accounts",
        "orders",
        "events_log",
        "measurements",
        "measurements_2024",
    ] {
        assert!(
            output.stdout.contains(table),
            "plan does not mention {table}"
        );
    }
    let target_objects = query_one(
        &job.target,
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') \
           AND n.nspname !~ '^pg_toast'",
    );
    assert_eq!(target_objects, "0", "plan created relations on the target");
    let target_schemas = lines(
        &job.target,
        "SELECT nspname FROM pg_namespace WHERE nspname NOT IN ('pg_catalog', \
         'information_schema', 'public') AND nspname !~ '^pg_'",
    );
    assert!(
        target_schemas.is_empty(),
        "plan created schemas on the target: {target_schemas:?}"
    );
    assert_eq!(
        source_checksums,
        pg_table_checksums(&job.source),
        "plan changed the source"
    );
    job.assert_no_slot_left();
}

/// The independent checks themselves: they must notice a missing row, a changed value and a
/// schema difference, or every test above proves nothing.
#[test]
fn independent_checks_catch_differences() {
    let source = pg().create_db("checks_src");
    let target = pg().create_db("checks_dst");
    let setup = "CREATE TABLE t (id integer PRIMARY KEY, v text); \
                 INSERT INTO t SELECT i, 'v' || i FROM generate_series(1, 10) i; \
                 CREATE SEQUENCE s; SELECT setval('s', 5);";
    psql(&source, setup);
    psql(&target, setup);
    assert_same_data(&source, &target);
    assert_same_schema(&source, &target);

    psql(&target, "UPDATE t SET v = 'changed' WHERE id = 3");
    let message = panic_message(|| assert_same_data(&source, &target));
    assert!(
        message.contains("public.t") && message.contains("different contents"),
        "{message}"
    );

    psql(
        &target,
        "UPDATE t SET v = 'v3' WHERE id = 3; DELETE FROM t WHERE id = 4",
    );
    let message = panic_message(|| assert_same_data(&source, &target));
    assert!(
        message.contains("10 rows on source, 9 on target"),
        "{message}"
    );

    psql(
        &target,
        "INSERT INTO t VALUES (4, 'v4'); CREATE INDEX t_v ON t (v); SELECT setval('s', 6)",
    );
    assert_same_data(&source, &target);
    let message = panic_message(|| assert_same_schema(&source, &target));
    assert!(
        message.contains("only on target: CREATE INDEX t_v"),
        "{message}"
    );
    assert!(message.contains("last_value=6"), "{message}");

    // kuaka's own schema on the target is not compared.
    psql(
        &target,
        "DROP INDEX t_v; SELECT setval('s', 5); CREATE SCHEMA kuaka; \
                   CREATE TABLE kuaka.bookkeeping (x integer); INSERT INTO kuaka.bookkeeping VALUES (1)",
    );
    assert_same_data(&source, &target);
    assert_same_schema(&source, &target);
}

fn panic_message(f: impl FnOnce() + std::panic::UnwindSafe) -> String {
    let error = std::panic::catch_unwind(f).expect_err("the check should have failed");
    error
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| error.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default()
}

// ---- target orders text keys differently ---------------------------------------------------

/// Regression: redoing an interrupted chunk must not depend on how the target orders its key.
/// The source database sorts text with ICU (`a` < `B` < `c`), the target with C (`B` < `a` <
/// `c`), so the same key range selects different rows on each side; an earlier design deleted
/// the range on the target before a re-copy and would have removed rows of finished chunks.
#[test]
fn text_keys_with_a_different_target_collation_survive_a_crash() {
    let admin = pg().url("postgres");
    let source_db = "collation_src";
    psql(
        &admin,
        &format!("DROP DATABASE IF EXISTS {source_db} WITH (FORCE)"),
    );
    psql(
        &admin,
        &format!(
            "CREATE DATABASE {source_db} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
        ),
    );
    let source = pg().url(source_db);
    psql(
        &source,
        "CREATE TABLE words (w text PRIMARY KEY, n int NOT NULL); \
         INSERT INTO words SELECT chr(65 + (i % 26)) || chr(97 + (i / 26 % 26)) || i, i \
           FROM generate_series(1, 6000) i; \
         INSERT INTO words SELECT lower(chr(65 + (i % 26))) || chr(65 + (i / 26 % 26)) || i, -i \
           FROM generate_series(1, 6000) i;",
    );
    assert_eq!(
        query_one(&source, "SELECT 'a' < 'B'"),
        "t",
        "the source must order case-insensitively for this test to mean anything"
    );
    let target = pg().create_db("collation_dst");
    assert_eq!(query_one(&target, "SELECT 'a' < 'B'"), "f");
    let state = tempfile::tempdir().expect("state");
    let command = |failpoint: Option<&str>| {
        let mut c = kuaka();
        c.args([
            "run",
            "--snapshot-only",
            "--source",
            &source,
            "--target",
            &target,
        ])
        .arg("--state")
        .arg(state.path())
        .args(["--chunk-rows", "1000", "--jobs", "2"]);
        if let Some(f) = failpoint {
            c.env("KUAKA_FAILPOINT", f);
        }
        c
    };
    let killed = run(command(Some("snapshot.chunk.after_commit:6")));
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&killed.status),
        Some(9),
        "{}",
        killed.all_output()
    );
    run(command(None)).assert_success();
    assert_same_data(&source, &target);
}
