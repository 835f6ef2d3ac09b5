//! SQLite sources (to SQLite and PostgreSQL) and `kuaka demo`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use kuaka::demo_data::table_digest;
use rusqlite::Connection;

use crate::support::mariadb::mariadb;
use crate::support::postgres::query_rows;
use crate::support::{Background, kuaka, pg, run};
use crate::verify::{assert_verified, verify};

fn chinook_copy(dir: &Path) -> PathBuf {
    let path = dir.join("chinook.db");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chinook/Chinook_Sqlite.sqlite"),
        &path,
    )
    .expect("copy chinook");
    path
}

fn url(path: &Path) -> String {
    format!("sqlite://{}", path.display())
}

fn stream(source: &str, target: &str, state: &Path, extra: &[&str]) -> std::process::Command {
    let mut c = kuaka();
    c.args(["run", "--source", source, "--target", target, "--state"])
        .arg(state)
        .args(extra);
    c
}

/// Keeps changing chinook: new invoice lines, price changes, deletes, Unicode names.
fn chinook_writer(path: PathBuf, stop: Arc<AtomicBool>) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let conn = Connection::open(&path).expect("writer open");
        conn.busy_timeout(Duration::from_secs(10)).expect("busy");
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let sql = format!(
                "BEGIN;
                 INSERT INTO InvoiceLine (InvoiceLineId, InvoiceId, TrackId, UnitPrice, Quantity) VALUES ({id}, 1, {track}, 0.99, {q});
                 UPDATE Track SET UnitPrice = UnitPrice + 0.01, Name = Name || '·é🎵' WHERE TrackId = {track};
                 DELETE FROM InvoiceLine WHERE InvoiceLineId = {old};
                 COMMIT;",
                id = 100_000 + n,
                track = 1 + n % 3000,
                q = n % 7,
                old = 1 + n % 2000
            );
            if let Err(e) = conn.execute_batch(&sql) {
                let _ = conn.execute_batch("ROLLBACK");
                if !e.to_string().contains("locked") && !e.to_string().contains("busy") {
                    panic!("writer: {e}");
                }
            }
            thread::sleep(Duration::from_millis(3));
        }
        n
    })
}

/// Per table: the rows as text, ordered by key, read with each engine's own client.
fn sqlite_rows(path: &Path, sql: &str) -> Vec<String> {
    let conn = Connection::open(path).expect("open");
    let mut stmt = conn.prepare(sql).expect("prepare");
    let n = stmt.column_count();
    stmt.query_map([], |r| {
        Ok((0..n)
            .map(|i| match r.get_ref(i).expect("value") {
                rusqlite::types::ValueRef::Null => String::new(),
                rusqlite::types::ValueRef::Integer(v) => v.to_string(),
                rusqlite::types::ValueRef::Real(v) => format!("{v:.2}"),
                rusqlite::types::ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                rusqlite::types::ValueRef::Blob(b) => format!("{b:?}"),
            })
            .collect::<Vec<_>>()
            .join("|"))
    })
    .expect("query")
    .collect::<Result<Vec<_>, _>>()
    .expect("rows")
}

/// A target database of the SQLite tests, and how to read it with the engine's own client.
enum Dest {
    Postgres(String),
    /// A database of the suite's MariaDB server.
    Mariadb(String),
}

impl Dest {
    fn postgres(name: &str) -> Dest {
        Dest::Postgres(pg().create_db(name))
    }

    fn mariadb(name: &str) -> Dest {
        mariadb().create_db(name);
        Dest::Mariadb(name.to_owned())
    }

    fn url(&self) -> String {
        match self {
            Dest::Postgres(url) => url.clone(),
            Dest::Mariadb(db) => mariadb().url(db),
        }
    }

    /// An identifier quoted for this engine.
    fn q(&self, name: &str) -> String {
        match self {
            Dest::Postgres(_) => format!("\"{name}\""),
            Dest::Mariadb(_) => format!("`{name}`"),
        }
    }

    fn rows(&self, sql: &str) -> Vec<Vec<String>> {
        match self {
            Dest::Postgres(url) => query_rows(url, sql),
            Dest::Mariadb(db) => mariadb().rows(db, sql),
        }
    }
}

/// The rows of a SQLite query and of a target query are the same (only the first
/// differences are printed).
fn compare(source: &Path, target: &Dest, sqlite_sql: &str, target_sql: &str, what: &str) {
    let a = sqlite_rows(source, sqlite_sql);
    let b: Vec<String> = target
        .rows(target_sql)
        .into_iter()
        .map(|r| r.join("|"))
        .collect();
    if a != b {
        let diff: Vec<String> = a
            .iter()
            .zip(&b)
            .filter(|(x, y)| x != y)
            .take(5)
            .map(|(x, y)| format!("source {x} / target {y}"))
            .collect();
        panic!(
            "{what}: {} source rows, {} target rows; first differences: {diff:?}",
            a.len(),
            b.len()
        );
    }
}

/// Chinook SQLite → PostgreSQL while a writer changes it; kuaka is SIGKILLed mid-stream and
/// resumes. Every table then has the same keys on both sides, and the written columns the same
/// values.
#[test]
fn sqlite_chinook_to_postgres_under_writes_with_sigkill() {
    chinook_under_writes_with_sigkill(Dest::postgres("sqlite_chinook_dst"));
}

/// The same into MariaDB.
#[test]
fn sqlite_chinook_to_mariadb_under_writes_with_sigkill() {
    chinook_under_writes_with_sigkill(Dest::mariadb("sqlite_chinook_dst"));
}

fn chinook_under_writes_with_sigkill(dest: Dest) {
    let dir = tempfile::tempdir().expect("dir");
    let source = chinook_copy(dir.path());
    let target = dest.url();
    let state = dir.path().join("state");
    let mut first = Background::spawn(stream(&url(&source), &target, &state, &[]));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = chinook_writer(source.clone(), stop.clone());
    thread::sleep(Duration::from_millis(2500));
    assert!(first.is_running(), "{}", first.stderr());
    first.kill().assert_killed_by_sigkill();
    let mut second = Background::spawn(stream(&url(&source), &target, &state, &[]));
    thread::sleep(Duration::from_millis(1500));
    // Verify while the writer writes and the job applies: no difference may be reported
    // (one seen while its change is on the way is re-read, and is gone then).
    crate::support::wait_until("the resumed job to stream", Duration::from_secs(60), || {
        assert!(second.is_running(), "{}", second.stderr());
        crate::support::job_phase(&state) == "streaming"
    });
    crate::verify::assert_verified_while_writing(&state);
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().expect("writer");
    assert!(writes > 20, "the writer made only {writes} transactions");
    second.kill();
    run(stream(
        &url(&source),
        &target,
        &state,
        &["--until", "caught-up"],
    ))
    .assert_exit_code(0);
    assert_verified(&state);
    for (table, key) in [
        ("Album", "AlbumId"),
        ("Artist", "ArtistId"),
        ("Customer", "CustomerId"),
        ("Employee", "EmployeeId"),
        ("Genre", "GenreId"),
        ("Invoice", "InvoiceId"),
        ("InvoiceLine", "InvoiceLineId"),
        ("MediaType", "MediaTypeId"),
        ("Playlist", "PlaylistId"),
        ("Track", "TrackId"),
    ] {
        compare(
            &source,
            &dest,
            &format!("SELECT {key} FROM {table} ORDER BY 1"),
            &format!("SELECT {} FROM {} ORDER BY 1", dest.q(key), dest.q(table)),
            &format!("keys of {table}"),
        );
    }
    let q = |n: &str| dest.q(n);
    compare(
        &source,
        &dest,
        "SELECT TrackId, Name, printf('%.2f', UnitPrice) FROM Track ORDER BY 1",
        &format!(
            "SELECT {}, {}, {} FROM {} ORDER BY 1",
            q("TrackId"),
            q("Name"),
            q("UnitPrice"),
            q("Track")
        ),
        "Track",
    );
    compare(
        &source,
        &dest,
        "SELECT InvoiceLineId, InvoiceId, TrackId, printf('%.2f', UnitPrice), Quantity FROM InvoiceLine ORDER BY 1",
        &format!(
            "SELECT {}, {}, {}, {}, {} FROM {} ORDER BY 1",
            q("InvoiceLineId"),
            q("InvoiceId"),
            q("TrackId"),
            q("UnitPrice"),
            q("Quantity"),
            q("InvoiceLine")
        ),
        "InvoiceLine",
    );
    // Clean removes the triggers and the change table from the source.
    let mut clean = kuaka();
    clean.args(["clean", "--state"]).arg(&state);
    run(clean).assert_exit_code(0);
    let left: i64 = Connection::open(&source)
        .expect("open")
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE name LIKE '\\_kuaka%' ESCAPE '\\'",
            [],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(left, 0);
}

const ODD_SCHEMA: &str = "
    CREATE TABLE anything (id INTEGER PRIMARY KEY, v);
    CREATE TABLE pairs (a TEXT, b BLOB, note TEXT, PRIMARY KEY (a, b)) WITHOUT ROWID;
    INSERT INTO anything VALUES (1, 42), (2, 2.5), (3, 'forty-two'), (4, NULL), (5, '中文 😀');
    INSERT INTO pairs VALUES ('k', X'01', 'blob key'), ('k', '01', 'text key'), ('😀', X'', 'emoji');
    INSERT INTO pairs VALUES ('K', X'01', 'upper case'), ('k ', X'01', 'trailing space');
";

const ODD_CHANGES: &str = "
    UPDATE anything SET v = 7 WHERE id = 3;
    UPDATE anything SET v = 'seven' WHERE id = 1;
    INSERT INTO anything VALUES (6, 1e300), (7, -0.0);
    DELETE FROM pairs WHERE a = 'k' AND b = X'01';
    INSERT INTO pairs VALUES ('k', X'02', 'ünïcödé');
    UPDATE pairs SET a = 'moved' WHERE a = '😀';
";

/// Mixed storage classes in one column and a WITHOUT ROWID table with a blob/text key, to a
/// SQLite target: every value keeps its storage class, before and after the snapshot.
#[test]
fn sqlite_mixed_storage_classes_and_without_rowid_to_sqlite() {
    let dir = tempfile::tempdir().expect("dir");
    let source = dir.path().join("odd.db");
    let target = dir.path().join("copy.db");
    Connection::open(&source)
        .expect("open")
        .execute_batch(ODD_SCHEMA)
        .expect("schema");
    let state = dir.path().join("state");
    run(stream(
        &url(&source),
        &url(&target),
        &state,
        &["--until", "caught-up"],
    ))
    .assert_exit_code(0);
    Connection::open(&source)
        .expect("open")
        .execute_batch(ODD_CHANGES)
        .expect("changes");
    run(stream(
        &url(&source),
        &url(&target),
        &state,
        &["--until", "caught-up"],
    ))
    .assert_exit_code(0);
    let (s, t) = (
        Connection::open(&source).expect("open"),
        Connection::open(&target).expect("open"),
    );
    for table in ["anything", "pairs"] {
        let a = table_digest(&s, table).expect("digest");
        assert_eq!(a, table_digest(&t, table).expect("digest"), "{table}");
    }
    // kuaka verify agrees, paging one key at a time through text and blob keys.
    let state_arg = state.to_str().expect("utf-8 path");
    let (out, json) = verify(&["--state", state_arg, "--chunk-rows", "1"]);
    assert_eq!(out.status.code(), Some(0), "{json:#}\n{}", out.stderr);
    // The digest sees storage classes: make sure it would have caught a difference.
    t.execute("UPDATE anything SET v = '42' WHERE id = 1", [])
        .expect("plant");
    s.execute("UPDATE anything SET v = 42 WHERE id = 1", [])
        .expect("plant");
    assert_ne!(
        table_digest(&s, "anything").expect("digest"),
        table_digest(&t, "anything").expect("digest")
    );
    // So does kuaka verify (SQLite to SQLite compares storage classes too).
    let (out, json) = verify(&["--state", state_arg, "--rechecks", "0"]);
    assert_eq!(out.status.code(), Some(1), "{json:#}");
    assert!(json.to_string().contains("\"v\""), "{json:#}");
}

/// The same to PostgreSQL: an untyped column becomes text, a blob key bytea; values that do
/// not fit their column are refused with the table, column and key.
#[test]
fn sqlite_mixed_storage_classes_to_postgres() {
    mixed_storage_classes(Dest::postgres("sqlite_odd_dst"));
}

/// The same to MariaDB: text and blob keys become varchar/varbinary compared byte by byte, so
/// `'k'`, `X'6b'`-like neighbours stay distinct.
#[test]
fn sqlite_mixed_storage_classes_to_mariadb() {
    mixed_storage_classes(Dest::mariadb("sqlite_odd_dst"));
}

fn mixed_storage_classes(dest: Dest) {
    let dir = tempfile::tempdir().expect("dir");
    let source = dir.path().join("odd.db");
    Connection::open(&source)
        .expect("open")
        .execute_batch(ODD_SCHEMA)
        .expect("schema");
    let target = dest.url();
    let state = dir.path().join("state");
    run(stream(
        &url(&source),
        &target,
        &state,
        &["--until", "caught-up"],
    ))
    .assert_exit_code(0);
    Connection::open(&source)
        .expect("open")
        .execute_batch(ODD_CHANGES)
        .expect("changes");
    run(stream(
        &url(&source),
        &target,
        &state,
        &["--until", "caught-up"],
    ))
    .assert_exit_code(0);
    let rows = dest.rows("SELECT id, coalesce(v, '<null>') FROM anything ORDER BY id");
    let flat: Vec<String> = rows.into_iter().map(|r| r.join("=")).collect();
    assert_eq!(
        flat,
        [
            "1=seven",
            "2=2.5",
            "3=7",
            "4=<null>",
            "5=中文 😀",
            "6=1e300",
            "7=-0.0"
        ]
    );
    let hex = match dest {
        Dest::Postgres(_) => "encode(b, 'hex')",
        Dest::Mariadb(_) => "lower(hex(b))",
    };
    // Keys that differ only in case or a trailing space stay distinct rows (sorted here, not by
    // the target's collation).
    let rows = dest.rows(&format!("SELECT a, {hex}, note FROM pairs"));
    let mut flat: Vec<String> = rows.into_iter().map(|r| r.join("|")).collect();
    flat.sort();
    assert_eq!(
        flat,
        [
            "K|01|upper case",
            "k |01|trailing space",
            "k|02|ünïcödé",
            "k|3031|text key",
            "moved||emoji"
        ]
    );
    // A value PostgreSQL cannot hold in its column: a clear error, nothing applied.
    Connection::open(&source)
        .expect("open")
        .execute_batch("INSERT INTO anything VALUES (8, X'00ff');")
        .expect("insert");
    let out = run(stream(
        &url(&source),
        &target,
        &state,
        &["--until", "caught-up"],
    ));
    out.assert_exit_code(2);
    assert!(
        out.stderr.contains("anything")
            && out.stderr.contains("column v")
            && out.stderr.contains("key 8"),
        "{}",
        out.stderr
    );
}

/// The README's first command works, and proves its copy.
#[test]
fn demo_runs_and_verifies() {
    let dir = tempfile::tempdir().expect("dir");
    let mut c = kuaka();
    c.args(["demo", "--scale", "1", "--seconds", "2", "--dir"])
        .arg(dir.path());
    let out = run(c);
    out.assert_exit_code(0);
    assert!(
        out.stdout.contains("source and target are equal"),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
    // It walked through a cutover (the writer wrote on the copy) and a fallback.
    for line in ["4/7 cutover", "5/7 fallback"] {
        assert!(out.stderr.contains(line), "no {line:?} in:\n{}", out.stderr);
    }
    let on_copy: u64 = out
        .stdout
        .lines()
        .find_map(|l| l.split("the writer made ").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        on_copy > 0,
        "no writes on the copy after the cutover:\n{}",
        out.stdout
    );
    // An independent check of the demo's own verification: every table's rows and storage
    // classes, hashed on both sides by SQLite.
    let source = Connection::open(dir.path().join("shop.db")).expect("open");
    let copy = Connection::open(dir.path().join("shop-copy.db")).expect("open");
    for table in ["customers", "products", "orders", "order_lines"] {
        assert_eq!(
            table_digest(&source, table).expect("digest"),
            table_digest(&copy, table).expect("digest"),
            "{table}"
        );
    }
}
