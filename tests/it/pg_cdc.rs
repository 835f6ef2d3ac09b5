//! Change capture and apply, PostgreSQL → PostgreSQL: a snapshot, live changes, catch-up, and
//! crashes of kuaka and restarts of the databases in the middle of it, each checked against
//! the source with independent checksums (and, for exactly-once, a target-side audit of every
//! row version applied).

use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use crate::support::job::Job;
use crate::support::postgres::{PgServer, query_rows};
use crate::support::{Background, assert_same_data, pg, psql, query_one, run, sigterm, wait_until};

/// Tables with keys for the live tests: a counter (updates are `n = n + 1`), a table with
/// TOASTed values, a parent with `ON UPDATE CASCADE` children, a partitioned table and one
/// that gets truncated.
const LIVE_SCHEMA: &str = "
CREATE TABLE counter (id integer PRIMARY KEY, n integer NOT NULL);
INSERT INTO counter SELECT g, 0 FROM generate_series(1, 50) g;
CREATE TABLE doc (id integer PRIMARY KEY, title text, body text);
ALTER TABLE doc ALTER COLUMN body SET STORAGE EXTERNAL;
INSERT INTO doc SELECT g, 'title ' || g, repeat(md5(g::text), 200) FROM generate_series(1, 300) g;
CREATE TABLE parent (id integer PRIMARY KEY, name text NOT NULL);
CREATE TABLE child (id integer PRIMARY KEY,
  parent_id integer NOT NULL REFERENCES parent ON UPDATE CASCADE ON DELETE CASCADE, note text);
INSERT INTO parent SELECT g, 'parent ' || g FROM generate_series(1, 100) g;
INSERT INTO child SELECT g, 1 + g % 100, 'child ' || g FROM generate_series(1, 400) g;
CREATE TABLE measure (id integer, day date, v numeric(10,2), PRIMARY KEY (id, day))
  PARTITION BY RANGE (day);
CREATE TABLE measure_2024 PARTITION OF measure FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE measure_2025 PARTITION OF measure FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
INSERT INTO measure SELECT g, date '2024-01-01' + g % 300, g / 7.0 FROM generate_series(1, 1000) g;
CREATE TABLE scratch (id integer PRIMARY KEY, v text);
INSERT INTO scratch SELECT g, 'before ' || g FROM generate_series(1, 100) g;
";

/// Changes of every kind the live tests make while kuaka streams.
const LIVE_CHANGES: &str = "
UPDATE doc SET title = title || ' (edited)' WHERE id % 3 = 0;
UPDATE doc SET body = body || 'more' WHERE id = 5;
INSERT INTO doc SELECT g, 'new ' || g, repeat(md5(g::text), 300) FROM generate_series(301, 350) g;
UPDATE parent SET id = id + 1000 WHERE id <= 20;
DELETE FROM parent WHERE id BETWEEN 30 AND 40;
UPDATE measure SET day = day + 200 WHERE id % 5 = 0;
UPDATE measure SET v = v + 1 WHERE id % 7 = 0;
DELETE FROM measure WHERE id % 11 = 0;
TRUNCATE scratch;
INSERT INTO scratch VALUES (1, 'after the truncate');
BEGIN;
DELETE FROM counter WHERE id = 50;
INSERT INTO counter VALUES (50, 100);
UPDATE counter SET n = n + 1 WHERE id <= 10;
COMMIT;
";

/// `n` updates of the counter table, each its own transaction.
fn counter_updates(n: usize) -> String {
    (0..n)
        .map(|i| format!("UPDATE counter SET n = n + 1 WHERE id = {};\n", 1 + i % 49))
        .collect()
}

/// Run a script in a thread (the caller joins it).
fn write_in_background(url: &str, sql: String) -> thread::JoinHandle<()> {
    let url = url.to_owned();
    thread::spawn(move || {
        psql(&url, &sql);
    })
}

/// A script that may fail part-way (the server restarts under it): run it, ignore failures.
fn psql_tolerant(url: &str, sql: &str) {
    let _ = Command::new("psql")
        .args([url, "-X", "-q", "-c", sql])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// On the target: record every row version apply writes to `counter` (an `ALWAYS` trigger
/// fires even under `session_replication_role = replica`).
fn install_audit(target: &str) {
    psql(
        target,
        "CREATE TABLE kuaka.it_audit (id integer, n integer);
         CREATE FUNCTION kuaka.it_audit() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN INSERT INTO kuaka.it_audit VALUES (NEW.id, NEW.n); RETURN NEW; END $$;
         CREATE TRIGGER it_audit AFTER INSERT OR UPDATE ON public.counter
           FOR EACH ROW EXECUTE FUNCTION kuaka.it_audit();
         ALTER TABLE public.counter ENABLE ALWAYS TRIGGER it_audit;",
    );
}

/// No row version of `counter` was applied twice, and the audit saw some.
fn assert_applied_once(target: &str) {
    let twice = query_rows(
        target,
        "SELECT id, n, count(*) FROM kuaka.it_audit GROUP BY 1, 2 HAVING count(*) > 1 ORDER BY 1, 2 LIMIT 20",
    );
    assert!(
        twice.is_empty(),
        "row versions applied more than once (id, n, times): {twice:?}"
    );
    let seen: i64 = query_one(target, "SELECT count(*) FROM kuaka.it_audit")
        .parse()
        .expect("count");
    assert!(
        seen > 0,
        "the audit saw no applied change; the check proves nothing"
    );
}

fn positions(status: &serde_json::Value) -> std::collections::BTreeMap<String, String> {
    status["positions"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    (
                        p["name"].as_str().unwrap_or_default().to_owned(),
                        p["value"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

// ---- live changes ----------------------------------------------------------------------------

/// Every type of the type matrix, in rows copied by the snapshot and again in rows inserted,
/// updated and deleted while kuaka streams; then `status` shows the positions.
#[test]
fn cdc_type_matrix_before_and_after_the_snapshot() {
    let job = Job::with_fixture("cdc_types", "type_matrix.sql");
    let background = job.stream_in_background(&[]);
    psql(
        &job.source,
        "CREATE TEMP TABLE copy AS SELECT * FROM type_matrix;
         UPDATE copy SET id = id + 1000;
         INSERT INTO type_matrix SELECT * FROM copy;
         UPDATE type_matrix SET c_text = coalesce(c_text, '') || ' changed' WHERE id % 2 = 0;
         DELETE FROM type_matrix WHERE id = 3;",
    );
    sigterm(background);
    let output = job.sync(&[]);
    assert!(output.stderr.contains("caught up"), "{}", output.stderr);
    assert_same_data(&job.source, &job.target);
    let status = job.status_json();
    assert_eq!(status["phase"], "streaming", "{status}");
    let p = positions(&status);
    for name in [
        "applied",
        "captured",
        "confirmed",
        "lag_seconds",
        "p0",
        "p1",
    ] {
        assert!(
            p.contains_key(name),
            "status has no position {name}: {status}"
        );
    }
    assert_eq!(p["applied"], p["captured"], "{status}");
    job.clean();
}

/// TOAST values left unchanged by updates, a key update cascading to children, rows moving
/// between partitions, TRUNCATE, deletes: all arrive, and the target equals the source.
#[test]
fn cdc_toast_cascades_partitions_truncate() {
    let job = Job::new("cdc_live", |url| {
        psql(url, LIVE_SCHEMA);
    });
    let background = job.stream_in_background(&[]);
    psql(&job.source, LIVE_CHANGES);
    sigterm(background);
    job.sync(&[]);
    assert_same_data(&job.source, &job.target);
    // The unchanged TOASTed bodies were kept, not nulled.
    assert_eq!(
        query_one(&job.target, "SELECT count(*) FROM doc WHERE body IS NULL"),
        "0"
    );
    assert_eq!(
        query_one(&job.target, "SELECT v FROM scratch"),
        "after the truncate"
    );
    job.clean();
}

/// A one-million-row source transaction streams through the change log into one target
/// transaction.
#[test]
fn cdc_million_row_transaction() {
    let job = Job::new("cdc_big_txn", |url| {
        psql(
            url,
            "CREATE TABLE big (id bigint PRIMARY KEY, v integer NOT NULL, note text);",
        );
    });
    let background = job.stream_in_background(&[]);
    psql(
        &job.source,
        "INSERT INTO big SELECT g, g % 1000, 'row ' || g FROM generate_series(1, 1000000) g;",
    );
    wait_until(
        "the million rows to reach the target",
        Duration::from_secs(300),
        || query_one(&job.target, "SELECT count(*) FROM big") == "1000000",
    );
    sigterm(background);
    assert_same_data(&job.source, &job.target);
    job.clean();
}

/// Writers change the source while the snapshot is taken; after catching up the target is
/// equal, with the per-key apply mode too.
#[test]
fn cdc_concurrent_writers_during_the_snapshot() {
    for mode in ["transactional", "per-key"] {
        let name = format!("cdc_writers_{}", mode.replace('-', "_"));
        let job = Job::new(&name, |url| {
            psql(url, LIVE_SCHEMA);
            psql(
                url,
                "CREATE TABLE bulk (id bigint PRIMARY KEY, v text);
                 INSERT INTO bulk SELECT g, md5(g::text) FROM generate_series(1, 60000) g;",
            );
        });
        let writer = write_in_background(
            &job.source,
            format!(
                "{}{LIVE_CHANGES}{}",
                counter_updates(600),
                "INSERT INTO bulk SELECT g, 'late' FROM generate_series(60001, 61000) g;
                 UPDATE bulk SET v = 'changed' WHERE id % 100 = 0;"
            ),
        );
        job.sync(&[
            "--apply-mode",
            mode,
            "--apply-workers",
            "3",
            "--chunk-rows",
            "5000",
            "--max-rows-per-sec",
            "30000",
        ]);
        writer.join().expect("writer");
        job.sync(&["--apply-mode", mode, "--apply-workers", "3"]);
        assert_same_data(&job.source, &job.target);
        job.clean();
    }
}

/// An application `TRUNCATE` between the chunk plan and the copy neither waits for kuaka nor
/// wedges it: planning keeps no table lock (a held one let the readers queue behind the
/// `TRUNCATE`, a wait cycle the server cannot see), and the change stream replays the
/// `TRUNCATE` over whatever the copy read.
#[test]
fn cdc_truncate_between_plan_and_copy() {
    let job = Job::new("cdc_truncate_plan", |url| {
        psql(
            url,
            "CREATE TABLE scratch (id integer PRIMARY KEY, v text);
             INSERT INTO scratch SELECT g, 'before ' || g FROM generate_series(1, 500) g;",
        );
    });
    let pause = tempfile::tempdir().expect("tempdir");
    let release = pause.path().join("go");
    let mut command = job.stream_command(&["--chunk-rows", "100"]);
    command.env(
        "KUAKA_PAUSE",
        format!("snapshot.planned={}", release.display()),
    );
    let background = Background::spawn(command);
    let reached = pause.path().join("go.reached");
    wait_until(
        "the run to pause after planning",
        Duration::from_secs(60),
        || reached.exists(),
    );
    // Fails on lock_timeout if kuaka still held a lock on the table.
    psql(
        &job.source,
        "SET lock_timeout = '10s'; TRUNCATE scratch;
         INSERT INTO scratch VALUES (1, 'after the truncate'), (700, 'new');",
    );
    std::fs::write(&release, b"").expect("release the pause");
    wait_until("the streaming phase", Duration::from_secs(120), || {
        job.phase() == "streaming"
    });
    sigterm(background);
    job.sync(&[]);
    assert_same_data(&job.source, &job.target);
    assert_eq!(query_one(&job.target, "SELECT count(*) FROM scratch"), "2");
    job.clean();
}

// ---- crashes and restarts --------------------------------------------------------------------

/// SIGKILL in the middle of the snapshot while writers run: the rerun finishes the copy, and
/// replaying the change log from the slot's start makes the mixed copy exact.
#[test]
fn cdc_sigkill_during_the_snapshot() {
    let job = Job::new("cdc_kill_snapshot", |url| {
        psql(url, LIVE_SCHEMA);
        psql(
            url,
            "CREATE TABLE bulk (id bigint PRIMARY KEY, v text);
             INSERT INTO bulk SELECT g, md5(g::text) FROM generate_series(1, 40000) g;",
        );
    });
    let writer = write_in_background(&job.source, counter_updates(800));
    let mut command = job.stream_command(&["--chunk-rows", "4000", "--jobs", "2"]);
    command.env("KUAKA_FAILPOINT", "snapshot.chunk.after_commit:3");
    run(command).assert_killed_by_sigkill();
    psql(
        &job.source,
        "UPDATE bulk SET v = 'after the kill' WHERE id % 50 = 0;",
    );
    job.sync(&["--chunk-rows", "4000"]);
    writer.join().expect("writer");
    job.sync(&[]);
    assert_same_data(&job.source, &job.target);
    job.clean();
}

/// SIGKILL between an apply transaction's changes and its COMMIT, and SIGKILL from outside
/// while capture streams: after resuming, the target equals the source and no row version
/// was applied twice.
#[test]
fn cdc_sigkill_during_capture_and_before_apply_commit() {
    let job = Job::new("cdc_kill_apply", |url| {
        psql(url, LIVE_SCHEMA);
    });
    job.sync(&[]);
    install_audit(&job.target);

    // Writes keep coming until every kill happened, so each run has commits to make.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (source, stop) = (job.source.clone(), stop.clone());
        thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                psql(&source, &counter_updates(25));
            }
        })
    };
    for failpoint in ["apply.before_commit:4", "apply.after_commit:3"] {
        let mut command = job.stream_command(&[]);
        command.env("KUAKA_FAILPOINT", failpoint);
        Background::spawn(command)
            .wait(Duration::from_secs(120))
            .assert_killed_by_sigkill();
    }
    // And from outside, while capture streams.
    let mut background = Background::spawn(job.stream_command(&[]));
    thread::sleep(Duration::from_millis(1500));
    assert!(background.is_running(), "{}", background.stderr());
    background.kill().assert_killed_by_sigkill();

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().expect("writer");
    psql(&job.source, &counter_updates(100));
    job.sync(&[]);
    assert_same_data(&job.source, &job.target);
    assert_applied_once(&job.target);
    job.clean();
}

/// Stream from `source` to `target` under writes while `restarts` restarts servers; then the
/// target catches up by itself, equals the source, and applied no row version twice.
fn streaming_survives_restarts(source: &str, target: &str, restarts: impl FnOnce()) {
    psql(source, LIVE_SCHEMA);
    let job = Job::between(
        "restart_src",
        source.to_owned(),
        "restart_dst",
        target.to_owned(),
    );
    let background = job.stream_in_background(&[]);
    install_audit(target);
    let writer = {
        let source = source.to_owned();
        thread::spawn(move || {
            for round in 0..60 {
                psql_tolerant(&source, &counter_updates(20));
                psql_tolerant(
                    &source,
                    &format!(
                        "INSERT INTO scratch VALUES ({}, 'round {round}') ON CONFLICT DO NOTHING",
                        1000 + round
                    ),
                );
                thread::sleep(Duration::from_millis(50));
            }
        })
    };
    thread::sleep(Duration::from_millis(800));
    restarts();
    writer.join().expect("writer");
    psql(source, &counter_updates(50));
    wait_until(
        "apply to catch up after the restarts",
        Duration::from_secs(120),
        || {
            query_one(source, "SELECT sum(n) FROM counter")
                == query_one(target, "SELECT sum(n) FROM counter")
        },
    );
    sigterm(background);
    job.sync(&[]);
    assert_same_data(source, target);
    assert_applied_once(target);
    job.clean();
}

/// The database server restarts (source and target at once: they share it) twice while kuaka
/// streams under writes: capture and apply reconnect and resume on their own.
#[test]
fn cdc_server_restarts_during_streaming() {
    let server = PgServer::start_private();
    let source = server.create_db("restart_src");
    let target = server.create_db("restart_dst");
    streaming_survives_restarts(&source, &target, || {
        server.restart();
        thread::sleep(Duration::from_millis(1500));
        server.restart();
    });
}

/// The slot is dropped under a running job: a definite error naming the slot, never a silent
/// skip; a rerun refuses the same way.
#[test]
fn cdc_dropped_slot_is_a_definite_error() {
    let job = Job::new("cdc_slot_gone", |url| {
        psql(
            url,
            "CREATE TABLE t (id integer PRIMARY KEY); INSERT INTO t VALUES (1);",
        );
    });
    let background = job.stream_in_background(&[]);
    wait_until("the slot to be dropped", Duration::from_secs(60), || {
        psql(
            &job.source,
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name LIKE 'kuaka%' AND database = current_database() AND active_pid IS NOT NULL;",
        );
        Command::new("psql")
            .args([&job.source, "-X", "-q", "-c"])
            .arg("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name LIKE 'kuaka%' AND database = current_database()")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    });
    psql(&job.source, "INSERT INTO t VALUES (2);");
    let output = background.wait(Duration::from_secs(120));
    output.assert_exit_code(2);
    assert!(
        output.stderr.contains("no longer exists"),
        "{}",
        output.stderr
    );
    let rerun = run(job.stream_command(&["--until", "caught-up"]));
    rerun.assert_exit_code(2);
    assert!(
        rerun.stderr.contains("no longer exists"),
        "{}",
        rerun.stderr
    );
    job.clean();
}

/// A nullable column added on the source is added on the target and filled by the changes
/// that follow; a dropped column stops the job with a message naming the table and change.
#[test]
fn cdc_schema_changes() {
    let job = Job::new("cdc_ddl", |url| {
        psql(
            url,
            "CREATE TABLE item (id integer PRIMARY KEY, name text);
             INSERT INTO item SELECT g, 'item ' || g FROM generate_series(1, 100) g;",
        );
    });
    let background = job.stream_in_background(&[]);
    psql(
        &job.source,
        "ALTER TABLE item ADD COLUMN color text;
         UPDATE item SET color = 'red' WHERE id % 2 = 0;
         INSERT INTO item VALUES (101, 'new', 'blue');",
    );
    sigterm(background);
    job.sync(&[]);
    assert_same_data(&job.source, &job.target);
    assert_eq!(
        query_one(&job.target, "SELECT color FROM item WHERE id = 101"),
        "blue"
    );

    psql(
        &job.source,
        "ALTER TABLE item DROP COLUMN name; INSERT INTO item VALUES (102, 'green');",
    );
    let output = run(job.stream_command(&["--until", "caught-up"]));
    output.assert_exit_code(2);
    assert!(
        output.stderr.contains("public.item") && output.stderr.contains("column name"),
        "{}",
        output.stderr
    );
    // Nothing after the change was applied.
    assert_eq!(
        query_one(&job.target, "SELECT count(*) FROM item WHERE id = 102"),
        "0"
    );
    job.clean();
}

/// `--until caught-up` waits for commits that returned to their clients but whose WAL is not
/// flushed yet (`synchronous_commit = off`, a WAL writer that flushes only every 10 s). A check
/// against the WAL write position, or a barrier transaction that writes no WAL (PostgreSQL
/// commits those asynchronously), returns before such a transaction reaches the stream.
#[test]
fn cdc_caught_up_includes_unflushed_async_commits() {
    let server = PgServer::start_private();
    let source = server.create_db("cdc_async_src");
    let target = pg().create_db("cdc_async_dst");
    psql(
        &source,
        "ALTER SYSTEM SET wal_writer_delay = '10s'; SELECT pg_reload_conf();
         CREATE TABLE t (id integer PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'before' FROM generate_series(1, 10) g;",
    );
    let job = Job::between("cdc_async_src", source.clone(), "cdc_async_dst", target);
    job.sync(&[]);
    for round in 0..3 {
        // Several pages of WAL, so the commit record lands past the last completed page.
        psql(
            &source,
            &format!(
                "SET synchronous_commit = off;
                 ALTER TABLE t ADD COLUMN c{round} text;
                 INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series({}, {}) g;",
                1000 * (round + 1),
                1000 * (round + 1) + 199
            ),
        );
        job.sync(&[]);
        assert_same_data(&job.source, &job.target);
    }
    job.clean();
}

/// A column added in a transaction that kuaka was receiving when it died: the added column is
/// still followed after the restart. (The saved table shapes must not run ahead of the log: the
/// crash cuts the unfinished transaction, with its add-column instruction, from the log.)
#[test]
fn cdc_added_column_survives_a_crash_mid_transaction() {
    let job = Job::new("cdc_ddl_crash", |url| {
        psql(
            url,
            "CREATE TABLE item (id integer PRIMARY KEY, name text);
             INSERT INTO item SELECT g, 'item ' || g FROM generate_series(1, 100) g;",
        );
    });
    job.sync(&[]);
    psql(
        &job.source,
        "BEGIN;
         ALTER TABLE item ADD COLUMN color text;
         INSERT INTO item SELECT g, 'bulk', 'c' || g FROM generate_series(1000, 200999) g;
         COMMIT;",
    );
    let mut command = job.stream_command(&["--until", "caught-up"]);
    command.env("KUAKA_FAILPOINT", "capture.synced_in_transaction");
    Background::spawn(command)
        .wait(Duration::from_secs(120))
        .assert_killed_by_sigkill();
    job.sync(&[]);
    assert_same_data(&job.source, &job.target);
    job.clean();
}

/// Tables whose updates cannot be captured by key are refused before anything is created.
#[test]
fn cdc_keyless_table_is_refused_up_front() {
    let job = Job::new("cdc_keyless", |url| {
        psql(
            url,
            "CREATE TABLE has_key (id integer PRIMARY KEY);
             CREATE TABLE no_key (a integer, b text);",
        );
    });
    let output = run(job.stream_command(&["--until", "caught-up"]));
    output.assert_exit_code(2);
    assert!(
        output.stderr.contains("public.no_key") && output.stderr.contains("primary key"),
        "{}",
        output.stderr
    );
    assert_eq!(
        query_rows(&job.source, "SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE 'kuaka%' AND database = current_database()").len(),
        0
    );
    assert_eq!(
        query_one(
            &job.target,
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ),
        "0"
    );
    // Excluding it is the way out.
    job.sync(&["--exclude", "no_key"]);
    job.clean();
    let _ = pg();
}

/// A quiet job does not hold WAL: while only other databases write, the slot's confirmed
/// position still moves past their WAL (keepalives are answered with the server's position).
#[test]
fn cdc_idle_slot_still_advances() {
    let job = Job::new("cdc_idle", |url| {
        psql(
            url,
            "CREATE TABLE t (id integer PRIMARY KEY); INSERT INTO t VALUES (1);",
        );
    });
    let background = job.stream_in_background(&[]);
    let other = pg().create_db("cdc_idle_other");
    psql(
        &other,
        "CREATE TABLE noise (id integer, v text);
         INSERT INTO noise SELECT g, md5(g::text) FROM generate_series(1, 50000) g;",
    );
    let written = query_one(&other, "SELECT pg_current_wal_lsn()");
    wait_until(
        "the idle slot to confirm WAL written by another database",
        Duration::from_secs(60),
        || {
            query_one(
                &job.source,
                &format!(
                    "SELECT confirmed_flush_lsn >= '{written}'::pg_lsn FROM pg_replication_slots \
                     WHERE slot_name LIKE 'kuaka%' AND database = current_database()"
                ),
            ) == "t"
        },
    );
    sigterm(background);
    job.clean();
}

/// The source invalidates the slot (its WAL was removed past `max_slot_wal_keep_size` while
/// kuaka was stopped): the next run fails with a definite error naming the slot.
#[test]
fn cdc_invalidated_slot_is_a_definite_error() {
    let server = PgServer::start_private();
    let source = server.create_db("cdc_lost_src");
    let target = server.create_db("cdc_lost_dst");
    psql(
        &source,
        "CREATE TABLE t (id integer PRIMARY KEY); INSERT INTO t VALUES (1);",
    );
    let job = Job::between("cdc_lost_src", source.clone(), "cdc_lost_dst", target);
    job.sync(&[]);
    psql(
        &source,
        "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'; SELECT pg_reload_conf();",
    );
    // Enough WAL, over several segments and checkpoints, that the slot's WAL is removed.
    wait_until(
        "the slot to be invalidated",
        Duration::from_secs(120),
        || {
            psql(
                &source,
                "CREATE TABLE IF NOT EXISTS filler (v text);
             INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 20000);
             SELECT pg_switch_wal(); CHECKPOINT;",
            );
            query_one(
                &source,
                "SELECT coalesce(string_agg(wal_status, ','), '') FROM pg_replication_slots WHERE slot_name LIKE 'kuaka%'",
            ) == "lost"
        },
    );
    let output = run(job.stream_command(&["--until", "caught-up"]));
    output.assert_exit_code(2);
    assert!(
        output.stderr.contains("invalidated") || output.stderr.contains("cannot stream"),
        "{}",
        output.stderr
    );
}

/// Swapping values of a unique column (not the key) inside one batch: the per-key reduction
/// would write them in an order the unique index rejects, so apply redoes the batch in source
/// order, one statement per change, and gets the source's result.
#[test]
fn cdc_unique_swap_falls_back_to_source_order() {
    let job = Job::new("cdc_unique_swap", |url| {
        psql(
            url,
            "CREATE TABLE person (id integer PRIMARY KEY, email text NOT NULL UNIQUE);
             INSERT INTO person VALUES (1, 'a@x'), (2, 'b@x');",
        );
    });
    job.sync(&[]);
    psql(
        &job.source,
        "BEGIN;
         UPDATE person SET email = 'tmp' WHERE id = 2;
         UPDATE person SET email = 'b@x' WHERE id = 1;
         UPDATE person SET email = 'a@x' WHERE id = 2;
         COMMIT;",
    );
    let output = job.sync(&[]);
    assert!(
        output.stderr.contains("one by one"),
        "the reduced batch did not conflict; the test no longer exercises the fallback:\n{}",
        output.stderr
    );
    assert_same_data(&job.source, &job.target);
    job.clean();
}

/// Transactions bigger than the server's `logical_decoding_work_mem` are streamed before they
/// commit (protocol 2): kuaka spools them aside, drops rolled-back subtransactions and
/// aborted transactions, and logs each committed one whole.
#[test]
fn cdc_streamed_transactions_with_savepoints_and_aborts() {
    let job = Job::new("cdc_streamed", |url| {
        psql(
            url,
            "CREATE TABLE big (id bigint PRIMARY KEY, v integer NOT NULL, note text);
             INSERT INTO big VALUES (0, 0, 'before');",
        );
    });
    psql(
        &job.source,
        "ALTER DATABASE cdc_streamed_src SET logical_decoding_work_mem = '64kB';",
    );
    let background = job.stream_in_background(&[]);
    // Another session commits small transactions while the big one is being streamed.
    let small = write_in_background(
        &job.source,
        (1..=200)
            .map(|i| {
                format!(
                    "INSERT INTO big VALUES ({}, {i}, 'small');\n",
                    1_000_000 + i
                )
            })
            .collect(),
    );
    psql(
        &job.source,
        "BEGIN;
         INSERT INTO big SELECT g, g % 100, 'kept ' || g FROM generate_series(1, 20000) g;
         SAVEPOINT a;
         INSERT INTO big SELECT g, 1, 'rolled back' FROM generate_series(20001, 40000) g;
         ROLLBACK TO SAVEPOINT a;
         SAVEPOINT b;
         INSERT INTO big SELECT g, 2, 'released' FROM generate_series(40001, 45000) g;
         RELEASE SAVEPOINT b;
         UPDATE big SET v = v + 1 WHERE id % 10 = 0;
         COMMIT;
         BEGIN;
         INSERT INTO big SELECT g, 3, 'aborted' FROM generate_series(100001, 130000) g;
         ROLLBACK;",
    );
    small.join().expect("small writer");
    psql(&job.source, "INSERT INTO big VALUES (-1, -1, 'last');");
    sigterm(background);
    job.sync(&[]);
    assert_same_data(&job.source, &job.target);
    let streamed: i64 = query_one(
        &job.source,
        "SELECT coalesce(sum(s.stream_txns), 0) FROM pg_stat_replication_slots s \
         JOIN pg_replication_slots r USING (slot_name) \
         WHERE r.slot_name LIKE 'kuaka%' AND r.database = current_database()",
    )
    .parse()
    .expect("stream_txns");
    assert!(
        streamed > 0,
        "the server streamed no transaction; the test no longer exercises protocol 2"
    );
    job.clean();
}

/// Per-key apply of a transaction too big to hold: every worker commits first, then one
/// worker applies it as it streams in; a crash in the middle of it resumes exactly.
#[test]
fn cdc_per_key_big_transaction_and_crash() {
    let job = Job::new("cdc_per_key_big", |url| {
        psql(url, LIVE_SCHEMA);
        psql(
            url,
            "CREATE TABLE big (id bigint PRIMARY KEY, v integer NOT NULL);",
        );
    });
    let args = ["--apply-mode", "per-key", "--apply-workers", "3"];
    job.sync(&args);
    install_audit(&job.target);
    psql(
        &job.source,
        &format!(
            "{}INSERT INTO big SELECT g, g % 7 FROM generate_series(1, 100000) g;\n{}",
            counter_updates(200),
            counter_updates(200)
        ),
    );
    let mut command = job.stream_command(&args);
    command.env("KUAKA_FAILPOINT", "apply.before_commit:2");
    Background::spawn(command)
        .wait(Duration::from_secs(120))
        .assert_killed_by_sigkill();
    job.sync(&args);
    assert_same_data(&job.source, &job.target);
    assert_applied_once(&job.target);
    job.clean();
}

/// The source and the target run on separate servers, and each restarts on its own while kuaka
/// streams under writes: capture reconnects to the slot while apply keeps going, and apply
/// reconnects to the target while capture keeps spooling.
#[test]
fn cdc_source_and_target_restart_separately() {
    let source_server = PgServer::start_private();
    let target_server = PgServer::start_private();
    let source = source_server.create_db("restart_src");
    let target = target_server.create_db("restart_dst");
    streaming_survives_restarts(&source, &target, || {
        target_server.restart();
        thread::sleep(Duration::from_millis(1200));
        source_server.restart();
    });
}
