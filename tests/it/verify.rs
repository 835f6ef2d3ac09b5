//! `kuaka verify`: planted differences of every kind are found (and nothing else), across
//! engine pairs; equal copies verify clean.

use std::collections::BTreeSet;
use std::path::Path;

use rusqlite::Connection;

use crate::support::mariadb::mariadb;
use crate::support::postgres::psql;
use crate::support::{RunOutput, kuaka, pg, run};

/// `kuaka verify --json` between two URLs (or a state dir), parsed.
pub fn verify(args: &[&str]) -> (RunOutput, serde_json::Value) {
    let mut c = kuaka();
    c.arg("verify").arg("--json").args(args);
    let out = run(c);
    let json = serde_json::from_str(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out, json)
}

/// Verify a job's copy through its state dir: exit 0, every table equal, and no page read
/// again row by row (nothing writes to either side).
pub fn assert_verified(state: &Path) {
    let json = assert_verified_while_writing(state);
    // Equal copies compare by digests alone: a page read again row by row means the two
    // sides' fast readers encoded equal rows differently.
    for table in json["tables"].as_array().into_iter().flatten() {
        assert_eq!(table["narrowed"], 0, "{json:#}");
    }
}

/// Verify a job's copy through its state dir while the job applies changes: exit 0, every
/// table equal.
pub fn assert_verified_while_writing(state: &Path) -> serde_json::Value {
    let (out, json) = verify(&["--state", state.to_str().expect("utf-8 path")]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "verify found differences or failed:\n{}\n{}",
        out.stdout,
        out.stderr
    );
    assert_eq!(json["equal"], true);
    // kuaka status shows the result.
    let status = kuaka()
        .args(["status", "--json", "--state"])
        .arg(state)
        .output()
        .expect("status");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status json");
    assert_eq!(status["last_verification"]["equal"], true, "{status:#}");
    json
}

/// (key, kind, differing columns) as owned strings.
fn set(items: &[(&str, &str, &str)]) -> BTreeSet<(String, String, String)> {
    items
        .iter()
        .map(|(a, b, c)| ((*a).to_owned(), (*b).to_owned(), (*c).to_owned()))
        .collect()
}

/// (key, kind, differing columns) of every reported difference.
fn differences(json: &serde_json::Value) -> BTreeSet<(String, String, String)> {
    let mut found = BTreeSet::new();
    for t in json["tables"].as_array().expect("tables") {
        for d in t["differences"].as_array().into_iter().flatten() {
            let key = d["key"]
                .as_array()
                .expect("key")
                .iter()
                .map(|k| k.as_str().unwrap_or_default().to_owned())
                .collect::<Vec<_>>()
                .join(",");
            let columns = d["columns"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| c.as_str().unwrap_or_default().to_owned())
                .collect::<Vec<_>>()
                .join(",");
            found.insert((
                key,
                d["kind"].as_str().unwrap_or_default().to_owned(),
                columns,
            ));
        }
    }
    found
}

const ROWS: &str = "INSERT INTO planted (id, name, note, amount, free, at) VALUES
    (1, 'one', 'n', 1.10, 1.10, '2024-01-02 03:04:05.123456'),
    (2, 'two', 'n', 1.10, 1.10, '2024-01-02 03:04:05.123456'),
    (3, 'three', NULL, 1.10, 1.10, '2024-01-02 03:04:05.123456'),
    (4, 'four', 'n', 1.10, 1.10, '2024-01-02 03:04:05.123456'),
    (5, 'five', 'n', 1.10, 1.10, '2024-01-02 03:04:05.123456'),
    (6, 'six', 'n', 1.10, 1.10, '2024-01-02 03:04:05.123456'),
    (7, 'seven', 'n', 1.10, 1.10, '2024-01-02 03:04:05.123456'),
    (8, 'eight', 'n', 1.10, 1.10, '2024-01-02 03:04:05.123456');";

/// Plant every kind of difference into the target, then check verify names exactly them.
/// `plus_one_microsecond` is the engine's SQL for `at + 1 µs`.
fn plant_and_check(
    source: &str,
    target: &str,
    exec_target: impl Fn(&str),
    plus_one_microsecond: &str,
) {
    let (out, json) = verify(&["--source", source, "--target", target]);
    assert_eq!(out.status.code(), Some(0), "{}\n{}", out.stdout, out.stderr);
    assert_eq!(json["equal"], true);
    exec_target(&format!(
        "UPDATE planted SET name = 'uno' WHERE id = 1;
         DELETE FROM planted WHERE id = 2;
         INSERT INTO planted (id, name) VALUES (100, 'extra');
         UPDATE planted SET note = '' WHERE id = 3;
         UPDATE planted SET name = 'four ' WHERE id = 4;
         UPDATE planted SET at = {plus_one_microsecond} WHERE id = 5;
         UPDATE planted SET free = 1.1 WHERE id = 6;
         UPDATE planted SET amount = 1.11 WHERE id = 7;"
    ));
    let (out, json) = verify(&["--source", source, "--target", target, "--show-values"]);
    assert_eq!(out.status.code(), Some(1), "{}\n{}", out.stdout, out.stderr);
    let expected = set(&[
        ("1", "differs", "name"),
        ("2", "missing in target", ""),
        ("3", "differs", "note"),
        ("4", "differs", "name"),
        ("5", "differs", "at"),
        ("7", "differs", "amount"),
        ("100", "extra in target", ""),
    ]);
    assert_eq!(differences(&json), expected, "{json:#}");
    // Values only when asked for.
    assert!(out.stdout.contains("uno"), "{}", out.stdout);
    let (_, quiet) = verify(&["--source", source, "--target", target]);
    assert!(!quiet.to_string().contains("uno"), "{quiet}");
    // Text output names the table and the key; --quick sees the count difference only.
    let mut text = kuaka();
    text.args(["verify", "--source", source, "--target", target]);
    let text = run(text);
    assert_eq!(text.status.code(), Some(1));
    assert!(
        text.stdout.contains("planted") && text.stdout.contains("key (2): missing in target"),
        "{}",
        text.stdout
    );
    // Same row count on both sides (one missing, one extra), but the largest key differs.
    let (out, json) = verify(&["--source", source, "--target", target, "--quick"]);
    assert_eq!(out.status.code(), Some(1), "{json:#}");
    assert!(
        json.to_string().contains("keys range from 1 to 8"),
        "{json:#}"
    );
    // Repair re-copies exactly the differing keys; the copy is then equal.
    let (out, json) = verify(&["--source", source, "--target", target, "--repair"]);
    assert_eq!(out.status.code(), Some(0), "{json:#}\n{}", out.stderr);
    let repaired: u64 = json["tables"]
        .as_array()
        .expect("tables")
        .iter()
        .map(|t| t["repaired"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(repaired, 7, "{json:#}");
    let (out, json) = verify(&["--source", source, "--target", target]);
    assert_eq!(out.status.code(), Some(0), "{json:#}");
}

fn snapshot(source: &str, target: &str, state: &Path) {
    let mut c = kuaka();
    c.args([
        "run",
        "--snapshot-only",
        "--source",
        source,
        "--target",
        target,
        "--state",
    ])
    .arg(state);
    run(c).assert_success();
}

#[test]
fn verify_pg_to_pg_finds_every_planted_difference() {
    let source = pg().create_db("verify_src");
    let target = pg().create_db("verify_dst");
    psql(
        &source,
        &format!(
            "CREATE TABLE planted (id int PRIMARY KEY, name varchar(20), note text, amount numeric(10,2), free numeric, at timestamp(6)); {ROWS}"
        ),
    );
    let state = tempfile::tempdir().expect("state");
    snapshot(&source, &target, state.path());
    plant_and_check(
        &source,
        &target,
        |sql| {
            psql(&target, sql);
        },
        "at + interval '1 microsecond'",
    );
}

#[test]
fn verify_mariadb_to_pg_finds_every_planted_difference() {
    let server = mariadb();
    let source = server.create_db("verify_my_src");
    server.exec_script(
        "verify_my_src",
        &format!(
            "CREATE TABLE planted (id int PRIMARY KEY, name varchar(20), note text, amount decimal(10,2), free decimal(20,5), at datetime(6)); {ROWS}"
        ),
    );
    let target = pg().create_db("verify_my_dst");
    let state = tempfile::tempdir().expect("state");
    snapshot(&source, &target, state.path());
    plant_and_check(
        &source,
        &target,
        |sql| {
            psql(&target, sql);
        },
        "at + interval '1 microsecond'",
    );
}

#[test]
fn verify_pg_to_mariadb_finds_every_planted_difference() {
    let source = pg().create_db("verify_pgmy_src");
    psql(
        &source,
        &format!(
            "CREATE TABLE planted (id int PRIMARY KEY, name varchar(20), note text, amount numeric(10,2), free numeric, at timestamp(6)); {ROWS}"
        ),
    );
    let server = mariadb();
    let target = server.create_db("verify_pgmy_dst");
    let state = tempfile::tempdir().expect("state");
    snapshot(&source, &target, state.path());
    plant_and_check(
        &source,
        &target,
        |sql| server.exec_script("verify_pgmy_dst", sql),
        "at + INTERVAL 1 MICROSECOND",
    );
}

#[test]
fn verify_sqlite_to_mariadb_finds_every_planted_difference() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("planted.db");
    Connection::open(&path)
        .expect("open")
        .execute_batch(&format!(
            "CREATE TABLE planted (id INTEGER PRIMARY KEY, name VARCHAR(20), note TEXT, amount NUMERIC(10,2), free NUMERIC, at DATETIME); {ROWS}"
        ))
        .expect("schema");
    let source = format!("sqlite://{}", path.display());
    let server = mariadb();
    let target = server.create_db("verify_lite_dst");
    snapshot(&source, &target, &dir.path().join("state"));
    plant_and_check(
        &source,
        &target,
        |sql| server.exec_script("verify_lite_dst", sql),
        "at + INTERVAL 1 MICROSECOND",
    );
}

/// Errors are errors (exit 2), not differences.
#[test]
fn verify_errors_exit_2() {
    let mut c = kuaka();
    c.args([
        "verify",
        "--source",
        "postgres://nobody@127.0.0.1:1/x",
        "--target",
    ])
    .arg(pg().url("postgres"));
    let out = run(c);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("(source)"), "{}", out.stderr);
    // The side is named: a wrong target password is the target's.
    let mut c = kuaka();
    c.args(["verify", "--source"])
        .arg(pg().url("postgres"))
        .args(["--target", "postgres://nobody:secret-pw@127.0.0.1:1/x"]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("(target)") && !out.stderr.contains("secret-pw"),
        "{}",
        out.stderr
    );
    let mut c = kuaka();
    c.args(["verify", "--source", "sqlite:///nonexistent/dir/x.db"]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("--target"), "{}", out.stderr);
}

#[test]
fn verify_mariadb_to_mariadb_finds_every_planted_difference() {
    let server = mariadb();
    let source = server.create_db("verify_mm_src");
    server.exec_script(
        "verify_mm_src",
        &format!(
            "CREATE TABLE planted (id int PRIMARY KEY, name varchar(20), note text, amount decimal(10,2), free decimal(20,5), at datetime(6)); {ROWS}"
        ),
    );
    let target = server.create_db("verify_mm_dst");
    let state = tempfile::tempdir().expect("state");
    snapshot(&source, &target, state.path());
    plant_and_check(
        &source,
        &target,
        |sql| server.exec_script("verify_mm_dst", sql),
        "at + INTERVAL 1 MICROSECOND",
    );
}

/// Same-engine MySQL chunks are digested by the servers: a difference deep in a big table
/// (past the first, calibrating chunk) is still found and named, including a NULL that moved
/// to the neighbouring column (which `CONCAT_WS` alone would not see).
#[test]
fn verify_mariadb_server_side_digests_find_differences() {
    let server = mariadb();
    let source = server.create_db("verify_push_src");
    server.exec_script(
        "verify_push_src",
        "CREATE TABLE big (id int PRIMARY KEY, a varchar(10), b varchar(10), n int NOT NULL);
         INSERT INTO big SELECT seq, 'x', NULL, seq FROM seq_1_to_5000;
         ANALYZE TABLE big;",
    );
    let target = server.create_db("verify_push_dst");
    server_digests_case(
        &source,
        &target,
        |sql| server.exec_script("verify_push_dst", sql),
        "UPDATE big SET a = NULL, b = 'x' WHERE id = 4321;
         UPDATE big SET n = 0 WHERE id = 2500;
         DELETE FROM big WHERE id = 4999;",
        &[
            ("2500", "differs", "n"),
            ("4321", "differs", "a,b"),
            ("4999", "missing in target", ""),
        ],
    );
}

/// The same on PostgreSQL → PostgreSQL: each server digests its chunks (composite row text,
/// two seeded 64-bit hashes); differences past the calibrating chunk are found and named.
#[test]
fn verify_pg_server_side_digests_find_differences() {
    let source = pg().create_db("verify_pgpush_src");
    let target = pg().create_db("verify_pgpush_dst");
    psql(
        &source,
        "CREATE TABLE big (id int PRIMARY KEY, a text, b text, n numeric(10,2), at timestamptz);
         INSERT INTO big SELECT g, 'x', NULL, g / 3.0, '2024-01-01 00:00:00+00'::timestamptz + g * interval '1 second'
           FROM generate_series(1, 5000) g;
         ANALYZE big;",
    );
    server_digests_case(
        &source,
        &target,
        |sql| {
            psql(&target, sql);
        },
        "UPDATE big SET a = NULL, b = 'x' WHERE id = 4321;
         UPDATE big SET a = '' WHERE id = 3000;
         UPDATE big SET at = at + interval '1 microsecond' WHERE id = 2500;
         DELETE FROM big WHERE id = 4999;",
        &[
            ("2500", "differs", "at"),
            ("3000", "differs", "a"),
            ("4321", "differs", "a,b"),
            ("4999", "missing in target", ""),
        ],
    );
}

/// MariaDB → PostgreSQL with `--server-digests`: both servers digest the same row text (MD5 of values printed alike),
/// so only digests travel; a latin1 column, an enum, a boolean, dates and datetimes take part,
/// and each planted difference past the calibrating chunk is found and named.
#[test]
fn verify_mariadb_to_pg_server_side_digests_find_differences() {
    let server = mariadb();
    let source = server.create_db("verify_xpush_src");
    server.exec_script(
        "verify_xpush_src",
        "CREATE TABLE big (id int PRIMARY KEY, a varchar(10), b text, n decimal(10,2) NOT NULL,
           at datetime(6), d date, flag tinyint(1), e enum('x','y'),
           l varchar(10) CHARACTER SET latin1, c char(8));
         INSERT INTO big SELECT seq, 'x', NULL, seq / 3, '2024-01-01 00:00:00' + INTERVAL seq SECOND,
           '2024-01-01' + INTERVAL seq DAY, seq % 2, IF(seq % 3 = 0, 'x', 'y'), 'café', 'c'
           FROM seq_1_to_5000;
         ANALYZE TABLE big;",
    );
    let target = pg().create_db("verify_xpush_dst");
    server_digests_case(
        &source,
        &target,
        |sql| {
            psql(&target, sql);
        },
        "UPDATE big SET a = NULL, b = 'x' WHERE id = 4321;
         UPDATE big SET a = '' WHERE id = 3000;
         UPDATE big SET at = at + interval '1 microsecond' WHERE id = 2500;
         UPDATE big SET n = n + 0.01 WHERE id = 1200;
         UPDATE big SET l = 'cafe' WHERE id = 1500;
         UPDATE big SET flag = NOT flag WHERE id = 1700;
         DELETE FROM big WHERE id = 4999;
         INSERT INTO big (id, n) VALUES (6000, 1);",
        &[
            ("1200", "differs", "n"),
            ("1500", "differs", "l"),
            ("1700", "differs", "flag"),
            ("2500", "differs", "at"),
            ("3000", "differs", "a"),
            ("4321", "differs", "a,b"),
            ("4999", "missing in target", ""),
            ("6000", "extra in target", ""),
        ],
    );
}

/// PostgreSQL → MariaDB with the same cross-engine digests; a boolean stored as 2 on the
/// MariaDB side is a difference, not a true.
#[test]
fn verify_pg_to_mariadb_server_side_digests_find_differences() {
    let source = pg().create_db("verify_xpush2_src");
    psql(
        &source,
        "CREATE TABLE big (id int PRIMARY KEY, a text, b varchar(10), n numeric(10,2),
           at timestamp, d date, flag boolean);
         INSERT INTO big SELECT g, 'x', NULL, g / 3.0, '2024-01-01'::timestamp + g * interval '1.5 second',
           date '2024-01-01' + g, g % 2 = 0 FROM generate_series(1, 5000) g;
         ANALYZE big;",
    );
    let server = mariadb();
    let target = server.create_db("verify_xpush2_dst");
    server_digests_case(
        &source,
        &target,
        |sql| server.exec_script("verify_xpush2_dst", sql),
        "UPDATE big SET a = NULL, b = 'x' WHERE id = 4321;
         UPDATE big SET a = '' WHERE id = 3000;
         UPDATE big SET at = at + INTERVAL 1 MICROSECOND WHERE id = 2500;
         UPDATE big SET flag = 2 WHERE id = 1700;
         UPDATE big SET d = NULL WHERE id = 1800;
         DELETE FROM big WHERE id = 4999;",
        &[
            ("1700", "differs", "flag"),
            ("1800", "differs", "d"),
            ("2500", "differs", "at"),
            ("3000", "differs", "a"),
            ("4321", "differs", "a,b"),
            ("4999", "missing in target", ""),
        ],
    );
}

/// Copy `source` (table `big`, 5,000 rows), verify it equal by server digests in many
/// chunks, plant `changes` on the target, and expect exactly `expected`.
fn server_digests_case(
    source: &str,
    target: &str,
    exec_target: impl Fn(&str),
    changes: &str,
    expected: &[(&str, &str, &str)],
) {
    let state = tempfile::tempdir().expect("state");
    snapshot(source, target, state.path());
    // Row estimates on the target too, so both sides chunk alike.
    exec_target(if target.starts_with("postgres") {
        "ANALYZE big;"
    } else {
        "ANALYZE TABLE big;"
    });
    let mut args = vec![
        "--source",
        source,
        "--target",
        target,
        "--chunk-rows",
        "100",
    ];
    if source.starts_with("postgres") != target.starts_with("postgres") {
        args.push("--server-digests");
    }
    let (out, json) = verify(&args);
    assert_eq!(out.status.code(), Some(0), "{json:#}\n{}", out.stderr);
    assert!(
        json["tables"][0]["chunks"].as_u64().unwrap_or(0) >= 40,
        "expected many chunks: {json:#}"
    );
    assert_eq!(json["tables"][0]["method"], "server digests", "{json:#}");
    exec_target(changes);
    let (out, json) = verify(&args);
    assert_eq!(out.status.code(), Some(1), "{json:#}");
    assert_eq!(differences(&json), set(expected), "{json:#}");
}

/// Streaming across engines pages both sides in the same key order: integer keys of every
/// width (a PostgreSQL side once sorted them as text, "10" before "9") and text keys with
/// case and trailing-space neighbours, in chunks far smaller than the table.
#[test]
fn verify_streams_many_chunks_across_engines() {
    let server = mariadb();
    let source = server.create_db("verify_pages_src");
    server.exec_script(
        "verify_pages_src",
        "CREATE TABLE ints (id int PRIMARY KEY, v varchar(10));
         INSERT INTO ints SELECT seq, CONCAT('v', seq) FROM seq_1_to_2000;
         CREATE TABLE words (w varchar(20) COLLATE utf8mb4_nopad_bin PRIMARY KEY, n int);
         INSERT INTO words SELECT CONCAT(CHAR(65 + seq % 26), seq), seq FROM seq_1_to_500;
         INSERT INTO words VALUES ('a', 1), ('A', 2), ('a ', 3), ('é', 4), ('Z', 5), ('😀', 6);
         ANALYZE TABLE ints, words;",
    );
    let target = pg().create_db("verify_pages_dst");
    let state = tempfile::tempdir().expect("state");
    snapshot(&source, &target, state.path());
    let (out, json) = verify(&[
        "--source",
        &source,
        "--target",
        &target,
        "--chunk-rows",
        "64",
    ]);
    assert_eq!(out.status.code(), Some(0), "{json:#}\n{}", out.stderr);
    assert_eq!(json["tables"][0]["method"], "streamed", "{json:#}");
    assert!(
        json["tables"][0]["chunks"].as_u64().unwrap_or(0) >= 30,
        "{json:#}"
    );
    psql(&target, "DELETE FROM words WHERE w = 'a ';");
    let (out, json) = verify(&[
        "--source",
        &source,
        "--target",
        &target,
        "--chunk-rows",
        "7",
    ]);
    assert_eq!(out.status.code(), Some(1), "{json:#}");
    let expected = set(&[("a ", "missing in target", "")]);
    assert_eq!(differences(&json), expected, "{json:#}");
}

/// A verification SIGKILLed part-way resumes from its checkpoint in the state dir: the parts
/// already compared are not compared again, and their differences are still reported.
#[test]
fn verify_resumes_after_sigkill() {
    let source = pg().create_db("verify_resume_src");
    let target = pg().create_db("verify_resume_dst");
    psql(
        &source,
        "CREATE TABLE big (id int PRIMARY KEY, v text);
         INSERT INTO big SELECT g, 'v' || g FROM generate_series(1, 5000) g;
         ANALYZE big;",
    );
    let state = tempfile::tempdir().expect("state");
    snapshot(&source, &target, state.path());
    psql(
        &target,
        "UPDATE big SET v = 'changed' WHERE id = 1; ANALYZE big;",
    );
    let state_arg = state.path().to_str().expect("utf-8 path");
    let args = [
        "verify",
        "--state",
        state_arg,
        "--chunk-rows",
        "100",
        "--jobs",
        "1",
        "--rechecks",
        "0",
    ];
    let mut first = kuaka();
    first
        .args(args)
        .env("KUAKA_FAILPOINT", "verify.after_part:2");
    run(first).assert_killed_by_sigkill();
    let mut status = kuaka();
    status.args(["status", "--state", state_arg]);
    let status = run(status);
    assert!(
        status
            .stdout
            .contains("verification running (or interrupted)")
            && status.stdout.contains("2/4 parts"),
        "{}",
        status.stdout
    );
    let mut second = kuaka();
    second.args(args).arg("--json");
    let out = run(second);
    assert_eq!(out.status.code(), Some(1), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("resuming the verification") && out.stderr.contains("2 of 4 parts"),
        "{}",
        out.stderr
    );
    let json: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(json["rows"], 5000, "{json:#}");
    assert_eq!(
        differences(&json),
        set(&[("1", "differs", "v")]),
        "{json:#}"
    );
    // Finished: the next run starts over (and finds the same).
    let mut third = kuaka();
    third.args(args);
    let out = run(third);
    assert_eq!(out.status.code(), Some(1));
    assert!(!out.stderr.contains("resuming"), "{}", out.stderr);
}

/// A table without a key is compared as two multisets of rows: a missing duplicate copy and a
/// changed row are found (and counted), nothing else.
#[test]
fn verify_keyless_tables_as_multisets() {
    let server = mariadb();
    let source = server.create_db("verify_nokey_src");
    server.exec_script(
        "verify_nokey_src",
        "CREATE TABLE log (at datetime(6), msg varchar(40), n decimal(6,2));
         INSERT INTO log VALUES ('2024-01-01 00:00:01', 'start', 1.5), ('2024-01-01 00:00:01', 'start', 1.5),
           ('2024-01-01 00:00:01', 'start', 1.5), ('2024-01-01 00:00:02', 'tick', NULL), ('2024-01-01 00:00:03', 'stop', 0);",
    );
    let target = pg().create_db("verify_nokey_dst");
    let state = tempfile::tempdir().expect("state");
    snapshot(&source, &target, state.path());
    let args = ["--source", source.as_str(), "--target", target.as_str()];
    let (out, json) = verify(&args);
    assert_eq!(out.status.code(), Some(0), "{json:#}\n{}", out.stderr);
    assert_eq!(json["tables"][0]["method"], "multiset (no key)", "{json:#}");
    psql(
        &target,
        "DELETE FROM log WHERE ctid = (SELECT min(ctid) FROM log WHERE msg = 'start');
         UPDATE log SET n = 0.01 WHERE msg = 'stop';",
    );
    let (out, json) = verify(&args);
    assert_eq!(out.status.code(), Some(1), "{json:#}");
    let kinds: Vec<(String, String)> = json["tables"][0]["differences"]
        .as_array()
        .expect("differences")
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap_or_default().to_owned(),
                d["key"][1].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let mut kinds = kinds;
    kinds.sort();
    assert_eq!(
        kinds,
        [
            (
                "extra in target".to_owned(),
                "0 on the source, 1 on the target".to_owned()
            ),
            (
                "missing in target".to_owned(),
                "1 on the source, 0 on the target".to_owned()
            ),
            (
                "missing in target".to_owned(),
                "3 on the source, 2 on the target".to_owned()
            ),
        ],
        "{json:#}"
    );
}

/// A table keyed by text in a case-insensitive collation: no index gives the binary order
/// verify compares in, so each side is read by one sorted query and rows are matched by key
/// as they arrive (pages would sort the table once each). Differences far apart in the
/// table are all found in one narrowing (pages would narrow once per page), and repair
/// fixes them; into PostgreSQL and into MariaDB.
#[test]
fn verify_text_keys_in_a_case_insensitive_collation_are_read_in_one_sorted_pass() {
    let server = mariadb();
    let source = server.create_db("verify_ci_src");
    // Upper and lower case alternate: the collation's order interleaves them, the binary
    // order puts every upper-case key first.
    server.exec_script(
        "verify_ci_src",
        "CREATE TABLE words (w varchar(40) COLLATE utf8mb4_general_ci PRIMARY KEY, n int, note varchar(10));
         INSERT INTO words SELECT CONCAT(CHAR(65 + seq % 26 + 32 * (seq % 2)), '-', seq), seq, 'x' FROM seq_1_to_3000;
         INSERT INTO words VALUES ('é', -1, NULL), ('Z', -2, ''), ('ß', -3, 'y');
         ANALYZE TABLE words;",
    );
    let to_pg = pg().create_db("verify_ci_dst");
    let to_mariadb = server.create_db("verify_ci_dst");
    type Exec<'a> = Box<dyn Fn(&str) + 'a>;
    let targets: [(&str, Exec); 2] = [
        (
            &to_pg,
            Box::new(|sql: &str| {
                psql(&to_pg, sql);
            }),
        ),
        (
            &to_mariadb,
            Box::new(|sql: &str| server.exec_script("verify_ci_dst", sql)),
        ),
    ];
    for (target, exec_target) in targets {
        let state = tempfile::tempdir().expect("state");
        snapshot(&source, target, state.path());
        let args = [
            "--source",
            &source,
            "--target",
            target,
            "--chunk-rows",
            "100",
        ];
        let (out, json) = verify(&args);
        assert_eq!(out.status.code(), Some(0), "{json:#}\n{}", out.stderr);
        assert_eq!(json["tables"][0]["source_rows"], 3003, "{json:#}");
        assert_eq!(json["tables"][0]["narrowed"], 0, "{json:#}");
        exec_target(
            "DELETE FROM words WHERE w = 'A-26';
             UPDATE words SET n = 0 WHERE w = 'j-2999';
             UPDATE words SET note = NULL WHERE w = 'Z';
             INSERT INTO words VALUES ('zz-extra', 1, NULL);",
        );
        let (out, json) = verify(&args);
        assert_eq!(out.status.code(), Some(1), "{json:#}\n{}", out.stderr);
        let expected = set(&[
            ("A-26", "missing in target", ""),
            ("j-2999", "differs", "n"),
            ("Z", "differs", "note"),
            ("zz-extra", "extra in target", ""),
        ]);
        assert_eq!(differences(&json), expected, "{json:#}");
        assert_eq!(json["tables"][0]["narrowed"], 1, "{json:#}");
        let repair = [&args[..], &["--repair"]].concat();
        let (out, json) = verify(&repair);
        assert_eq!(out.status.code(), Some(0), "{json:#}\n{}", out.stderr);
        assert_eq!(json["tables"][0]["repaired"], 4, "{json:#}");
        let (out, json) = verify(&args);
        assert_eq!(out.status.code(), Some(0), "{json:#}\n{}", out.stderr);
        // A target far from its source (more than ten pages of rows without their match)
        // is compared page by page instead: every difference is still named.
        exec_target("DELETE FROM words WHERE n > 1500;");
        let (out, json) = verify(&args);
        assert_eq!(out.status.code(), Some(1), "{json:#}\n{}", out.stderr);
        let found = differences(&json);
        assert_eq!(found.len(), 1500, "{json:#}");
        assert!(found.iter().all(|(_, kind, _)| kind == "missing in target"));
        assert!(json["tables"][0]["narrowed"].as_u64() > Some(1), "{json:#}");
        assert!(
            out.stderr.contains("comparing it page by page"),
            "{}",
            out.stderr
        );
    }
}

/// Two source keys that are one key in the target's type (`'a'` and `'a '` into `char(n)`)
/// are not taken for one row: the table is not equal.
#[test]
fn verify_two_source_keys_equal_in_the_target_type_are_not_one_row() {
    let server = mariadb();
    let source = server.create_db("verify_pad_src");
    server.exec_script(
        "verify_pad_src",
        "CREATE TABLE k (w varchar(5) COLLATE utf8mb4_nopad_bin PRIMARY KEY, n int);
         INSERT INTO k VALUES ('a', 1), ('a ', 1), ('b', 2);",
    );
    let target = pg().create_db("verify_pad_dst");
    psql(
        &target,
        "CREATE TABLE k (w char(5) PRIMARY KEY, n int); INSERT INTO k VALUES ('a', 1), ('b', 2);",
    );
    let (out, json) = verify(&["--source", &source, "--target", &target]);
    assert_eq!(out.status.code(), Some(1), "{json:#}\n{}", out.stderr);
    assert_eq!(json["equal"], false, "{json:#}");
}

/// A latin1 text key with accented values: rows are found again by their keys (the key's
/// literal is compared in the column's character set), so each difference has its kind.
#[test]
fn verify_latin1_text_keys_are_read_back_by_key() {
    let server = mariadb();
    let source = server.create_db("verify_latin1_src");
    server.exec_script(
        "verify_latin1_src",
        "CREATE TABLE names (w varchar(20) CHARACTER SET latin1 COLLATE latin1_bin PRIMARY KEY, n int);
         INSERT INTO names VALUES ('e', 1), ('é', 2), ('z', 3), ('Ä', 4), ('ü-x', 5);",
    );
    let target = pg().create_db("verify_latin1_dst");
    let state = tempfile::tempdir().expect("state");
    snapshot(&source, &target, state.path());
    let args = ["--source", &source, "--target", &target];
    let (out, json) = verify(&args);
    assert_eq!(out.status.code(), Some(0), "{json:#}\n{}", out.stderr);
    psql(
        &target,
        "UPDATE names SET n = 20 WHERE w = 'é'; DELETE FROM names WHERE w = 'Ä';",
    );
    let (out, json) = verify(&args);
    assert_eq!(out.status.code(), Some(1), "{json:#}\n{}", out.stderr);
    let expected = set(&[("é", "differs", "n"), ("Ä", "missing in target", "")]);
    assert_eq!(differences(&json), expected, "{json:#}");
    let (out, json) = verify(&[&args[..], &["--repair"]].concat());
    assert_eq!(out.status.code(), Some(0), "{json:#}\n{}", out.stderr);
    assert_eq!(json["tables"][0]["repaired"], 2, "{json:#}");
}
