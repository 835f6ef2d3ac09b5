//! More PostgreSQL to PostgreSQL snapshot tests: table selection, existing target tables
//! (`--target-exists truncate|drop`), JSON logs, secrets, one consistent instant under concurrent
//! writes, and the `status` and `plan` outputs.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::support::postgres::{
    PASSWORD_ROLE, PASSWORD_ROLE_PASSWORD, PG_BIN, pg_schema_snapshot, query_rows,
};
use crate::support::{
    Background, RunOutput, kuaka, pg, pg_table_checksums, psql, query_one, run, wait_until,
};

use crate::support::job::Job;

/// `kuaka status --state DIR [extra]`
fn status(state: &Path, extra: &[&str]) -> RunOutput {
    let mut command = kuaka();
    command.arg("status").arg("--state").arg(state).args(extra);
    run(command)
}

fn lines(url: &str, sql: &str) -> Vec<String> {
    query_rows(url, sql)
        .into_iter()
        .map(|row| row.join("|"))
        .collect()
}

/// `schema.name kind` of every table, partitioned table, view and materialized view outside the
/// system schemas and kuaka's own, sorted.
fn relations(url: &str) -> Vec<String> {
    let mut relations = lines(
        url,
        "SELECT format('%I.%I', n.nspname, c.relname) || ' ' || c.relkind::text \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('r', 'p', 'v', 'm') \
           AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'kuaka') \
           AND n.nspname !~ '^pg_'",
    );
    relations.sort();
    relations
}

/// `name type` of a table's columns in order.
fn columns(url: &str, schema: &str, table: &str) -> Vec<String> {
    lines(
        url,
        &format!(
            "SELECT a.attname || ' ' || format_type(a.atttypid, a.atttypmod) \
               || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END \
             FROM pg_attribute a WHERE a.attrelid = '{schema}.{table}'::regclass \
               AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"
        ),
    )
}

// ---- selection -----------------------------------------------------------------------------

#[test]
fn selection_tables_and_exclude() {
    let job = Job::with_fixture("more_selection", "selection_source.sql");
    let output = job.run(&[
        "--tables",
        "a.*",
        "--exclude",
        "skip_me",
        "--chunk-rows",
        "50",
        "--jobs",
        "2",
    ]);
    output.assert_success();

    let mut expected = vec![
        "a.parted p",
        "a.parted_low r",
        "a.t1 r",
        "a.t2 r",
        "a.v_t1 v",
        "c.parted_high r",
    ];
    expected.sort();
    assert_eq!(
        relations(&job.target),
        expected,
        "the target does not hold exactly the selected tables, their partitions and the view \
         over a.t1 (source: {:?})",
        relations(&job.source)
    );
    assert_eq!(
        query_one(
            &job.target,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'b'"
        ),
        "0",
        "schema b was created although none of its tables is selected"
    );
    assert_eq!(
        query_one(
            &job.target,
            "SELECT i.inhparent::regclass::text || ' ' || pg_get_expr(c.relpartbound, c.oid) \
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhrelid = 'c.parted_high'::regclass"
        ),
        "a.parted FOR VALUES FROM (100) TO (1000)",
        "c.parted_high is not a partition of a.parted on the target"
    );

    // The view over a.t1 was created and works; the one over skip_me was skipped with a warning.
    let view_rows =
        "SELECT count(*) || ' ' || md5(string_agg(id || v, ',' ORDER BY id)) FROM a.v_t1";
    assert_eq!(
        query_one(&job.source, view_rows),
        query_one(&job.target, view_rows)
    );
    let all_output = output.all_output();
    assert!(
        all_output
            .lines()
            .any(|line| line.contains("v_skip") && line.to_lowercase().contains("warn")),
        "no warning naming the skipped view a.v_skip in:\n{all_output}"
    );

    // Data of the copied tables equals the source; nothing else holds rows on the target.
    let copied = ["a.t1", "a.t2", "a.parted_low", "c.parted_high"];
    let source_checksums: BTreeMap<String, (i64, String)> = pg_table_checksums(&job.source)
        .into_iter()
        .filter(|(table, _)| copied.contains(&table.as_str()))
        .collect();
    assert_eq!(
        source_checksums.len(),
        copied.len(),
        "setup: {source_checksums:?}"
    );
    assert_eq!(pg_table_checksums(&job.target), source_checksums);
}

// ---- existing target tables ----------------------------------------------------------------

const ITEMS_SOURCE: &str = "CREATE TABLE items (id integer PRIMARY KEY, name text NOT NULL, qty integer); \
     CREATE INDEX items_qty_idx ON items (qty); \
     INSERT INTO items SELECT i, 'item ' || i, i % 17 FROM generate_series(1, 500) i; \
     CREATE TABLE other (id integer PRIMARY KEY, v text); \
     INSERT INTO other SELECT i, md5(i::text) FROM generate_series(1, 50) i;";

#[test]
fn target_exists_truncate_keeps_definitions() {
    let job = Job::new("more_truncate", |url| {
        psql(url, ITEMS_SOURCE);
    });
    psql(
        &job.target,
        "CREATE TABLE items (id integer PRIMARY KEY, name text NOT NULL, qty integer, note text); \
         CREATE INDEX items_qty_idx ON items (qty); \
         CREATE INDEX items_note_idx ON items (note); \
         INSERT INTO items VALUES (1, 'old 1', 0, 'old'), (2, 'old 2', 0, 'old'), \
           (100000, 'old 100000', 0, 'old');",
    );
    job.run(&[
        "--target-exists",
        "truncate",
        "--chunk-rows",
        "100",
        "--jobs",
        "2",
    ])
    .assert_success();

    assert_eq!(
        query_one(
            &job.target,
            "SELECT count(*) FROM items WHERE note IS NOT NULL OR name LIKE 'old%' OR id = 100000"
        ),
        "0",
        "rows the target held before the run survived --target-exists truncate"
    );
    let items = "SELECT count(*) || ' ' \
                 || md5(string_agg(format('%s|%s|%s', id, name, qty), E'\\n' ORDER BY id)) \
                 FROM items";
    assert_eq!(
        query_one(&job.source, items),
        query_one(&job.target, items),
        "items differs from the source"
    );
    let source_checksums = pg_table_checksums(&job.source);
    assert_eq!(
        source_checksums.get("public.other"),
        pg_table_checksums(&job.target).get("public.other"),
        "the table that did not exist on the target was not copied right"
    );
    assert_eq!(
        columns(&job.target, "public", "items"),
        [
            "id integer not null",
            "name text not null",
            "qty integer",
            "note text"
        ],
        "--target-exists truncate changed the target's table definition"
    );
    assert_eq!(
        query_one(
            &job.target,
            "SELECT string_agg(indexname, ',' ORDER BY indexname) FROM pg_indexes \
             WHERE schemaname = 'public' AND tablename = 'items'"
        ),
        "items_note_idx,items_pkey,items_qty_idx",
        "--target-exists truncate changed the target's indexes"
    );

    // A target table that lacks one of the source's columns: refused, nothing touched.
    let job = Job::new("more_truncate_missing", |url| {
        psql(url, ITEMS_SOURCE);
    });
    psql(
        &job.target,
        "CREATE TABLE items (id integer PRIMARY KEY, name text NOT NULL); \
         INSERT INTO items VALUES (1, 'old 1'), (2, 'old 2');",
    );
    let relations_before = relations(&job.target);
    let checksums_before = pg_table_checksums(&job.target);
    let output = job.run(&["--target-exists", "truncate"]);
    output.assert_exit_code(2);
    let all_output = output.all_output();
    assert!(
        all_output
            .lines()
            .any(|line| line.contains("items") && line.contains("qty")),
        "no message naming the table items and its missing column qty:\n{all_output}"
    );
    assert_eq!(
        relations(&job.target),
        relations_before,
        "the refused run changed the target's relations"
    );
    assert_eq!(
        pg_table_checksums(&job.target),
        checksums_before,
        "the refused run changed the target's rows"
    );
    assert_eq!(
        columns(&job.target, "public", "items"),
        ["id integer not null", "name text not null"]
    );
}

#[test]
fn target_exists_drop_replaces() {
    let job = Job::new("more_drop", |url| {
        psql(
            url,
            "CREATE TABLE things (id integer PRIMARY KEY, label text NOT NULL, \
               price numeric(8, 2)); \
             CREATE INDEX things_label_idx ON things (label); \
             INSERT INTO things SELECT i, 'thing ' || i, i * 1.25 FROM generate_series(1, 300) i;",
        );
    });
    psql(
        &job.target,
        "CREATE TABLE things (code text, x integer); \
         INSERT INTO things VALUES ('a', 1), ('b', 2), ('c', 3); \
         CREATE TABLE keep_me (id integer PRIMARY KEY, v text); \
         INSERT INTO keep_me SELECT i, 'keep ' || i FROM generate_series(1, 10) i;",
    );
    let keep_me_before = pg_table_checksums(&job.target)["public.keep_me"].clone();
    let keep_me_columns = columns(&job.target, "public", "keep_me");

    job.run(&["--target-exists", "drop", "--chunk-rows", "100"])
        .assert_success();

    assert_eq!(
        columns(&job.target, "public", "things"),
        columns(&job.source, "public", "things"),
        "things was not replaced by the source's definition"
    );
    let source_schema = pg_schema_snapshot(&job.source);
    let target_schema = pg_schema_snapshot(&job.target);
    for section in ["indexes", "constraints"] {
        let target_lines: Vec<_> = target_schema[section]
            .iter()
            .filter(|line| line.contains("things"))
            .collect();
        let source_lines: Vec<_> = source_schema[section]
            .iter()
            .filter(|line| line.contains("things"))
            .collect();
        assert_eq!(target_lines, source_lines, "{section} of things differ");
    }
    let target_checksums = pg_table_checksums(&job.target);
    assert_eq!(
        target_checksums.get("public.things"),
        pg_table_checksums(&job.source).get("public.things"),
        "things does not hold the source's rows"
    );
    assert_eq!(
        target_checksums.get("public.keep_me"),
        Some(&keep_me_before),
        "keep_me was changed"
    );
    assert_eq!(columns(&job.target, "public", "keep_me"), keep_me_columns);
}

// ---- logs and secrets ----------------------------------------------------------------------

#[test]
fn json_logs() {
    let job = Job::new("more_json_logs", |url| {
        psql(
            url,
            "CREATE TABLE t (id integer PRIMARY KEY, v text); \
             INSERT INTO t SELECT i, md5(i::text) FROM generate_series(1, 300) i; \
             CREATE TABLE no_pk (a integer, b text); \
             INSERT INTO no_pk SELECT i, 'x' FROM generate_series(1, 20) i;",
        );
    });
    let output = job.run(&["--log-format", "json", "--chunk-rows", "100"]);
    output.assert_success();
    let mut json_lines = 0;
    for line in output.stderr.lines().map(str::trim) {
        if !line.starts_with('{') {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {line}"));
        assert!(
            value.get("level").is_some_and(|l| l.is_string()),
            "a JSON log line has no \"level\": {line}"
        );
        let has_message = value.get("message").is_some()
            || value
                .get("fields")
                .is_some_and(|f| f.is_object() && f.get("message").is_some());
        assert!(
            has_message,
            "a JSON log line has no \"message\" nor \"fields.message\": {line}"
        );
        json_lines += 1;
    }
    assert!(
        json_lines > 0,
        "--log-format json printed no JSON line on stderr:\n{}",
        output.stderr
    );
    let other_lines: Vec<&str> = output
        .stderr
        .lines()
        .filter(|line| !line.trim().is_empty() && !line.trim_start().starts_with('{'))
        .collect();
    eprintln!("{json_lines} JSON lines; other stderr lines: {other_lines:?}");
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => pending.push(path),
                Ok(t) if t.is_file() => files.push(path),
                _ => {}
            }
        }
    }
    files.sort();
    files
}

/// Panic when any file under `dir` holds `secret`; return the files looked at.
fn assert_no_file_holds(dir: &Path, secret: &str) -> Vec<PathBuf> {
    let files = files_under(dir);
    for file in &files {
        // A file may vanish between listing and reading (the -wal and -shm files).
        let Ok(bytes) = std::fs::read(file) else {
            continue;
        };
        assert!(
            !bytes
                .windows(secret.len())
                .any(|window| window == secret.as_bytes()),
            "{} holds the password",
            file.display()
        );
    }
    files
}

#[test]
fn secrets_never_stored_or_printed() {
    let secret = PASSWORD_ROLE_PASSWORD;
    let job = Job::new("more_secrets", |url| {
        psql(
            url,
            "CREATE TABLE s (id integer PRIMARY KEY, v text); \
             INSERT INTO s SELECT i, md5(i::text) FROM generate_series(1, 3000) i;",
        );
    });
    let port = pg().port;
    let source = pg().url_with_password(&job.source_db, secret);
    let target = format!(
        "postgres://{PASSWORD_ROLE}@127.0.0.1:{port}/{}",
        job.target_db
    );
    let with_endpoints = |command: &mut Command| {
        command
            .args(["--source", &source, "--target", &target])
            .args(["--target-password-env", "KUAKA_IT_TARGET_PASSWORD"])
            .env("KUAKA_IT_TARGET_PASSWORD", secret);
    };
    let assert_not_printed = |output: &RunOutput| {
        assert!(
            !output.all_output().contains(secret),
            "{} printed the password:\n{}",
            output.description,
            output.all_output()
        );
    };

    // Slow enough that the state store is looked at while the run writes it (WAL and all).
    let mut command = kuaka();
    command.arg("run");
    with_endpoints(&mut command);
    command
        .args(["--state", job.state_dir(), "--snapshot-only"])
        .args(["--chunk-rows", "100", "--jobs", "2"])
        .args(["--max-rows-per-sec", "3000"]);
    let mut background = Background::spawn(command);
    wait_until("rows to reach the target", Duration::from_secs(60), || {
        let copied: i64 = pg_table_checksums(&job.target)
            .values()
            .map(|(count, _)| count)
            .sum();
        copied > 0 || !background.is_running()
    });
    let while_running = assert_no_file_holds(job.state.path(), secret);
    eprintln!("state files while running: {while_running:?}");
    let output = background.wait(Duration::from_secs(120));
    output.assert_success();
    assert_not_printed(&output);
    assert_eq!(
        pg_table_checksums(&job.source).get("public.s"),
        pg_table_checksums(&job.target).get("public.s")
    );

    for extra in [&[][..], &["--json"][..]] {
        let output = status(job.state.path(), extra);
        output.assert_success();
        assert_not_printed(&output);
    }
    let mut command = kuaka();
    command.arg("plan");
    with_endpoints(&mut command);
    let output = run(command);
    output.assert_success();
    assert_not_printed(&output);

    let after = assert_no_file_holds(job.state.path(), secret);
    eprintln!("state files after the run: {after:?}");
    assert!(
        after
            .iter()
            .any(|f| f.file_name().is_some_and(|n| n == "state.db")),
        "no state.db in the state dir: {after:?}"
    );
    // The bookkeeping on the target is part of the state too.
    let bookkeeping = query_one(
        &job.target,
        "SELECT coalesce(string_agg(j::text, ' '), '') FROM kuaka.jobs j",
    );
    assert!(
        !bookkeeping.contains(secret),
        "kuaka.jobs on the target holds the password: {bookkeeping}"
    );
}

// ---- consistency under concurrent writes ---------------------------------------------------

const ACCOUNTS: i64 = 2_000;
const INITIAL_BALANCE: i64 = 100;

/// A `psql` session that commits random transfers between accounts, one transaction each, as
/// fast as it can until `stop`.
struct TransferWriter {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<(), String>>>,
}

impl TransferWriter {
    fn start(url: &str) -> TransferWriter {
        let mut child: Child = Command::new(format!("{PG_BIN}/psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-f", "-"])
            .env_remove("PGPASSWORD")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn psql for the writer");
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = Arc::clone(&stop);
        let handle = thread::spawn(move || {
            let mut stdin = child.stdin.take().expect("psql stdin");
            // xorshift64: no rand dependency needed.
            let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
            let mut next = move |n: u64| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state % n
            };
            while !stop_flag.load(Ordering::Relaxed) {
                let mut batch = String::new();
                for _ in 0..10 {
                    let from = 1 + next(ACCOUNTS as u64);
                    let to = 1 + (from + next(ACCOUNTS as u64 - 1)) % ACCOUNTS as u64;
                    let amount = 1 + next(50);
                    batch.push_str(&format!(
                        "BEGIN;\n\
                         UPDATE accounts SET balance = balance - {amount} WHERE id = {from};\n\
                         UPDATE accounts SET balance = balance + {amount} WHERE id = {to};\n\
                         INSERT INTO transfers (from_id, to_id, amount) \
                         VALUES ({from}, {to}, {amount});\n\
                         COMMIT;\n"
                    ));
                }
                if stdin.write_all(batch.as_bytes()).is_err() {
                    break;
                }
            }
            drop(stdin);
            let output = child.wait_with_output().map_err(|e| e.to_string())?;
            if output.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "the writer's psql failed ({}): {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr)
                ))
            }
        });
        TransferWriter {
            stop,
            handle: Some(handle),
        }
    }

    /// Stop, let psql run what it has read, and report its failure if any.
    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let handle = self.handle.take().expect("writer handle");
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => panic!("the writer thread panicked"),
        }
    }
}

impl Drop for TransferWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn count_transfers(url: &str) -> i64 {
    query_one(url, "SELECT count(*) FROM transfers")
        .parse()
        .expect("count")
}

#[test]
fn consistent_under_concurrent_writes() {
    // 2,000 accounts of 100 and a history of 40,000 transfers whose net effect the balances
    // already show, so the copy takes a couple of seconds at 20,000 rows/s.
    const HISTORY: i64 = 40_000;
    let job = Job::new("more_consistent", |url| {
        psql(
            url,
            &format!(
                "CREATE TABLE accounts (id integer PRIMARY KEY, balance bigint NOT NULL); \
                 INSERT INTO accounts SELECT i, {INITIAL_BALANCE} FROM generate_series(1, {ACCOUNTS}) i; \
                 CREATE TABLE transfers (id bigserial PRIMARY KEY, from_id integer NOT NULL, \
                   to_id integer NOT NULL, amount integer NOT NULL); \
                 INSERT INTO transfers (from_id, to_id, amount) \
                 SELECT 1 + (i * 7919) % {ACCOUNTS}, 1 + (i::bigint * 104729 + 1) % {ACCOUNTS}, 1 + i % 50 \
                 FROM generate_series(1, {HISTORY}) i; \
                 UPDATE accounts a SET balance = {INITIAL_BALANCE} + d.net \
                 FROM (SELECT id, sum(delta) AS net FROM \
                         (SELECT to_id AS id, amount AS delta FROM transfers \
                          UNION ALL SELECT from_id, -amount FROM transfers) x GROUP BY id) d \
                 WHERE d.id = a.id; \
                 VACUUM ANALYZE accounts; VACUUM ANALYZE transfers;"
            ),
        );
    });
    let total = (ACCOUNTS * INITIAL_BALANCE).to_string();
    // Every account's balance follows from the transfers: the number of accounts where not.
    let inconsistent_accounts = format!(
        "SELECT count(*) FROM accounts a LEFT JOIN \
           (SELECT id, sum(delta) AS net FROM \
              (SELECT to_id AS id, amount::bigint AS delta FROM transfers \
               UNION ALL SELECT from_id, -amount::bigint FROM transfers) x GROUP BY id) d \
           ON d.id = a.id \
         WHERE a.balance <> {INITIAL_BALANCE} + coalesce(d.net, 0)"
    );
    assert_eq!(
        query_one(&job.source, "SELECT sum(balance) FROM accounts"),
        total
    );
    assert_eq!(query_one(&job.source, &inconsistent_accounts), "0");

    let writer = TransferWriter::start(&job.source);
    wait_until(
        "the writer to commit its first transfers",
        Duration::from_secs(30),
        || count_transfers(&job.source) >= HISTORY + 20,
    );
    let before_run = count_transfers(&job.source);
    let output = job.run(&[
        "--chunk-rows",
        "100",
        "--jobs",
        "4",
        "--max-rows-per-sec",
        "20000",
    ]);
    let after_run = count_transfers(&job.source);
    writer.stop();
    output.assert_success();

    let copied = count_transfers(&job.target);
    eprintln!(
        "transfers on the source: {before_run} when kuaka started, {after_run} when it ended; \
         {copied} on the target"
    );
    assert!(
        after_run > copied && copied >= before_run,
        "the writer did not commit while kuaka copied (source had {before_run} transfers at \
         the start and {after_run} at the end, the target has {copied}): the test proves nothing"
    );
    assert_eq!(
        query_one(&job.target, "SELECT count(*) FROM accounts"),
        ACCOUNTS.to_string()
    );
    assert_eq!(
        query_one(&job.target, "SELECT sum(balance) FROM accounts"),
        total,
        "the sum of the balances on the target is off: accounts was not copied as of one instant"
    );
    assert_eq!(
        query_one(&job.target, &inconsistent_accounts),
        "0",
        "balances on the target do not match the transfers on the target: accounts and \
         transfers were copied at different instants"
    );
    // One writer, so the snapshot holds transfers 1..n without a gap.
    assert_eq!(
        query_one(&job.target, "SELECT max(id) FROM transfers"),
        copied.to_string(),
        "the copied transfers have a gap"
    );
    // And the source is still consistent after the writer stopped (checks the writer itself).
    assert_eq!(
        query_one(&job.source, "SELECT sum(balance) FROM accounts"),
        total
    );
    assert_eq!(query_one(&job.source, &inconsistent_accounts), "0");
}

// ---- status and plan -----------------------------------------------------------------------

#[test]
fn status_output_text() {
    let job = Job::new("more_status", |url| {
        psql(
            url,
            "CREATE TABLE alpha (id integer PRIMARY KEY); \
             INSERT INTO alpha SELECT generate_series(1, 250); \
             CREATE TABLE beta (id integer PRIMARY KEY, v text); \
             INSERT INTO beta SELECT i, md5(i::text) FROM generate_series(1, 37) i; \
             CREATE TABLE gamma (a integer, b text); \
             INSERT INTO gamma SELECT i, 'g' FROM generate_series(1, 12) i;",
        );
    });
    job.run(&["--chunk-rows", "100"]).assert_success();

    let output = status(job.state.path(), &[]);
    output.assert_success();
    let text = &output.stdout;
    assert!(
        text.contains("snapshot complete"),
        "status does not show the phase \"snapshot complete\":\n{text}"
    );
    for (table, rows) in [
        ("public.alpha", "250"),
        ("public.beta", "37"),
        ("public.gamma", "12"),
    ] {
        let line = text
            .lines()
            .find(|line| line.split_whitespace().any(|word| word == table))
            .unwrap_or_else(|| panic!("status does not show {table}:\n{text}"));
        assert!(
            line.split_whitespace().any(|word| word == rows),
            "status does not show {rows} rows for {table}: {line:?}\n{text}"
        );
    }
    assert!(
        text.contains("299"),
        "status does not show the total of 299 rows:\n{text}"
    );

    let empty = tempfile::tempdir().expect("empty dir");
    let output = status(empty.path(), &[]);
    output.assert_exit_code(2);
    let message = output.all_output();
    assert!(
        message.contains(empty.path().to_str().expect("utf-8"))
            || message.to_lowercase().contains("no job"),
        "status on an empty dir does not say there is no job there:\n{message}"
    );
    let missing = empty.path().join("does-not-exist");
    status(&missing, &[]).assert_exit_code(2);
    assert!(
        !missing.exists(),
        "kuaka status created the state dir it was asked to read"
    );
}

/// The plan's summary line (`-- name rows size format chunks chunking`) of `table`.
fn plan_line<'a>(plan: &'a str, table: &str) -> &'a str {
    plan.lines()
        .filter(|line| line.starts_with("--"))
        .find(|line| line.split_whitespace().any(|word| word == table))
        .unwrap_or_else(|| panic!("the plan has no line for {table}:\n{plan}"))
}

/// The words after the copy format in a plan line: the format and the chunk count.
fn format_and_chunks(line: &str) -> (String, String) {
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| *w == "binary" || *w == "text")
        .unwrap_or_else(|| panic!("no copy format in the plan line {line:?}"));
    (
        words[at].to_owned(),
        words.get(at + 1).copied().unwrap_or_default().to_owned(),
    )
}

#[test]
fn plan_shows_chunks_and_formats() {
    let job = Job::new("more_plan", |url| {
        psql(
            url,
            "CREATE TABLE hundred (id integer PRIMARY KEY, v text); \
             INSERT INTO hundred SELECT i, md5(i::text) FROM generate_series(1, 100) i; \
             CREATE TYPE feeling AS ENUM ('sad', 'ok', 'happy'); \
             CREATE TABLE moods (id integer PRIMARY KEY, feelings feeling[]); \
             INSERT INTO moods VALUES (1, '{sad,ok}'), (2, '{happy}'), (3, NULL);",
        );
    });
    let output = run({
        let mut command = kuaka();
        command
            .args(["plan", "--source", &job.source, "--target", &job.target])
            .args(["--chunk-rows", "10"]);
        command
    });
    output.assert_success();
    let plan = &output.stdout;

    let hundred = plan_line(plan, "public.hundred");
    assert_eq!(
        format_and_chunks(hundred),
        ("binary".to_owned(), "10".to_owned()),
        "hundred (100 rows, integer key, --chunk-rows 10) should be 10 chunks in binary: \
         {hundred:?}"
    );
    let moods = plan_line(plan, "public.moods");
    assert_eq!(
        format_and_chunks(moods).0,
        "text",
        "moods has an array of an enum: its binary form embeds type OIDs, so text: {moods:?}"
    );
    assert_eq!(
        relations(&job.target),
        Vec::<String>::new(),
        "plan created relations on the target"
    );
}
