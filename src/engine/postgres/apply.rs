//! Applying captured changes to a PostgreSQL target, exactly once.
//!
//! Contracts:
//! - Every apply transaction ends by moving the job's row in `kuaka.apply_position` to the
//!   commit position of the last source transaction it holds; a restart reads that row and
//!   skips every transaction at or before it. Nothing is applied twice, nothing is skipped.
//! - The session runs with `session_replication_role = replica`: target triggers and
//!   foreign-key actions stay silent (the source's own cascades arrive as changes).
//! - Within a batch, the changes of one table are reduced to their net effect per key (last
//!   image wins) and written as one `DELETE ... WHERE key IN (...)` and one multi-row
//!   `INSERT ... ON CONFLICT (key) DO UPDATE`; tables are independent of each other while
//!   constraints are off. Updates whose TOASTed values were not sent (unchanged) become
//!   `UPDATE`s of the columns that were, in order. If the reduction trips a unique constraint
//!   other than the key, the batch is retried in strict order, one statement per change.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64};

use tokio_postgres::Client;

use super::capture::KuakaRecord;
use super::decode::{self, PgOutput, TupleValue};
use super::{Context, Error, Result};
use crate::model::PgLsn;
use crate::model::schema::{QualifiedName, quote_ident, quote_literal};

/// Bookkeeping on the target: where apply got to, one row per job and worker.
pub const TARGET_APPLY_BOOKKEEPING: &str = "CREATE SCHEMA IF NOT EXISTS kuaka; \
     CREATE TABLE IF NOT EXISTS kuaka.apply_position (job_id text NOT NULL, worker integer NOT NULL, \
       position text NOT NULL, commit_time timestamptz, applied_at timestamptz NOT NULL DEFAULT now(), \
       PRIMARY KEY (job_id, worker))";

/// Pending rows of one table before its statements are written out.
const FLUSH_ROWS: usize = 5_000;

/// A relation as the change stream describes it.
#[derive(Debug)]
pub struct Relation {
    pub name: QualifiedName,
    pub columns: Vec<String>,
    pub key: Vec<usize>,
}

impl Relation {
    pub fn from_message(message: &PgOutput) -> Option<(u32, Relation)> {
        let PgOutput::Relation {
            id,
            namespace,
            name,
            columns,
            ..
        } = message
        else {
            return None;
        };
        Some((
            *id,
            Relation {
                name: QualifiedName::new(namespace.clone(), name.clone()),
                columns: columns.iter().map(|c| c.name.clone()).collect(),
                key: columns
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.is_key)
                    .map(|(i, _)| i)
                    .collect(),
            },
        ))
    }
}

/// One value of a change.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Cell {
    Null,
    Value(String),
    /// A TOASTed value the source did not send: the target keeps its own.
    Unchanged,
}

impl Cell {
    fn sql(&self) -> String {
        match self {
            Cell::Null | Cell::Unchanged => "NULL".to_owned(),
            Cell::Value(v) => quote_literal(v),
        }
    }
}

fn cells(table: &QualifiedName, tuple: &[TupleValue]) -> Result<Vec<Cell>> {
    tuple
        .iter()
        .map(|v| match v {
            TupleValue::Null => Ok(Cell::Null),
            TupleValue::Unchanged => Ok(Cell::Unchanged),
            TupleValue::Text(b) | TupleValue::Binary(b) => {
                String::from_utf8(b.clone()).map(Cell::Value).map_err(|_| {
                    Error::Definite(format!(
                        "a change of {} holds text that is not UTF-8",
                        table.display_name()
                    ))
                })
            }
        })
        .collect()
}

/// A row change, resolved against its relation.
#[derive(Debug)]
pub enum RowChange {
    Upsert {
        rel: Arc<Relation>,
        row: Vec<Cell>,
    },
    /// Some values unchanged (TOAST) or the key changed with some unchanged: `UPDATE` by key.
    Update {
        rel: Arc<Relation>,
        key: Vec<Cell>,
        row: Vec<Cell>,
    },
    Delete {
        rel: Arc<Relation>,
        key: Vec<Cell>,
    },
    Truncate {
        rels: Vec<Arc<Relation>>,
        restart_identity: bool,
    },
}

impl RowChange {
    /// An `UPDATE` that moves a row to another key (routed by its old key).
    pub fn moves_key(&self) -> bool {
        match self {
            RowChange::Update { rel, key, row } => key_of(rel, row) != *key,
            _ => false,
        }
    }

    /// The table and key a change belongs to (for per-key routing); `None` for truncates.
    pub fn routing_key(&self) -> Option<(&QualifiedName, Vec<&Cell>)> {
        match self {
            RowChange::Upsert { rel, row } => {
                Some((&rel.name, rel.key.iter().map(|i| &row[*i]).collect()))
            }
            RowChange::Update { rel, key, .. } | RowChange::Delete { rel, key } => {
                Some((&rel.name, key.iter().collect()))
            }
            RowChange::Truncate { .. } => None,
        }
    }
}

fn key_of(rel: &Relation, row: &[Cell]) -> Vec<Cell> {
    rel.key.iter().map(|i| row[*i].clone()).collect()
}

/// Turn a decoded row message into changes (a key-changing update is a delete and an upsert).
pub fn resolve(
    message: PgOutput,
    relations: &HashMap<u32, Arc<Relation>>,
) -> Result<Vec<RowChange>> {
    let rel_of = |id: u32| {
        relations.get(&id).cloned().ok_or_else(|| {
            Error::Definite(format!(
                "the change log refers to relation {id} before describing it"
            ))
        })
    };
    let check_key = |rel: &Relation, key: &[Cell]| {
        if rel.key.is_empty() || key.contains(&Cell::Unchanged) {
            Err(Error::Definite(format!(
                "a change of {} carries no usable key (no replica identity, or an unchanged TOASTed key)",
                rel.name.display_name()
            )))
        } else {
            Ok(())
        }
    };
    Ok(match message {
        PgOutput::Insert { relation, new } => {
            let rel = rel_of(relation)?;
            let row = cells(&rel.name, &new)?;
            check_key(&rel, &key_of(&rel, &row))?;
            vec![RowChange::Upsert { rel, row }]
        }
        PgOutput::Update {
            relation,
            old_key,
            old_row,
            new,
        } => {
            let rel = rel_of(relation)?;
            let row = cells(&rel.name, &new)?;
            let new_key = key_of(&rel, &row);
            let old_key = match old_key.or(old_row) {
                Some(old) => key_of(&rel, &cells(&rel.name, &old)?),
                None => new_key.clone(),
            };
            check_key(&rel, &old_key)?;
            let partial = row.contains(&Cell::Unchanged);
            if partial {
                vec![RowChange::Update {
                    rel,
                    key: old_key,
                    row,
                }]
            } else if old_key != new_key {
                vec![
                    RowChange::Delete {
                        rel: rel.clone(),
                        key: old_key,
                    },
                    RowChange::Upsert { rel, row },
                ]
            } else {
                vec![RowChange::Upsert { rel, row }]
            }
        }
        PgOutput::Delete {
            relation,
            old_key,
            old_row,
        } => {
            let rel = rel_of(relation)?;
            let old = old_key.or(old_row).ok_or_else(|| {
                Error::Definite(format!(
                    "a delete of {} carries no key",
                    rel.name.display_name()
                ))
            })?;
            let key = key_of(&rel, &cells(&rel.name, &old)?);
            check_key(&rel, &key)?;
            vec![RowChange::Delete { rel, key }]
        }
        PgOutput::Truncate {
            restart_identity,
            relations: ids,
            ..
        } => vec![RowChange::Truncate {
            rels: ids.into_iter().map(rel_of).collect::<Result<Vec<_>>>()?,
            restart_identity,
        }],
        _ => Vec::new(),
    })
}

/// Per-table counters of applied changes.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct TableCounts {
    pub upserts: u64,
    pub updates: u64,
    pub deletes: u64,
    pub truncates: u64,
}

#[derive(Debug)]
enum Net {
    Upsert(Vec<Cell>),
    Delete,
}

#[derive(Debug)]
struct Pending {
    rel: Arc<Relation>,
    order: Vec<Vec<Cell>>,
    ops: HashMap<Vec<Cell>, Net>,
}

/// Changes on their way to one target transaction, as SQL.
#[derive(Debug, Default)]
pub struct Batch {
    pending: BTreeMap<QualifiedName, Pending>,
    sql: String,
    strict: bool,
    pub rows: usize,
    pub counts: BTreeMap<String, TableCounts>,
    /// `--newer-wins COLUMN`: an upsert or update never replaces a target row whose column
    /// is greater (the dual-write period after a cutover).
    newer_wins: Option<String>,
    /// The guarded statements written so far, in order: (table, rows it carries). Each
    /// returns the rows it wrote, so the ones kept back can be counted.
    guarded: Vec<(String, u64)>,
}

impl Batch {
    pub fn new(strict: bool) -> Batch {
        Batch {
            strict,
            ..Batch::default()
        }
    }

    pub fn with_newer_wins(mut self, column: Option<&str>) -> Batch {
        self.newer_wins = column.map(str::to_owned);
        self
    }

    /// The guarded statements of the SQL taken so far (see [`Batch::take_sql`]).
    pub fn take_guarded(&mut self) -> Vec<(String, u64)> {
        std::mem::take(&mut self.guarded)
    }

    fn count(&mut self, table: &QualifiedName) -> &mut TableCounts {
        self.counts.entry(table.display_name()).or_default()
    }

    pub fn add(&mut self, change: RowChange) {
        self.rows += 1;
        match change {
            RowChange::Upsert { rel, row } => {
                self.count(&rel.name).upserts += 1;
                let key = key_of(&rel, &row);
                self.net(rel, key, Net::Upsert(row));
            }
            RowChange::Delete { rel, key } => {
                self.count(&rel.name).deletes += 1;
                self.net(rel, key, Net::Delete);
            }
            RowChange::Update { rel, key, row } => {
                self.count(&rel.name).updates += 1;
                self.flush_table(&rel.name);
                let sets: Vec<String> = rel
                    .columns
                    .iter()
                    .zip(&row)
                    .filter(|(_, c)| **c != Cell::Unchanged)
                    .map(|(n, c)| format!("{} = {}", quote_ident(n), c.sql()))
                    .collect();
                let guard = self.newer_wins.as_deref().and_then(|col| {
                    let i = rel.columns.iter().position(|c| c == col)?;
                    match &row[i] {
                        Cell::Unchanged => None,
                        value if value.sql() == "NULL" => None,
                        value => Some(format!(
                            " AND ({0} IS NULL OR {0} <= {1}) RETURNING NULL",
                            quote_ident(col),
                            value.sql()
                        )),
                    }
                });
                if guard.is_some() {
                    self.guarded.push((rel.name.display_name(), 1));
                }
                let _ = writeln!(
                    self.sql,
                    "UPDATE {} SET {} WHERE {}{};",
                    rel.name,
                    sets.join(", "),
                    key_condition(&rel, &key),
                    guard.unwrap_or_default()
                );
            }
            RowChange::Truncate {
                rels,
                restart_identity,
            } => {
                self.flush_all();
                for r in &rels {
                    self.count(&r.name).truncates += 1;
                }
                let names: Vec<String> = rels.iter().map(|r| r.name.to_string()).collect();
                let _ = writeln!(
                    self.sql,
                    "TRUNCATE {}{};",
                    names.join(", "),
                    if restart_identity {
                        " RESTART IDENTITY"
                    } else {
                        ""
                    }
                );
            }
        }
    }

    /// A kuaka instruction from the log (in the source transaction's place).
    pub fn instruction(&mut self, record: &KuakaRecord) {
        match record {
            KuakaRecord::AddColumn {
                table,
                column,
                type_sql,
                ..
            } => {
                self.flush_table(table);
                let _ = writeln!(
                    self.sql,
                    "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {} {type_sql};",
                    quote_ident(column)
                );
            }
        }
    }

    /// The description of a table changed: write out what is pending in the old shape.
    pub fn relation_changed(&mut self, table: &QualifiedName) {
        self.flush_table(table);
    }

    fn net(&mut self, rel: Arc<Relation>, key: Vec<Cell>, op: Net) {
        if self.strict {
            let mut p = Pending {
                rel,
                order: vec![key.clone()],
                ops: HashMap::new(),
            };
            p.ops.insert(key, op);
            write_pending(
                &mut self.sql,
                p,
                self.newer_wins.as_deref(),
                &mut self.guarded,
            );
            return;
        }
        let name = rel.name.clone();
        let pending = self.pending.entry(name.clone()).or_insert_with(|| Pending {
            rel,
            order: Vec::new(),
            ops: HashMap::new(),
        });
        if pending.ops.insert(key.clone(), op).is_none() {
            pending.order.push(key);
        }
        if pending.order.len() >= FLUSH_ROWS {
            self.flush_table(&name);
        }
    }

    fn flush_table(&mut self, table: &QualifiedName) {
        if let Some(p) = self.pending.remove(table) {
            write_pending(
                &mut self.sql,
                p,
                self.newer_wins.as_deref(),
                &mut self.guarded,
            );
        }
    }

    pub fn flush_all(&mut self) {
        for (_, p) in std::mem::take(&mut self.pending) {
            write_pending(
                &mut self.sql,
                p,
                self.newer_wins.as_deref(),
                &mut self.guarded,
            );
        }
    }

    /// SQL written out so far (pending net changes stay until flushed).
    pub fn take_sql(&mut self) -> String {
        std::mem::take(&mut self.sql)
    }

    pub fn sql_len(&self) -> usize {
        self.sql.len()
    }
}

fn key_condition(rel: &Relation, key: &[Cell]) -> String {
    rel.key
        .iter()
        .zip(key)
        .map(|(i, c)| format!("{} = {}", quote_ident(&rel.columns[*i]), c.sql()))
        .collect::<Vec<_>>()
        .join(" AND ")
}

fn write_pending(
    sql: &mut String,
    p: Pending,
    newer_wins: Option<&str>,
    guarded: &mut Vec<(String, u64)>,
) {
    let rel = &p.rel;
    let key_cols: Vec<String> = rel
        .key
        .iter()
        .map(|i| quote_ident(&rel.columns[*i]))
        .collect();
    let mut deletes = Vec::new();
    let mut upserts = Vec::new();
    for key in &p.order {
        match p.ops.get(key) {
            Some(Net::Delete) => deletes.push(key),
            Some(Net::Upsert(row)) => upserts.push(row),
            None => {}
        }
    }
    if !deletes.is_empty() {
        let tuples: Vec<String> = deletes
            .iter()
            .map(|k| {
                let vals: Vec<String> = k.iter().map(Cell::sql).collect();
                format!("({})", vals.join(", "))
            })
            .collect();
        let _ = writeln!(
            sql,
            "DELETE FROM {} WHERE ({}) IN ({});",
            rel.name,
            key_cols.join(", "),
            tuples.join(", ")
        );
    }
    if !upserts.is_empty() {
        let cols: Vec<String> = rel.columns.iter().map(|c| quote_ident(c)).collect();
        let _ = write!(
            sql,
            "INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE VALUES ",
            rel.name,
            cols.join(", ")
        );
        for (n, row) in upserts.iter().enumerate() {
            if n > 0 {
                sql.push(',');
            }
            sql.push('(');
            for (i, c) in row.iter().enumerate() {
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&c.sql());
            }
            sql.push(')');
        }
        let sets: Vec<String> = rel
            .columns
            .iter()
            .enumerate()
            .filter(|(i, _)| !rel.key.contains(i))
            .map(|(_, c)| format!("{0} = EXCLUDED.{0}", quote_ident(c)))
            .collect();
        if sets.is_empty() {
            let _ = writeln!(sql, " ON CONFLICT ({}) DO NOTHING;", key_cols.join(", "));
        } else if let Some(col) = newer_wins.filter(|c| rel.columns.iter().any(|n| n == c)) {
            // Rows the guard keeps back are not returned: counted by the caller.
            let _ = writeln!(
                sql,
                " ON CONFLICT ({}) DO UPDATE SET {} WHERE {table}.{c} IS NULL OR EXCLUDED.{c} IS NULL OR {table}.{c} <= EXCLUDED.{c} RETURNING NULL;",
                key_cols.join(", "),
                sets.join(", "),
                table = rel.name,
                c = quote_ident(col)
            );
            guarded.push((rel.name.display_name(), upserts.len() as u64));
        } else {
            let _ = writeln!(
                sql,
                " ON CONFLICT ({}) DO UPDATE SET {};",
                key_cols.join(", "),
                sets.join(", ")
            );
        }
    }
}

/// Apply progress, shared with the run and status.
#[derive(Debug, Default)]
pub struct ApplyProgress {
    /// Commit position of the last source transaction applied (minimum over workers).
    pub applied: AtomicU64,
    pub applied_commit_time_us: AtomicI64,
    pub transactions: AtomicU64,
    pub changes: AtomicU64,
    pub counts: std::sync::Mutex<BTreeMap<String, TableCounts>>,
    /// Changes the `--newer-wins` guard did not apply (the target's row was newer), by table.
    pub kept_back: std::sync::Mutex<BTreeMap<String, u64>>,
}

impl ApplyProgress {
    pub fn add_kept_back(&self, kept: &BTreeMap<String, u64>) {
        if let Ok(mut all) = self.kept_back.lock() {
            for (t, n) in kept {
                *all.entry(t.clone()).or_default() += n;
            }
        }
    }

    pub fn add_counts(&self, counts: &BTreeMap<String, TableCounts>) {
        if let Ok(mut all) = self.counts.lock() {
            for (t, c) in counts {
                let e = all.entry(t.clone()).or_default();
                e.upserts += c.upserts;
                e.updates += c.updates;
                e.deletes += c.deletes;
                e.truncates += c.truncates;
            }
        }
    }
}

/// Open an apply session on the target: replica role, plain settings.
pub async fn connect(endpoint: &crate::config::Endpoint, role: &str) -> Result<Client> {
    let client = super::connect(endpoint, super::Side::Target, role).await?;
    client
        .batch_execute(super::snapshot::TARGET_SESSION_SETUP)
        .await
        .ctx(|| "setting up the apply session".into())?;
    client
        .batch_execute("SET session_replication_role = replica; SET synchronous_commit = off")
        .await
        .map_err(|e| {
            if super::describe(&e).contains("permission denied") {
                Error::Definite(format!(
                    "the target user {} may not set session_replication_role (needs superuser, or rds_superuser/azure_pg_admin on managed services); kuaka needs it so target triggers and foreign keys do not act on changes twice",
                    endpoint.user
                ))
            } else {
                Error::query("setting session_replication_role = replica on the target", e)
            }
        })?;
    client
        .batch_execute(TARGET_APPLY_BOOKKEEPING)
        .await
        .ctx(|| "creating kuaka.apply_position on the target".into())?;
    Ok(client)
}

/// The applied position of a job's worker; `None` when apply has not started.
pub async fn applied_position(client: &Client, job_id: &str, worker: i32) -> Result<Option<PgLsn>> {
    let row = client
        .query_opt(
            "SELECT position FROM kuaka.apply_position WHERE job_id = $1 AND worker = $2",
            &[&job_id, &worker],
        )
        .await
        .ctx(|| "reading kuaka.apply_position on the target".into())?;
    row.map(|r| {
        let text: String = r.get(0);
        text.parse::<PgLsn>().map_err(|_| {
            Error::Definite(format!(
                "kuaka.apply_position on the target holds an unreadable position {text:?} for job {job_id}"
            ))
        })
    })
    .transpose()
}

/// Record the starting position of a worker if it has none (idempotent).
pub async fn init_position(client: &Client, job_id: &str, worker: i32, start: PgLsn) -> Result<()> {
    client
        .execute(
            "INSERT INTO kuaka.apply_position (job_id, worker, position) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            &[&job_id, &worker, &start.to_string()],
        )
        .await
        .ctx(|| "initialising kuaka.apply_position on the target".into())?;
    Ok(())
}

/// The statement that moves a worker's position, for the end of an apply transaction.
pub fn position_update(job_id: &str, worker: i32, lsn: PgLsn, commit_time_us: i64) -> String {
    format!(
        "UPDATE kuaka.apply_position SET position = {}, commit_time = to_timestamp({}::float8 / 1e6 + 946684800), applied_at = now() WHERE job_id = {} AND worker = {worker};",
        quote_literal(&lsn.to_string()),
        commit_time_us,
        quote_literal(job_id)
    )
}

/// Decode a change-log record's pgoutput payload.
pub fn decode_record(payload: &[u8]) -> Result<PgOutput> {
    decode::decode(payload).map_err(|e| {
        Error::Definite(format!(
            "the change log holds a message kuaka cannot read: {e}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel() -> Arc<Relation> {
        Arc::new(Relation {
            name: QualifiedName::new("public", "t"),
            columns: vec!["id".into(), "v".into(), "big".into()],
            key: vec![0],
        })
    }

    fn v(s: &str) -> Cell {
        Cell::Value(s.into())
    }

    #[test]
    fn newer_wins_guards_upserts_and_updates_and_lists_them() {
        let mut b = Batch::new(false).with_newer_wins(Some("v"));
        let r = rel();
        b.add(RowChange::Upsert {
            rel: r.clone(),
            row: vec![v("1"), v("a"), v("x")],
        });
        b.add(RowChange::Upsert {
            rel: r.clone(),
            row: vec![v("2"), v("b"), v("x")],
        });
        b.add(RowChange::Update {
            rel: r.clone(),
            key: vec![v("3")],
            row: vec![v("3"), v("c"), Cell::Unchanged],
        });
        // A NULL version carries no order: applied unguarded.
        b.add(RowChange::Update {
            rel: r.clone(),
            key: vec![v("4")],
            row: vec![v("4"), Cell::Null, Cell::Unchanged],
        });
        b.flush_all();
        let sql = b.take_sql();
        assert!(
            sql.contains(r#"WHERE "public"."t"."v" IS NULL OR EXCLUDED."v" IS NULL OR "public"."t"."v" <= EXCLUDED."v" RETURNING NULL;"#),
            "{sql}"
        );
        assert!(
            sql.contains(r#"AND ("v" IS NULL OR "v" <= 'c') RETURNING NULL;"#),
            "{sql}"
        );
        assert!(sql.contains(r#"WHERE "id" = '4';"#), "{sql}");
        // In statement order: the update of 3 flushed the two pending upserts first.
        assert_eq!(
            b.take_guarded(),
            vec![("public.t".to_owned(), 2), ("public.t".to_owned(), 1)]
        );
        // Without the column in the table, nothing is guarded.
        let mut plain = Batch::new(false).with_newer_wins(Some("gmt_modified"));
        plain.add(RowChange::Upsert {
            rel: r,
            row: vec![v("1"), v("a"), v("x")],
        });
        plain.flush_all();
        assert!(!plain.take_sql().contains("RETURNING"));
        assert!(plain.take_guarded().is_empty());
    }

    #[test]
    fn net_effect_per_key_and_order_between_kinds() {
        let mut b = Batch::new(false);
        let r = rel();
        b.add(RowChange::Upsert {
            rel: r.clone(),
            row: vec![v("1"), v("a"), v("x")],
        });
        b.add(RowChange::Upsert {
            rel: r.clone(),
            row: vec![v("1"), v("b"), v("x")],
        });
        b.add(RowChange::Upsert {
            rel: r.clone(),
            row: vec![v("2"), v("c"), Cell::Null],
        });
        b.add(RowChange::Delete {
            rel: r.clone(),
            key: vec![v("2")],
        });
        b.add(RowChange::Update {
            rel: r.clone(),
            key: vec![v("1")],
            row: vec![v("1"), v("it's"), Cell::Unchanged],
        });
        b.flush_all();
        let sql = b.take_sql();
        let lines: Vec<&str> = sql.lines().collect();
        assert_eq!(lines.len(), 3, "{sql}");
        assert_eq!(
            lines[0],
            r#"DELETE FROM "public"."t" WHERE ("id") IN (('2'));"#
        );
        assert!(lines[1].starts_with(r#"INSERT INTO "public"."t" ("id", "v", "big") OVERRIDING SYSTEM VALUE VALUES ('1', 'b', 'x') ON CONFLICT ("id") DO UPDATE SET "v" = EXCLUDED."v""#), "{}", lines[1]);
        assert_eq!(
            lines[2],
            r#"UPDATE "public"."t" SET "id" = '1', "v" = 'it''s' WHERE "id" = '1';"#
        );
        assert_eq!(b.rows, 5);
    }

    #[test]
    fn strict_mode_keeps_every_change() {
        let mut b = Batch::new(true);
        let r = rel();
        b.add(RowChange::Upsert {
            rel: r.clone(),
            row: vec![v("1"), v("a"), v("x")],
        });
        b.add(RowChange::Upsert {
            rel: r.clone(),
            row: vec![v("1"), v("b"), v("x")],
        });
        b.flush_all();
        assert_eq!(b.take_sql().lines().count(), 2);
    }
}
