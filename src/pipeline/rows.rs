//! Jobs whose source is SQLite (to SQLite or PostgreSQL): rows travel as typed values.
//!
//! The hand-off follows DESIGN.md: capture (triggers) is installed before the snapshot; the
//! snapshot reads every table in one read transaction that also reads the change position P0,
//! so the copy is exactly the state at P0. A copy resumed after a crash reads the remaining
//! tables at a later position P1 and replays changes from P0; every change is an upsert of the
//! row's current image or a delete, so replaying is harmless, and the target is consistent
//! once apply passes P1. Apply commits each batch with the position in the same target
//! transaction; the source's change records are removed only after that commit.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::binlog_target::{Dialect, Sink};
use super::snapshot::Summary;
use super::{Error, Result, cutover};
use crate::config::{Endpoint, EngineKind, JobSpec, TargetExists, Until};
use crate::engine::mysql::{self, Flavour, apply as myapply};
use crate::engine::postgres::snapshot::CopyProgress;
use crate::engine::postgres::{self, Side, rows as pgrows};
use crate::engine::sqlite::{self, KeyChange, SourceCatalog, SourceTable, quote_ident};
use crate::model::DataType;
use crate::model::schema::quote_literal;
use crate::model::value::{Row, Value};
use crate::state::StateStore;
use crate::ui::Ui;

/// Rows per target statement, and per committed batch of a table copy.
const ROWS_PER_STATEMENT: usize = 500;
const ROWS_PER_COMMIT: usize = 20_000;
/// Change records read per apply batch.
const CHANGES_PER_BATCH: usize = 20_000;

/// What the run did, for the caller's summary line.
#[derive(Debug, Default, Clone)]
pub struct RowsSummary {
    pub p0: i64,
    pub p1: i64,
    pub applied: i64,
    pub batches: u64,
    pub changes: u64,
    pub caught_up: bool,
}

pub(crate) enum Target {
    Sqlite(Connection),
    Postgres(Client),
    /// A MySQL/MariaDB target, and the collation of its text columns.
    Mysql(Sink, &'static str),
}

fn block<R>(f: impl FnOnce() -> R) -> R {
    tokio::task::block_in_place(f)
}

/// A MySQL/MariaDB target session for rows of another engine, and the binary collation its
/// text columns get: values that do not fit are errors, not silent truncation, and keys
/// compare byte by byte (trailing spaces kept) like on SQLite and PostgreSQL.
pub(crate) async fn mysql_target(endpoint: &Endpoint, role: &str) -> Result<(Sink, &'static str)> {
    let mut sink = Sink::connect(endpoint, role).await?;
    let Sink::Mysql(conn) = &mut sink else {
        unreachable!("a MySQL endpoint gives a MySQL sink")
    };
    // Values that do not fit are errors, not silent truncation; SQLite compares
    // text byte by byte and keeps trailing spaces, so keys do too.
    let (flavour, version) = mysql::flavour(conn).await?;
    let collation = match flavour {
        Flavour::Mariadb => "utf8mb4_nopad_bin",
        Flavour::Mysql if !version.starts_with("5.") => "utf8mb4_0900_bin",
        Flavour::Mysql => "utf8mb4_bin",
    };
    sink.execute(
        "SET SESSION sql_mode = 'STRICT_ALL_TABLES,NO_AUTO_VALUE_ON_ZERO,NO_ENGINE_SUBSTITUTION'",
        "setting a strict sql_mode on the target",
    )
    .await?;
    Ok((sink, collation))
}

impl Target {
    pub(crate) async fn connect(endpoint: &Endpoint) -> Result<Target> {
        match endpoint.engine {
            EngineKind::Sqlite => {
                let conn = block(|| sqlite::open(&endpoint.database, true))?;
                block(|| sqlite::target_bookkeeping(&conn))?;
                Ok(Target::Sqlite(conn))
            }
            EngineKind::Postgres => {
                let client = postgres::connect(endpoint, Side::Target, "rows target").await?;
                client
                    .batch_execute(pgrows::BOOKKEEPING)
                    .await
                    .map_err(|e| pg_error("creating kuaka's tables on the target", e))?;
                // Foreign keys and triggers must not act on applied changes: the source
                // already enforced them, and a batch is not in the source's row order.
                client
                    .batch_execute("SET session_replication_role = replica")
                    .await
                    .map_err(|e| {
                        pg_error(
                            "setting session_replication_role on the target (needs superuser or rds_superuser)",
                            e,
                        )
                    })?;
                Ok(Target::Postgres(client))
            }
            EngineKind::Mysql => {
                let (sink, collation) = mysql_target(endpoint, "rows target").await?;
                Ok(Target::Mysql(sink, collation))
            }
        }
    }

    pub(crate) async fn existing_tables(&mut self, names: &[&str]) -> Result<Vec<String>> {
        match self {
            Target::Sqlite(conn) => block(|| {
                let mut found = Vec::new();
                for n in names {
                    let exists: bool = conn
                        .query_row(
                            "SELECT count(*) > 0 FROM sqlite_schema WHERE type = 'table' AND name = ?1",
                            [n],
                            |r| r.get(0),
                        )
                        .map_err(|e| Error::Definite(format!("reading the target catalog: {e}")))?;
                    if exists {
                        found.push((*n).to_owned());
                    }
                }
                Ok(found)
            }),
            Target::Postgres(client) => {
                let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
                let rows = client
                    .query(
                        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename = ANY($1)",
                        &[&names],
                    )
                    .await
                    .map_err(|e| pg_error("reading the target catalog", e))?;
                Ok(rows.iter().map(|r| r.get(0)).collect())
            }
            Target::Mysql(sink, _) => {
                let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
                sink.existing_tables(&names).await
            }
        }
    }

    pub(crate) async fn execute(&mut self, sql: &str, what: &str) -> Result<()> {
        match self {
            Target::Sqlite(conn) => block(|| {
                conn.execute_batch(sql)
                    .map_err(|e| Error::Definite(format!("{what}: {e}")))
            }),
            Target::Postgres(client) => client
                .batch_execute(sql)
                .await
                .map_err(|e| pg_error(what, e)),
            Target::Mysql(sink, _) => sink.execute(sql, what).await,
        }
    }

    pub(crate) async fn copied_tables(&mut self, job_id: &str) -> Result<HashMap<String, i64>> {
        match self {
            Target::Sqlite(conn) => block(|| {
                conn.prepare(&format!(
                    "SELECT table_name, rows FROM {} WHERE job_id = ?1",
                    sqlite::COPIED_TABLE
                ))
                .and_then(|mut s| {
                    s.query_map([job_id], |r| Ok((r.get(0)?, r.get(1)?)))
                        .and_then(|rows| rows.collect())
                })
                .map_err(|e| Error::Definite(format!("reading copied tables on the target: {e}")))
            }),
            Target::Postgres(client) => Ok(client
                .query(
                    "SELECT table_name, rows FROM kuaka.row_copied WHERE job_id = $1",
                    &[&job_id],
                )
                .await
                .map_err(|e| pg_error("reading copied tables on the target", e))?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect()),
            Target::Mysql(sink, _) => sink.copied(job_id).await,
        }
    }

    pub(crate) async fn position(&mut self, job_id: &str) -> Result<Option<i64>> {
        match self {
            Target::Sqlite(conn) => block(|| {
                use rusqlite::OptionalExtension;
                conn.query_row(
                    &format!(
                        "SELECT position FROM {} WHERE job_id = ?1",
                        sqlite::POSITION_TABLE
                    ),
                    [job_id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(|e| Error::Definite(format!("reading the applied position: {e}")))
            }),
            Target::Postgres(client) => Ok(client
                .query_opt(
                    "SELECT position FROM kuaka.row_position WHERE job_id = $1",
                    &[&job_id],
                )
                .await
                .map_err(|e| pg_error("reading the applied position", e))?
                .map(|r| r.get(0))),
            Target::Mysql(sink, _) => match sink.applied_position(job_id).await? {
                None => Ok(None),
                Some(p) => p.parse().map(Some).map_err(|_| {
                    Error::Definite(format!(
                        "the target's kuaka.apply_position holds {p:?} for job {job_id}, not a SQLite change position"
                    ))
                }),
            },
        }
    }

    /// Load one page of a table's copy; the page shorter than `page` is the last, and carries
    /// the table's "copied" row. Returns whether it was the last.
    pub(crate) async fn load_page(
        &mut self,
        table: &SourceTable,
        rows: &[Row],
        page: usize,
        job_id: &str,
        count: &mut i64,
    ) -> Result<bool> {
        let last = rows.len() < page;
        *count += rows.len() as i64;
        let marker = if last {
            self.copied_marker(job_id, table.name(), *count)
        } else {
            String::new()
        };
        self.load(table, rows, &marker).await?;
        crate::failpoint::hit("snapshot.chunk.after_commit");
        Ok(last)
    }

    /// The statement recording a table as copied (in the transaction of its last rows).
    fn copied_marker(&self, job_id: &str, table: &str, count: i64) -> String {
        match self {
            Target::Sqlite(_) => format!(
                "INSERT OR REPLACE INTO {} (job_id, table_name, rows) VALUES ({}, {}, {count});",
                sqlite::COPIED_TABLE,
                quote_literal(job_id),
                quote_literal(table)
            ),
            Target::Postgres(_) => format!(
                "INSERT INTO kuaka.row_copied (job_id, table_name, rows) VALUES ({}, {}, {count}) ON CONFLICT (job_id, table_name) DO UPDATE SET rows = EXCLUDED.rows;\n",
                quote_literal(job_id),
                quote_literal(table)
            ),
            Target::Mysql(..) => Dialect::Mysql.copied_marker(job_id, table, count),
        }
    }

    /// Upsert copied rows in one transaction, with `marker` (the table's "copied" row, on its
    /// last page) in the same transaction.
    pub(crate) async fn load(
        &mut self,
        table: &SourceTable,
        rows: &[Row],
        marker: &str,
    ) -> Result<()> {
        match self {
            Target::Sqlite(conn) => block(|| {
                let fail = |e: rusqlite::Error| {
                    Error::Definite(format!("writing to target table {}: {e}", table.name()))
                };
                let tx = conn.transaction().map_err(fail)?;
                write_sqlite_rows(&tx, table, rows, &[]).map_err(fail)?;
                if !marker.is_empty() {
                    tx.execute_batch(marker).map_err(fail)?;
                }
                tx.commit().map_err(fail)
            }),
            Target::Postgres(client) => {
                let mut sql = String::from("BEGIN;\n");
                sql.push_str(&pg_statements(table, rows, &[])?);
                sql.push_str(marker);
                sql.push_str("COMMIT;");
                let result = client.batch_execute(&sql).await;
                if result.is_err() {
                    let _ = client.batch_execute("ROLLBACK").await;
                }
                result
                    .map_err(|e| pg_error(&format!("writing to target table {}", table.name()), e))
            }
            Target::Mysql(sink, _) => {
                let body = mysql_statements(table, rows, &[])?;
                sink.commit(
                    &body,
                    marker,
                    &format!("writing to target table {}", table.name()),
                )
                .await
                .map_err(|e| e.error)
            }
        }
    }

    /// Apply a batch of changes of several tables in one transaction with the position.
    async fn apply(
        &mut self,
        tables: &HashMap<String, SourceTable>,
        changes: &[KeyChange],
        job_id: &str,
        position: i64,
    ) -> Result<()> {
        let mut by_table: Vec<(&str, Vec<Row>, Vec<Row>)> = Vec::new();
        for c in changes {
            let i = match by_table.iter().position(|(t, _, _)| *t == c.table) {
                Some(i) => i,
                None => {
                    by_table.push((&c.table, Vec::new(), Vec::new()));
                    by_table.len() - 1
                }
            };
            match &c.row {
                Some(row) => by_table[i].1.push(row.clone()),
                None => by_table[i].2.push(c.key.clone()),
            }
        }
        match self {
            Target::Sqlite(conn) => block(|| {
                let fail = |e: rusqlite::Error| {
                    Error::Definite(format!("applying changes to the SQLite target: {e}"))
                };
                let tx = conn.transaction().map_err(fail)?;
                // Through a cutover's fence (see `sqlite_switch`): seen by this transaction only.
                let pass = super::sqlite_switch::PASS_TABLE;
                tx.execute_batch(&format!("INSERT INTO {pass} VALUES (1)"))
                    .map_err(fail)?;
                for (name, upserts, deletes) in &by_table {
                    let Some(table) = tables.get(*name) else {
                        continue;
                    };
                    write_sqlite_rows(&tx, table, upserts, deletes).map_err(fail)?;
                }
                tx.execute_batch(&format!("DELETE FROM {pass}"))
                    .map_err(fail)?;
                tx.execute(
                    &format!(
                        "INSERT INTO {} (job_id, position) VALUES (?1, ?2) ON CONFLICT (job_id) DO UPDATE SET position = excluded.position",
                        sqlite::POSITION_TABLE
                    ),
                    rusqlite::params![job_id, position],
                )
                .map_err(fail)?;
                crate::failpoint::hit("apply.before_commit");
                tx.commit().map_err(fail)?;
                crate::failpoint::hit("apply.after_commit");
                Ok(())
            }),
            Target::Postgres(client) => {
                let mut sql = String::from("BEGIN;\n");
                for (name, upserts, deletes) in &by_table {
                    let Some(table) = tables.get(*name) else {
                        continue;
                    };
                    sql.push_str(&pg_statements(table, upserts, deletes)?);
                }
                sql.push_str(&format!(
                    "INSERT INTO kuaka.row_position (job_id, position) VALUES ({}, {position}) ON CONFLICT (job_id) DO UPDATE SET position = EXCLUDED.position, applied_at = now();\n",
                    quote_literal(job_id)
                ));
                let result = client.batch_execute(&sql).await;
                let result = match result {
                    Ok(()) => {
                        crate::failpoint::hit("apply.before_commit");
                        client.batch_execute("COMMIT").await
                    }
                    Err(e) => Err(e),
                };
                if result.is_err() {
                    let _ = client.batch_execute("ROLLBACK").await;
                }
                result.map_err(|e| pg_error("applying changes to the target", e))?;
                crate::failpoint::hit("apply.after_commit");
                Ok(())
            }
            Target::Mysql(sink, _) => {
                let mut body = String::new();
                for (name, upserts, deletes) in &by_table {
                    let Some(table) = tables.get(*name) else {
                        continue;
                    };
                    body.push_str(&mysql_statements(table, upserts, deletes)?);
                }
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() as u32)
                    .unwrap_or(0);
                let tail = Dialect::Mysql.position_update(job_id, &position.to_string(), now);
                sink.commit(&body, &tail, "applying changes to the target")
                    .await
                    .map_err(|e| e.error)
            }
        }
    }
}

/// Deletes then upserts of one table as MySQL statements (values checked against the
/// column's model type like on PostgreSQL).
pub(crate) fn mysql_statements(
    table: &SourceTable,
    upserts: &[Row],
    deletes: &[Row],
) -> Result<String> {
    let types = table.column_types();
    let key_index = table.key_index();
    let key_types: Vec<_> = key_index.iter().map(|&i| types[i].clone()).collect();
    let tuple = |row: &Row, names: &[String], types: &[DataType], key: &Row| {
        let mut out = String::from("(");
        for (i, ((v, t), column)) in row.iter().zip(types).zip(names).enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            myapply::typed_literal(v, t, &mut out).map_err(|e| {
                Error::Definite(format!(
                    "table {}, column {column}, row with key {}: {e}",
                    table.name(),
                    describe_key(key)
                ))
            })?;
        }
        out.push(')');
        Ok::<_, Error>(out)
    };
    let mut sql = String::new();
    for chunk in deletes.chunks(ROWS_PER_STATEMENT) {
        let tuples = chunk
            .iter()
            .map(|k| tuple(k, &table.key, &key_types, k))
            .collect::<Result<Vec<_>>>()?;
        sql.push_str(&myapply::delete(table.name(), &table.key, &tuples));
    }
    for chunk in upserts.chunks(ROWS_PER_STATEMENT) {
        let tuples = chunk
            .iter()
            .map(|r| {
                let k: Row = key_index.iter().map(|&i| r[i].clone()).collect();
                tuple(r, &table.columns, &types, &k)
            })
            .collect::<Result<Vec<_>>>()?;
        sql.push_str(&myapply::upsert(
            table.name(),
            &table.columns,
            &table.key,
            &tuples,
        ));
    }
    Ok(sql)
}

/// Deletes, then upserts, of one table on a SQLite target, inside the caller's transaction.
/// Deletes go first: a key deleted and another inserted with the same unique value must not
/// collide.
fn write_sqlite_rows(
    tx: &rusqlite::Transaction<'_>,
    table: &SourceTable,
    upserts: &[Row],
    deletes: &[Row],
) -> rusqlite::Result<()> {
    let mut del = tx.prepare_cached(&sqlite::delete_sql(table.name(), &table.key))?;
    for key in deletes {
        del.execute(rusqlite::params_from_iter(key.iter().map(sqlite::to_sql)))?;
    }
    let mut up = tx.prepare_cached(&sqlite::upsert_sql(
        table.name(),
        &table.columns,
        &table.key,
    ))?;
    for row in upserts {
        up.execute(rusqlite::params_from_iter(row.iter().map(sqlite::to_sql)))?;
    }
    Ok(())
}

fn pg_error(what: &str, e: tokio_postgres::Error) -> Error {
    Error::Definite(format!(
        "{what}: {}",
        e.as_db_error()
            .map(|d| d.message().to_owned())
            .unwrap_or_else(|| e.to_string())
    ))
}

/// Deletes then upserts of one table as PostgreSQL statements.
fn pg_statements(table: &SourceTable, upserts: &[Row], deletes: &[Row]) -> Result<String> {
    let types = table.column_types();
    pg_rows_sql(
        table.name(),
        &table.columns,
        &types,
        &table.key,
        upserts,
        deletes,
    )
}

/// Deletes (by key) then upserts of rows of `public.<name>`, as multi-row PostgreSQL
/// statements. A value that does not fit its column's type is an error naming the table,
/// column and key.
pub(crate) fn pg_rows_sql(
    name: &str,
    columns: &[String],
    types: &[crate::model::DataType],
    key: &[String],
    upserts: &[Row],
    deletes: &[Row],
) -> Result<String> {
    let key_index: Vec<usize> = key
        .iter()
        .map(|k| columns.iter().position(|c| c == k).unwrap_or(0))
        .collect();
    let key_types: Vec<_> = key_index.iter().map(|&i| types[i].clone()).collect();
    let tuple = |row: &Row, names: &[String], types: &[crate::model::DataType], key: &Row| {
        let mut parts = Vec::with_capacity(row.len());
        for ((v, t), column) in row.iter().zip(types).zip(names) {
            parts.push(pgrows::literal(v, t).map_err(|e| {
                Error::Definite(format!(
                    "table {name}, column {column}, row with key {}: {e}",
                    describe_key(key)
                ))
            })?);
        }
        Ok::<_, Error>(format!("({})", parts.join(", ")))
    };
    let mut sql = String::new();
    for chunk in deletes.chunks(ROWS_PER_STATEMENT) {
        let tuples = chunk
            .iter()
            .map(|k| tuple(k, key, &key_types, k))
            .collect::<Result<Vec<_>>>()?;
        sql.push_str(&pgrows::delete(name, key, &tuples));
    }
    for chunk in upserts.chunks(ROWS_PER_STATEMENT) {
        let tuples = chunk
            .iter()
            .map(|r| {
                let k: Row = key_index.iter().map(|&i| r[i].clone()).collect();
                tuple(r, columns, types, &k)
            })
            .collect::<Result<Vec<_>>>()?;
        sql.push_str(&pgrows::upsert(name, columns, key, &tuples));
    }
    Ok(sql)
}

pub(crate) fn describe_key(key: &Row) -> String {
    key.iter()
        .map(|v| match v {
            Value::Int(i) => i.to_string(),
            Value::Text(t) => format!("{t:?}"),
            other => format!("{other:?}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `CREATE TABLE` on PostgreSQL for a SQLite table (columns and primary key; the rest comes
/// after the data).
fn pg_create_table(t: &SourceTable) -> String {
    let mut parts: Vec<String> = t
        .table
        .columns
        .iter()
        .filter(|c| c.generated.is_none())
        .map(|c| {
            format!(
                "{} {}{}",
                quote_ident(&c.name),
                pgrows::pg_type(&c.data_type),
                if c.nullable { "" } else { " NOT NULL" }
            )
        })
        .collect();
    if !t.key.is_empty() {
        parts.push(format!("PRIMARY KEY ({})", sqlite::join_idents(&t.key)));
    }
    format!(
        "CREATE TABLE public.{} ({});\n",
        quote_ident(t.name()),
        parts.join(", ")
    )
}

/// Unique keys, indexes and foreign keys on PostgreSQL, after the data.
fn pg_post_data(t: &SourceTable) -> Vec<(String, String)> {
    let mut steps = Vec::new();
    let table = format!("public.{}", quote_ident(t.name()));
    for (i, k) in t.table.unique_keys.iter().enumerate() {
        steps.push((
            format!("unique key on {}", t.name()),
            format!(
                "ALTER TABLE {table} ADD CONSTRAINT {} UNIQUE ({});",
                quote_ident(&format!("{}_key{}", t.name(), i + 1)),
                sqlite::join_idents(&k.columns)
            ),
        ));
    }
    for index in &t.table.indexes {
        if index.columns.iter().any(|c| c == "<expression>") {
            continue;
        }
        steps.push((
            format!("index {}", index.name),
            format!(
                "CREATE {}INDEX {} ON {table} ({});",
                if index.unique { "UNIQUE " } else { "" },
                quote_ident(&index.name),
                sqlite::join_idents(&index.columns)
            ),
        ));
    }
    for fk in &t.table.foreign_keys {
        let definition = fk.definition.replace(
            &format!("REFERENCES {}", quote_ident(&fk.referenced_table.name)),
            &format!(
                "REFERENCES public.{}",
                quote_ident(&fk.referenced_table.name)
            ),
        );
        steps.push((
            format!("foreign key {}", fk.name),
            format!(
                "ALTER TABLE {table} ADD CONSTRAINT {} {definition} NOT VALID;",
                quote_ident(&fk.name)
            ),
        ));
    }
    steps
}

/// For each column inside a primary key, unique key or index: the number of string columns
/// of the widest such index (see [`myapply::column_type`]).
fn mysql_key_shares(t: &SourceTable) -> HashMap<String, u32> {
    let is_string = |c: &String| {
        t.table.column(c).is_some_and(|col| {
            !matches!(
                col.data_type,
                DataType::Bool
                    | DataType::Int16
                    | DataType::Int32
                    | DataType::Int64
                    | DataType::Float32
                    | DataType::Float64
                    | DataType::Numeric { .. }
                    | DataType::Date
                    | DataType::Time
                    | DataType::Timestamp
            )
        })
    };
    let mut groups: Vec<&[String]> = vec![&t.key];
    groups.extend(t.table.unique_keys.iter().map(|k| k.columns.as_slice()));
    groups.extend(t.table.indexes.iter().map(|i| i.columns.as_slice()));
    let mut shares: HashMap<String, u32> = HashMap::new();
    for columns in groups {
        let n = columns.iter().filter(|c| is_string(c)).count() as u32;
        for c in columns.iter().filter(|c| is_string(c)) {
            let share = shares.entry(c.clone()).or_insert(n);
            *share = (*share).max(n);
        }
    }
    shares
}

/// `CREATE TABLE` on MySQL/MariaDB for a SQLite table: columns and primary key, text compared
/// byte by byte like SQLite's BINARY collation.
pub(crate) fn mysql_create_table(t: &SourceTable, collation: &str) -> String {
    let shares = mysql_key_shares(t);
    let mut parts: Vec<String> = t
        .table
        .columns
        .iter()
        .filter(|c| c.generated.is_none())
        .map(|c| {
            // An integer key filled by a sequence (identity or serial) keeps being filled by
            // the target once the application writes there.
            let auto = t.key.len() == 1
                && t.key[0] == c.name
                && matches!(
                    c.data_type,
                    DataType::Int16 | DataType::Int32 | DataType::Int64
                )
                && (c.identity.is_some()
                    || c.default
                        .as_deref()
                        .is_some_and(|d| d.starts_with("nextval(")));
            format!(
                "{} {}{}{}",
                mysql::quote_ident(&c.name),
                myapply::column_type(&c.data_type, shares.get(&c.name).copied()),
                if c.nullable { " NULL" } else { " NOT NULL" },
                if auto { " AUTO_INCREMENT" } else { "" }
            )
        })
        .collect();
    if !t.key.is_empty() {
        parts.push(format!("PRIMARY KEY ({})", mysql_idents(&t.key)));
    }
    format!(
        "CREATE TABLE {} ({}) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE={collation};\n",
        mysql::quote_ident(t.name()),
        parts.join(", ")
    )
}

fn mysql_idents(names: &[String]) -> String {
    names
        .iter()
        .map(|n| mysql::quote_ident(n))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Unique keys and indexes of a table from another engine, after the data: on MySQL/MariaDB,
/// or on SQLite (`sqlite`) for a PostgreSQL source. Each step is labelled by its own name (the
/// label is what makes it run once across a crash).
pub(crate) fn index_steps(t: &SourceTable, sqlite: bool) -> Vec<(String, String)> {
    let quote = |n: &str| {
        if sqlite {
            quote_ident(n)
        } else {
            mysql::quote_ident(n)
        }
    };
    let list = |names: &[String]| {
        names
            .iter()
            .map(|n| quote(n))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let table = quote(t.name());
    let exists = if sqlite { "IF NOT EXISTS " } else { "" };
    // SQLite's index names are per database, MySQL's per table: prefix them with the table
    // on SQLite unless they carry it already.
    let index_name = |n: &str| {
        if sqlite && !n.starts_with(t.name()) {
            format!("{}_{n}", t.name())
        } else {
            n.to_owned()
        }
    };
    let mut steps = Vec::new();
    for (i, k) in t.table.unique_keys.iter().enumerate() {
        let name = if k.name.is_empty() {
            format!("{}_key{}", t.name(), i + 1)
        } else {
            index_name(&k.name)
        };
        steps.push((
            format!("unique key {name} on {}", t.name()),
            format!(
                "CREATE UNIQUE INDEX {exists}{} ON {table} ({});",
                quote(&name),
                list(&k.columns)
            ),
        ));
    }
    for index in &t.table.indexes {
        if index.columns.iter().any(|c| c == "<expression>") {
            tracing::warn!(
                "expression or partial index {} of {} is not created on the target; create it by hand",
                index.name,
                t.name()
            );
            continue;
        }
        steps.push((
            format!("index {} on {}", index.name, t.name()),
            format!(
                "CREATE {}INDEX {exists}{} ON {table} ({});",
                if index.unique { "UNIQUE " } else { "" },
                quote(&index_name(&index.name)),
                list(&index.columns)
            ),
        ));
    }
    steps
}

/// Foreign keys on MySQL/MariaDB with SQLite's ON UPDATE / ON DELETE rules (InnoDB has no
/// SET DEFAULT: such a key is named in a warning and left out).
pub(crate) fn mysql_foreign_keys(t: &SourceTable) -> Vec<(String, String)> {
    let mut steps = Vec::new();
    for fk in &t.table.foreign_keys {
        let rules = fk_actions(&fk.definition);
        if rules.contains("SET DEFAULT") {
            tracing::warn!(
                "foreign key {} of {} uses SET DEFAULT, which InnoDB does not support; it is not created",
                fk.name,
                t.name()
            );
            continue;
        }
        steps.push((
            format!("foreign key {}", fk.name),
            format!(
                "ALTER TABLE {} ADD CONSTRAINT {} FOREIGN KEY ({}) REFERENCES {} ({}) {rules};",
                mysql::quote_ident(t.name()),
                mysql::quote_ident(&fk.name),
                mysql_idents(&fk.columns),
                mysql::quote_ident(&fk.referenced_table.name),
                mysql_idents(&fk.referenced_columns)
            ),
        ));
    }
    steps
}

/// The `ON DELETE` / `ON UPDATE` actions of a foreign key's definition (SQLite or PostgreSQL),
/// without what InnoDB does not take (`MATCH`, `DEFERRABLE`, `NOT VALID`, column lists).
pub(crate) fn fk_actions(definition: &str) -> String {
    // The actions follow the last parenthesis of the referenced columns.
    let Some(start) = definition.find("REFERENCES") else {
        return String::new();
    };
    let rest = &definition[start..];
    let tail = rest.find(')').map(|i| &rest[i + 1..]).unwrap_or("");
    let words: Vec<&str> = tail.split_whitespace().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < words.len() {
        if words[i].eq_ignore_ascii_case("ON")
            && let Some(event) = words.get(i + 1)
            && (event.eq_ignore_ascii_case("DELETE") || event.eq_ignore_ascii_case("UPDATE"))
        {
            let action: Vec<&str> = match words.get(i + 2).map(|w| w.to_ascii_uppercase()) {
                Some(w) if w == "SET" || w == "NO" => {
                    words.iter().skip(i + 2).take(2).copied().collect()
                }
                Some(_) => vec![words[i + 2]],
                None => Vec::new(),
            };
            if !action.is_empty() {
                i += 2 + action.len();
                out.push(format!(
                    "ON {} {}",
                    event.to_ascii_uppercase(),
                    action.join(" ").to_ascii_uppercase()
                ));
                continue;
            }
        }
        i += 1;
    }
    out.join(" ")
}

/// Run a job whose source is SQLite; a SQLite → SQLite job turns around at each cutover
/// and fallback (see `sqlite_switch`).
pub async fn run(
    spec: &JobSpec,
    store: &Arc<StateStore>,
    job_id: &str,
    ui: &Ui,
    cancel: &CancellationToken,
) -> Result<Summary> {
    cutover::run_legs(
        spec,
        store,
        &store.dir(),
        job_id,
        async || forward(spec, store, job_id, ui, cancel).await,
        async || reverse(spec, store, job_id, cancel).await,
    )
    .await
}

/// Apply one batch of changes `from` → `to` under the position `leg_job`. Returns the number
/// of changed keys applied.
async fn pump(
    from: &mut Connection,
    to: &mut Target,
    tables: &HashMap<String, SourceTable>,
    leg_job: &str,
    applied: &mut i64,
) -> Result<usize> {
    let (changes, last) =
        block(|| sqlite::read_changes(from, tables, *applied, CHANGES_PER_BATCH))?;
    if last > *applied {
        to.apply(tables, &changes, leg_job, last).await?;
        *applied = last;
    }
    Ok(changes.len())
}

/// Apply until `applied` reaches the current end of `from`'s change table (read once at the
/// start), or `within` runs out. Returns the end when reached.
async fn catch_up(
    from: &mut Connection,
    to: &mut Target,
    tables: &HashMap<String, SourceTable>,
    leg_job: &str,
    applied: &mut i64,
    within: Duration,
) -> Result<Option<i64>> {
    let goal = block(|| sqlite::current_position(from))?;
    let deadline = Instant::now() + within;
    while *applied < goal {
        if Instant::now() > deadline {
            return Ok(None);
        }
        if pump(from, to, tables, leg_job, applied).await? == 0 && *applied < goal {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok(Some(goal))
}

/// A cutover (`reverse` false: the forward leg is running) or a fallback of a SQLite →
/// SQLite job, performed by the streaming loop. `from`/`to` are the running leg's.
#[allow(clippy::too_many_arguments)]
async fn switch(
    spec: &JobSpec,
    store: &StateStore,
    job_id: &str,
    request: cutover::Request,
    from: &mut Connection,
    to: &mut Target,
    tables: &HashMap<String, SourceTable>,
    leg_job: &str,
    applied: &mut i64,
) -> Result<()> {
    use crate::engine::postgres::Side;
    let reverse = request.action == "fallback";
    let dir = store.dir();
    let mut rep = cutover::Reporter::new(&dir, &request);
    rep.progress.steps.clear();
    rep.begin();
    // The database the application writes to now, and the one it moves to.
    let (writes, moves) = if reverse {
        ((&spec.target, Side::Target), (&spec.source, Side::Source))
    } else {
        ((&spec.source, Side::Source), (&spec.target, Side::Target))
    };
    let max_lag = Duration::from_secs_f64(request.max_lag_seconds.max(0.0));
    let drain_timeout = Duration::from_secs_f64(request.drain_timeout_seconds.max(1.0));
    let mut fenced: Vec<(&crate::config::Endpoint, Side)> = Vec::new();
    let before = async {
        match catch_up(from, to, tables, leg_job, applied, max_lag).await? {
            Some(at) => rep.step(
                "check lag",
                format!(
                    "applied every change the {} held (change {at}) within --max-lag {:.1} s",
                    writes.1.name(),
                    request.max_lag_seconds
                ),
            ),
            None => {
                return Err(Error::Definite(format!(
                    "refused: apply did not catch up with the {} within --max-lag {:.1} s; nothing was fenced",
                    writes.1.name(),
                    request.max_lag_seconds
                )));
            }
        }
        let mut said = Vec::new();
        if !reverse {
            said.push(cutover::fence(moves.0, moves.1, &[], &dir).await?);
            fenced.push(moves);
        }
        rep.progress.fenced_at_ms = Some(cutover::unix_ms());
        said.push(cutover::fence(writes.0, writes.1, &[], &dir).await?);
        fenced.push(writes);
        rep.step("fence", said.join("; "));
        match catch_up(from, to, tables, leg_job, applied, drain_timeout).await? {
            Some(at) => {
                rep.progress.drained_at = Some(format!("sqlite:{at}"));
                rep.step(
                    "drain",
                    format!("every change the fenced {} recorded (through change {at}) is applied", writes.1.name()),
                );
            }
            None => {
                return Err(Error::Definite(format!(
                    "apply did not catch up with the fenced {} within --drain-timeout {:.0} s",
                    writes.1.name(),
                    request.drain_timeout_seconds
                )));
            }
        }
        cutover::verify_step(&mut rep, writes.0, moves.0, spec, request.full_verify).await?;
        let moved = block(|| super::sqlite_switch::sync_sequences(&writes.0.database, &moves.0.database))?;
        rep.step(
            "sequences",
            format!("{moved} AUTOINCREMENT counters on the {} raised to the {}'s", moves.1.name(), writes.1.name()),
        );
        Ok(())
    }
    .await;
    if let Err(e) = before {
        // Nothing switched: the application gets its database back.
        let e = if reverse {
            cutover::lift_fences(e, &[writes], &request.app_roles, &dir).await
        } else {
            cutover::lift_fences(e, &fenced, &request.app_roles, &dir).await
        };
        rep.fail(&e);
        cutover::remove_request(&dir, &request.id);
        return Err(e);
    }
    if reverse {
        return cutover::switch_back(
            spec,
            store,
            &dir,
            job_id,
            &request,
            cutover::Prepared { reporter: rep },
        )
        .await;
    }
    let after = async {
        if request.no_reverse {
            store.set_meta("direction", "none")?;
            rep.step(
                "reverse replication",
                "not started (--no-reverse): the job ends here".into(),
            );
        } else {
            // Capture on the still-fenced target: every application write there is seen.
            let p0 = block(|| {
                let mut target = sqlite::open(&spec.target.database, false)?;
                let list: Vec<SourceTable> = tables.values().cloned().collect();
                sqlite::install_capture(&mut target, &list)?;
                sqlite::current_position(&target)
            })?;
            let n = cutover::cutovers(store) + 1;
            store.set_meta(&format!("rows_reverse_p0_{n}"), &p0.to_string())?;
            store.set_meta("cutovers", &n.to_string())?;
            store.set_meta("direction", "reverse")?;
            rep.progress.reverse_slot = Some(format!("capture triggers on {}", spec.target.database));
            rep.step(
                "reverse replication",
                "capture triggers on the target: changes the application makes there from now on reach the source".into(),
            );
        }
        cutover::finish_cutover(spec, store, &request, &mut rep).await
    }
    .await;
    match after {
        Err(e) if cutover::direction(store)? == "forward" => {
            let e = cutover::lift_fences(e, &fenced, &request.app_roles, &dir).await;
            rep.fail(&e);
            cutover::remove_request(&dir, &request.id);
            Err(e)
        }
        // Past the switch: the progress stays "running", so the next start finishes it.
        Err(e) => Err(e),
        Ok(()) => {
            cutover::remove_request(&dir, &request.id);
            Ok(())
        }
    }
}

/// At a fallback, with both files fenced and the reverse stream drained: the forward stream
/// resumes at the source's change position now, after the changes kuaka applied to it.
pub fn resume_forward_from_now(spec: &JobSpec, job_id: &str) -> Result<String> {
    let source = sqlite::open(&spec.source.database, false)?;
    let at = sqlite::current_position(&source)?;
    let target = sqlite::open(&spec.target.database, false)?;
    target
        .execute(
            &format!(
                "INSERT INTO {} (job_id, position) VALUES (?1, ?2) ON CONFLICT (job_id) DO UPDATE SET position = excluded.position",
                sqlite::POSITION_TABLE
            ),
            rusqlite::params![job_id, at],
        )
        .map_err(|e| Error::Definite(format!("moving the forward position on the target: {e}")))?;
    sqlite::purge_changes(&source, at)?;
    Ok(format!("change {at}"))
}

/// After a cutover: the target's changes applied to the source until a fallback.
async fn reverse(
    spec: &JobSpec,
    store: &Arc<StateStore>,
    job_id: &str,
    cancel: &CancellationToken,
) -> Result<Summary> {
    let n = cutover::cutovers(store).max(1);
    let leg_job = cutover::reverse_job_id(job_id, n);
    let mut from = block(|| sqlite::open(&spec.target.database, false))?;
    let catalog = block(|| sqlite::read_catalog(&from))?;
    let tables: HashMap<String, SourceTable> = catalog
        .tables
        .into_iter()
        .filter(|t| spec.selection.selects(&t.table.name))
        .map(|t| (t.name().to_owned(), t))
        .collect();
    let mut to = Target::connect(&spec.source).await?;
    let p0: i64 = store
        .meta(&format!("rows_reverse_p0_{n}"))?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut applied = to.position(&leg_job).await?.unwrap_or(p0).max(p0);
    tracing::info!(
        from = applied,
        "the job is cut over: streaming the target's changes back to the source"
    );
    let mut last_status = Instant::now() - Duration::from_secs(10);
    let mut last_check = Instant::now();
    loop {
        if cancel.is_cancelled() {
            return Err(Error::Interrupted);
        }
        if last_check.elapsed() >= Duration::from_millis(100) {
            last_check = Instant::now();
            if let Some(request) = cutover::pending_request(&store.dir(), true) {
                let done = switch(
                    spec,
                    store,
                    job_id,
                    request,
                    &mut from,
                    &mut to,
                    &tables,
                    &leg_job,
                    &mut applied,
                )
                .await;
                match done {
                    Ok(()) => {
                        return Ok(Summary {
                            handoff: true,
                            ..Summary::default()
                        });
                    }
                    Err(e) if cutover::direction(store)? == "forward" => return Err(e),
                    Err(e) => tracing::warn!("fallback did not happen: {e}"),
                }
            }
        }
        let n = pump(&mut from, &mut to, &tables, &leg_job, &mut applied).await?;
        if last_status.elapsed() >= Duration::from_secs(1) {
            last_status = Instant::now();
            let current = block(|| sqlite::current_position(&from)).unwrap_or(applied);
            let _ = store.set_position("reverse_captured", &format!("sqlite:{current}"));
            let _ = store.set_position("reverse_applied", &format!("sqlite:{applied}"));
            if let Err(e) = block(|| sqlite::purge_changes(&from, applied)) {
                tracing::warn!("{e}");
            }
        }
        if n == 0 {
            tokio::select! {
                _ = cancel.cancelled() => return Err(Error::Interrupted),
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }
}

/// The forward direction: snapshot (unless done), then changes source → target.
async fn forward(
    spec: &JobSpec,
    store: &Arc<StateStore>,
    job_id: &str,
    ui: &Ui,
    cancel: &CancellationToken,
) -> Result<Summary> {
    let mut source = block(|| sqlite::open(&spec.source.database, false))?;
    let mut catalog: SourceCatalog = block(|| sqlite::read_catalog(&source))?;
    catalog
        .tables
        .retain(|t| spec.selection.selects(&t.table.name));
    for skipped in &catalog.skipped {
        tracing::warn!("{skipped}");
    }
    if catalog.tables.is_empty() {
        return Err(Error::Definite(
            "the SQLite source has no tables to move (after --tables/--exclude)".into(),
        ));
    }
    if !spec.snapshot_only {
        sqlite::check_capturable(&catalog)?;
    }
    let mut target = Target::connect(&spec.target).await?;
    let names: Vec<&str> = catalog.tables.iter().map(|t| t.name()).collect();

    // Target tables, before data.
    if !store.step_done("rows:pre_data")? {
        // Set before the first CREATE: tables found after a crash in between are kuaka's own
        // (MySQL creates tables outside any transaction).
        let ours = store.meta("rows_creating")?.is_some();
        let existing = target.existing_tables(&names).await?;
        if !existing.is_empty() && !ours && spec.target_exists == TargetExists::Error {
            return Err(Error::Definite(format!(
                "the target already has tables named like the source's: {}; use --target-exists drop (or truncate), or another target",
                existing.join(", ")
            )));
        }
        if !existing.is_empty() {
            let mut sql = String::new();
            for t in &existing {
                match &target {
                    Target::Sqlite(_) => {
                        sql.push_str(&format!("DROP TABLE IF EXISTS {};", quote_ident(t)))
                    }
                    Target::Postgres(_) => sql.push_str(&format!(
                        "DROP TABLE IF EXISTS public.{} CASCADE;",
                        quote_ident(t)
                    )),
                    Target::Mysql(..) => {
                        sql.push_str(&format!("DROP TABLE IF EXISTS {};", mysql::quote_ident(t)))
                    }
                }
            }
            target
                .execute(&sql, "dropping existing target tables")
                .await?;
        }
        store.set_meta("rows_creating", "1")?;
        let mut sql = String::new();
        for t in &catalog.tables {
            match &target {
                Target::Sqlite(_) => {
                    sql.push_str(&t.create_sql);
                    sql.push_str(";\n");
                }
                Target::Postgres(_) => sql.push_str(&pg_create_table(t)),
                Target::Mysql(_, collation) => sql.push_str(&mysql_create_table(t, collation)),
            }
        }
        let sql = match &target {
            Target::Mysql(..) => sql,
            _ => format!("BEGIN;\n{sql}COMMIT;"),
        };
        target.execute(&sql, "creating the target tables").await?;
        store.mark_step("rows:pre_data", "pre_data")?;
        tracing::info!(tables = catalog.tables.len(), "target tables created");
    }

    // Capture before the snapshot, so no change falls between them.
    if !spec.snapshot_only {
        block(|| sqlite::install_capture(&mut source, &catalog.tables))?;
    }

    // Snapshot: every table not yet copied, in one read transaction with its position.
    let copied = target.copied_tables(job_id).await?;
    let todo: Vec<&SourceTable> = catalog
        .tables
        .iter()
        .filter(|t| !copied.contains_key(t.name()))
        .collect();
    let mut rows_total: u64 = copied.values().map(|r| *r as u64).sum();
    let mut rows_this_run = 0u64;
    let copy_started = Instant::now();
    let p1 = copy_tables(
        &mut source,
        &mut target,
        &todo,
        job_id,
        ui,
        cancel,
        &mut rows_this_run,
    )
    .await?;
    rows_total += rows_this_run;
    let copy_seconds = copy_started.elapsed().as_secs_f64();
    let p0 = match store.meta("rows_p0")? {
        Some(v) => v.parse().unwrap_or(p1),
        None => {
            store.set_meta("rows_p0", &p1.to_string())?;
            p1
        }
    };
    if !todo.is_empty() || store.meta("rows_p1")?.is_none() {
        store.set_meta("rows_p1", &p1.to_string())?;
    }
    let p1: i64 = store
        .meta("rows_p1")?
        .and_then(|v| v.parse().ok())
        .unwrap_or(p1);

    if !store.step_done("rows:post_data")? {
        let mut steps: Vec<(String, String)> = Vec::new();
        for t in &catalog.tables {
            match &target {
                Target::Sqlite(_) => {
                    for s in &t.index_sql {
                        steps.push((format!("index on {}", t.name()), format!("{s};")));
                    }
                }
                Target::Postgres(_) => steps.extend(pg_post_data(t)),
                Target::Mysql(..) => steps.extend(index_steps(t, false)),
            }
        }
        // On MySQL the foreign keys come last: their parent's unique keys must exist.
        let mut foreign_keys: Vec<(String, String)> = Vec::new();
        if let Target::Mysql(..) = &target {
            for t in &catalog.tables {
                foreign_keys.extend(mysql_foreign_keys(t));
            }
        }
        match &target {
            Target::Sqlite(_) => {
                for (name, s) in &catalog.views {
                    steps.push((format!("view {name}"), format!("{s};")));
                }
                for t in &catalog.tables {
                    if spec.snapshot_only {
                        for s in &t.trigger_sql {
                            steps.push((format!("trigger on {}", t.name()), format!("{s};")));
                        }
                    } else if !t.trigger_sql.is_empty() {
                        // SQLite cannot switch triggers off for one connection: created now,
                        // they would fire on every applied change.
                        tracing::warn!(
                            "the {} triggers of {} are not created on the target while it is kept in sync (they would fire on applied changes); create them at cutover",
                            t.trigger_sql.len(),
                            t.name()
                        );
                    }
                }
            }
            Target::Postgres(_) | Target::Mysql(..) => {
                let engine = match &target {
                    Target::Mysql(..) => "MySQL",
                    _ => "PostgreSQL",
                };
                for (name, _) in &catalog.views {
                    tracing::warn!(
                        "view {name} is not recreated on {engine} (SQLite SQL differs); create it by hand"
                    );
                }
                for t in catalog.tables.iter().filter(|t| !t.trigger_sql.is_empty()) {
                    tracing::warn!(
                        "the triggers of {} are not recreated on {engine}; create them by hand",
                        t.name()
                    );
                }
            }
        }
        for (what, sql) in &steps {
            // Each step once, even across a crash between two of them.
            let step = format!("rows:post:{what}");
            if store.step_done(&step)? {
                continue;
            }
            target.execute(sql, &format!("creating {what}")).await?;
            store.mark_step(&step, "post_data")?;
        }
        for (what, sql) in &foreign_keys {
            let step = format!("rows:post:{what}");
            if store.step_done(&step)? {
                continue;
            }
            // The session does not check existing rows (foreign_key_checks = 0), so a failure
            // here is a definition MySQL cannot take; the data is complete without it.
            if let Err(e) = target.execute(sql, &format!("creating {what}")).await {
                tracing::warn!("{what} is not created on the target: {e}");
            }
            store.mark_step(&step, "post_data")?;
        }
        // Foreign keys went in NOT VALID: check the existing rows now, and keep (and name) the
        // ones the source's own data breaks (SQLite enforces foreign keys only when asked).
        if let Target::Postgres(_) = &target {
            for t in &catalog.tables {
                for fk in &t.table.foreign_keys {
                    let sql = format!(
                        "ALTER TABLE public.{} VALIDATE CONSTRAINT {};",
                        quote_ident(t.name()),
                        quote_ident(&fk.name)
                    );
                    if let Err(e) = target.execute(&sql, "validating").await {
                        tracing::warn!(
                            "foreign key {} of {} is kept NOT VALID: the source's rows break it ({e}); new rows are checked",
                            fk.name,
                            t.name()
                        );
                    }
                }
            }
        }
        store.mark_step("rows:post_data", "post_data")?;
    }
    let mut summary = Summary {
        tables: catalog.tables.len(),
        rows: rows_total,
        rows_this_run,
        copy_seconds,
        exact: p0 == p1,
        ..Summary::default()
    };
    let mut rows_summary = RowsSummary {
        p0,
        p1,
        ..RowsSummary::default()
    };
    if spec.snapshot_only {
        store.set_phase("done")?;
        return Ok(summary);
    }

    // Apply.
    let tables: HashMap<String, SourceTable> = catalog
        .tables
        .iter()
        .map(|t| (t.name().to_owned(), t.clone()))
        .collect();
    let mut applied = target.position(job_id).await?.unwrap_or(p0).max(p0);
    let mut consistent = applied >= p1;
    store.set_phase(if consistent {
        "streaming"
    } else {
        "catching_up"
    })?;
    let mut goal: Option<i64> = None;
    let mut last_purge = Instant::now();
    let mut last_status = Instant::now() - Duration::from_secs(10);
    let mut last_check = Instant::now();
    let switchable = spec.target.engine == EngineKind::Sqlite;
    loop {
        if cancel.is_cancelled() {
            return Err(Error::Interrupted);
        }
        if consistent && switchable && last_check.elapsed() >= Duration::from_millis(100) {
            last_check = Instant::now();
            if let Some(request) = cutover::pending_request(&store.dir(), false) {
                let done = switch(
                    spec,
                    store,
                    job_id,
                    request,
                    &mut source,
                    &mut target,
                    &tables,
                    job_id,
                    &mut applied,
                )
                .await;
                match done {
                    Ok(()) => {
                        summary.handoff = cutover::direction(store)? == "reverse";
                        summary.cut_over = !summary.handoff;
                        rows_summary.applied = applied;
                        summary.rows_stream = Some(rows_summary);
                        return Ok(summary);
                    }
                    Err(e) if cutover::direction(store)? != "forward" => return Err(e),
                    Err(e) => tracing::warn!("cutover did not happen: {e}"),
                }
            }
        }
        if consistent && goal.is_none() && spec.until == Some(Until::CaughtUp) {
            goal = Some(block(|| sqlite::current_position(&source))?);
        }
        let (changes, last) =
            block(|| sqlite::read_changes(&mut source, &tables, applied, CHANGES_PER_BATCH))?;
        if last > applied {
            target.apply(&tables, &changes, job_id, last).await?;
            rows_summary.batches += 1;
            rows_summary.changes += changes.len() as u64;
            applied = last;
        }
        if !consistent && applied >= p1 {
            consistent = true;
            store.set_phase("streaming")?;
            tracing::info!(
                applied,
                "caught up: the target is consistent with the source"
            );
        }
        if last_status.elapsed() >= Duration::from_secs(1) {
            last_status = Instant::now();
            let current = block(|| sqlite::current_position(&source)).unwrap_or(applied);
            let _ = store.set_position("captured", &format!("sqlite:{current}"));
            let _ = store.set_position("applied", &format!("sqlite:{applied}"));
            let _ = store.set_position("lag_changes", &(current - applied).max(0).to_string());
        }
        if last_purge.elapsed() >= Duration::from_secs(2) {
            last_purge = Instant::now();
            if let Err(e) = block(|| sqlite::purge_changes(&source, applied)) {
                tracing::warn!("{e}");
            }
        }
        if let Some(g) = goal
            && applied >= g
            && consistent
        {
            rows_summary.caught_up = true;
            break;
        }
        if last == applied && changes.is_empty() {
            // Nothing new: wait a little (or stop).
            tokio::select! {
                _ = cancel.cancelled() => return Err(Error::Interrupted),
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }
    let _ = block(|| sqlite::purge_changes(&source, applied));
    let _ = store.set_position("applied", &format!("sqlite:{applied}"));
    rows_summary.applied = applied;
    summary.rows_stream = Some(rows_summary);
    Ok(summary)
}

/// Copy `tables` in one source read transaction; returns the change position it saw.
async fn copy_tables(
    source: &mut Connection,
    target: &mut Target,
    tables: &[&SourceTable],
    job_id: &str,
    ui: &Ui,
    cancel: &CancellationToken,
    rows_copied: &mut u64,
) -> Result<i64> {
    let read_err = |e: rusqlite::Error| Error::Definite(format!("reading the SQLite source: {e}"));
    block(|| source.execute_batch("BEGIN DEFERRED")).map_err(read_err)?;
    let result = async {
        let position = block(|| sqlite::current_position(source))?;
        for t in tables {
            let progress = ui.table(
                &t.table.name.display_name(),
                t.table.estimated_rows.unwrap_or(0).max(0) as u64,
                0,
                0,
            );
            let mut count: i64 = 0;
            let mut batch: Vec<Row> = Vec::with_capacity(ROWS_PER_COMMIT);
            // Keyset pages in key order (rowid for a keyless table), all inside the one read
            // transaction: each page continues after the last key of the previous one.
            let keyless = t.key.is_empty();
            let key_cols: Vec<String> = if keyless {
                vec!["rowid".to_owned()]
            } else {
                t.key.clone()
            };
            let key_index: Vec<usize> = if keyless {
                vec![t.columns.len()]
            } else {
                t.key
                    .iter()
                    .map(|k| t.columns.iter().position(|c| c == k).unwrap_or(0))
                    .collect()
            };
            let select = format!(
                "SELECT {}{} FROM {}",
                sqlite::join_idents(&t.columns),
                if keyless { ", rowid" } else { "" },
                quote_ident(t.name())
            );
            let order = if keyless {
                "rowid".to_owned()
            } else {
                sqlite::join_idents(&key_cols)
            };
            let first = format!("{select} ORDER BY {order} LIMIT {ROWS_PER_COMMIT}");
            let next = format!(
                "{select} WHERE ({order}) > ({}) ORDER BY {order} LIMIT {ROWS_PER_COMMIT}",
                (1..=key_cols.len())
                    .map(|i| format!("?{i}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let mut after: Option<Row> = None;
            if keyless {
                // No key to upsert by: a table cut off by a crash is copied again whole.
                let empty = match target {
                    Target::Sqlite(_) => format!("DELETE FROM {};", quote_ident(t.name())),
                    Target::Postgres(_) => format!("TRUNCATE public.{};", quote_ident(t.name())),
                    Target::Mysql(..) => format!("DELETE FROM {};", mysql::quote_ident(t.name())),
                };
                target
                    .execute(&empty, "emptying a keyless target table")
                    .await?;
            }
            loop {
                if cancel.is_cancelled() {
                    return Err(Error::Interrupted);
                }
                batch.clear();
                let width = t.columns.len() + usize::from(keyless);
                block(|| {
                    let mut stmt = match &after {
                        None => source.prepare_cached(&first)?,
                        Some(_) => source.prepare_cached(&next)?,
                    };
                    let params: Vec<rusqlite::types::Value> =
                        after.iter().flatten().map(sqlite::to_sql).collect();
                    let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
                    while let Some(r) = rows.next()? {
                        let row: Row = (0..width)
                            .map(|i| r.get_ref(i).map(sqlite::to_value))
                            .collect::<rusqlite::Result<Row>>()?;
                        batch.push(row);
                    }
                    Ok::<_, rusqlite::Error>(())
                })
                .map_err(read_err)?;
                after = batch
                    .last()
                    .map(|r| key_index.iter().map(|&i| r[i].clone()).collect());
                if keyless {
                    for r in batch.iter_mut() {
                        r.pop();
                    }
                }
                let last = target
                    .load_page(t, &batch, ROWS_PER_COMMIT, job_id, &mut count)
                    .await?;
                progress.add(batch.len() as u64, 0);
                *rows_copied += batch.len() as u64;
                if last {
                    break;
                }
            }
            progress.finish();
            tracing::info!(table = %t.name(), rows = count, "copied");
        }
        Ok(position)
    }
    .await;
    let _ = block(|| source.execute_batch("COMMIT"));
    result
}

/// Remove kuaka's triggers and change table from a SQLite source.
pub fn clean_source(path: &str) -> Result<usize> {
    let conn = sqlite::open(path, false)?;
    sqlite::remove_capture(&conn)
}

/// Forget the job's rows in a SQLite target's bookkeeping (a PostgreSQL target's are removed
/// by the caller's connection).
pub fn clean_target(target: &Endpoint, job_id: &str) -> Result<()> {
    if target.engine != EngineKind::Sqlite || !std::path::Path::new(&target.database).exists() {
        return Ok(());
    }
    let conn = sqlite::open(&target.database, false)?;
    for table in [sqlite::POSITION_TABLE, sqlite::COPIED_TABLE] {
        let _ = conn.execute(&format!("DELETE FROM {table} WHERE job_id = ?1"), [job_id]);
    }
    Ok(())
}
