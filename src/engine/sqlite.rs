//! SQLite: a database file opened in-process (rusqlite, SQLite bundled).
//!
//! - **Source**: catalog → model; a snapshot in one read transaction (WAL mode, so the
//!   application keeps writing); change capture by triggers that kuaka installs. Each INSERT,
//!   UPDATE and DELETE on a replicated table records the table and the row's key, as SQL
//!   literals made by `quote()` (so the storage class survives), in `_kuaka_changes`, whose
//!   `seq` is the source position. Capture reads the changed keys and their *current* rows in
//!   one read transaction: a key whose row is gone is a delete, any other an upsert of the full
//!   row. Replaying is therefore idempotent, and the change table is the durable buffer: rows
//!   leave it only after the target committed them.
//! - **Target**: tables from the source's own `CREATE` statements (SQLite → SQLite) or from the
//!   model, bulk loads in large transactions, and apply with the applied position in
//!   `_kuaka_position`, written in the same transaction.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params_from_iter};

use crate::model::schema::{
    Column, DataType, ForeignKey, Index, Key, Partitioning, QualifiedName, Table, TableKind,
};
use crate::model::value::{Row, Value};
use crate::pipeline::{Error, Result};

/// The change table kuaka adds to a source database (removed by `kuaka clean`).
pub const CHANGE_TABLE: &str = "_kuaka_changes";
/// Applied position and copied tables on a SQLite target.
pub const POSITION_TABLE: &str = "_kuaka_position";
pub const COPIED_TABLE: &str = "_kuaka_copied";
/// Columns added on the source while a PostgreSQL job streamed, with their model types.
pub const ADDED_COLUMN_TABLE: &str = "_kuaka_added_column";
const TRIGGER_PREFIX: &str = "_kuaka_";

pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn sql_error(context: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> Error {
    let context = context.into();
    move |e| Error::Definite(format!("{context}: {e}"))
}

/// Open a database file. A source must exist; a target is created when missing.
pub fn open(path: &str, create: bool) -> Result<Connection> {
    if !create && !std::path::Path::new(path).exists() {
        return Err(Error::Definite(format!(
            "SQLite database {path} does not exist"
        )));
    }
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let conn = Connection::open_with_flags(path, flags)
        .map_err(sql_error(format!("opening SQLite database {path}")))?;
    conn.busy_timeout(Duration::from_secs(30))
        .map_err(sql_error("setting busy_timeout"))?;
    // WAL lets readers (the snapshot, capture) run alongside the application's writes. It is
    // a property of the file and stays on after the job.
    // The switch needs the file to itself. SQLite reports "database is locked" at once, busy
    // handler or not, when a writer holds its lock while this connection upgrades (deadlock
    // avoidance): retry for as long as the busy timeout would have waited.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mode: String = loop {
        match conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)) {
            Ok(mode) => break mode,
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(sql_error(format!("switching {path} to WAL mode"))(e)),
        }
    };
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::Definite(format!(
            "SQLite database {path} cannot use WAL mode (journal_mode is {mode}); kuaka needs it to read while the application writes"
        )));
    }
    Ok(conn)
}

/// One table of a SQLite source with what capture and copy need.
#[derive(Clone, Debug)]
pub struct SourceTable {
    pub table: Table,
    /// Key columns, in key order (the primary key).
    pub key: Vec<String>,
    /// Columns copied (generated columns are computed by the target), in table order.
    pub columns: Vec<String>,
    /// The source's own statements (table, indexes, triggers), for a SQLite target.
    pub create_sql: String,
    pub index_sql: Vec<String>,
    pub trigger_sql: Vec<String>,
    pub without_rowid: bool,
}

impl SourceTable {
    pub fn name(&self) -> &str {
        &self.table.name.name
    }

    /// The model type of each copied column, in copy order.
    pub fn column_types(&self) -> Vec<DataType> {
        self.columns
            .iter()
            .map(|c| {
                self.table
                    .column(c)
                    .map(|col| col.data_type.clone())
                    .unwrap_or(DataType::Text)
            })
            .collect()
    }

    /// Where each key column sits among the copied columns.
    pub fn key_index(&self) -> Vec<usize> {
        self.key
            .iter()
            .map(|k| self.columns.iter().position(|c| c == k).unwrap_or(0))
            .collect()
    }
}

/// Everything read from a SQLite source's catalog.
#[derive(Clone, Debug, Default)]
pub struct SourceCatalog {
    pub tables: Vec<SourceTable>,
    /// `CREATE VIEW` statements (recreated on a SQLite target, reported otherwise).
    pub views: Vec<(String, String)>,
    /// What is not moved, each with a reason.
    pub skipped: Vec<String>,
}

/// The model type of a declared SQLite column type, by SQLite's affinity rules (first match:
/// INT → integer; CHAR, CLOB, TEXT → text; BLOB or no type → blob; REAL, FLOA, DOUB → real;
/// anything else numeric, where common names of dates, booleans and decimals are kept).
pub fn data_type(declared: &str) -> DataType {
    let upper = declared.to_ascii_uppercase();
    let params: Vec<u32> = upper
        .split_once('(')
        .map(|(_, rest)| {
            rest.trim_end_matches(')')
                .split(',')
                .filter_map(|p| p.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let base = upper.split('(').next().unwrap_or("").trim().to_owned();
    if upper.contains("INT") {
        DataType::Int64
    } else if upper.contains("CHAR") || upper.contains("CLOB") || upper.contains("TEXT") {
        DataType::Text
    } else if upper.contains("BLOB") {
        DataType::Bytes
    } else if upper.trim().is_empty() {
        DataType::Other { name: "any".into() }
    } else if upper.contains("REAL") || upper.contains("FLOA") || upper.contains("DOUB") {
        DataType::Float64
    } else {
        match base.as_str() {
            "BOOLEAN" | "BOOL" => DataType::Bool,
            "DATE" => DataType::Date,
            "DATETIME" | "TIMESTAMP" => DataType::Timestamp,
            // What kuaka declares for PostgreSQL's timestamptz (UTC text).
            "TIMESTAMPTZ" => DataType::TimestampTz,
            "TIME" => DataType::Time,
            "DECIMAL" | "NUMERIC" | "NUMBER" => DataType::Numeric {
                precision: params.first().copied(),
                scale: params.get(1).copied(),
            },
            _ => DataType::Numeric {
                precision: None,
                scale: None,
            },
        }
    }
}

/// Read the catalog of the main database: tables (without kuaka's own and SQLite's internal
/// ones), their keys, indexes, foreign keys and triggers, and views.
pub fn read_catalog(conn: &Connection) -> Result<SourceCatalog> {
    let mut catalog = SourceCatalog::default();
    let objects: Vec<(String, String, String, Option<String>)> = {
        let mut stmt = conn
            .prepare(
                "SELECT type, name, tbl_name, sql FROM sqlite_schema \
                 WHERE name NOT LIKE 'sqlite\\_%' ESCAPE '\\' AND name NOT LIKE '\\_kuaka\\_%' ESCAPE '\\' \
                   AND name NOT LIKE 'kuaka\\_fence\\_%' ESCAPE '\\' \
                 ORDER BY type, name",
            )
            .map_err(sql_error("reading sqlite_schema"))?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(sql_error("reading sqlite_schema"))?
    };
    for (kind, name, table_name, sql) in &objects {
        let Some(sql) = sql else { continue };
        match kind.as_str() {
            "table" => {
                if sql.to_ascii_uppercase().starts_with("CREATE VIRTUAL TABLE") {
                    catalog.skipped.push(format!(
                        "virtual table {name}: not copied (recreate it on the target; its module may not exist there)"
                    ));
                    continue;
                }
                let table = read_table(conn, name, sql)?;
                catalog.tables.push(table);
            }
            "view" => catalog.views.push((name.clone(), sql.clone())),
            _ => {}
        }
        let _ = table_name;
    }
    for (kind, name, table_name, sql) in &objects {
        let Some(sql) = sql else { continue };
        let Some(t) = catalog.tables.iter_mut().find(|t| t.name() == table_name) else {
            continue;
        };
        match kind.as_str() {
            "index" => {
                t.index_sql.push(sql.clone());
                if let Some(index) = t.table.indexes.iter_mut().find(|i| &i.name == name) {
                    index.definition = sql.clone();
                }
            }
            "trigger" => t.trigger_sql.push(sql.clone()),
            _ => {}
        }
    }
    Ok(catalog)
}

fn read_table(conn: &Connection, name: &str, create_sql: &str) -> Result<SourceTable> {
    let context = || format!("reading the columns of SQLite table {name}");
    let mut columns = Vec::new();
    let mut copied = Vec::new();
    let mut key: Vec<(i64, String)> = Vec::new();
    {
        let mut stmt = conn
            .prepare(
                "SELECT name, type, \"notnull\", dflt_value, pk, hidden FROM pragma_table_xinfo(?1) ORDER BY cid",
            )
            .map_err(sql_error(context()))?;
        let mut rows = stmt.query([name]).map_err(sql_error(context()))?;
        while let Some(r) = rows.next().map_err(sql_error(context()))? {
            let col: String = r.get(0).map_err(sql_error(context()))?;
            let declared: String = r
                .get::<_, Option<String>>(1)
                .map_err(sql_error(context()))?
                .unwrap_or_default();
            let not_null: bool = r.get(2).map_err(sql_error(context()))?;
            let default: Option<String> = r.get(3).map_err(sql_error(context()))?;
            let pk: i64 = r.get(4).map_err(sql_error(context()))?;
            let hidden: i64 = r.get(5).map_err(sql_error(context()))?;
            if hidden == 1 {
                continue;
            }
            if pk > 0 {
                key.push((pk, col.clone()));
            }
            let generated = (hidden == 2 || hidden == 3).then(|| "generated".to_owned());
            if generated.is_none() {
                copied.push(col.clone());
            }
            columns.push(Column {
                name: col,
                data_type: data_type(&declared),
                native_type: declared,
                binary_portable: false,
                nullable: !not_null && pk == 0,
                default,
                generated,
                identity: None,
                collation: None,
                comment: None,
                type_schema: None,
            });
        }
    }
    key.sort();
    let key: Vec<String> = key.into_iter().map(|(_, c)| c).collect();
    let without_rowid: bool = conn
        .query_row(
            "SELECT count(*) = 0 FROM pragma_index_list(?1) WHERE origin = 'pk'",
            [name],
            |r| r.get(0),
        )
        .map_err(sql_error(context()))
        .map(|no_pk_index: bool| {
            !no_pk_index && create_sql.to_ascii_uppercase().contains("WITHOUT ROWID")
        })?;
    let mut indexes = Vec::new();
    let mut unique_keys = Vec::new();
    {
        let mut stmt = conn
            .prepare("SELECT name, \"unique\", origin FROM pragma_index_list(?1) ORDER BY name")
            .map_err(sql_error(context()))?;
        let list: Vec<(String, bool, String)> = stmt
            .query_map([name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .and_then(|rows| rows.collect())
            .map_err(sql_error(context()))?;
        for (index, unique, origin) in list {
            let cols: Vec<String> = conn
                .prepare("SELECT name FROM pragma_index_info(?1) ORDER BY seqno")
                .and_then(|mut s| {
                    s.query_map([&index], |r| r.get::<_, Option<String>>(0))
                        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
                })
                .map_err(sql_error(context()))?
                .into_iter()
                .map(|c| c.unwrap_or_else(|| "<expression>".into()))
                .collect();
            match origin.as_str() {
                "pk" => {}
                "u" => unique_keys.push(Key {
                    name: index.clone(),
                    definition: format!(
                        "UNIQUE ({})",
                        cols.iter()
                            .map(|c| quote_ident(c))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    columns: cols,
                    inherited: false,
                }),
                _ => indexes.push(Index {
                    name: index.clone(),
                    unique,
                    definition: String::new(),
                    columns: cols,
                }),
            }
        }
    }
    let mut foreign_keys = Vec::new();
    {
        let mut stmt = conn
            .prepare(
                "SELECT id, seq, \"table\", \"from\", \"to\", on_update, on_delete FROM pragma_foreign_key_list(?1) ORDER BY id, seq",
            )
            .map_err(sql_error(context()))?;
        type FkRow = (i64, String, String, Option<String>, String, String);
        let rows: Vec<FkRow> = stmt
            .query_map([name], |r| {
                Ok((
                    r.get(0)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            })
            .and_then(|rows| rows.collect())
            .map_err(sql_error(context()))?;
        let mut by_id: Vec<(i64, Vec<&FkRow>)> = Vec::new();
        for row in &rows {
            match by_id.iter_mut().find(|(id, _)| *id == row.0) {
                Some((_, v)) => v.push(row),
                None => by_id.push((row.0, vec![row])),
            }
        }
        for (id, parts) in by_id {
            let referenced = parts[0].1.clone();
            let from: Vec<String> = parts.iter().map(|p| p.2.clone()).collect();
            // A missing "to" means the parent's primary key.
            let to: Vec<String> = if parts.iter().all(|p| p.3.is_some()) {
                parts.iter().filter_map(|p| p.3.clone()).collect()
            } else {
                primary_key_of(conn, &referenced)?
            };
            let mut definition = format!(
                "FOREIGN KEY ({}) REFERENCES {} ({})",
                join_idents(&from),
                quote_ident(&referenced),
                join_idents(&to)
            );
            for (action, rule) in [("UPDATE", &parts[0].4), ("DELETE", &parts[0].5)] {
                if rule != "NO ACTION" {
                    definition.push_str(&format!(" ON {action} {rule}"));
                }
            }
            foreign_keys.push(ForeignKey {
                name: format!("{name}_fk{id}"),
                columns: from,
                referenced_table: QualifiedName::new("main", referenced),
                referenced_columns: to,
                definition,
                not_valid: false,
            });
        }
    }
    let estimated_rows: i64 = conn
        .query_row(
            &format!("SELECT count(*) FROM {}", quote_ident(name)),
            [],
            |r| r.get(0),
        )
        .map_err(sql_error(format!("counting the rows of {name}")))?;
    let table = Table {
        name: QualifiedName::new("main", name),
        kind: TableKind::Plain,
        unlogged: false,
        primary_key: (!key.is_empty()).then(|| Key {
            name: format!("{name}_pkey"),
            columns: key.clone(),
            definition: format!("PRIMARY KEY ({})", join_idents(&key)),
            inherited: false,
        }),
        columns,
        unique_keys,
        checks: Vec::new(),
        exclusions: Vec::new(),
        foreign_keys,
        indexes,
        triggers: Vec::new(),
        partitioning: Partitioning {
            partition_by: None,
            partition_of: None,
        },
        comment: None,
        estimated_rows: Some(estimated_rows),
        estimated_bytes: 0,
    };
    Ok(SourceTable {
        table,
        key,
        columns: copied,
        create_sql: create_sql.to_owned(),
        index_sql: Vec::new(),
        trigger_sql: Vec::new(),
        without_rowid,
    })
}

fn primary_key_of(conn: &Connection, table: &str) -> Result<Vec<String>> {
    let mut stmt = conn
        .prepare("SELECT name FROM pragma_table_info(?1) WHERE pk > 0 ORDER BY pk")
        .map_err(sql_error(format!("reading the key of {table}")))?;
    stmt.query_map([table], |r| r.get(0))
        .and_then(|rows| rows.collect())
        .map_err(sql_error(format!("reading the key of {table}")))
}

pub fn join_idents(names: &[String]) -> String {
    names
        .iter()
        .map(|n| quote_ident(n))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn to_value(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        ValueRef::Real(f) => Value::Float(f),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Bytes(b.to_vec()),
    }
}

pub fn to_sql(v: &Value) -> SqlValue {
    match v {
        Value::Null => SqlValue::Null,
        Value::Bool(b) => SqlValue::Integer(*b as i64),
        Value::Int(i) => SqlValue::Integer(*i),
        Value::UInt(u) => match i64::try_from(*u) {
            Ok(i) => SqlValue::Integer(i),
            Err(_) => SqlValue::Text(u.to_string()),
        },
        Value::Float(f) => SqlValue::Real(*f),
        Value::Decimal(d) => SqlValue::Text(d.clone()),
        Value::Text(t) | Value::Native(t) => SqlValue::Text(t.clone()),
        Value::Bytes(b) => SqlValue::Blob(b.clone()),
    }
}

// ---------------------------------------------------------------------------------------------
// Capture

/// Refuse what capture cannot follow, naming each table.
pub fn check_capturable(catalog: &SourceCatalog) -> Result<()> {
    let keyless: Vec<&str> = catalog
        .tables
        .iter()
        .filter(|t| t.key.is_empty())
        .map(|t| t.name())
        .collect();
    if !keyless.is_empty() {
        return Err(Error::Definite(format!(
            "SQLite tables without a PRIMARY KEY cannot be followed (their rowids may change on VACUUM): {}; add a primary key or --exclude them",
            keyless.join(", ")
        )));
    }
    Ok(())
}

fn key_literal(table: &SourceTable, row: &str) -> String {
    table
        .key
        .iter()
        .map(|k| format!("quote({row}.{})", quote_ident(k)))
        .collect::<Vec<_>>()
        .join(" || ',' || ")
}

/// Create the change table and the triggers of each table (idempotent). Runs in one write
/// transaction, so the application's writes are either before all triggers or seen by them.
pub fn install_capture(conn: &mut Connection, tables: &[SourceTable]) -> Result<()> {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(sql_error("starting the capture set-up transaction"))?;
    let mut sql = format!(
        "CREATE TABLE IF NOT EXISTS {CHANGE_TABLE} (seq INTEGER PRIMARY KEY AUTOINCREMENT, tbl TEXT NOT NULL, k TEXT NOT NULL);\n"
    );
    for t in tables {
        let name = t.name();
        let lit = crate::model::schema::quote_literal(name);
        let new_key = key_literal(t, "NEW");
        let old_key = key_literal(t, "OLD");
        let table = quote_ident(name);
        let trig = |op: &str| quote_ident(&format!("{TRIGGER_PREFIX}{op}_{name}"));
        sql.push_str(&format!(
            "CREATE TRIGGER IF NOT EXISTS {ins} AFTER INSERT ON {table} BEGIN \
               INSERT INTO {CHANGE_TABLE} (tbl, k) VALUES ({lit}, {new_key}); END;\n\
             CREATE TRIGGER IF NOT EXISTS {upd} AFTER UPDATE ON {table} BEGIN \
               INSERT INTO {CHANGE_TABLE} (tbl, k) VALUES ({lit}, {old_key}); \
               INSERT INTO {CHANGE_TABLE} (tbl, k) SELECT {lit}, {new_key} WHERE ({new_key}) IS NOT ({old_key}); END;\n\
             CREATE TRIGGER IF NOT EXISTS {del} AFTER DELETE ON {table} BEGIN \
               INSERT INTO {CHANGE_TABLE} (tbl, k) VALUES ({lit}, {old_key}); END;\n",
            ins = trig("ins"),
            upd = trig("upd"),
            del = trig("del"),
        ));
    }
    tx.execute_batch(&sql).map_err(sql_error(
        "installing the capture triggers on the SQLite source",
    ))?;
    tx.commit().map_err(sql_error(
        "installing the capture triggers on the SQLite source",
    ))
}

/// Drop kuaka's triggers and change table from a SQLite source.
pub fn remove_capture(conn: &Connection) -> Result<usize> {
    let triggers: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_schema WHERE type = 'trigger' AND name LIKE '\\_kuaka\\_%' ESCAPE '\\'",
        )
        .and_then(|mut s| {
            s.query_map([], |r| r.get(0))
                .and_then(|rows| rows.collect::<rusqlite::Result<Vec<String>>>())
        })
        .map_err(sql_error("listing kuaka's triggers"))?;
    let mut sql = String::from("BEGIN IMMEDIATE;");
    for t in &triggers {
        sql.push_str(&format!("DROP TRIGGER IF EXISTS {};", quote_ident(t)));
    }
    sql.push_str(&format!("DROP TABLE IF EXISTS {CHANGE_TABLE}; COMMIT;"));
    conn.execute_batch(&sql)
        .map_err(sql_error("removing kuaka's triggers and change table"))?;
    Ok(triggers.len())
}

/// The newest change position (0 before any change).
pub fn current_position(conn: &Connection) -> Result<i64> {
    // No capture installed (a snapshot-only copy of a file without AUTOINCREMENT tables):
    // SQLite has not created sqlite_sequence, and no change was ever recorded.
    let has_sequence: bool = conn
        .query_row(
            "SELECT count(*) > 0 FROM sqlite_schema WHERE type = 'table' AND name = 'sqlite_sequence'",
            [],
            |r| r.get(0),
        )
        .map_err(sql_error("reading the SQLite change position"))?;
    if !has_sequence {
        return Ok(0);
    }
    conn.query_row(
        "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = ?1), 0)",
        [CHANGE_TABLE],
        |r| r.get(0),
    )
    .optional()
    .map(|v| v.unwrap_or(0))
    .map_err(sql_error("reading the SQLite change position"))
}

/// A row's new state: its full image, or `None` when it no longer exists (a delete).
#[derive(Clone, Debug, PartialEq)]
pub struct KeyChange {
    pub table: String,
    pub key: Row,
    pub row: Option<Row>,
}

/// Changes after `after`, at most `limit` change records, reduced to the current state of each
/// changed key, read in one read transaction. Returns the position of the last record read.
pub fn read_changes(
    conn: &mut Connection,
    tables: &HashMap<String, SourceTable>,
    after: i64,
    limit: usize,
) -> Result<(Vec<KeyChange>, i64)> {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Deferred)
        .map_err(sql_error("reading SQLite changes"))?;
    let records: Vec<(i64, String, String)> = tx
        .prepare_cached(&format!(
            "SELECT seq, tbl, k FROM {CHANGE_TABLE} WHERE seq > ?1 ORDER BY seq LIMIT ?2"
        ))
        .and_then(|mut s| {
            s.query_map(rusqlite::params![after, limit as i64], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        })
        .map_err(sql_error("reading the SQLite change table"))?;
    let last = records.last().map(|r| r.0).unwrap_or(after);
    // Last occurrence of each key decides its place in the batch.
    let mut order: Vec<(String, String)> = Vec::new();
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    for (_, tbl, k) in records {
        let id = (tbl, k);
        if let Some(&i) = seen.get(&id) {
            order[i] = (String::new(), String::new());
        }
        seen.insert(id.clone(), order.len());
        order.push(id);
    }
    let mut changes = Vec::new();
    for (tbl, k) in order.into_iter().filter(|(t, _)| !t.is_empty()) {
        let Some(table) = tables.get(&tbl) else {
            // A table dropped from the job (or never in it): nothing to apply.
            continue;
        };
        let key: Row = tx
            .prepare_cached(&format!("SELECT {k}"))
            .and_then(|mut s| {
                s.query_row([], |r| {
                    (0..table.key.len())
                        .map(|i| r.get_ref(i).map(to_value))
                        .collect::<rusqlite::Result<Row>>()
                })
            })
            .map_err(sql_error(format!(
                "decoding a key of {tbl} in the change table ({k})"
            )))?;
        let select = format!(
            "SELECT {} FROM {} WHERE ({}) = ({})",
            join_idents(&table.columns),
            quote_ident(&tbl),
            join_idents(&table.key),
            (1..=table.key.len())
                .map(|i| format!("?{i}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let row = tx
            .prepare_cached(&select)
            .and_then(|mut s| {
                s.query_row(params_from_iter(key.iter().map(to_sql)), |r| {
                    (0..table.columns.len())
                        .map(|i| r.get_ref(i).map(to_value))
                        .collect::<rusqlite::Result<Row>>()
                })
                .optional()
            })
            .map_err(sql_error(format!("reading a changed row of {tbl}")))?;
        changes.push(KeyChange {
            table: tbl,
            key,
            row,
        });
    }
    tx.commit().map_err(sql_error("reading SQLite changes"))?;
    Ok((changes, last))
}

/// Forget change records the target has committed.
pub fn purge_changes(conn: &Connection, applied: i64) -> Result<usize> {
    conn.execute(
        &format!("DELETE FROM {CHANGE_TABLE} WHERE seq <= ?1"),
        [applied],
    )
    .map_err(sql_error(
        "removing applied records from the SQLite change table",
    ))
}

// ---------------------------------------------------------------------------------------------
// Target

/// Create kuaka's bookkeeping tables on a SQLite target.
pub fn target_bookkeeping(conn: &Connection) -> Result<()> {
    // The source already enforced its foreign keys (and its cascades arrive as changes): the
    // copy and apply must not check them row by row, or fire cascades a second time.
    conn.execute_batch(&format!(
        "PRAGMA foreign_keys = OFF;
         CREATE TABLE IF NOT EXISTS {POSITION_TABLE} (job_id TEXT PRIMARY KEY, position INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS {COPIED_TABLE} (job_id TEXT NOT NULL, table_name TEXT NOT NULL, rows INTEGER NOT NULL, PRIMARY KEY (job_id, table_name));
         CREATE TABLE IF NOT EXISTS _kuaka_fence_pass (pass INTEGER);
         CREATE TABLE IF NOT EXISTS {ADDED_COLUMN_TABLE} (job_id TEXT NOT NULL, table_schema TEXT NOT NULL, table_name TEXT NOT NULL, column_name TEXT NOT NULL, data_type TEXT NOT NULL, PRIMARY KEY (job_id, table_schema, table_name, column_name));"
    ))
    .map_err(sql_error("creating kuaka's tables on the SQLite target"))
}

/// Statement for an upsert of `columns` keyed by `key`.
pub fn upsert_sql(table: &str, columns: &[String], key: &[String]) -> String {
    let updates: Vec<String> = columns
        .iter()
        .filter(|c| !key.contains(c))
        .map(|c| format!("{0} = excluded.{0}", quote_ident(c)))
        .collect();
    if key.is_empty() {
        return format!(
            "INSERT INTO {} ({}) VALUES ({})",
            quote_ident(table),
            join_idents(columns),
            (1..=columns.len())
                .map(|i| format!("?{i}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    format!(
        "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) DO {}",
        quote_ident(table),
        join_idents(columns),
        (1..=columns.len())
            .map(|i| format!("?{i}"))
            .collect::<Vec<_>>()
            .join(", "),
        join_idents(key),
        if updates.is_empty() {
            "NOTHING".to_owned()
        } else {
            format!("UPDATE SET {}", updates.join(", "))
        }
    )
}

pub fn delete_sql(table: &str, key: &[String]) -> String {
    format!(
        "DELETE FROM {} WHERE ({}) = ({})",
        quote_ident(table),
        join_idents(key),
        (1..=key.len())
            .map(|i| format!("?{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

// ---------------------------------------------------------------------------------------------
// Rendering for rows of other engines

/// The SQLite declared type for a model type: exact values stay exact (decimals, times and
/// everything without a SQLite counterpart as TEXT, bytes as BLOB).
pub fn declared_type(t: &DataType) -> &'static str {
    match t {
        DataType::Bool => "BOOLEAN",
        DataType::Int16 | DataType::Int32 | DataType::Int64 => "INTEGER",
        DataType::Float32 | DataType::Float64 => "REAL",
        DataType::Bytes => "BLOB",
        // Numeric affinity, but ISO text never parses as a number: the values stay text,
        // and the declared names tell readers (and kuaka verify) what they hold.
        DataType::Date => "DATE",
        DataType::Time => "TIME",
        DataType::Timestamp => "TIMESTAMP",
        DataType::TimestampTz => "TIMESTAMPTZ",
        _ => "TEXT",
    }
}

/// A model value as a SQLite literal (its storage class kept: integers, reals, text, blobs).
pub fn literal(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("NULL"),
        Value::Bool(b) => out.push_str(if *b { "1" } else { "0" }),
        Value::Int(i) => out.push_str(&i.to_string()),
        // Past i64 SQLite would make it a REAL: keep the digits as text.
        Value::UInt(u) if i64::try_from(*u).is_err() => {
            out.push_str(&crate::model::schema::quote_literal(&u.to_string()))
        }
        Value::UInt(u) => out.push_str(&u.to_string()),
        Value::Float(f) => out.push_str(&format!("{f:?}")),
        Value::Decimal(t) | Value::Text(t) | Value::Native(t) => {
            out.push_str(&crate::model::schema::quote_literal(t))
        }
        Value::Bytes(b) => {
            out.push_str("X'");
            for byte in b {
                let _ = write!(out, "{byte:02X}");
            }
            out.push('\'');
        }
    }
}

/// Multi-row upsert on SQLite (3.24+).
pub fn upsert_many(table: &str, columns: &[String], key: &[String], tuples: &[String]) -> String {
    let join = join_idents;
    let sets: Vec<String> = columns
        .iter()
        .filter(|c| !key.contains(c))
        .map(|c| format!("{0} = excluded.{0}", quote_ident(c)))
        .collect();
    format!(
        "INSERT INTO {} ({}) VALUES {} ON CONFLICT ({}) DO {};\n",
        quote_ident(table),
        join(columns),
        tuples.join(", "),
        join(key),
        if sets.is_empty() {
            "NOTHING".to_owned()
        } else {
            format!("UPDATE SET {}", sets.join(", "))
        }
    )
}

/// `DELETE … WHERE (key) IN (VALUES …)` on SQLite.
pub fn delete_many(table: &str, key: &[String], tuples: &[String]) -> String {
    format!(
        "DELETE FROM {} WHERE ({}) IN (VALUES {});\n",
        quote_ident(table),
        join_idents(key),
        tuples.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let conn = open(path.to_str().unwrap(), true).unwrap();
        (dir, conn)
    }

    #[test]
    fn affinity_rules() {
        assert_eq!(data_type("INTEGER"), DataType::Int64);
        assert_eq!(data_type("BIGINT UNSIGNED"), DataType::Int64);
        assert_eq!(data_type("NVARCHAR(120)"), DataType::Text);
        assert_eq!(data_type("BLOB"), DataType::Bytes);
        assert_eq!(data_type(""), DataType::Other { name: "any".into() });
        assert_eq!(data_type("DOUBLE PRECISION"), DataType::Float64);
        assert_eq!(
            data_type("NUMERIC(10,2)"),
            DataType::Numeric {
                precision: Some(10),
                scale: Some(2)
            }
        );
        assert_eq!(data_type("DATETIME"), DataType::Timestamp);
        assert_eq!(data_type("boolean"), DataType::Bool);
        // "POINT" contains "INT": SQLite gives it integer affinity too.
        assert_eq!(data_type("POINT"), DataType::Int64);
    }

    #[test]
    fn catalog_and_capture_follow_keys_with_their_storage_class() {
        let (_dir, mut conn) = db();
        conn.execute_batch(
            "CREATE TABLE p (id INTEGER PRIMARY KEY, v);
             CREATE TABLE w (a TEXT, b BLOB, v NUMERIC(5,1), PRIMARY KEY (a, b)) WITHOUT ROWID;
             CREATE TABLE c (id INTEGER PRIMARY KEY, p INTEGER REFERENCES p(id) ON DELETE CASCADE);
             CREATE INDEX c_p ON c (p);",
        )
        .unwrap();
        let catalog = read_catalog(&conn).unwrap();
        let names: Vec<&str> = catalog.tables.iter().map(|t| t.name()).collect();
        assert_eq!(names, ["c", "p", "w"]);
        let w = &catalog.tables[2];
        assert!(w.without_rowid);
        assert_eq!(w.key, ["a", "b"]);
        let c = &catalog.tables[0];
        assert_eq!(c.table.foreign_keys.len(), 1);
        assert!(
            c.table.foreign_keys[0]
                .definition
                .contains("ON DELETE CASCADE")
        );
        assert_eq!(c.index_sql.len(), 1);
        install_capture(&mut conn, &catalog.tables).unwrap();
        // Installing twice is harmless.
        install_capture(&mut conn, &catalog.tables).unwrap();
        conn.execute_batch(
            "INSERT INTO p VALUES (1, 'x'), (2, 2.5), (3, X'00ff');
             INSERT INTO w VALUES ('k', X'01', 1.5), ('k', '01', 2);
             UPDATE p SET id = 10 WHERE id = 1;
             DELETE FROM p WHERE id = 2;
             INSERT INTO c VALUES (1, 3);
             DELETE FROM p WHERE id = 3;",
        )
        .unwrap();
        let tables: HashMap<String, SourceTable> = catalog
            .tables
            .iter()
            .map(|t| (t.name().to_owned(), t.clone()))
            .collect();
        let (changes, last) = read_changes(&mut conn, &tables, 0, 1000).unwrap();
        assert_eq!(last, current_position(&conn).unwrap());
        let find = |t: &str, k: &Row| changes.iter().find(|c| c.table == t && &c.key == k);
        // Blob and text keys with the same bytes are different rows.
        assert_eq!(
            find("w", &vec![Value::Text("k".into()), Value::Bytes(vec![1])])
                .unwrap()
                .row
                .as_ref()
                .unwrap()[2],
            Value::Float(1.5)
        );
        assert!(
            find(
                "w",
                &vec![Value::Text("k".into()), Value::Text("01".into())]
            )
            .is_some()
        );
        assert_eq!(find("p", &vec![Value::Int(1)]).unwrap().row, None);
        assert_eq!(
            find("p", &vec![Value::Int(10)]).unwrap().row,
            Some(vec![Value::Int(10), Value::Text("x".into())])
        );
        assert_eq!(find("p", &vec![Value::Int(2)]).unwrap().row, None);
        // The cascade fired the child's trigger.
        assert_eq!(find("c", &vec![Value::Int(1)]).unwrap().row, None);
        let (again, _) = read_changes(&mut conn, &tables, last, 1000).unwrap();
        assert!(again.is_empty());
        assert!(purge_changes(&conn, last).unwrap() > 0);
        assert_eq!(current_position(&conn).unwrap(), last);
        assert_eq!(remove_capture(&conn).unwrap(), 9);
        let left: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE name LIKE '\\_kuaka%' ESCAPE '\\'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(left, 0);
    }

    #[test]
    fn keyless_tables_are_refused_by_name() {
        let (_dir, conn) = db();
        conn.execute_batch(
            "CREATE TABLE loose (a, b); CREATE TABLE fine (id INTEGER PRIMARY KEY);",
        )
        .unwrap();
        let err = check_capturable(&read_catalog(&conn).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("loose") && !err.contains("fine"), "{err}");
    }
}
