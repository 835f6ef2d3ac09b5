//! The target side of a job whose source is MySQL/MariaDB: how rows and changes are written
//! on a PostgreSQL or a MySQL/MariaDB target, with InnoDB's foreign-key cascades (which the
//! binlog does not contain) reproduced as explicit statements, and the target connection with
//! kuaka's bookkeeping.

use std::collections::HashMap;

use mysql_async::prelude::Queryable;
use tokio_postgres::Client;

use super::rows::{describe_key, pg_rows_sql};
use super::{Error, Result};
use crate::config::{Endpoint, EngineKind};
use crate::engine::mysql::apply as myapply;
use crate::engine::mysql::binlog::RowEvent;
use crate::engine::mysql::catalog::{Kind, MyCatalog, MyTable};
use crate::engine::mysql::{self, quote_ident as my_ident};
use crate::engine::postgres::apply::TARGET_APPLY_BOOKKEEPING;
use crate::engine::postgres::{self as pg, Side, rows as pgrows};
use crate::model::schema::{DataType, quote_ident as pg_ident, quote_literal};
use crate::model::value::{Row, Value};

/// Rows per multi-row statement.
const ROWS_PER_STATEMENT: usize = 500;

/// Session table (PostgreSQL, SQLite) of the rows the `--newer-wins` guard kept back.
const KEPT_TABLE: &str = "kuaka_kept";

/// MySQL user variable counting the rows of `table` the `--newer-wins` guard kept back.
pub(super) fn kept_variable(table: &str) -> String {
    format!("@{}", my_ident(&format!("kuaka_kept.{table}")))
}

/// Statements zeroing the `--newer-wins` counts of `tables`, for the start of a transaction.
pub(super) fn kept_reset(dialect: Dialect, tables: &[String]) -> String {
    match dialect {
        Dialect::Postgres => format!(
            "CREATE TEMP TABLE IF NOT EXISTS {KEPT_TABLE} (t text, n bigint);\nDELETE FROM pg_temp.{KEPT_TABLE};\n"
        ),
        Dialect::Sqlite => format!(
            "CREATE TEMP TABLE IF NOT EXISTS {KEPT_TABLE} (t TEXT, n INTEGER);\nDELETE FROM temp.{KEPT_TABLE};\n"
        ),
        Dialect::Mysql => tables
            .iter()
            .map(|t| format!("SET {} = 0;\n", kept_variable(t)))
            .collect(),
    }
}

/// The `--newer-wins` counts of a SQLite session (see [`kept_reset`]).
pub(super) fn sqlite_kept_back(c: &rusqlite::Connection) -> rusqlite::Result<Vec<(String, i64)>> {
    let mut stmt = c.prepare(&format!(
        "SELECT t, sum(n) FROM temp.{KEPT_TABLE} GROUP BY t"
    ))?;
    stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
        .collect()
}

/// The SQL spelling of the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Mysql,
    Sqlite,
}

impl Dialect {
    pub fn quote_ident(self, name: &str) -> String {
        match self {
            Dialect::Postgres | Dialect::Sqlite => pg_ident(name),
            Dialect::Mysql => my_ident(name),
        }
    }

    /// A moved table on the target: `public."t"` or `` `t` `` (the target URL's database).
    pub fn table(self, name: &str) -> String {
        match self {
            Dialect::Postgres => format!("public.{}", pg_ident(name)),
            Dialect::Mysql => my_ident(name),
            Dialect::Sqlite => pg_ident(name),
        }
    }

    pub(super) fn literal(self, text: &str) -> String {
        match self {
            Dialect::Postgres | Dialect::Sqlite => quote_literal(text),
            Dialect::Mysql => mysql::quote_literal(text),
        }
    }

    /// Move the job's applied position (in the caller's transaction).
    pub fn position_update(self, job_id: &str, position: &str, timestamp: u32) -> String {
        match self {
            Dialect::Postgres => format!(
                "INSERT INTO kuaka.apply_position (job_id, worker, position, commit_time) VALUES ({}, 0, {}, to_timestamp({timestamp})) \
                 ON CONFLICT (job_id, worker) DO UPDATE SET position = EXCLUDED.position, commit_time = EXCLUDED.commit_time, applied_at = now();\n",
                self.literal(job_id),
                self.literal(position)
            ),
            Dialect::Mysql => format!(
                "INSERT INTO kuaka.apply_position (job_id, worker, position, commit_time) VALUES ({}, 0, {}, FROM_UNIXTIME({timestamp})) \
                 ON DUPLICATE KEY UPDATE position = VALUES(position), commit_time = VALUES(commit_time), applied_at = CURRENT_TIMESTAMP(6);\n",
                self.literal(job_id),
                self.literal(position)
            ),
            Dialect::Sqlite => format!(
                "INSERT INTO {} (job_id, position) VALUES ({}, {}) ON CONFLICT (job_id) DO UPDATE SET position = excluded.position;\n",
                crate::engine::sqlite::POSITION_TABLE,
                self.literal(job_id),
                self.literal(position)
            ),
        }
    }

    /// Record a copied chunk (in the chunk's transaction).
    pub fn copied_marker(self, job_id: &str, marker: &str, rows: i64) -> String {
        match self {
            Dialect::Postgres => format!(
                "INSERT INTO kuaka.row_copied (job_id, table_name, rows) VALUES ({}, {}, {rows}) ON CONFLICT (job_id, table_name) DO UPDATE SET rows = EXCLUDED.rows;\n",
                self.literal(job_id),
                self.literal(marker)
            ),
            Dialect::Mysql => format!(
                "INSERT INTO kuaka.row_copied (job_id, table_name, `rows`) VALUES ({}, {}, {rows}) ON DUPLICATE KEY UPDATE `rows` = VALUES(`rows`);\n",
                self.literal(job_id),
                self.literal(marker)
            ),
            Dialect::Sqlite => format!(
                "INSERT OR REPLACE INTO {} (job_id, table_name, rows) VALUES ({}, {}, {rows});\n",
                crate::engine::sqlite::COPIED_TABLE,
                self.literal(job_id),
                self.literal(marker)
            ),
        }
    }
}

/// A target connection.
pub enum Sink {
    Postgres(Client),
    Mysql(mysql_async::Conn),
    Sqlite(rusqlite::Connection),
}

fn sqlite_error(what: &str, e: rusqlite::Error) -> Error {
    Error::Definite(format!("{what}: {e}"))
}

fn block<R>(f: impl FnOnce() -> R) -> R {
    tokio::task::block_in_place(f)
}

/// Why a batch did not commit.
pub struct BatchError {
    pub error: Error,
    /// A unique key other than the primary key clashed (the net-effect form reorders rows).
    pub unique_violation: bool,
}

fn pg_error(what: &str, e: tokio_postgres::Error) -> Error {
    pg::Error::query(what.to_owned(), e).into()
}

impl Sink {
    /// Connect, create kuaka's bookkeeping, and set the session up for applying: no triggers
    /// and no foreign-key checks (the source enforced them; batches reorder rows).
    pub async fn connect(endpoint: &Endpoint, role: &str) -> Result<Sink> {
        match endpoint.engine {
            EngineKind::Postgres => {
                let client = pg::connect(endpoint, Side::Target, role).await?;
                client
                    .batch_execute(&format!(
                        "{};\n{}",
                        pgrows::BOOKKEEPING,
                        TARGET_APPLY_BOOKKEEPING
                    ))
                    .await
                    .map_err(|e| pg_error("creating kuaka's tables on the target", e))?;
                client
                    .batch_execute("SET session_replication_role = replica")
                    .await
                    .map_err(|e| {
                        pg_error(
                            "setting session_replication_role on the target (needs superuser or rds_superuser)",
                            e,
                        )
                    })?;
                Ok(Sink::Postgres(client))
            }
            EngineKind::Mysql => {
                let mut conn = mysql::connect(endpoint, role).await?;
                conn.query_drop(myapply::BOOKKEEPING).await.map_err(|e| {
                    mysql::error("creating kuaka's tables on the target (database kuaka)", e)
                })?;
                conn.query_drop("SET SESSION foreign_key_checks = 0, SESSION unique_checks = 1")
                    .await
                    .map_err(|e| mysql::error("setting up the target session", e))?;
                Ok(Sink::Mysql(conn))
            }
            EngineKind::Sqlite => {
                let conn = block(|| {
                    let conn = crate::engine::sqlite::open(&endpoint.database, true)?;
                    crate::engine::sqlite::target_bookkeeping(&conn)?;
                    Ok::<_, Error>(conn)
                })?;
                Ok(Sink::Sqlite(conn))
            }
        }
    }

    pub fn dialect(&self) -> Dialect {
        match self {
            Sink::Postgres(_) => Dialect::Postgres,
            Sink::Mysql(_) => Dialect::Mysql,
            Sink::Sqlite(_) => Dialect::Sqlite,
        }
    }

    /// Run statements (no result rows).
    pub async fn execute(&mut self, sql: &str, what: &str) -> Result<()> {
        match self {
            Sink::Postgres(c) => c.batch_execute(sql).await.map_err(|e| pg_error(what, e)),
            Sink::Mysql(c) => c
                .query_drop(sql)
                .await
                .map_err(|e| mysql::error(what, e).into()),
            Sink::Sqlite(c) => block(|| c.execute_batch(sql)).map_err(|e| sqlite_error(what, e)),
        }
    }

    /// `body` and then `tail` (the position or marker) in one transaction.
    pub async fn commit(&mut self, body: &str, tail: &str, what: &str) -> Result<(), BatchError> {
        let (begin, rollback) = match self {
            Sink::Postgres(_) => ("BEGIN;\n", "ROLLBACK"),
            Sink::Mysql(_) => ("START TRANSACTION;\n", "ROLLBACK"),
            Sink::Sqlite(_) => ("BEGIN IMMEDIATE;\n", "ROLLBACK"),
        };
        let sql = format!("{begin}{body}{tail}");
        let result = match self {
            Sink::Postgres(c) => match c.batch_execute(&sql).await {
                Ok(()) => {
                    crate::failpoint::hit("apply.before_commit");
                    c.batch_execute("COMMIT").await
                }
                Err(e) => Err(e),
            }
            .map_err(|e| BatchError {
                unique_violation: e.code()
                    == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION),
                error: pg_error(what, e),
            }),
            Sink::Mysql(c) => match c.query_drop(&sql).await {
                Ok(()) => {
                    crate::failpoint::hit("apply.before_commit");
                    c.query_drop("COMMIT").await
                }
                Err(e) => Err(e),
            }
            .map_err(|e| BatchError {
                unique_violation: matches!(&e, mysql_async::Error::Server(s) if s.code == 1062),
                error: mysql::error(what, e).into(),
            }),
            Sink::Sqlite(c) => block(|| {
                c.execute_batch(&sql)?;
                crate::failpoint::hit("apply.before_commit");
                c.execute_batch("COMMIT")
            })
            .map_err(|e| BatchError {
                unique_violation: e.to_string().contains("UNIQUE constraint failed"),
                error: sqlite_error(what, e),
            }),
        };
        if result.is_err() {
            let _ = self.execute(rollback, "rolling back").await;
        } else {
            crate::failpoint::hit("apply.after_commit");
        }
        result
    }

    /// After a committed batch with `--newer-wins` guards on `tables`: how many rows of each
    /// the guard kept back (tables with none left out).
    pub async fn kept_back(&mut self, tables: &[String]) -> Result<Vec<(String, u64)>> {
        let what = "reading the --newer-wins counts";
        let counts: Vec<(String, i64)> = match self {
            Sink::Mysql(c) => {
                let sql = format!(
                    "SELECT {}",
                    tables
                        .iter()
                        .map(|t| format!("COALESCE({}, 0)", kept_variable(t)))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                let row: Option<mysql_async::Row> = c
                    .query_first(sql)
                    .await
                    .map_err(|e| mysql::error(what, e))?;
                let row = row.map(|r| r.unwrap()).unwrap_or_default();
                tables
                    .iter()
                    .zip(row)
                    .map(|(t, v)| {
                        let n = mysql_async::from_value_opt::<i64>(v).unwrap_or(0);
                        (t.clone(), n)
                    })
                    .collect()
            }
            Sink::Postgres(c) => c
                .query(
                    &format!("SELECT t, sum(n)::bigint FROM pg_temp.{KEPT_TABLE} GROUP BY t"),
                    &[],
                )
                .await
                .map_err(|e| pg_error(what, e))?
                .iter()
                .map(|r| {
                    (
                        r.get::<_, String>(0),
                        r.get::<_, Option<i64>>(1).unwrap_or(0),
                    )
                })
                .collect(),
            Sink::Sqlite(c) => block(|| sqlite_kept_back(c)).map_err(|e| sqlite_error(what, e))?,
        };
        Ok(counts
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(t, n)| (t, n as u64))
            .collect())
    }

    /// Which of `names` exist on the target already.
    pub async fn existing_tables(&mut self, names: &[String]) -> Result<Vec<String>> {
        match self {
            Sink::Postgres(c) => Ok(c
                .query(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename = ANY($1)",
                    &[&names],
                )
                .await
                .map_err(|e| pg_error("reading the target catalog", e))?
                .iter()
                .map(|r| r.get(0))
                .collect()),
            Sink::Mysql(c) => {
                let all: Vec<String> = c
                    .query("SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE()")
                    .await
                    .map_err(|e| mysql::error("reading the target catalog", e))?;
                Ok(all.into_iter().filter(|t| names.contains(t)).collect())
            }
            Sink::Sqlite(c) => {
                let all: Vec<String> = block(|| {
                    c.prepare("SELECT name FROM sqlite_schema WHERE type = 'table'")
                        .and_then(|mut s| {
                            s.query_map([], |r| r.get(0))?
                                .collect::<rusqlite::Result<Vec<String>>>()
                        })
                })
                .map_err(|e| sqlite_error("reading the target catalog", e))?;
                Ok(all.into_iter().filter(|t| names.contains(t)).collect())
            }
        }
    }

    /// Copied chunks of the job (`kuaka.row_copied`).
    pub async fn copied(&mut self, job_id: &str) -> Result<HashMap<String, i64>> {
        match self {
            Sink::Postgres(c) => Ok(c
                .query(
                    "SELECT table_name, rows FROM kuaka.row_copied WHERE job_id = $1",
                    &[&job_id],
                )
                .await
                .map_err(|e| pg_error("reading copied tables on the target", e))?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect()),
            Sink::Mysql(c) => c
                .exec::<(String, i64), _, _>(
                    "SELECT table_name, `rows` FROM kuaka.row_copied WHERE job_id = ?",
                    (job_id,),
                )
                .await
                .map(|rows| rows.into_iter().collect())
                .map_err(|e| mysql::error("reading copied tables on the target", e).into()),
            Sink::Sqlite(c) => block(|| {
                c.prepare(&format!(
                    "SELECT table_name, rows FROM {} WHERE job_id = ?1",
                    crate::engine::sqlite::COPIED_TABLE
                ))
                .and_then(|mut s| {
                    s.query_map([job_id], |r| Ok((r.get(0)?, r.get(1)?)))?
                        .collect::<rusqlite::Result<HashMap<String, i64>>>()
                })
            })
            .map_err(|e| sqlite_error("reading copied tables on the target", e)),
        }
    }

    /// The job's applied position, as stored.
    pub async fn applied_position(&mut self, job_id: &str) -> Result<Option<String>> {
        match self {
            Sink::Postgres(c) => Ok(c
                .query_opt(
                    "SELECT position FROM kuaka.apply_position WHERE job_id = $1 AND worker = 0",
                    &[&job_id],
                )
                .await
                .map_err(|e| pg_error("reading the applied position", e))?
                .map(|r| r.get(0))),
            Sink::Mysql(c) => c
                .exec_first::<String, _, _>(
                    "SELECT position FROM kuaka.apply_position WHERE job_id = ? AND worker = 0",
                    (job_id,),
                )
                .await
                .map_err(|e| mysql::error("reading the applied position", e).into()),
            Sink::Sqlite(c) => block(|| {
                use rusqlite::OptionalExtension;
                c.query_row(
                    &format!(
                        "SELECT CAST(position AS TEXT) FROM {} WHERE job_id = ?1",
                        crate::engine::sqlite::POSITION_TABLE
                    ),
                    [job_id],
                    |r| r.get(0),
                )
                .optional()
            })
            .map_err(|e| sqlite_error("reading the applied position", e)),
        }
    }
}

/// How one table's rows are written on the target.
pub struct Shape {
    pub name: String,
    pub dialect: Dialect,
    /// Copied (non-generated) columns and their model types.
    pub columns: Vec<String>,
    pub types: Vec<DataType>,
    /// How each copied column's values are written on a MySQL target.
    pub kinds: Vec<Kind>,
    /// Source column indexes of the copied columns.
    pub copied: Vec<usize>,
    pub key: Vec<String>,
    /// Positions of the key columns among the copied columns.
    key_index: Vec<usize>,
    /// Foreign keys of other moved tables that reference this one and act on its changes.
    children: Vec<ChildRule>,
    /// `--newer-wins COLUMN` when the table has that column (and it is not a key column).
    pub newer_wins: Option<String>,
}

/// An InnoDB foreign-key action to reproduce on the target: the binlog holds the parent's
/// change but not what InnoDB did to the child rows.
#[derive(Clone, Debug)]
pub struct ChildRule {
    child: String,
    columns: Vec<String>,
    types: Vec<DataType>,
    kinds: Vec<Kind>,
    /// Child columns MySQL would set to now on our UPDATE (InnoDB's cascade does not):
    /// assigned to themselves so they keep their value.
    keep: Vec<String>,
    /// Positions of the referenced columns among the parent's copied columns.
    parent_index: Vec<usize>,
    /// `CASCADE` or `SET NULL` (anything else does nothing to children).
    on_delete: String,
    on_update: String,
}

impl Shape {
    pub fn new(t: &MyTable, catalog: &MyCatalog, dialect: Dialect) -> Shape {
        let copied = t.copied();
        let columns: Vec<String> = copied.iter().map(|&i| t.columns[i].name.clone()).collect();
        let types = copied
            .iter()
            .map(|&i| t.table.columns[i].data_type.clone())
            .collect();
        let kinds = copied.iter().map(|&i| t.columns[i].kind).collect();
        let key_index = t
            .key
            .iter()
            .map(|k| columns.iter().position(|c| c == k).unwrap_or(0))
            .collect();
        let acts = |rule: &str| matches!(rule, "CASCADE" | "SET NULL");
        let mut children = Vec::new();
        for fk in catalog
            .foreign_keys
            .iter()
            .filter(|fk| fk.parent == t.name() && (acts(&fk.on_delete) || acts(&fk.on_update)))
        {
            let Some(child) = catalog.tables.iter().find(|c| c.name() == fk.child) else {
                continue;
            };
            let types: Option<Vec<DataType>> = fk
                .columns
                .iter()
                .map(|c| child.table.column(c).map(|col| col.data_type.clone()))
                .collect();
            let kinds: Option<Vec<Kind>> = fk
                .columns
                .iter()
                .map(|c| {
                    child
                        .columns
                        .iter()
                        .find(|col| col.name == *c)
                        .map(|col| col.kind)
                })
                .collect();
            let parent_index: Option<Vec<usize>> = fk
                .parent_columns
                .iter()
                .map(|c| columns.iter().position(|x| x == c))
                .collect();
            if let (Some(types), Some(kinds), Some(parent_index)) = (types, kinds, parent_index) {
                children.push(ChildRule {
                    child: fk.child.clone(),
                    columns: fk.columns.clone(),
                    types,
                    kinds,
                    keep: child
                        .columns
                        .iter()
                        .filter(|c| c.on_update_now && !fk.columns.contains(&c.name))
                        .map(|c| c.name.clone())
                        .collect(),
                    parent_index,
                    on_delete: fk.on_delete.clone(),
                    on_update: fk.on_update.clone(),
                });
            }
        }
        Shape {
            name: t.name().to_owned(),
            dialect,
            columns,
            types,
            kinds,
            copied,
            key: t.key.clone(),
            key_index,
            children,
            newer_wins: None,
        }
    }

    /// Guard this table's upserts with `--newer-wins COLUMN` (if it has the column).
    pub fn with_newer_wins(mut self, column: Option<&str>) -> Shape {
        self.newer_wins = column
            .filter(|c| self.columns.iter().any(|n| n == c) && !self.key.iter().any(|k| k == c))
            .map(str::to_owned);
        self
    }

    /// An upsert statement of `rows` rows with the `--newer-wins` guard: a row whose target
    /// row has a greater guard column is left alone (NULL on either side: applied), and how
    /// many were left is added to the session's count (read by [`Sink::kept_back`]).
    fn guarded(&self, column: &str, statement: String, rows: usize) -> String {
        guard_upsert(self.dialect, &self.name, column, statement, rows)
    }
}

/// The `--newer-wins` form of a PostgreSQL or SQLite upsert statement of `rows` rows into
/// table `name` (MySQL's is built whole: [`myapply::upsert_newer_wins`]).
pub(super) fn guard_upsert(
    dialect: Dialect,
    name: &str,
    column: &str,
    statement: String,
    rows: usize,
) -> String {
    {
        let body = statement.trim_end().trim_end_matches(';');
        let table = dialect.table(name);
        let c = dialect.quote_ident(column);
        let name = dialect.literal(name);
        match dialect {
            Dialect::Postgres if body.contains(" DO UPDATE SET ") => format!(
                "WITH written AS ({body} WHERE {table}.{c} IS NULL OR EXCLUDED.{c} IS NULL OR {table}.{c} <= EXCLUDED.{c} RETURNING 1) \
                 INSERT INTO pg_temp.{KEPT_TABLE} SELECT {name}, {rows} - count(*) FROM written;\n"
            ),
            Dialect::Sqlite if body.contains(" DO UPDATE SET ") => format!(
                "{body} WHERE {table}.{c} IS NULL OR excluded.{c} IS NULL OR {table}.{c} <= excluded.{c};\n\
                 INSERT INTO temp.{KEPT_TABLE} VALUES ({name}, {rows} - changes());\n"
            ),
            _ => statement,
        }
    }
}

impl Shape {
    /// The target's statements for these row images: deletes by key, then upserts.
    fn rows_sql(&self, upserts: &[Row], deletes: &[Row]) -> Result<String> {
        match self.dialect {
            Dialect::Postgres => match &self.newer_wins {
                None => pg_rows_sql(
                    &self.name,
                    &self.columns,
                    &self.types,
                    &self.key,
                    upserts,
                    deletes,
                ),
                Some(column) => {
                    let mut sql = pg_rows_sql(
                        &self.name,
                        &self.columns,
                        &self.types,
                        &self.key,
                        &[],
                        deletes,
                    )?;
                    for chunk in upserts.chunks(ROWS_PER_STATEMENT) {
                        let statement = pg_rows_sql(
                            &self.name,
                            &self.columns,
                            &self.types,
                            &self.key,
                            chunk,
                            &[],
                        )?;
                        sql.push_str(&self.guarded(column, statement, chunk.len()));
                    }
                    Ok(sql)
                }
            },
            Dialect::Mysql => {
                let key_kinds: Vec<Kind> = self.key_index.iter().map(|&i| self.kinds[i]).collect();
                let mut sql = String::new();
                for chunk in deletes.chunks(ROWS_PER_STATEMENT) {
                    let tuples = chunk
                        .iter()
                        .map(|k| self.my_tuple(k, &key_kinds, &self.key, k))
                        .collect::<Result<Vec<_>>>()?;
                    sql.push_str(&myapply::delete(&self.name, &self.key, &tuples));
                }
                for chunk in upserts.chunks(ROWS_PER_STATEMENT) {
                    let tuples = chunk
                        .iter()
                        .map(|r| self.my_tuple(r, &self.kinds, &self.columns, &self.key_of(r)))
                        .collect::<Result<Vec<_>>>()?;
                    sql.push_str(&match &self.newer_wins {
                        Some(column) => myapply::upsert_newer_wins(
                            &self.name,
                            &self.columns,
                            &self.key,
                            &tuples,
                            column,
                            &kept_variable(&self.name),
                        ),
                        None => myapply::upsert(&self.name, &self.columns, &self.key, &tuples),
                    });
                }
                Ok(sql)
            }
            Dialect::Sqlite => {
                use crate::engine::sqlite;
                // Index of each value's type: a key tuple holds the key columns only.
                let tuple = |row: &Row, types: &[&DataType]| {
                    let mut out = String::from("(");
                    for (i, v) in row.iter().enumerate() {
                        if i > 0 {
                            out.push_str(", ");
                        }
                        match (v, types.get(i)) {
                            (
                                Value::Text(t) | Value::Native(t),
                                Some(
                                    DataType::Timestamp
                                    | DataType::TimestampTz
                                    | DataType::Time
                                    | DataType::Interval,
                                ),
                            ) => sqlite::literal(&Value::Text(sqlite_temporal(t)), &mut out),
                            _ => sqlite::literal(v, &mut out),
                        }
                    }
                    out.push(')');
                    out
                };
                let mut sql = String::new();
                let key_types: Vec<&DataType> =
                    self.key_index.iter().map(|&i| &self.types[i]).collect();
                let all_types: Vec<&DataType> = self.types.iter().collect();
                for chunk in deletes.chunks(ROWS_PER_STATEMENT) {
                    let tuples: Vec<String> = chunk.iter().map(|k| tuple(k, &key_types)).collect();
                    sql.push_str(&sqlite::delete_many(&self.name, &self.key, &tuples));
                }
                for chunk in upserts.chunks(ROWS_PER_STATEMENT) {
                    let tuples: Vec<String> = chunk.iter().map(|r| tuple(r, &all_types)).collect();
                    let statement =
                        sqlite::upsert_many(&self.name, &self.columns, &self.key, &tuples);
                    sql.push_str(&match &self.newer_wins {
                        Some(column) => self.guarded(column, statement, chunk.len()),
                        None => statement,
                    });
                }
                Ok(sql)
            }
        }
    }

    fn my_tuple(&self, row: &Row, kinds: &[Kind], names: &[String], key: &Row) -> Result<String> {
        let mut out = String::from("(");
        for (i, ((v, kind), column)) in row.iter().zip(kinds).zip(names).enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            myapply::literal(*kind, v, &mut out).map_err(|e| {
                Error::Definite(format!(
                    "table {}, column {column}, row with key {}: {e}",
                    self.name,
                    describe_key(key)
                ))
            })?;
        }
        out.push(')');
        Ok(out)
    }

    /// Upserts of copied rows (the snapshot's chunk), as [`Self::rows_sql`] writes them.
    pub fn rows_sql_for_copy(&self, rows: &[Row]) -> Result<String> {
        self.rows_sql(rows, &[])
    }

    pub fn project(&self, row: &Row) -> Row {
        self.copied.iter().map(|&i| row[i].clone()).collect()
    }

    fn key_of(&self, row: &Row) -> Row {
        self.key_index.iter().map(|&i| row[i].clone()).collect()
    }
}

/// A MySQL time value as SQLite keeps it: UTC without the `+00` the decoder adds for
/// PostgreSQL, and microseconds written out (the text protocol prints a column's own
/// precision, the binlog decoder six digits; one value, one text).
fn sqlite_temporal(text: &str) -> String {
    let t = text.strip_suffix("+00").unwrap_or(text);
    let t = match t.rfind('.') {
        Some(dot) if t.len() - dot - 1 < 6 => format!("{t}{}", "0".repeat(6 - (t.len() - dot - 1))),
        _ => t.to_owned(),
    };
    // A TIME (an interval on other engines): hours of at least two digits, as the text
    // protocol prints them (the binlog decoder does not pad).
    let (sign, body) = t.strip_prefix('-').map_or(("", t.as_str()), |b| ("-", b));
    match body.split_once(':') {
        Some((h, rest)) if h.len() == 1 && !body.contains(' ') => format!("{sign}0{h}:{rest}"),
        _ => t.clone(),
    }
}

/// One table's pending changes: its name, keys in first-seen order, and each key's last image
/// (`None` = deleted).
type PendingTable = (String, Vec<String>, HashMap<String, (Row, Option<Row>)>);

/// The changes of one apply transaction, reduced to their net effect per key between
/// statements that must run in source order (cascading parent changes).
pub struct Batch<'a> {
    shapes: &'a HashMap<String, Shape>,
    /// Per table: keys in first-seen order and each key's last image (`None` = deleted).
    pending: Vec<PendingTable>,
    sql: String,
    pub changes: usize,
    pub transactions: u64,
    /// Apply every change as its own statement, in source order (after a unique-key clash of
    /// the net-effect form).
    strict: bool,
    /// Tables whose upserts carry the `--newer-wins` guard in the SQL not yet taken.
    guarded: std::collections::BTreeSet<String>,
}

impl<'a> Batch<'a> {
    pub fn new(shapes: &'a HashMap<String, Shape>, strict: bool) -> Batch<'a> {
        Batch {
            shapes,
            pending: Vec::new(),
            sql: String::new(),
            changes: 0,
            transactions: 0,
            strict,
            guarded: Default::default(),
        }
    }

    fn put(&mut self, shape: &Shape, key: Row, row: Option<Row>) {
        let id = serde_json::to_string(&key).unwrap_or_default();
        let i = match self.pending.iter().position(|(t, _, _)| *t == shape.name) {
            Some(i) => i,
            None => {
                self.pending
                    .push((shape.name.clone(), Vec::new(), HashMap::new()));
                self.pending.len() - 1
            }
        };
        let (_, order, images) = &mut self.pending[i];
        if !images.contains_key(&id) {
            order.push(id.clone());
        }
        images.insert(id, (key, row));
    }

    fn flush(&mut self) -> Result<()> {
        for (table, order, mut images) in std::mem::take(&mut self.pending) {
            let shape = &self.shapes[&table];
            let mut upserts = Vec::new();
            let mut deletes = Vec::new();
            for id in order {
                if let Some((key, row)) = images.remove(&id) {
                    match row {
                        Some(r) => upserts.push(r),
                        None => deletes.push(key),
                    }
                }
            }
            if shape.newer_wins.is_some() && !upserts.is_empty() {
                self.guarded.insert(table.clone());
            }
            self.sql.push_str(&shape.rows_sql(&upserts, &deletes)?);
        }
        Ok(())
    }

    /// What InnoDB did to child rows when a parent row went from `old` to `new` (`None`:
    /// deleted), as explicit statements on the children, in source order after the parent's
    /// change. Explicit rather than left to PostgreSQL's own foreign-key triggers: while the
    /// target catches up after the snapshot, the parent row may already be gone (or moved) on
    /// the target while a child copied earlier still points at it, and a trigger would only
    /// fire for a parent row that exists. They run with `session_replication_role = origin`
    /// so that deeper levels (a child that is itself a cascading parent) cascade too.
    fn child_actions(&mut self, shape: &Shape, old: &Row, new: Option<&Row>) -> Result<()> {
        let mut statements = String::new();
        for rule in &shape.children {
            let old_values: Row = rule.parent_index.iter().map(|&i| old[i].clone()).collect();
            if old_values.contains(&Value::Null) {
                continue;
            }
            let new_values: Option<Row> =
                new.map(|n| rule.parent_index.iter().map(|&i| n[i].clone()).collect());
            if new_values.as_ref() == Some(&old_values) {
                continue;
            }
            let action = if new.is_some() {
                &rule.on_update
            } else {
                &rule.on_delete
            };
            let render = |values: &Row| -> Result<Vec<String>> {
                values
                    .iter()
                    .zip(&rule.types)
                    .zip(&rule.kinds)
                    .zip(&rule.columns)
                    .map(|(((v, t), kind), column)| {
                        let rendered = match shape.dialect {
                            Dialect::Postgres => pgrows::literal(v, t),
                            Dialect::Mysql => {
                                let mut out = String::new();
                                myapply::literal(*kind, v, &mut out).map(|()| out)
                            }
                            Dialect::Sqlite => {
                                let mut out = String::new();
                                crate::engine::sqlite::literal(v, &mut out);
                                Ok(out)
                            }
                        };
                        rendered.map_err(|e| {
                            Error::Definite(format!(
                                "table {}, column {column} (foreign key to {}): {e}",
                                rule.child, shape.name
                            ))
                        })
                    })
                    .collect()
            };
            let columns: Vec<String> = rule
                .columns
                .iter()
                .map(|c| shape.dialect.quote_ident(c))
                .collect();
            let old_literals = render(&old_values)?;
            let condition = columns
                .iter()
                .zip(&old_literals)
                .map(|(c, v)| format!("{c} = {v}"))
                .collect::<Vec<_>>()
                .join(" AND ");
            let table = shape.dialect.table(&rule.child);
            let set = |values: &[String]| {
                columns
                    .iter()
                    .zip(values)
                    .map(|(c, v)| format!("{c} = {v}"))
                    .chain(
                        rule.keep
                            .iter()
                            .filter(|_| shape.dialect == Dialect::Mysql)
                            .map(|k| {
                                let k = shape.dialect.quote_ident(k);
                                format!("{k} = {k}")
                            }),
                    )
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            match (action.as_str(), &new_values) {
                ("CASCADE", None) => {
                    statements.push_str(&format!("DELETE FROM {table} WHERE {condition};\n"))
                }
                ("CASCADE", Some(values)) => {
                    let new_literals = render(values)?;
                    statements.push_str(&format!(
                        "UPDATE {table} SET {} WHERE {condition};\n",
                        set(&new_literals)
                    ));
                }
                ("SET NULL", _) => {
                    let nulls = vec!["NULL".to_owned(); columns.len()];
                    statements.push_str(&format!(
                        "UPDATE {table} SET {} WHERE {condition};\n",
                        set(&nulls)
                    ));
                }
                _ => {}
            }
        }
        if !statements.is_empty() {
            // The parent's change (pending) goes first: a child's new key must find it.
            self.flush()?;
            if shape.dialect == Dialect::Postgres {
                self.sql
                    .push_str("SET LOCAL session_replication_role = origin;\n");
                self.sql.push_str(&statements);
                self.sql
                    .push_str("SET LOCAL session_replication_role = replica;\n");
            } else {
                self.sql.push_str(&statements);
            }
        }
        Ok(())
    }

    pub fn add(&mut self, change: &RowEvent) -> Result<()> {
        let shapes = self.shapes;
        let Some(shape) = shapes.get(&change.table) else {
            return Ok(());
        };
        self.changes += 1;
        let before = change.before.as_ref().map(|r| shape.project(r));
        let after = change.after.as_ref().map(|r| shape.project(r));
        match (before, after) {
            (None, Some(a)) => self.put(shape, shape.key_of(&a), Some(a)),
            (Some(b), None) => {
                self.put(shape, shape.key_of(&b), None);
                self.child_actions(shape, &b, None)?;
            }
            (Some(b), Some(a)) => {
                let (old_key, new_key) = (shape.key_of(&b), shape.key_of(&a));
                if old_key != new_key {
                    self.put(shape, old_key, None);
                }
                self.put(shape, new_key, Some(a.clone()));
                self.child_actions(shape, &b, Some(&a))?;
            }
            (None, None) => {}
        }
        if self.strict {
            self.flush()?;
        }
        Ok(())
    }

    /// The batch's statements, and the tables among them guarded by `--newer-wins` (their
    /// kept-back counts are reset first and read with [`Sink::kept_back`] after the commit).
    pub fn take_sql(&mut self) -> Result<(String, Vec<String>)> {
        self.flush()?;
        let guarded: Vec<String> = std::mem::take(&mut self.guarded).into_iter().collect();
        let sql = std::mem::take(&mut self.sql);
        let Some(dialect) = guarded.first().map(|t| self.shapes[t].dialect) else {
            return Ok((sql, guarded));
        };
        Ok((format!("{}{sql}", kept_reset(dialect, &guarded)), guarded))
    }
}

#[cfg(test)]
impl Shape {
    /// `name (id bigint key, v text)`; a table named `parent` has two acting children.
    pub fn for_test(name: &str, dialect: Dialect, children: Vec<ChildRule>) -> Shape {
        Shape {
            name: name.into(),
            dialect,
            columns: vec!["id".into(), "v".into()],
            types: vec![DataType::Int64, DataType::Text],
            kinds: vec![
                Kind::Int {
                    bits: 64,
                    unsigned: false,
                },
                Kind::Text,
            ],
            copied: vec![0, 1],
            key: vec!["id".into()],
            key_index: vec![0],
            children,
            newer_wins: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(name: &str) -> Shape {
        shape_in(name, Dialect::Postgres)
    }

    fn shape_in(name: &str, dialect: Dialect) -> Shape {
        let rule = |child: &str, column: &str, on_delete: &str, on_update: &str| ChildRule {
            child: child.into(),
            columns: vec![column.into()],
            types: vec![DataType::Int64],
            kinds: vec![Kind::Int {
                bits: 64,
                unsigned: false,
            }],
            keep: if child == "child" {
                vec!["changed_at".into()]
            } else {
                vec![]
            },
            parent_index: vec![0],
            on_delete: on_delete.into(),
            on_update: on_update.into(),
        };
        let children = if name == "parent" {
            vec![
                rule("child", "parent_id", "SET NULL", "CASCADE"),
                rule("other", "p", "CASCADE", "RESTRICT"),
            ]
        } else {
            vec![]
        };
        Shape::for_test(name, dialect, children)
    }

    fn row(id: i64, v: &str) -> Row {
        vec![Value::Int(id), Value::Text(v.into())]
    }

    #[test]
    fn innodb_cascades_become_explicit_child_statements_in_source_order() {
        let shapes: HashMap<String, Shape> =
            [("parent", shape("parent")), ("child", shape("child"))]
                .into_iter()
                .map(|(n, s)| (n.to_owned(), s))
                .collect();
        let mut b = Batch::new(&shapes, false);
        let ev = |t: &str, before: Option<Row>, after: Option<Row>| RowEvent {
            table: t.into(),
            before,
            after,
        };
        b.add(&ev("child", None, Some(row(1, "a")))).unwrap();
        b.add(&ev("child", Some(row(1, "a")), Some(row(1, "b"))))
            .unwrap();
        // A parent update that leaves the key alone touches no child.
        b.add(&ev("parent", Some(row(5, "x")), Some(row(5, "y"))))
            .unwrap();
        b.add(&ev("parent", Some(row(7, "x")), Some(row(8, "x"))))
            .unwrap();
        b.add(&ev("parent", Some(row(9, "y")), None)).unwrap();
        let sql = b.take_sql().unwrap().0;
        let find = |needle: &str| {
            sql.find(needle)
                .unwrap_or_else(|| panic!("{needle} not in {sql}"))
        };
        let child = find("INSERT INTO public.\"child\"");
        let moved = find("(8, 'x')");
        let cascade =
            find("UPDATE public.\"child\" SET \"parent_id\" = 8 WHERE \"parent_id\" = 7;");
        let parent_delete = find("DELETE FROM public.\"parent\" WHERE (\"id\") IN ((9))");
        let set_null =
            find("UPDATE public.\"child\" SET \"parent_id\" = NULL WHERE \"parent_id\" = 9;");
        let delete_cascade = find("DELETE FROM public.\"other\" WHERE \"p\" = 9;");
        assert!(
            child < moved && moved < cascade && cascade < parent_delete,
            "{sql}"
        );
        assert!(
            parent_delete < set_null && set_null < delete_cascade,
            "{sql}"
        );
        assert!(
            !sql.contains("\"p\" = 8") && !sql.contains("\"parent_id\" = 5"),
            "{sql}"
        );
        assert_eq!(
            sql.matches("session_replication_role = origin").count(),
            2,
            "{sql}"
        );
        // The child's two changes were reduced to one upsert of the last image.
        assert!(
            sql.contains("(1, 'b')") && !sql.contains("(1, 'a')"),
            "{sql}"
        );
    }

    #[test]
    fn mysql_target_statements() {
        let shapes: HashMap<String, Shape> = [("parent", Dialect::Mysql)]
            .into_iter()
            .map(|(n, d)| (n.to_owned(), shape_in(n, d)))
            .collect();
        let mut b = Batch::new(&shapes, false);
        b.add(&RowEvent {
            table: "parent".into(),
            before: None,
            after: Some(vec![Value::Int(1), Value::Text("it's".into())]),
        })
        .unwrap();
        b.add(&RowEvent {
            table: "parent".into(),
            before: Some(vec![Value::Int(2), Value::Null]),
            after: None,
        })
        .unwrap();
        let sql = b.take_sql().unwrap().0;
        assert!(sql.contains("INSERT INTO `parent` (`id`, `v`) VALUES (1, 'it\\'s') ON DUPLICATE KEY UPDATE `v` = VALUES(`v`);"), "{sql}");
        assert!(
            sql.contains("DELETE FROM `parent` WHERE (`id`) IN ((2));"),
            "{sql}"
        );
        assert!(
            sql.contains(
                "UPDATE `child` SET `parent_id` = NULL, `changed_at` = `changed_at` WHERE `parent_id` = 2;"
            ),
            "{sql}"
        );
        assert!(sql.contains("DELETE FROM `other` WHERE `p` = 2;"), "{sql}");
        assert!(!sql.contains("session_replication_role"), "{sql}");
    }

    #[test]
    fn newer_wins_guards_upserts_in_every_dialect_and_counts_what_it_kept() {
        for dialect in [Dialect::Mysql, Dialect::Postgres, Dialect::Sqlite] {
            let shapes: HashMap<String, Shape> = [
                (
                    "t".to_owned(),
                    Shape::for_test("t", dialect, vec![]).with_newer_wins(Some("v")),
                ),
                // No such column: applied as usual.
                (
                    "u".to_owned(),
                    Shape::for_test("u", dialect, vec![]).with_newer_wins(Some("gmt")),
                ),
            ]
            .into_iter()
            .collect();
            let mut b = Batch::new(&shapes, false);
            for table in ["t", "u"] {
                b.add(&RowEvent {
                    table: table.into(),
                    before: None,
                    after: Some(vec![Value::Int(1), Value::Text("x".into())]),
                })
                .unwrap();
            }
            b.add(&RowEvent {
                table: "t".into(),
                before: Some(vec![Value::Int(2), Value::Null]),
                after: None,
            })
            .unwrap();
            let (sql, guarded) = b.take_sql().unwrap();
            assert_eq!(guarded, vec!["t".to_owned()], "{dialect:?}");
            let expect: &[&str] = match dialect {
                Dialect::Mysql => &[
                    "SET @`kuaka_kept.t` = 0;",
                    "ON DUPLICATE KEY UPDATE `v` = IF((`v` IS NULL OR VALUES(`v`) IS NULL OR `v` <= VALUES(`v`)), VALUES(`v`), IF((@`kuaka_kept.t` := COALESCE(@`kuaka_kept.t`, 0) + 1) > 0, `v`, `v`));",
                    "INSERT INTO `u` (`id`, `v`) VALUES (1, 'x') ON DUPLICATE KEY UPDATE `v` = VALUES(`v`);",
                    "DELETE FROM `t` WHERE (`id`) IN ((2));",
                ],
                Dialect::Postgres => &[
                    "DELETE FROM pg_temp.kuaka_kept;",
                    "WITH written AS (INSERT INTO public.\"t\"",
                    "WHERE public.\"t\".\"v\" IS NULL OR EXCLUDED.\"v\" IS NULL OR public.\"t\".\"v\" <= EXCLUDED.\"v\" RETURNING 1) INSERT INTO pg_temp.kuaka_kept SELECT 't', 1 - count(*) FROM written;",
                ],
                Dialect::Sqlite => &[
                    "DELETE FROM temp.kuaka_kept;",
                    "WHERE \"t\".\"v\" IS NULL OR excluded.\"v\" IS NULL OR \"t\".\"v\" <= excluded.\"v\";",
                    "INSERT INTO temp.kuaka_kept VALUES ('t', 1 - changes());",
                ],
            };
            for e in expect {
                assert!(sql.contains(e), "{dialect:?}: no {e:?} in\n{sql}");
            }
            // A key column is no guard.
            assert!(
                Shape::for_test("k", dialect, vec![])
                    .with_newer_wins(Some("id"))
                    .newer_wins
                    .is_none()
            );
        }
    }
}
