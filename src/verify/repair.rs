//! `--repair`: write the source's current image of each differing key to the target (upsert),
//! or delete the key where the source has no row, in one target transaction per table, with
//! the same statements and value checks as the copy and apply paths. The repaired keys are
//! then read again on both sides.
//!
//! The session is set up like apply's: PostgreSQL `session_replication_role = replica` and
//! MySQL `foreign_key_checks = 0`, so the target's triggers and cascades do not act on the
//! repair (the source already did).

use rusqlite::Connection;
use tokio_postgres::Client;

use super::read::SideTable;
use crate::config::{Endpoint, EngineKind};
use crate::engine::mysql::{apply as myapply, catalog::MyColumn};
use crate::engine::postgres::{self, Side, rows as pgrows};
use crate::engine::sqlite;
use crate::model::DataType;
use crate::model::value::Row;
use crate::pipeline::binlog_target::Sink;
use crate::pipeline::{Error, Result};

pub enum Writer {
    Postgres(Client),
    Mysql(Sink),
    Sqlite(Connection),
}

/// What a repair writes: target table and columns, the target types, and the source's
/// MySQL columns when source and target are both MySQL (values then go as the binlog
/// apply writes them).
pub struct Plan<'a> {
    pub table: &'a SideTable,
    pub columns: &'a [String],
    pub types: &'a [DataType],
    pub key_at: &'a [usize],
    pub same_engine_mysql: Option<&'a [MyColumn]>,
}

impl Writer {
    pub async fn connect(endpoint: &Endpoint) -> Result<Writer> {
        match endpoint.engine {
            EngineKind::Postgres => {
                let client = postgres::connect(endpoint, Side::Target, "repair").await?;
                client
                    .batch_execute("SET session_replication_role = replica")
                    .await
                    .map_err(|e| {
                        postgres::Error::query(
                            "setting session_replication_role on the target for --repair (needs superuser or rds_superuser)",
                            e,
                        )
                    })?;
                Ok(Writer::Postgres(client))
            }
            EngineKind::Mysql => Ok(Writer::Mysql(Sink::connect(endpoint, "repair").await?)),
            EngineKind::Sqlite => {
                let path = endpoint.database.clone();
                Ok(Writer::Sqlite(tokio::task::block_in_place(|| {
                    sqlite::open(&path, false)
                })?))
            }
        }
    }

    /// Upsert `rows` (full rows in `plan.columns` order) and delete `keys`, in one transaction.
    pub async fn write(&mut self, plan: &Plan<'_>, rows: &[Row], keys: &[Row]) -> Result<()> {
        let name = plan.table.name.display_name();
        let key_names: Vec<String> = plan
            .key_at
            .iter()
            .map(|&i| plan.columns[i].clone())
            .collect();
        let key_types: Vec<DataType> = plan.key_at.iter().map(|&i| plan.types[i].clone()).collect();
        let what = format!("repairing table {name}");
        match self {
            Writer::Postgres(client) => {
                let tuple = |row: &Row, types: &[DataType], names: &[String]| {
                    row.iter()
                        .zip(types)
                        .zip(names)
                        .map(|((v, t), c)| {
                            pgrows::literal(v, t)
                                .map_err(|e| Error::Definite(format!("{what}, column {c}: {e}")))
                        })
                        .collect::<Result<Vec<_>>>()
                        .map(|parts| format!("({})", parts.join(", ")))
                };
                let table = plan.table.name.to_string();
                let mut sql = String::from("BEGIN;\n");
                if !keys.is_empty() {
                    let tuples = keys
                        .iter()
                        .map(|k| tuple(k, &key_types, &key_names))
                        .collect::<Result<Vec<_>>>()?;
                    sql.push_str(&pgrows::delete_from(&table, &key_names, &tuples));
                }
                if !rows.is_empty() {
                    let tuples = rows
                        .iter()
                        .map(|r| tuple(r, plan.types, plan.columns))
                        .collect::<Result<Vec<_>>>()?;
                    sql.push_str(&pgrows::upsert_into(
                        &table,
                        plan.columns,
                        &key_names,
                        &tuples,
                    ));
                }
                sql.push_str("COMMIT;");
                let result = client.batch_execute(&sql).await;
                if result.is_err() {
                    let _ = client.batch_execute("ROLLBACK").await;
                }
                result.map_err(|e| postgres::Error::query(what.clone(), e).into())
            }
            Writer::Mysql(sink) => {
                let tuple = |row: &Row, types: &[DataType], names: &[String]| {
                    let mut out = String::from("(");
                    for (i, ((v, t), c)) in row.iter().zip(types).zip(names).enumerate() {
                        if i > 0 {
                            out.push_str(", ");
                        }
                        let kind = plan
                            .same_engine_mysql
                            .and_then(|cols| cols.iter().find(|m| &m.name == c))
                            .map(|m| m.kind);
                        match kind {
                            Some(kind) => myapply::literal(kind, v, &mut out),
                            None => myapply::typed_literal(v, t, &mut out),
                        }
                        .map_err(|e| Error::Definite(format!("{what}, column {c}: {e}")))?;
                    }
                    out.push(')');
                    Ok::<_, Error>(out)
                };
                let mut body = String::new();
                if !keys.is_empty() {
                    let tuples = keys
                        .iter()
                        .map(|k| tuple(k, &key_types, &key_names))
                        .collect::<Result<Vec<_>>>()?;
                    body.push_str(&myapply::delete(&plan.table.name.name, &key_names, &tuples));
                }
                if !rows.is_empty() {
                    let tuples = rows
                        .iter()
                        .map(|r| tuple(r, plan.types, plan.columns))
                        .collect::<Result<Vec<_>>>()?;
                    body.push_str(&myapply::upsert(
                        &plan.table.name.name,
                        plan.columns,
                        &key_names,
                        &tuples,
                    ));
                }
                sink.commit(&body, "", &what).await.map_err(|e| e.error)
            }
            Writer::Sqlite(conn) => tokio::task::block_in_place(|| {
                let fail = |e: rusqlite::Error| Error::Definite(format!("{what}: {e}"));
                let tx = conn.transaction().map_err(fail)?;
                {
                    let mut del = tx
                        .prepare(&sqlite::delete_sql(&plan.table.name.name, &key_names))
                        .map_err(fail)?;
                    for k in keys {
                        del.execute(rusqlite::params_from_iter(k.iter().map(sqlite::to_sql)))
                            .map_err(fail)?;
                    }
                    let mut up = tx
                        .prepare(&sqlite::upsert_sql(
                            &plan.table.name.name,
                            plan.columns,
                            &key_names,
                        ))
                        .map_err(fail)?;
                    for r in rows {
                        up.execute(rusqlite::params_from_iter(r.iter().map(sqlite::to_sql)))
                            .map_err(fail)?;
                    }
                }
                tx.commit().map_err(fail)
            }),
        }
    }
}
