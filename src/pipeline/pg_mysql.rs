//! PostgreSQL → MySQL/MariaDB: the snapshot and the apply side of a job whose changes are
//! captured from PostgreSQL (pgoutput) and written to a MySQL/MariaDB target.
//!
//! - Tables are rendered from the model ([`myapply::column_type`], the type map in the
//!   README), text columns with a binary collation: PostgreSQL's keys are unique byte by byte.
//! - The snapshot reads each table under the replication slot's exported snapshot (workers
//!   import it), in cursor pages, and writes multi-row upserts in transactions of
//!   [`ROWS_PER_COMMIT`] rows; the last page of a table carries the table's "copied" row in
//!   `kuaka.row_copied`. A table cut off by a crash is emptied and copied again.
//! - Values arrive as PostgreSQL text (sessions in UTC, ISO dates, hex bytea) and are turned
//!   into model values by [`pg_value`]; what MySQL cannot hold (infinite dates, NaN,
//!   timestamps BC, more than 30 decimal places) is an error naming table, column and key.
//! - Apply reads the change log like the PostgreSQL apply: whole source transactions per
//!   target transaction, the position in `kuaka.apply_position` in the same transaction.
//!   Changes of a table are reduced to their net effect per key, except on tables with unique
//!   keys besides the primary key, whose changes go one by one in source order: MySQL's
//!   `ON DUPLICATE KEY UPDATE` fires on any unique key, so a reordered batch could update the
//!   wrong row. `TRUNCATE` becomes `DELETE FROM` (a MySQL `TRUNCATE` commits the transaction).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio_postgres::{Client, SimpleQueryMessage};
use tokio_util::sync::CancellationToken;

use super::binlog_target::{Dialect, Sink};
use super::cdc::{ApplyContext, Item, Next, TxnLog};
use super::rows::{self, Target, describe_key, mysql_target};
use super::snapshot::Summary;
use super::{Error, Result};
use crate::config::{JobSpec, TargetExists};
use crate::engine::mysql::{self, apply as myapply};
use crate::engine::postgres::apply::{Cell, Relation, RowChange, TableCounts};
use crate::engine::postgres::capture::KuakaRecord;
use crate::engine::postgres::snapshot::{CopyProgress, ExportedSnapshot, SOURCE_SESSION_SETUP};
use crate::engine::postgres::{self, Side, catalog};
use crate::engine::sqlite::SourceTable;
use crate::model::PgLsn;
use crate::model::schema::{DataType, QualifiedName, Schema, quote_ident, quote_literal};
use crate::model::value::{Row, Value};
use crate::state::StateStore;
use crate::ui::Ui;

/// Rows per cursor page and per committed batch of a table copy.
const ROWS_PER_COMMIT: usize = 10_000;
/// Pending keys of one table before its statements are written out.
const FLUSH_ROWS: usize = 5_000;
/// Changes per apply batch (at a transaction boundary), and SQL held before it is sent.
const MAX_BATCH_CHANGES: usize = 20_000;
const MAX_PENDING_SQL: usize = 4 << 20;
const MAX_BATCH_TIME: std::time::Duration = std::time::Duration::from_millis(500);

/// A PostgreSQL text value as a model value for a MySQL column of `data_type`.
pub fn pg_value(text: &str, data_type: &DataType) -> std::result::Result<Value, String> {
    let temporal_bad = |t: &str| t.contains("infinity") || t.ends_with(" BC");
    Ok(match data_type {
        DataType::Bool => Value::Bool(text == "t"),
        DataType::Int16 | DataType::Int32 | DataType::Int64 => Value::Int(
            text.parse()
                .map_err(|_| format!("{text:?} is not an integer"))?,
        ),
        DataType::Float32 | DataType::Float64 => {
            let f: f64 = text
                .parse()
                .map_err(|_| format!("{text:?} is not a number"))?;
            if !f.is_finite() {
                return Err(format!(
                    "{text} has no MySQL equivalent (FLOAT/DOUBLE are finite)"
                ));
            }
            Value::Float(f)
        }
        DataType::Numeric { scale, .. } => {
            if text == "NaN" || text.contains("Infinity") {
                return Err(format!(
                    "{text} has no MySQL equivalent (DECIMAL is finite)"
                ));
            }
            let places = text.split_once('.').map_or(0, |(_, f)| f.len());
            if scale.is_none() && places > 30 {
                return Err(format!(
                    "{text} has {places} decimal places; MySQL's DECIMAL holds at most 30"
                ));
            }
            Value::Decimal(text.to_owned())
        }
        // `money` prints with the currency symbol and group separators of lc_monetary.
        DataType::Money => Value::Decimal(
            text.chars()
                .filter(|c| c.is_ascii_digit() || *c == '.' || *c == '-')
                .collect(),
        ),
        DataType::Bytes => {
            let hex = text
                .strip_prefix("\\x")
                .ok_or_else(|| format!("bytea {text:?} is not in hex output"))?;
            Value::Bytes(
                (0..hex.len() / 2)
                    .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
                    .collect::<std::result::Result<_, _>>()
                    .map_err(|_| format!("bytea {text:?} is not valid hex"))?,
            )
        }
        // Padding, not data: PostgreSQL's own char → text drops it, and MySQL's CHAR too.
        DataType::Char { .. } => Value::Text(text.trim_end_matches(' ').to_owned()),
        DataType::Date | DataType::Timestamp if temporal_bad(text) => {
            return Err(format!("{text} has no MySQL equivalent"));
        }
        DataType::TimestampTz => {
            if temporal_bad(text) {
                return Err(format!("{text} has no MySQL equivalent"));
            }
            // Sessions run in UTC: the offset is always +00.
            let utc = text
                .strip_suffix("+00")
                .ok_or_else(|| format!("timestamp {text:?} is not in UTC"))?;
            Value::Text(utc.to_owned())
        }
        _ => Value::Text(text.to_owned()),
    })
}

/// The moved tables as the MySQL side needs them: key, copied columns, model types.
pub fn source_tables(schema: &Schema) -> Result<Vec<SourceTable>> {
    let mut seen: HashMap<&str, &QualifiedName> = HashMap::new();
    let mut out = Vec::new();
    for t in schema.tables.iter().filter(|t| t.holds_rows()) {
        let Some(pk) = &t.primary_key else {
            return Err(Error::Definite(format!(
                "table {} has no primary key: a MySQL/MariaDB target needs one to apply changes by key; add one or leave the table out with --exclude",
                t.name.display_name()
            )));
        };
        if let Some(other) = seen.insert(&t.name.name, &t.name) {
            return Err(Error::Definite(format!(
                "tables {} and {} would both be {} in the MySQL database: leave one out with --exclude",
                other.display_name(),
                t.name.display_name(),
                t.name.name
            )));
        }
        out.push(SourceTable {
            table: t.clone(),
            key: pk.columns.clone(),
            columns: t.copied_columns().map(|c| c.name.clone()).collect(),
            create_sql: String::new(),
            index_sql: Vec::new(),
            trigger_sql: Vec::new(),
            without_rowid: false,
        });
    }
    Ok(out)
}

/// A source session for the copy: text output that parses the same everywhere, in UTC.
async fn source_session(spec: &JobSpec, role: &str, snapshot_id: &str) -> Result<Client> {
    let client = postgres::connect(&spec.source, Side::Source, role).await?;
    client
        .batch_execute(&format!(
            "{SOURCE_SESSION_SETUP}; SET TimeZone = 'UTC'; \
             BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(snapshot_id)
        ))
        .await
        .map_err(|e| postgres::Error::query("importing the snapshot for the copy", e))?;
    Ok(client)
}

/// The snapshot of a PostgreSQL → MySQL/MariaDB job. `slot_snapshot` is the replication
/// slot's snapshot on a first run (the copy is then exactly the slot's start).
pub async fn snapshot(
    spec: &JobSpec,
    store: &Arc<StateStore>,
    job_id: &str,
    ui: &Ui,
    cancel: &CancellationToken,
    slot_snapshot: Option<ExportedSnapshot>,
) -> Result<Summary> {
    let exact = slot_snapshot.is_some();
    let snapshot = match slot_snapshot {
        Some(s) => s,
        None => {
            let client =
                postgres::connect(&spec.source, Side::Source, "snapshot coordinator").await?;
            ExportedSnapshot::export(client).await?
        }
    };
    let schema = match store.meta("schema")? {
        Some(json) => serde_json::from_str(&json)
            .map_err(|e| Error::Definite(format!("reading the stored schema: {e}")))?,
        None => {
            let fresh = catalog::read_schema(&snapshot.client, &spec.selection).await?;
            store.set_meta("schema", &serde_json::to_string(&fresh).unwrap_or_default())?;
            fresh
        }
    };
    for note in &schema.skipped {
        tracing::warn!("{note}");
    }
    let tables = source_tables(&schema)?;
    if tables.is_empty() {
        return Err(Error::Definite(format!(
            "no tables selected on {}: check --tables/--exclude (patterns are schema.table globs)",
            spec.source
        )));
    }
    let mut target = Target::connect(&spec.target).await?;
    let sqlite_target = matches!(target, Target::Sqlite(_));
    let quote = |name: &str| {
        if sqlite_target {
            quote_ident(name)
        } else {
            mysql::quote_ident(name)
        }
    };

    if !store.step_done("pg_mysql:pre_data")? {
        let names: Vec<&str> = tables.iter().map(|t| t.name()).collect();
        let ours = store.meta("pg_mysql_creating")?.is_some();
        let existing = target.existing_tables(&names).await?;
        if !existing.is_empty() && !ours && spec.target_exists == TargetExists::Error {
            return Err(Error::Definite(format!(
                "the target already has tables named like the source's: {}; use --target-exists drop, or another target",
                existing.join(", ")
            )));
        }
        let mut sql = String::new();
        for t in &existing {
            let _ = write!(sql, "DROP TABLE IF EXISTS {};", quote(t));
        }
        store.set_meta("pg_mysql_creating", "1")?;
        for t in &tables {
            match &target {
                Target::Mysql(_, collation) => {
                    sql.push_str(&rows::mysql_create_table(t, collation));
                }
                _ => sql.push_str(&sqlite_create_table(t)),
            }
        }
        if sqlite_target {
            sql = format!("BEGIN;\n{sql}COMMIT;");
        }
        target.execute(&sql, "creating the target tables").await?;
        store.mark_step("pg_mysql:pre_data", "pre_data")?;
        tracing::info!(tables = tables.len(), "target tables created");
        for t in &schema.tables {
            for c in t.columns.iter().filter(|c| c.generated.is_some()) {
                tracing::warn!(
                    "generated column {}.{} is not created on the target (its expression is PostgreSQL SQL); add it by hand",
                    t.name.display_name(),
                    c.name
                );
            }
        }
    }

    let copied = target.copied_tables(job_id).await?;
    let todo: Vec<SourceTable> = tables
        .iter()
        .filter(|t| !copied.contains_key(t.name()))
        .cloned()
        .collect();
    drop(target);
    let copy_started = Instant::now();
    let queue = Arc::new(std::sync::Mutex::new(todo));
    let copied_now = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // One writer at a time on a SQLite file.
    let workers = if sqlite_target {
        1
    } else {
        spec.jobs.max(1).min(tables.len())
    };
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..workers {
        let (spec, queue, copied_now, job_id, ui, cancel, id) = (
            spec.clone(),
            queue.clone(),
            copied_now.clone(),
            job_id.to_owned(),
            ui.clone(),
            cancel.clone(),
            snapshot.id.clone(),
        );
        tasks.spawn(async move {
            let source = source_session(&spec, &format!("copy {w}"), &id).await?;
            let mut target = Target::connect(&spec.target).await?;
            loop {
                let next = queue.lock().ok().and_then(|mut q| q.pop());
                let Some(t) = next else { return Ok(()) };
                let n = copy_table(&source, &mut target, &t, &job_id, &ui, &cancel).await?;
                copied_now.fetch_add(n, Ordering::Relaxed);
            }
        });
    }
    let mut first_error = None;
    while let Some(r) = tasks.join_next().await {
        let r = r.unwrap_or_else(|e| Err(Error::Definite(format!("a copy task failed: {e}"))));
        if let Err(e) = r {
            // One failure stops the others (their tables are copied again on a rerun).
            cancel.cancel();
            first_error.get_or_insert(e);
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let copy_seconds = copy_started.elapsed().as_secs_f64();
    let _ = snapshot.client.batch_execute("COMMIT").await;
    drop(snapshot);

    // Indexes, then foreign keys (their parents' unique keys must exist), each once. SQLite
    // takes its foreign keys in CREATE TABLE.
    let mut target = Target::connect(&spec.target).await?;
    let mut steps = Vec::new();
    for t in &tables {
        steps.extend(rows::index_steps(t, sqlite_target));
    }
    if !sqlite_target {
        for t in &tables {
            steps.extend(rows::mysql_foreign_keys(t));
        }
    }
    for t in &schema.tables {
        for c in &t.checks {
            tracing::warn!(
                "check constraint {} of {} is not created on the target (PostgreSQL SQL); add it by hand",
                c.name,
                t.name.display_name()
            );
        }
    }
    for (label, sql) in steps {
        let key = format!("pg_mysql:post:{label}");
        if store.step_done(&key)? {
            continue;
        }
        target.execute(&sql, &format!("creating {label}")).await?;
        store.mark_step(&key, "post_data")?;
    }
    for v in &schema.views {
        tracing::warn!(
            "view {} is not recreated on the target (PostgreSQL SQL); create it by hand",
            v.name.display_name()
        );
    }
    if spec.snapshot_only {
        store.set_phase("done")?;
    }
    let copied = target.copied_tables(job_id).await?;
    let rows_this_run = copied_now.load(Ordering::Relaxed);
    Ok(Summary {
        tables: tables.len(),
        rows: copied.values().map(|r| *r as u64).sum::<u64>(),
        rows_this_run,
        copy_seconds,
        exact,
        ..Summary::default()
    })
}

/// `CREATE TABLE` on SQLite for a PostgreSQL table: columns, primary key and foreign keys
/// (SQLite takes them only here; apply sessions run with foreign_keys off).
pub(crate) fn sqlite_create_table(t: &SourceTable) -> String {
    let mut parts: Vec<String> = t
        .table
        .copied_columns()
        .map(|c| {
            format!(
                "{} {}{}",
                quote_ident(&c.name),
                crate::engine::sqlite::declared_type(&c.data_type),
                if c.nullable { "" } else { " NOT NULL" }
            )
        })
        .collect();
    parts.push(format!(
        "PRIMARY KEY ({})",
        crate::engine::sqlite::join_idents(&t.key)
    ));
    for fk in &t.table.foreign_keys {
        parts.push(format!(
            "CONSTRAINT {} FOREIGN KEY ({}) REFERENCES {} ({}) {}",
            quote_ident(&fk.name),
            crate::engine::sqlite::join_idents(&fk.columns),
            quote_ident(&fk.referenced_table.name),
            crate::engine::sqlite::join_idents(&fk.referenced_columns),
            rows::fk_actions(&fk.definition)
        ));
    }
    format!(
        "CREATE TABLE {} ({});\n",
        quote_ident(t.name()),
        parts.join(", ")
    )
}

/// Copy one table (emptied first: a copy cut off by a crash starts over).
async fn copy_table(
    source: &Client,
    target: &mut Target,
    t: &SourceTable,
    job_id: &str,
    ui: &Ui,
    cancel: &CancellationToken,
) -> Result<u64> {
    let name = t.table.name.display_name();
    let progress = ui.table(
        &name,
        t.table.estimated_rows.unwrap_or(0).max(0) as u64,
        0,
        0,
    );
    let table = match target {
        Target::Sqlite(_) => quote_ident(t.name()),
        _ => mysql::quote_ident(t.name()),
    };
    target
        .execute(
            &format!("DELETE FROM {table}"),
            &format!("emptying target table {}", t.name()),
        )
        .await?;
    let cursor = quote_ident(&format!("kuaka_copy_{}", t.name()));
    let columns: Vec<String> = t.columns.iter().map(|c| quote_ident(c)).collect();
    let read = |what: &str, e| postgres::Error::query(format!("{what} {name}"), e);
    source
        .batch_execute(&format!(
            "DECLARE {cursor} NO SCROLL CURSOR FOR SELECT {} FROM {}",
            columns.join(", "),
            t.table.name
        ))
        .await
        .map_err(|e| read("reading", e))?;
    let types = t.column_types();
    let key_index = t.key_index();
    let mut count = 0i64;
    loop {
        if cancel.is_cancelled() {
            return Err(Error::Interrupted);
        }
        let messages = source
            .simple_query(&format!("FETCH {ROWS_PER_COMMIT} FROM {cursor}"))
            .await
            .map_err(|e| read("reading", e))?;
        let mut batch: Vec<Row> = Vec::with_capacity(ROWS_PER_COMMIT);
        for m in messages {
            if let SimpleQueryMessage::Row(r) = m {
                let mut row = Vec::with_capacity(types.len());
                for (i, ty) in types.iter().enumerate() {
                    row.push(match r.get(i) {
                        None => Value::Null,
                        Some(text) => pg_value(text, ty).map_err(|e| {
                            let key: Row = key_index
                                .iter()
                                .map(|&k| {
                                    let text = r.get(k).unwrap_or_default();
                                    pg_value(text, &types[k])
                                        .unwrap_or_else(|_| Value::Text(text.to_owned()))
                                })
                                .collect();
                            Error::Definite(format!(
                                "table {name}, column {}, row with key {}: {e}",
                                t.columns[i],
                                describe_key(&key)
                            ))
                        })?,
                    });
                }
                batch.push(row);
            }
        }
        let last = target
            .load_page(t, &batch, ROWS_PER_COMMIT, job_id, &mut count)
            .await?;
        progress.add(batch.len() as u64, 0);
        if last {
            break;
        }
    }
    source
        .batch_execute(&format!("CLOSE {cursor}"))
        .await
        .map_err(|e| read("closing the cursor of", e))?;
    progress.finish();
    tracing::info!(table = %name, rows = count, "copied");
    Ok(count as u64)
}

/// The tables of a stored schema by name, for apply.
pub fn apply_tables(schema: &Schema) -> Result<HashMap<QualifiedName, SourceTable>> {
    Ok(source_tables(schema)?
        .into_iter()
        .map(|t| (t.table.name.clone(), t))
        .collect())
}

#[derive(Debug)]
enum Net {
    Upsert(Vec<Cell>),
    Delete,
}

/// One table's changes not yet written: its relation, keys in first-seen order, and the net
/// change per key.
type Pending = (Arc<Relation>, Vec<Vec<Cell>>, HashMap<Vec<Cell>, Net>);

/// Columns added on the source while the job streamed (not in the copied schema), with their
/// model types; kept on the target (`kuaka.added_column`) so every later session knows them.
type AddedColumns = HashMap<(QualifiedName, String), DataType>;

/// Changes on their way to one target transaction (MySQL, or SQLite with `sqlite`).
struct Batch<'a> {
    tables: &'a HashMap<QualifiedName, SourceTable>,
    /// The job's added columns, and its id (for their bookkeeping rows).
    added: Option<(&'a mut AddedColumns, &'a str)>,
    sqlite: bool,
    pending: BTreeMap<QualifiedName, Pending>,
    sql: String,
    rows: usize,
    counts: BTreeMap<String, TableCounts>,
    /// `--newer-wins COLUMN`.
    newer_wins: Option<&'a str>,
    /// Tables whose statements in this batch carry the guard (their counts are read after
    /// the commit).
    guarded: std::collections::BTreeSet<String>,
}

impl<'a> Batch<'a> {
    fn new(tables: &'a HashMap<QualifiedName, SourceTable>, sqlite: bool) -> Batch<'a> {
        Batch {
            tables,
            added: None,
            sqlite,
            pending: BTreeMap::new(),
            sql: String::new(),
            rows: 0,
            counts: BTreeMap::new(),
            newer_wins: None,
            guarded: Default::default(),
        }
    }

    fn with_added(mut self, added: &'a mut AddedColumns, job_id: &'a str) -> Batch<'a> {
        self.added = Some((added, job_id));
        self
    }

    fn with_newer_wins(mut self, column: Option<&'a str>) -> Batch<'a> {
        self.newer_wins = column;
        self
    }

    /// The `--newer-wins` column of `rel`, when it has it outside its key.
    fn guard_of(&self, rel: &Relation) -> Option<(usize, &'a str)> {
        let column = self.newer_wins?;
        let i = rel.columns.iter().position(|c| c == column)?;
        (!rel.key.contains(&i)).then_some((i, column))
    }

    fn dialect(&self) -> Dialect {
        if self.sqlite {
            Dialect::Sqlite
        } else {
            Dialect::Mysql
        }
    }

    fn ident(&self, name: &str) -> String {
        if self.sqlite {
            quote_ident(name)
        } else {
            mysql::quote_ident(name)
        }
    }

    fn table(&self, name: &QualifiedName) -> Result<&'a SourceTable> {
        self.tables.get(name).ok_or_else(|| {
            Error::Definite(format!(
                "a change of {} arrived, but the job did not copy that table",
                name.display_name()
            ))
        })
    }

    /// The literal of one cell of `rel`'s column `i`, checked against the column's type.
    fn literal(&self, rel: &Relation, i: usize, cell: &Cell, out: &mut String) -> Result<()> {
        let Cell::Value(text) = cell else {
            out.push_str("NULL");
            return Ok(());
        };
        let t = self.table(&rel.name)?;
        let column = &rel.columns[i];
        // A column added on the source after the copy is not in the model: its type came
        // with it (or, from logs of older versions, its text goes as it is).
        let data_type = t
            .table
            .column(column)
            .map(|c| c.data_type.clone())
            .or_else(|| {
                let (added, _) = self.added.as_ref()?;
                added.get(&(rel.name.clone(), column.clone())).cloned()
            })
            .unwrap_or(DataType::Text);
        let value = pg_value(text, &data_type).and_then(|v| {
            if self.sqlite {
                crate::engine::sqlite::literal(&v, out);
                Ok(())
            } else {
                myapply::typed_literal(&v, &data_type, out)
            }
        });
        value.map_err(|e| {
            Error::Definite(format!(
                "table {}, column {column}: {e}",
                rel.name.display_name()
            ))
        })
    }

    fn tuple(&self, rel: &Relation, columns: &[usize], cells: &[Cell]) -> Result<String> {
        let mut out = String::from("(");
        for (n, (&i, cell)) in columns.iter().zip(cells).enumerate() {
            if n > 0 {
                out.push_str(", ");
            }
            self.literal(rel, i, cell, &mut out)?;
        }
        out.push(')');
        Ok(out)
    }

    fn key_condition(&self, rel: &Relation, key: &[Cell]) -> Result<String> {
        let mut parts = Vec::new();
        for (&i, cell) in rel.key.iter().zip(key) {
            let mut lit = String::new();
            self.literal(rel, i, cell, &mut lit)?;
            parts.push(format!("{} = {lit}", self.ident(&rel.columns[i])));
        }
        Ok(parts.join(" AND "))
    }

    fn count(&mut self, table: &QualifiedName) -> &mut TableCounts {
        self.counts.entry(table.display_name()).or_default()
    }

    fn add(&mut self, change: RowChange) -> Result<()> {
        self.rows += 1;
        match change {
            RowChange::Upsert { rel, row } => {
                self.count(&rel.name).upserts += 1;
                let key = rel.key.iter().map(|i| row[*i].clone()).collect();
                self.net(rel, key, Net::Upsert(row))?;
            }
            RowChange::Delete { rel, key } => {
                self.count(&rel.name).deletes += 1;
                self.net(rel, key, Net::Delete)?;
            }
            RowChange::Update { rel, key, row } => {
                self.count(&rel.name).updates += 1;
                self.flush_table(&rel.name)?;
                // Guarded when the version column is in the change (not an unchanged TOAST).
                let guard = self
                    .guard_of(&rel)
                    .filter(|(i, _)| row[*i] != Cell::Unchanged);
                let mut newer = None;
                if let Some((i, column)) = guard {
                    let mut new = String::new();
                    self.literal(&rel, i, &row[i], &mut new)?;
                    let c = self.ident(column);
                    newer = Some(format!("({c} IS NULL OR {new} IS NULL OR {c} <= {new})"));
                    self.guarded.insert(rel.name.name.clone());
                }
                let mut sets = Vec::new();
                let mut last = None;
                for (i, cell) in row.iter().enumerate() {
                    if *cell == Cell::Unchanged {
                        continue;
                    }
                    let mut lit = String::new();
                    self.literal(&rel, i, cell, &mut lit)?;
                    let c = self.ident(&rel.columns[i]);
                    match (&newer, guard) {
                        // MySQL: each column keeps its value unless newer, the version column
                        // last (assignments run in order) and counting what it kept; a side
                        // effect in WHERE would run more than once per row.
                        (Some(newer), Some((g, _))) if !self.sqlite => {
                            if i == g {
                                let v = super::binlog_target::kept_variable(&rel.name.name);
                                last = Some(format!(
                                    "{c} = IF({newer}, {lit}, IF(({v} := COALESCE({v}, 0) + 1) > 0, {c}, {c}))"
                                ));
                            } else {
                                sets.push(format!("{c} = IF({newer}, {lit}, {c})"));
                            }
                        }
                        _ => sets.push(format!("{c} = {lit}")),
                    }
                }
                sets.extend(last);
                let mut condition = self.key_condition(&rel, &key)?;
                let mut count = None;
                if let (Some(newer), true) = (&newer, self.sqlite) {
                    // SQLite: changes() counts the rows the UPDATE matched.
                    condition = format!("{condition} AND {newer}");
                    count = Some(format!(
                        "INSERT INTO temp.kuaka_kept VALUES ({}, 1 - changes());\n",
                        quote_literal(&rel.name.name)
                    ));
                }
                let _ = writeln!(
                    self.sql,
                    "UPDATE {} SET {} WHERE {condition};",
                    self.ident(&rel.name.name),
                    sets.join(", ")
                );
                if let Some(count) = count {
                    self.sql.push_str(&count);
                }
            }
            RowChange::Truncate { rels, .. } => {
                self.flush_all()?;
                for r in &rels {
                    self.count(&r.name).truncates += 1;
                    // TRUNCATE would commit the transaction (and lose the position).
                    let _ = writeln!(self.sql, "DELETE FROM {};", self.ident(&r.name.name));
                }
            }
        }
        Ok(())
    }

    fn instruction(&mut self, record: &KuakaRecord) -> Result<()> {
        match record {
            KuakaRecord::AddColumn {
                table,
                column,
                type_sql,
                data_type,
            } => {
                self.flush_table(table)?;
                // The model type's column on the target (the same map as the copy's); a log
                // written before types were recorded gives text, which holds any value's
                // text form.
                let data_type = data_type.clone().unwrap_or(DataType::Text);
                let target_type = if self.sqlite {
                    crate::engine::sqlite::declared_type(&data_type).to_string()
                } else {
                    format!("{} NULL", myapply::column_type(&data_type, None))
                };
                tracing::info!(
                    "column {column} ({type_sql}) was added to {} on the source: adding it to the target as {target_type}",
                    table.display_name()
                );
                // The same record can come again (a capture that restarted before it saved
                // the table's new shape logs the change again): a column the bookkeeping
                // already knows is there. SQLite has no ADD COLUMN IF NOT EXISTS, and its
                // ALTER commits with the bookkeeping row; MySQL's commits at once, so it
                // relies on IF NOT EXISTS.
                let known = self
                    .added
                    .as_ref()
                    .is_some_and(|(a, _)| a.contains_key(&(table.clone(), column.clone())));
                if !(self.sqlite && known) {
                    let _ = writeln!(
                        self.sql,
                        "ALTER TABLE {} ADD COLUMN {}{} {target_type};",
                        self.ident(&table.name),
                        if self.sqlite { "" } else { "IF NOT EXISTS " },
                        self.ident(column),
                    );
                }
                let dialect = self.dialect();
                if let Some((added, job_id)) = self.added.as_mut() {
                    let json = serde_json::to_string(&data_type).unwrap_or_default();
                    let values = [
                        *job_id,
                        table.schema.as_str(),
                        table.name.as_str(),
                        column.as_str(),
                        json.as_str(),
                    ]
                    .map(|v| dialect.literal(v))
                    .join(", ");
                    let _ = writeln!(
                        self.sql,
                        "{} INTO {} (job_id, table_schema, table_name, column_name, data_type) VALUES ({values});",
                        if self.sqlite {
                            "INSERT OR REPLACE"
                        } else {
                            "REPLACE"
                        },
                        if self.sqlite {
                            crate::engine::sqlite::ADDED_COLUMN_TABLE
                        } else {
                            "kuaka.added_column"
                        }
                    );
                    added.insert((table.clone(), column.clone()), data_type);
                }
                Ok(())
            }
        }
    }

    fn net(&mut self, rel: Arc<Relation>, key: Vec<Cell>, op: Net) -> Result<()> {
        let name = rel.name.clone();
        // Tables with other unique keys get their changes in source order, one by one.
        let model = &self.table(&name)?.table;
        let in_order = !model.unique_keys.is_empty() || model.indexes.iter().any(|i| i.unique);
        let pending = self
            .pending
            .entry(name.clone())
            .or_insert_with(|| (rel, Vec::new(), HashMap::new()));
        if pending.2.insert(key.clone(), op).is_none() {
            pending.1.push(key);
        }
        if in_order || pending.1.len() >= FLUSH_ROWS {
            self.flush_table(&name)?;
        }
        Ok(())
    }

    fn flush_table(&mut self, table: &QualifiedName) -> Result<()> {
        if let Some((rel, order, mut ops)) = self.pending.remove(table) {
            let all: Vec<usize> = (0..rel.columns.len()).collect();
            let key_names: Vec<String> = rel.key.iter().map(|&i| rel.columns[i].clone()).collect();
            let mut deletes = Vec::new();
            let mut upserts = Vec::new();
            for key in order {
                match ops.remove(&key) {
                    Some(Net::Delete) => deletes.push(self.tuple(&rel, &rel.key, &key)?),
                    Some(Net::Upsert(row)) => upserts.push(self.tuple(&rel, &all, &row)?),
                    None => {}
                }
            }
            let table = &rel.name.name;
            if !deletes.is_empty() {
                self.sql.push_str(&if self.sqlite {
                    crate::engine::sqlite::delete_many(table, &key_names, &deletes)
                } else {
                    myapply::delete(table, &key_names, &deletes)
                });
            }
            if !upserts.is_empty() {
                let guard = self.guard_of(&rel).map(|(_, c)| c);
                let rows = upserts.len();
                let statement = match (self.sqlite, guard) {
                    (true, _) => crate::engine::sqlite::upsert_many(
                        table,
                        &rel.columns,
                        &key_names,
                        &upserts,
                    ),
                    (false, Some(column)) => myapply::upsert_newer_wins(
                        table,
                        &rel.columns,
                        &key_names,
                        &upserts,
                        column,
                        &super::binlog_target::kept_variable(table),
                    ),
                    (false, None) => myapply::upsert(table, &rel.columns, &key_names, &upserts),
                };
                self.sql.push_str(&match (self.sqlite, guard) {
                    (true, Some(column)) => super::binlog_target::guard_upsert(
                        self.dialect(),
                        table,
                        column,
                        statement,
                        rows,
                    ),
                    _ => statement,
                });
                if guard.is_some() {
                    self.guarded.insert(table.clone());
                }
            }
        }
        Ok(())
    }

    fn flush_all(&mut self) -> Result<()> {
        let names: Vec<QualifiedName> = self.pending.keys().cloned().collect();
        for n in names {
            self.flush_table(&n)?;
        }
        Ok(())
    }
}

/// The apply side's connection.
enum Out {
    Mysql(Sink),
    Sqlite(rusqlite::Connection),
}

impl Out {
    async fn connect(endpoint: &crate::config::Endpoint) -> Result<Out> {
        if endpoint.engine == crate::config::EngineKind::Sqlite {
            let conn = tokio::task::block_in_place(|| {
                let conn = crate::engine::sqlite::open(&endpoint.database, true)?;
                crate::engine::sqlite::target_bookkeeping(&conn)?;
                Ok::<_, Error>(conn)
            })?;
            Ok(Out::Sqlite(conn))
        } else {
            Ok(Out::Mysql(mysql_target(endpoint, "apply").await?.0))
        }
    }

    async fn applied(&mut self, job_id: &str) -> Result<Option<u64>> {
        match self {
            Out::Mysql(sink) => match sink.applied_position(job_id).await? {
                Some(p) => p.parse::<PgLsn>().map(|l| Some(l.0)).map_err(|_| {
                    Error::Definite(format!("unreadable applied position {p:?} on the target"))
                }),
                None => Ok(None),
            },
            Out::Sqlite(conn) => {
                use rusqlite::OptionalExtension;
                let at: Option<i64> = tokio::task::block_in_place(|| {
                    conn.query_row(
                        &format!(
                            "SELECT position FROM {} WHERE job_id = ?1",
                            crate::engine::sqlite::POSITION_TABLE
                        ),
                        [job_id],
                        |r| r.get(0),
                    )
                    .optional()
                })
                .map_err(|e| Error::Definite(format!("reading the applied position: {e}")))?;
                Ok(at.map(|p| p as u64))
            }
        }
    }

    fn begin(&self) -> &'static str {
        match self {
            Out::Mysql(_) => "START TRANSACTION",
            Out::Sqlite(_) => "BEGIN IMMEDIATE",
        }
    }

    /// The statement moving the job's position, for the end of the transaction.
    fn position_update(&self, job_id: &str, lsn: u64, commit_time_us: i64) -> String {
        match self {
            Out::Mysql(_) => Dialect::Mysql.position_update(
                job_id,
                &PgLsn(lsn).to_string(),
                (commit_time_us / 1_000_000 + 946_684_800).max(0) as u32,
            ),
            Out::Sqlite(_) => format!(
                "INSERT INTO {} (job_id, position) VALUES ({}, {}) ON CONFLICT (job_id) DO UPDATE SET position = excluded.position;\n",
                crate::engine::sqlite::POSITION_TABLE,
                quote_literal(job_id),
                lsn as i64
            ),
        }
    }

    /// The `--newer-wins` counts of `tables` since the last call (then zeroed).
    async fn kept_back(&mut self, tables: &[String]) -> Result<Vec<(String, u64)>> {
        let kept = match self {
            Out::Mysql(sink) => sink.kept_back(tables).await?,
            Out::Sqlite(conn) => tokio::task::block_in_place(|| {
                super::binlog_target::sqlite_kept_back(conn).map(|rows| {
                    rows.into_iter()
                        .filter(|(_, n)| *n > 0)
                        .map(|(t, n)| (t, n as u64))
                        .collect()
                })
            })
            .map_err(|e| Error::Definite(format!("reading the --newer-wins counts: {e}")))?,
        };
        let reset = super::binlog_target::kept_reset(
            if matches!(self, Out::Sqlite(_)) {
                Dialect::Sqlite
            } else {
                Dialect::Mysql
            },
            tables,
        );
        self.execute(&reset).await?;
        Ok(kept)
    }

    /// The job's columns added on the source while it streamed, as recorded on the target.
    async fn added_columns(&mut self, job_id: &str) -> Result<AddedColumns> {
        let what = "reading the columns added while streaming";
        let rows: Vec<(String, String, String, String)> = match self {
            Out::Mysql(Sink::Mysql(conn)) => {
                use mysql_async::prelude::Queryable;
                conn.exec(
                    "SELECT table_schema, table_name, column_name, data_type FROM kuaka.added_column WHERE job_id = ?",
                    (job_id,),
                )
                .await
                .map_err(|e| mysql::error(what, e))?
            }
            Out::Mysql(_) => Vec::new(),
            Out::Sqlite(conn) => tokio::task::block_in_place(|| {
                let mut stmt = conn.prepare(&format!(
                    "SELECT table_schema, table_name, column_name, data_type FROM {} WHERE job_id = ?1",
                    crate::engine::sqlite::ADDED_COLUMN_TABLE
                ))?;
                stmt.query_map([job_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(|e| Error::Definite(format!("{what}: {e}")))?,
        };
        rows.into_iter()
            .map(|(schema, table, column, json)| {
                let data_type = serde_json::from_str(&json).map_err(|e| {
                    Error::Definite(format!(
                        "{what}: the type of {schema}.{table}.{column} ({json}) is unreadable: {e}"
                    ))
                })?;
                Ok(((QualifiedName::new(schema, table), column), data_type))
            })
            .collect()
    }

    async fn execute(&mut self, sql: &str) -> Result<()> {
        match self {
            Out::Mysql(sink) => sink.execute(sql, "applying changes to the target").await,
            Out::Sqlite(conn) => {
                tokio::task::block_in_place(|| conn.execute_batch(sql)).map_err(|e| {
                    Error::Definite(format!("applying changes to the SQLite target: {e}"))
                })
            }
        }
    }
}

/// Apply the change log to a MySQL/MariaDB target from its recorded position, until
/// stopped. Single session, whole source transactions per target transaction.
pub(super) async fn apply_session(ctx: &ApplyContext, cancel: &CancellationToken) -> Result<()> {
    let tables = ctx.out_tables.clone().ok_or_else(|| {
        Error::Definite("the job's schema is missing from the state store".into())
    })?;
    let mut out = Out::connect(&ctx.target).await?;
    let sqlite = matches!(out, Out::Sqlite(_));
    if ctx.newer_wins.is_some() && sqlite {
        // The session's --newer-wins counts (MySQL counts in user variables).
        out.execute(&super::binlog_target::kept_reset(Dialect::Sqlite, &[]))
            .await?;
    }
    let mut applied = out.applied(&ctx.job_id).await?.unwrap_or(ctx.p0.0);
    ctx.progress.applied.store(applied, Ordering::Relaxed);
    let mut log = TxnLog::open(&ctx.dir, applied, ctx.log_end.clone())?;
    let mut added = out.added_columns(&ctx.job_id).await?;
    loop {
        let mut batch = Batch::new(&tables, sqlite)
            .with_newer_wins(ctx.newer_wins.as_deref())
            .with_added(&mut added, &ctx.job_id);
        let mut open = false;
        log.start_batch();
        let started = Instant::now();
        loop {
            let full = batch.rows >= MAX_BATCH_CHANGES || started.elapsed() >= MAX_BATCH_TIME;
            let record = match log.next(full, cancel).await? {
                Next::Record(r) => r,
                Next::EndOfBatch => break,
                Next::Stopped => return Ok(()),
            };
            for item in log.items(&record, applied)? {
                match item {
                    Item::Instruction(i) => batch.instruction(&i)?,
                    Item::Relation(name) => batch.flush_table(&name)?,
                    Item::Change(c) => batch.add(c)?,
                }
            }
            if batch.sql.len() > MAX_PENDING_SQL {
                if !open {
                    out.execute(out.begin()).await?;
                    open = true;
                }
                let sql = std::mem::take(&mut batch.sql);
                out.execute(&sql).await?;
            }
        }
        let Some((lsn, commit_time_us)) = log.last else {
            continue;
        };
        let txns = log.txns;
        batch.flush_all()?;
        let body = std::mem::take(&mut batch.sql);
        let tail = out.position_update(&ctx.job_id, lsn, commit_time_us);
        if !open {
            out.execute(out.begin()).await?;
        }
        let result = out.execute(&format!("{body}{tail}")).await;
        let result = match result {
            Ok(()) => {
                crate::failpoint::hit("apply.before_commit");
                out.execute("COMMIT").await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            let _ = out.execute("ROLLBACK").await;
            return Err(e);
        }
        crate::failpoint::hit("apply.after_commit");
        if !batch.guarded.is_empty() {
            let guarded: Vec<String> = std::mem::take(&mut batch.guarded).into_iter().collect();
            let kept = out.kept_back(&guarded).await?;
            for (table, n) in &kept {
                tracing::warn!(
                    table = table.as_str(),
                    "--newer-wins kept {n} rows of {table} back: the target's row was newer"
                );
            }
            ctx.progress.add_kept_back(&kept.into_iter().collect());
        }
        applied = lsn;
        let p = &ctx.progress;
        p.applied.store(lsn, Ordering::Relaxed);
        p.applied_commit_time_us
            .store(commit_time_us, Ordering::Relaxed);
        p.transactions.fetch_add(txns, Ordering::Relaxed);
        p.changes.fetch_add(batch.rows as u64, Ordering::Relaxed);
        p.add_counts(&batch.counts);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_text_becomes_mysql_values() {
        let v = |t: &str, d: DataType| pg_value(t, &d);
        assert_eq!(v("t", DataType::Bool).unwrap(), Value::Bool(true));
        assert_eq!(
            v("\\x00ff", DataType::Bytes).unwrap(),
            Value::Bytes(vec![0, 255])
        );
        assert_eq!(
            v("2001-02-03 04:05:06.5+00", DataType::TimestampTz).unwrap(),
            Value::Text("2001-02-03 04:05:06.5".into())
        );
        assert!(v("2001-02-03 04:05:06+02", DataType::TimestampTz).is_err());
        assert!(v("infinity", DataType::Timestamp).is_err());
        assert!(v("2001-02-03 BC", DataType::Date).is_err());
        assert!(v("NaN", DataType::Float64).is_err());
        let unbounded = DataType::Numeric {
            precision: None,
            scale: None,
        };
        assert!(v("NaN", unbounded.clone()).is_err());
        assert!(v(&format!("1.{}", "1".repeat(31)), unbounded.clone()).is_err());
        assert_eq!(
            v("-1.10", unbounded).unwrap(),
            Value::Decimal("-1.10".into())
        );
        assert_eq!(
            v("-$1,234.50", DataType::Money).unwrap(),
            Value::Decimal("-1234.50".into())
        );
    }

    #[test]
    fn foreign_key_actions_keep_what_innodb_takes() {
        assert_eq!(
            rows::fk_actions(
                "FOREIGN KEY (a, b) REFERENCES s.t(x, y) MATCH FULL ON UPDATE SET NULL ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED"
            ),
            "ON UPDATE SET NULL ON DELETE CASCADE"
        );
        assert_eq!(
            rows::fk_actions("FOREIGN KEY (a) REFERENCES t(x) ON DELETE NO ACTION NOT VALID"),
            "ON DELETE NO ACTION"
        );
        assert_eq!(rows::fk_actions("FOREIGN KEY (a) REFERENCES t(x)"), "");
    }
}
