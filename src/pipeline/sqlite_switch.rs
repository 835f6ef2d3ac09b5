//! Cutover and fallback of SQLite → SQLite jobs.
//!
//! - **Fence**: SQLite has no sessions or roles to hold off, so the fence is in the file:
//!   `BEFORE INSERT/UPDATE/DELETE` triggers named `kuaka_fence_*` on every table that abort
//!   with a message saying the database is read-only. They are created in one write
//!   transaction (it waits for the application's open write transaction, then every later one
//!   sees them). kuaka's own apply passes them: its transaction first inserts a row into
//!   `_kuaka_fence_pass`, which the triggers look for, and deletes it before committing, so
//!   no other connection ever sees it.
//! - **Reverse replication**: capture triggers and a change table on the target (the same
//!   mechanism as the forward direction), installed while it is fenced; the reverse stream
//!   applies to the source under its own job id (`<job>_r<N>`) in the source's
//!   `_kuaka_position`.
//! - **Fallback**: the forward stream resumes at the source's change position after the
//!   reverse stream's writes (the source's capture triggers recorded them; sending them to
//!   the target again would undo newer target rows), and the target's capture is removed.

use rusqlite::Connection;

use super::{Error, Result};
use crate::engine::sqlite::{self, quote_ident};

pub const FENCE_PREFIX: &str = "kuaka_fence_";
pub const PASS_TABLE: &str = "_kuaka_fence_pass";
const FENCE_MESSAGE: &str = "kuaka: this database is read-only (cutover): write to the other one";

fn fail(what: &str) -> impl FnOnce(rusqlite::Error) -> Error + '_ {
    move |e| Error::Definite(format!("{what}: {e}"))
}

/// The application's tables of a SQLite file (not SQLite's, not kuaka's).
fn user_tables(conn: &Connection) -> Result<Vec<String>> {
    conn.prepare(
        "SELECT name FROM sqlite_schema WHERE type = 'table' \
         AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' AND name NOT LIKE '\\_kuaka\\_%' ESCAPE '\\' ORDER BY name",
    )
    .and_then(|mut s| {
        s.query_map([], |r| r.get(0))
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<String>>>())
    })
    .map_err(fail("listing the tables to fence"))
}

/// Make every table of the file refuse the application's writes.
pub fn fence(path: &str) -> Result<String> {
    let mut conn = sqlite::open(path, false)?;
    let tables = user_tables(&conn)?;
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(fail("starting the fence transaction"))?;
    let mut sql = format!("CREATE TABLE IF NOT EXISTS {PASS_TABLE} (pass INTEGER);\n");
    for t in &tables {
        for (op, event) in [("ins", "INSERT"), ("upd", "UPDATE"), ("del", "DELETE")] {
            sql.push_str(&format!(
                "CREATE TRIGGER IF NOT EXISTS {} BEFORE {event} ON {} WHEN NOT EXISTS (SELECT 1 FROM {PASS_TABLE}) \
                 BEGIN SELECT RAISE(ABORT, '{FENCE_MESSAGE}'); END;\n",
                quote_ident(&format!("{FENCE_PREFIX}{op}_{t}")),
                quote_ident(t)
            ));
        }
    }
    tx.execute_batch(&sql)
        .map_err(fail("creating the fence triggers"))?;
    tx.commit().map_err(fail("creating the fence triggers"))?;
    Ok(format!(
        "{path}: {} tables refuse writes (triggers {FENCE_PREFIX}*)",
        tables.len()
    ))
}

/// Lift [`fence`].
pub fn unfence(path: &str) -> Result<()> {
    let conn = sqlite::open(path, false)?;
    let triggers: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_schema WHERE type = 'trigger' AND name LIKE 'kuaka\\_fence\\_%' ESCAPE '\\'",
        )
        .and_then(|mut s| {
            s.query_map([], |r| r.get(0))
                .and_then(|rows| rows.collect::<rusqlite::Result<Vec<String>>>())
        })
        .map_err(fail("listing the fence triggers"))?;
    let mut sql = String::from("BEGIN IMMEDIATE;");
    for t in &triggers {
        sql.push_str(&format!("DROP TRIGGER IF EXISTS {};", quote_ident(t)));
    }
    sql.push_str("COMMIT;");
    conn.execute_batch(&sql)
        .map_err(fail("dropping the fence triggers"))
}

/// `sqlite_sequence` (AUTOINCREMENT counters) of `to` raised to at least `from`'s. Returns
/// how many counters moved.
pub fn sync_sequences(from: &str, to: &str) -> Result<usize> {
    let read = |path: &str| -> Result<Vec<(String, i64)>> {
        let conn = sqlite::open(path, false)?;
        let exists: bool = conn
            .query_row(
                "SELECT count(*) > 0 FROM sqlite_schema WHERE name = 'sqlite_sequence'",
                [],
                |r| r.get(0),
            )
            .map_err(fail("reading sqlite_sequence"))?;
        if !exists {
            return Ok(Vec::new());
        }
        conn.prepare(
            "SELECT name, seq FROM sqlite_sequence WHERE name NOT LIKE '\\_kuaka\\_%' ESCAPE '\\'",
        )
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        })
        .map_err(fail("reading sqlite_sequence"))
    };
    let wanted = read(from)?;
    if wanted.is_empty() {
        return Ok(0);
    }
    let conn = sqlite::open(to, false)?;
    let mut moved = 0;
    for (table, seq) in wanted {
        moved += conn
            .execute(
                "UPDATE sqlite_sequence SET seq = ?2 WHERE name = ?1 AND seq < ?2",
                rusqlite::params![table, seq],
            )
            .map_err(fail("moving sqlite_sequence on the target"))?;
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fence_holds_off_writers_but_not_kuakas_passing_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.db");
        let path = path.to_str().unwrap();
        let app = Connection::open(path).unwrap();
        app.execute_batch(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT); INSERT INTO t VALUES (1, 'a');",
        )
        .unwrap();
        let said = fence(path).unwrap();
        assert!(said.contains("1 tables"), "{said}");
        for sql in [
            "INSERT INTO t VALUES (2, 'b')",
            "UPDATE t SET v = 'x'",
            "DELETE FROM t",
        ] {
            let err = app.execute_batch(sql).unwrap_err().to_string();
            assert!(err.contains("read-only"), "{sql}: {err}");
        }
        app.execute_batch(&format!(
            "BEGIN; INSERT INTO {PASS_TABLE} VALUES (1); INSERT INTO t VALUES (3, 'kuaka'); DELETE FROM {PASS_TABLE}; COMMIT;"
        ))
        .unwrap();
        // Fencing twice is harmless; unfencing lets the application write again.
        fence(path).unwrap();
        unfence(path).unwrap();
        app.execute_batch("INSERT INTO t VALUES (4, 'after')")
            .unwrap();
        let n: i64 = app
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 3);
    }
}
