//! SQLite sources (to SQLite and PostgreSQL) and `kuaka demo`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use kuaka::demo_data::table_digest;
use rusqlite::Connection;

use crate::support::postgres::query_rows;
use crate::support::{Background, kuaka, pg, run};

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

/// The rows of a SQLite query and of a PostgreSQL query are the same (only the first
/// differences are printed).
fn compare(source: &Path, target: &str, sqlite_sql: &str, pg_sql: &str, what: &str) {
    let a = sqlite_rows(source, sqlite_sql);
    let b: Vec<String> = query_rows(target, pg_sql)
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
    let dir = tempfile::tempdir().expect("dir");
    let source = chinook_copy(dir.path());
    let target = pg().create_db("sqlite_chinook_dst");
    let state = dir.path().join("state");
    let mut first = Background::spawn(stream(&url(&source), &target, &state, &[]));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = chinook_writer(source.clone(), stop.clone());
    thread::sleep(Duration::from_millis(2500));
    assert!(first.is_running(), "{}", first.stderr());
    first.kill().assert_killed_by_sigkill();
    let second = Background::spawn(stream(&url(&source), &target, &state, &[]));
    thread::sleep(Duration::from_millis(1500));
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
            &target,
            &format!("SELECT {key} FROM {table} ORDER BY 1"),
            &format!("SELECT \"{key}\" FROM \"{table}\" ORDER BY 1"),
            &format!("keys of {table}"),
        );
    }
    compare(
        &source,
        &target,
        "SELECT TrackId, Name, printf('%.2f', UnitPrice) FROM Track ORDER BY 1",
        "SELECT \"TrackId\", \"Name\", \"UnitPrice\" FROM \"Track\" ORDER BY 1",
        "Track",
    );
    compare(
        &source,
        &target,
        "SELECT InvoiceLineId, InvoiceId, TrackId, printf('%.2f', UnitPrice), Quantity FROM InvoiceLine ORDER BY 1",
        "SELECT \"InvoiceLineId\", \"InvoiceId\", \"TrackId\", \"UnitPrice\", \"Quantity\" FROM \"InvoiceLine\" ORDER BY 1",
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
    // The digest sees storage classes: make sure it would have caught a difference.
    t.execute("UPDATE anything SET v = '42' WHERE id = 1", [])
        .expect("plant");
    s.execute("UPDATE anything SET v = 42 WHERE id = 1", [])
        .expect("plant");
    assert_ne!(
        table_digest(&s, "anything").expect("digest"),
        table_digest(&t, "anything").expect("digest")
    );
}

/// The same to PostgreSQL: an untyped column becomes text, a blob key bytea; values that do
/// not fit their column are refused with the table, column and key.
#[test]
fn sqlite_mixed_storage_classes_to_postgres() {
    let dir = tempfile::tempdir().expect("dir");
    let source = dir.path().join("odd.db");
    Connection::open(&source)
        .expect("open")
        .execute_batch(ODD_SCHEMA)
        .expect("schema");
    let target = pg().create_db("sqlite_odd_dst");
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
    let rows = query_rows(
        &target,
        "SELECT id, coalesce(v, '<null>') FROM anything ORDER BY id",
    );
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
    let rows = query_rows(
        &target,
        "SELECT a, encode(b, 'hex'), note FROM pairs ORDER BY a, b",
    );
    let flat: Vec<String> = rows.into_iter().map(|r| r.join("|")).collect();
    assert_eq!(flat, ["k|02|ünïcödé", "k|3031|text key", "moved||emoji"]);
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
    assert!(dir.path().join("shop-copy.db").exists());
}
