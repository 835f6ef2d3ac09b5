//! Jobs whose source is MySQL or MariaDB and whose target is PostgreSQL.
//!
//! The hand-off follows DESIGN.md: the binlog position P0 is read (`SHOW MASTER STATUS`)
//! before any table is read; each table is then copied in its own `START TRANSACTION WITH
//! CONSISTENT SNAPSHOT` (several at once), with no table locks; P1 is read after the last
//! table. Apply replays the binlog from P0: every change is an upsert or delete by key with
//! full row images, so replaying changes a copy already contains is harmless, and the target
//! is consistent once apply passes P1. Each apply batch commits with the binlog position in
//! `kuaka.apply_position`, in the same target transaction: a restart resumes exactly there.
//!
//! InnoDB foreign-key cascades are not in the binlog (only the parent's row event is). The
//! target has the same foreign keys with the same actions, so a parent delete or key update
//! whose foreign keys act (CASCADE, SET NULL, SET DEFAULT) is applied as its own statement with
//! `session_replication_role = origin`: PostgreSQL then performs the same cascade, in source
//! order relative to the other changes of the transaction. Everything else is applied with
//! `session_replication_role = replica` (no triggers, no foreign-key checks).

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use mysql_async::prelude::Queryable;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::binlog_spool::Spool;
use super::binlog_target::{Batch, Dialect, Shape, Sink};
use super::pg_binary;
use super::snapshot::Summary;
use super::{Error, Reconnect, Result, cutover};
use crate::config::{JobSpec, TargetExists, Until};
use crate::engine::mysql::binlog::{self, Assembler, StreamItem};
use crate::engine::mysql::catalog::{self, MyCatalog, MyTable};
use crate::engine::mysql::decode::{self, BinlogCursor, GtidState};
use crate::engine::mysql::{self, Flavour, apply as myapply, quote_ident as my_ident};
use crate::engine::postgres::rows as pgrows;
use crate::engine::postgres::snapshot::CopyProgress;
use crate::model::Position;
use crate::model::schema::{QualifiedName, quote_ident, quote_literal};
use crate::state::StateStore;
use crate::ui::Ui;

/// Rows per copy chunk of a big table (by the server's estimate).
const CHUNK_ROWS: i64 = 250_000;
/// Row changes per apply transaction at most; a smaller batch commits when the stream idles.
const APPLY_BATCH_CHANGES: usize = 20_000;
/// How long apply waits for more events before committing what it has.
const APPLY_IDLE: Duration = Duration::from_millis(100);
/// Assumed copy speed for the binlog-retention warning (conservative on purpose).
const RETENTION_BYTES_PER_SEC: i64 = 20 * 1024 * 1024;

/// What the streaming part of a MySQL job did.
#[derive(Debug, Default, Clone)]
pub struct MysqlSummary {
    pub p0: String,
    pub p1: String,
    pub applied: String,
    pub transactions: u64,
    pub changes: u64,
    pub caught_up: bool,
    /// The stream ended with a cutover to the target (no reverse replication).
    pub cut_over: bool,
    /// Rows the `--newer-wins` guard kept back, by table.
    pub kept_back: std::collections::BTreeMap<String, u64>,
}

fn cursor_position(c: &BinlogCursor) -> Position {
    Position::BinlogFile {
        file: c.file.clone(),
        offset: c.offset,
    }
}

fn cursor_text(c: &BinlogCursor) -> String {
    cursor_position(c).to_string()
}

/// Separates a target position's binlog coordinates from the MariaDB GTID state they stand at.
const GTID_SUFFIX: &str = " gtid:";

/// The position apply writes on the target: coordinates, and the GTID state when known.
fn position_text(c: &BinlogCursor, gtid: Option<&GtidState>) -> String {
    match gtid {
        Some(g) => format!("{}{GTID_SUFFIX}{g}", cursor_text(c)),
        None => cursor_text(c),
    }
}

/// The GTID state a target position was written with.
fn position_gtid(text: &str) -> Option<GtidState> {
    GtidState::parse(text.split_once(GTID_SUFFIX)?.1)
}

fn parse_cursor(text: &str) -> Option<BinlogCursor> {
    let text = text.split_once(GTID_SUFFIX).map_or(text, |(c, _)| c);
    match text.parse::<Position>().ok()? {
        Position::BinlogFile { file, offset } => Some(BinlogCursor { file, offset }),
        _ => None,
    }
}

fn cmp(a: &BinlogCursor, b: &BinlogCursor) -> Ordering {
    cursor_position(a)
        .partial_cmp_same_source(&cursor_position(b))
        .unwrap_or(Ordering::Equal)
}

fn pg_error(what: &str, e: tokio_postgres::Error) -> Error {
    crate::engine::postgres::Error::query(what.to_owned(), e).into()
}

/// `SHOW CREATE TABLE` of a source table, split for loading (see `split_create_table`).
async fn show_create_table(
    source: &mut mysql_async::Conn,
    table: &MyTable,
) -> Result<myapply::CreateParts> {
    let name = table.name();
    let row: Option<(String, String)> = source
        .query_first(format!("SHOW CREATE TABLE {}", my_ident(name)))
        .await
        .map_err(|e| mysql::error(format!("reading the definition of {name}"), e))?;
    let (_, create) =
        row.ok_or_else(|| Error::Definite(format!("table {name} disappeared from the source")))?;
    let auto = table
        .columns
        .iter()
        .find(|c| c.auto_increment)
        .map(|c| c.name.as_str());
    Ok(myapply::split_create_table(&create, auto))
}

/// MySQL/MariaDB target after the data: the foreign keys (not checked: the target session
/// runs with foreign_key_checks = 0, and the source's rows already obeyed them); triggers
/// only for `--snapshot-only` runs (they would fire on applied changes otherwise).
async fn mysql_post_data(
    spec: &JobSpec,
    source: &mut mysql_async::Conn,
    target: &mut Sink,
    store: &StateStore,
    catalog: &MyCatalog,
) -> Result<()> {
    if store.step_done("mysql:post_data")? {
        return Ok(());
    }
    let mut parts = Vec::new();
    for t in &catalog.tables {
        parts.push((t.name(), show_create_table(source, t).await?));
    }
    // Secondary indexes: one ALTER per table (one scan, sorted builds), several tables at once.
    let queue = std::sync::Mutex::new(
        parts
            .iter()
            .filter(|(_, p)| !p.indexes.is_empty())
            .collect::<std::collections::VecDeque<_>>(),
    );
    let workers = spec.jobs.clamp(1, catalog.tables.len().max(1));
    let work = (0..workers).map(|_| async {
        let mut conn = None;
        loop {
            let next = queue.lock().expect("index queue").pop_front();
            let Some((table, p)) = next else { break };
            let step = format!("mysql:post:{table}:indexes");
            if store.step_done(&step)? {
                continue;
            }
            if conn.is_none() {
                conn = Some(Sink::connect(&spec.target, "indexes").await?);
            }
            let sink = conn.as_mut().expect("connected");
            let sql = format!(
                "ALTER TABLE {} {}",
                my_ident(table),
                p.indexes
                    .iter()
                    .map(|i| format!("ADD {i}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            match sink
                .execute(&sql, &format!("creating the indexes of {table}"))
                .await
            {
                Ok(()) => {}
                // Built before a crash that came before the step was recorded.
                Err(Error::Mysql(e)) if e.message.contains("(error 1061)") => {}
                Err(e) => return Err(e),
            }
            store.mark_step(&step, "post_data")?;
        }
        Ok::<(), Error>(())
    });
    futures_util::future::try_join_all(work).await?;
    let names: Vec<&str> = catalog.tables.iter().map(|t| t.name()).collect();
    for (table, p) in &parts {
        for fk in &p.foreign_keys {
            let step = format!("mysql:post:{table}:{fk}");
            if store.step_done(&step)? {
                continue;
            }
            let parent_moved = names
                .iter()
                .any(|n| fk.contains(&format!("REFERENCES {}", my_ident(n))));
            if !parent_moved {
                tracing::warn!("{fk} of {table} references a table that is not moved; not created");
                continue;
            }
            match target
                .execute(
                    &format!(
                        "SET SESSION foreign_key_checks = 0; ALTER TABLE {} ADD {fk}",
                        my_ident(table)
                    ),
                    &format!("creating a foreign key of {table}"),
                )
                .await
            {
                Ok(()) => {}
                // Added before a crash that came before the step was recorded.
                Err(Error::Mysql(e))
                    if e.message.contains("(error 1826)")
                        || e.message.contains("(error 1005)") && e.message.contains("121") => {}
                Err(e) => return Err(e),
            }
            store.mark_step(&step, "post_data")?;
        }
    }
    // Routines and views never fire on applied rows: created now. Triggers would: only a
    // copy that ends here gets them now; a synced target gets them at cutover.
    for problem in super::objects::copy_routines_and_views(spec).await? {
        tracing::warn!("{problem}");
    }
    if spec.snapshot_only {
        let triggers = super::objects::read_triggers(&spec.source, spec).await?;
        super::objects::create_triggers(&spec.target, &triggers).await?;
    } else if catalog.skipped.iter().any(|s| s.starts_with("trigger ")) {
        tracing::info!(
            "the source's triggers are created on the target at cutover (`kuaka cutover`): while the target is kept in sync they would fire on applied changes"
        );
    }
    store.mark_step("mysql:post_data", "post_data")?;
    Ok(())
}

/// Up-front checks of the source for change capture, each with what to do.
async fn preflight(
    conn: &mut mysql_async::Conn,
    flavour: Flavour,
    catalog: &MyCatalog,
) -> Result<()> {
    let mut problems = Vec::new();
    let row: Option<(Option<String>, Option<String>, Option<String>)> = conn
        .query_first("SELECT @@log_bin, @@binlog_format, @@binlog_row_image")
        .await
        .map_err(|e| mysql::error("reading the binlog settings", e))?;
    let (log_bin, format, image) = row.unwrap_or_default();
    if log_bin.as_deref() != Some("1") {
        problems.push(
            "binary logging is off; start the server with log_bin (and a server_id)".to_owned(),
        );
    }
    if format.as_deref() != Some("ROW") {
        problems.push(format!(
            "binlog_format is {}; set it to ROW (SET GLOBAL binlog_format = 'ROW', and in the server's configuration)",
            format.unwrap_or_default()
        ));
    }
    if image.as_deref() != Some("FULL") {
        problems.push(format!(
            "binlog_row_image is {}; set it to FULL (SET GLOBAL binlog_row_image = 'FULL')",
            image.unwrap_or_default()
        ));
    }
    if flavour == Flavour::Mysql
        && let Ok(Some(Some(options))) = conn
            .query_first::<Option<String>, _>("SELECT @@binlog_row_value_options")
            .await
        && !options.is_empty()
    {
        problems.push(format!(
            "binlog_row_value_options is {options}; set it to '' (partial JSON updates carry no full row image)"
        ));
    }
    let grants: Vec<String> = conn.query("SHOW GRANTS").await.unwrap_or_default();
    let global: Vec<&String> = grants.iter().filter(|g| g.contains(" ON *.* ")).collect();
    let has = |p: &str| {
        global
            .iter()
            .any(|g| g.contains("ALL PRIVILEGES") || g.contains(p))
    };
    if !grants.is_empty() && !has("REPLICATION SLAVE") && !has("REPLICATION REPLICA") {
        problems.push("the source user lacks REPLICATION SLAVE; GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO it".to_owned());
    }
    let keyless: Vec<&str> = catalog
        .tables
        .iter()
        .filter(|t| t.key.is_empty())
        .map(|t| t.name())
        .collect();
    if !keyless.is_empty() {
        problems.push(format!(
            "tables without a primary key or NOT NULL unique key cannot be kept in sync: {}; add a key, exclude them (--exclude), or use --snapshot-only",
            keyless.join(", ")
        ));
    }
    if !problems.is_empty() {
        return Err(Error::Definite(format!(
            "the source is not ready for change capture: {}",
            problems.join("; ")
        )));
    }
    // Retention: the binlog is spooled as it is written, during the copy too; only a job that
    // stops (a crash, an operator) for longer than the binlog is kept loses what it needs.
    let expire: Option<i64> = conn
        .query_first::<Option<i64>, _>("SELECT @@binlog_expire_logs_seconds")
        .await
        .ok()
        .flatten()
        .flatten();
    let bytes: i64 = catalog.tables.iter().map(|t| t.table.estimated_bytes).sum();
    let estimate = bytes / RETENTION_BYTES_PER_SEC;
    if let Some(expire) = expire
        && expire > 0
        && expire < estimate * 2
    {
        tracing::warn!(
            "binlog_expire_logs_seconds is {expire} but the snapshot may take about {estimate} s; kuaka spools the binlog while it copies, but if the job is stopped for longer than that, the binlog it needs to resume may be purged: raise it for the migration"
        );
    }
    Ok(())
}

/// Run a job whose source is MySQL/MariaDB and whose target is PostgreSQL.
pub async fn run(
    spec: &JobSpec,
    store: &Arc<StateStore>,
    job_id: &str,
    ui: &Ui,
    cancel: &CancellationToken,
) -> Result<Summary> {
    let dir = store.dir();
    cutover::run_legs(
        spec,
        store,
        &dir,
        job_id,
        async || forward(spec, store, job_id, ui, cancel, None).await,
        async || {
            if spec.target.engine == crate::config::EngineKind::Postgres {
                super::cdc::run_reverse(spec, store, &dir, job_id, ui, cancel).await
            } else {
                reverse(spec, store, job_id, ui, cancel).await
            }
        },
    )
    .await
}

/// The reverse leg of a MySQL → MySQL job after a cutover: the target's binlog applied to
/// the source, from the target's position at the switch (no copy: the two were equal).
async fn reverse(
    spec: &JobSpec,
    store: &Arc<StateStore>,
    job_id: &str,
    ui: &Ui,
    cancel: &CancellationToken,
) -> Result<Summary> {
    let n = cutover::cutovers(store).max(1);
    let main_dir = store.dir();
    let leg_store = Arc::new(StateStore::open_locked(&cutover::reverse_dir(
        &main_dir, n,
    ))?);
    let leg = LegOf {
        main: store.clone(),
        main_dir,
        main_spec: spec.clone(),
        base_job: job_id.to_owned(),
    };
    tracing::info!("the job is cut over: streaming the target's changes back to the source");
    forward(
        &cutover::reverse_spec(spec, store),
        &leg_store,
        &cutover::reverse_job_id(job_id, n),
        ui,
        cancel,
        Some(leg),
    )
    .await
}

/// A reverse leg's ties to the job it belongs to.
#[derive(Clone)]
struct LegOf {
    main: Arc<StateStore>,
    main_dir: std::path::PathBuf,
    main_spec: JobSpec,
    base_job: String,
}

/// The forward direction: snapshot (unless done) and binlog streaming. With `leg`, the
/// reverse leg of a cutover (no snapshot; fallback requests instead of cutover ones).
async fn forward(
    spec: &JobSpec,
    store: &Arc<StateStore>,
    job_id: &str,
    ui: &Ui,
    cancel: &CancellationToken,
    leg: Option<LegOf>,
) -> Result<Summary> {
    let database = spec.source.database.clone();
    // Connect and read the catalog, retrying transient failures (a restarting server, a
    // dropped connection, an OS error on the server) like the other phases do.
    let mut attempt = 0;
    let (mut source, flavour, mut catalog) = loop {
        let result = async {
            let mut source = mysql::connect(&spec.source, "catalog").await?;
            let (flavour, version) = mysql::flavour(&mut source).await?;
            tracing::info!(%version, "source server");
            let catalog = catalog::read(&mut source, &database).await?;
            Ok::<_, Error>((source, flavour, catalog))
        }
        .await;
        match result {
            Ok(done) => break done,
            Err(e) => match super::retry_delay(&e, attempt) {
                Some(delay) => {
                    tracing::warn!("{e}; retrying in {delay:?}");
                    attempt += 1;
                    tokio::select! {
                        _ = cancel.cancelled() => return Err(Error::Interrupted),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                None => return Err(e),
            },
        }
    };
    catalog.tables.retain(|t| {
        spec.selection
            .selects(&QualifiedName::new(database.clone(), t.name()))
    });
    for skipped in &catalog.skipped {
        tracing::warn!("{skipped}");
    }
    if catalog.tables.is_empty() {
        return Err(Error::Definite(format!(
            "the source database {database} has no tables to move (after --tables/--exclude)"
        )));
    }
    if !spec.snapshot_only {
        preflight(&mut source, flavour, &catalog).await?;
    }
    // The tables' shapes as the binlog position the job is at knows them: saved on the first
    // run, changed only by a followed DDL. A resumed run that is behind a later ALTER still
    // decodes the older events with the older shape.
    let catalog = match store.meta("mysql_catalog")? {
        Some(json) => serde_json::from_str::<MyCatalog>(&json)
            .map_err(|e| Error::Definite(format!("reading the saved catalog: {e}")))?,
        None => {
            let mut catalog = catalog;
            override_column_types(&mut catalog, &spec.column_types)?;
            store.set_meta(
                "mysql_catalog",
                &serde_json::to_string(&catalog)
                    .map_err(|e| Error::Definite(format!("saving the catalog: {e}")))?,
            )?;
            catalog
        }
    };
    let mut target = Sink::connect(&spec.target, "schema").await?;
    let dialect = target.dialect();

    if !store.step_done("mysql:pre_data")? {
        let names: Vec<String> = catalog.tables.iter().map(|t| t.name().to_owned()).collect();
        let existing = target.existing_tables(&names).await?;
        let mut sql = String::new();
        if !existing.is_empty() {
            if spec.target_exists == TargetExists::Error {
                return Err(Error::Definite(format!(
                    "the target already has tables named like the source's: {}; use --target-exists drop (or truncate), or another target",
                    existing.join(", ")
                )));
            }
            for t in &existing {
                sql.push_str(&match dialect {
                    Dialect::Postgres => {
                        format!("DROP TABLE IF EXISTS public.{} CASCADE;\n", quote_ident(t))
                    }
                    Dialect::Mysql => format!("DROP TABLE IF EXISTS {};\n", my_ident(t)),
                    Dialect::Sqlite => format!("DROP TABLE IF EXISTS {};\n", quote_ident(t)),
                });
            }
        }
        match dialect {
            Dialect::Sqlite => {
                for t in &catalog.tables {
                    sql.push_str(&super::pg_mysql::sqlite_create_table(&as_source_table(t)));
                }
                target
                    .execute(
                        &format!("BEGIN;\n{sql}COMMIT;"),
                        "creating the target tables",
                    )
                    .await?;
            }
            Dialect::Postgres => {
                for t in &catalog.tables {
                    sql.push_str(&create_table(t));
                }
                target
                    .execute(
                        &format!("BEGIN;\n{sql}COMMIT;"),
                        "creating the target tables",
                    )
                    .await?;
            }
            Dialect::Mysql => {
                // Same engine: the source's own definitions (types, charsets, collations,
                // indexes) without foreign keys, which come after the data. MySQL DDL is not
                // transactional: a crash here leaves tables that --target-exists drop clears.
                sql.insert_str(0, "SET SESSION foreign_key_checks = 0;\n");
                for t in &catalog.tables {
                    let parts = show_create_table(&mut source, t).await?;
                    sql.push_str(&parts.table);
                    sql.push_str(";\n");
                }
                target.execute(&sql, "creating the target tables").await?;
            }
        }
        store.mark_step("mysql:pre_data", "pre_data")?;
        tracing::info!(tables = catalog.tables.len(), "target tables created");
    }

    // The server the job reads: another one (a failover in the source's replication
    // topology) has other binlog coordinates for the same transactions. MySQL names each
    // server instance (server_uuid); MariaDB servers of one topology differ by server_id.
    let server_id = binlog::server_identity(&mut source, flavour).await?;
    match store.meta("mysql_server_id")? {
        None => store.set_meta("mysql_server_id", &server_id)?,
        Some(was) if was != server_id && !spec.snapshot_only => {
            resume_on_another_server(spec, store, job_id, flavour, &mut target, &was, &server_id)
                .await?;
        }
        Some(_) => {}
    }

    // P0 before any table is read.
    let p0 = match store.meta("mysql_p0")?.as_deref().and_then(parse_cursor) {
        Some(p) => p,
        None => {
            let p = if spec.snapshot_only {
                binlog::current_position(&mut source)
                    .await
                    .unwrap_or(BinlogCursor {
                        file: String::new(),
                        offset: 0,
                    })
            } else {
                binlog::current_position(&mut source).await?
            };
            store.set_meta("mysql_p0", &cursor_text(&p))?;
            p
        }
    };
    store.set_position("p0", &cursor_text(&p0))?;

    // The binlog is spooled from P0 (or from what the target has applied) on, while the
    // tables are copied: the source may purge it once it is on kuaka's disk.
    let mut spool = if spec.snapshot_only {
        None
    } else {
        let applied = target
            .applied_position(job_id)
            .await?
            .as_deref()
            .and_then(parse_cursor)
            .filter(|a| cmp(a, &p0) == Ordering::Greater)
            .unwrap_or_else(|| p0.clone());
        Some(Spool::start(
            &spec.source,
            flavour,
            &server_id,
            binlog::server_id(job_id),
            store,
            &applied,
            cancel,
        )?)
    };
    let snapshot = async {
        let copied = target.copied(job_id).await?;
        let chunk_rows = spec.chunk_rows.unwrap_or(CHUNK_ROWS).max(1);
        let plan = if leg.is_some() {
            Vec::new()
        } else {
            plan_chunks(&mut source, store, &catalog, chunk_rows).await?
        };
        crate::failpoint::hit("snapshot.planned");
        let todo: Vec<Chunk> = plan
            .into_iter()
            .filter(|c| !copied.contains_key(&c.marker()))
            .collect();
        let copy_started = Instant::now();
        let rows_this_run = copy_chunks(spec, &catalog, &todo, job_id, ui, cancel).await?;
        let copy_seconds = copy_started.elapsed().as_secs_f64();
        let rows_total = copied.values().map(|r| *r as u64).sum::<u64>() + rows_this_run;
        if !todo.is_empty() || store.meta("mysql_p1")?.is_none() {
            let p1 = if spec.snapshot_only {
                p0.clone()
            } else {
                binlog::current_position(&mut source).await?
            };
            store.set_meta("mysql_p1", &cursor_text(&p1))?;
        }
        let p1 = store
            .meta("mysql_p1")?
            .as_deref()
            .and_then(parse_cursor)
            .unwrap_or_else(|| p0.clone());
        store.set_position("p1", &cursor_text(&p1))?;

        match dialect {
            Dialect::Postgres => post_data(spec, &mut target, store, &catalog).await?,
            Dialect::Mysql => {
                mysql_post_data(spec, &mut source, &mut target, store, &catalog).await?
            }
            Dialect::Sqlite => {
                for t in &catalog.tables {
                    for (label, sql) in super::rows::index_steps(&as_source_table(t), true) {
                        let key = format!("mysql:post:{label}");
                        if store.step_done(&key)? {
                            continue;
                        }
                        target.execute(&sql, &format!("creating {label}")).await?;
                        store.mark_step(&key, "post_data")?;
                    }
                }
            }
        }
        Ok::<_, Error>((rows_this_run, rows_total, copy_seconds, p1))
    };
    let copied = match spool.as_mut() {
        Some(spool) => tokio::select! {
            r = snapshot => r,
            e = spool.failed() => Err(e),
        },
        None => snapshot.await,
    };
    let (rows_this_run, rows_total, copy_seconds, p1) = match copied {
        Ok(done) => done,
        Err(e) => {
            if let Some(spool) = spool {
                spool.stop().await;
            }
            return Err(e);
        }
    };

    let mut summary = Summary {
        tables: catalog.tables.len(),
        rows: rows_total,
        rows_this_run,
        copy_seconds,
        exact: p0 == p1,
        ..Summary::default()
    };
    if spec.snapshot_only {
        validate_foreign_keys(&mut target, store, &catalog).await?;
        store.set_phase("done")?;
        return Ok(summary);
    }
    drop(source);
    let reverse_leg = leg.is_some();
    let spool = spool.ok_or_else(|| Error::Definite("the binlog spool is not running".into()))?;
    let streamed = stream(spec, store, job_id, &spool, &catalog, &p0, &p1, cancel, leg).await;
    spool.stop().await;
    let streamed = streamed?;
    // Cut over with reverse replication (or fallen back from it): the same process streams
    // the other way now.
    summary.handoff = streamed.cut_over && (reverse_leg || cutover::direction(store)? == "reverse");
    summary.cut_over = streamed.cut_over && !summary.handoff;
    summary.mysql_stream = Some(streamed);
    Ok(summary)
}

/// The MariaDB GTID state at a binlog position (`BINLOG_GTID_POS`); `None` (with a warning)
/// when the server cannot tell, for example because the file was purged.
async fn gtid_at(conn: &mut mysql_async::Conn, at: &BinlogCursor) -> Option<GtidState> {
    let text: Result<Option<Option<String>>, _> = conn
        .exec_first(
            "SELECT BINLOG_GTID_POS(?, ?)",
            (at.file.as_str(), at.offset),
        )
        .await;
    match text {
        Ok(Some(Some(text))) => GtidState::parse(&text),
        Ok(_) => {
            tracing::warn!(
                "the source cannot tell the GTID position of {}: this run's positions carry none, so it cannot resume on another server",
                cursor_text(at)
            );
            None
        }
        Err(e) => {
            tracing::warn!("reading the GTID position of {}: {e}", cursor_text(at));
            None
        }
    }
}

/// The source is another server than the one the job read before (`@@server_id` changed): a
/// failover in its replication topology, behind the same address. Binlog files and offsets
/// differ between servers; the GTID state kuaka wrote with the target's position does not.
/// Find that state in the new server's binlog, move the target's position there (same
/// transaction boundary, new coordinates) and start the spool afresh. Idempotent: a crash
/// half way does the same again.
async fn resume_on_another_server(
    spec: &JobSpec,
    store: &StateStore,
    job_id: &str,
    flavour: Flavour,
    target: &mut Sink,
    was: &str,
    now_id: &str,
) -> Result<()> {
    let refuse = |why: String| {
        Error::Definite(format!(
            "the source is another server now (its server_id or server_uuid is {now_id}; the job read {was}): {why}"
        ))
    };
    if flavour != Flavour::Mariadb {
        return Err(refuse(
            "following a MySQL source to another server by GTID is not supported; start the job again (kuaka clean)".into(),
        ));
    }
    let phase = store.job()?.map(|j| j.phase).unwrap_or_default();
    if phase != "streaming" {
        return Err(refuse(format!(
            "the job was {phase}, not yet streaming with a consistent target; start it again (kuaka clean)"
        )));
    }
    let stored = target.applied_position(job_id).await?;
    let Some(state) = stored.as_deref().and_then(position_gtid) else {
        return Err(refuse(format!(
            "the target's position ({}) has no GTID state to find on it; start the job again (kuaka clean)",
            stored.as_deref().unwrap_or("none")
        )));
    };
    if state.domains() > 1 {
        // Another domain's transactions may come later in the new server's binlog than the
        // place found for the first: streaming from there would apply them again.
        return Err(refuse(format!(
            "the applied GTID position {state} spans several replication domains; kuaka resumes by GTID with one domain only: start the job again (kuaka clean)"
        )));
    }
    let anchor = binlog::mariadb_gtid_anchor(&spec.source, binlog::server_id(job_id), &state)
        .await
        .map_err(|e| refuse(e.to_string()))?;
    move_position(
        target,
        job_id,
        &position_text(&anchor, Some(&state)),
        "moving the target's position to the new source server",
    )
    .await?;
    crate::failpoint::hit("failover.position_moved");
    super::binlog_spool::discard(&store.dir())?;
    store.set_meta("mysql_p0", &cursor_text(&anchor))?;
    store.set_meta("mysql_p1", &cursor_text(&anchor))?;
    store.set_meta("mysql_server_id", now_id)?;
    tracing::warn!(
        gtid = %state,
        at = %cursor_text(&anchor),
        "the source is another server now (server_id {was} -> {now_id}): resuming by GTID position from its binlog"
    );
    Ok(())
}

/// Set the job's applied position on the target to `position`, outside any apply batch.
async fn move_position(target: &mut Sink, job_id: &str, position: &str, what: &str) -> Result<()> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as u32)
        .unwrap_or(0);
    let sql = target.dialect().position_update(job_id, position, now);
    target.execute(&sql, what).await
}

/// At a fallback, with the source fenced and the reverse stream drained: the forward stream
/// resumes at the source's binlog position now, after the changes kuaka applied to the source
/// (they came from the target; streaming them again would undo newer target rows).
pub async fn resume_forward_from_now(spec: &JobSpec, job_id: &str) -> Result<String> {
    let mut source = mysql::connect(&spec.source, "fallback").await?;
    let at = cursor_text(&binlog::current_position(&mut source).await?);
    let mut target = Sink::connect(&spec.target, "fallback").await?;
    move_position(
        &mut target,
        job_id,
        &at,
        "moving the forward position on the target",
    )
    .await?;
    Ok(at)
}

/// `--column-type`: the PostgreSQL type of some columns instead of the type map's. Values
/// then travel as their text and the target type's input function reads them (a
/// `tinyint(1)` overridden to smallint arrives as 0/1, not as a boolean).
fn override_column_types(
    catalog: &mut MyCatalog,
    overrides: &[crate::config::ColumnType],
) -> Result<()> {
    for o in overrides {
        let Some(t) = catalog.tables.iter_mut().find(|t| t.name() == o.table) else {
            return Err(Error::Definite(format!(
                "--column-type {}.{}={}: the job moves no table {}",
                o.table, o.column, o.target_type, o.table
            )));
        };
        let Some(i) = t.columns.iter().position(|c| c.name == o.column) else {
            return Err(Error::Definite(format!(
                "--column-type {}.{}={}: table {} has no column {}",
                o.table, o.column, o.target_type, o.table, o.column
            )));
        };
        t.columns[i].pg_type = o.target_type.clone();
        if let Some(model) = t.table.columns.iter_mut().find(|c| c.name == o.column) {
            model.data_type = crate::model::DataType::Other {
                name: o.target_type.clone(),
            };
        }
        tracing::info!(
            "column {}.{} becomes {} on the target (--column-type)",
            o.table,
            o.column,
            o.target_type
        );
    }
    Ok(())
}

/// A MySQL table as the renderers for other engines take it.
fn as_source_table(t: &MyTable) -> crate::engine::sqlite::SourceTable {
    crate::engine::sqlite::SourceTable {
        table: t.table.clone(),
        key: t.key.clone(),
        columns: t
            .copied()
            .iter()
            .map(|&i| t.columns[i].name.clone())
            .collect(),
        create_sql: String::new(),
        index_sql: Vec::new(),
        trigger_sql: Vec::new(),
        without_rowid: false,
    }
}

/// `CREATE TABLE` on PostgreSQL: the columns only. The primary key and the rest come after the
/// data: one index build is cheaper than maintaining the index row by row during COPY, and
/// each chunk is one transaction with its marker, so the copy needs no key to be idempotent.
fn create_table(t: &MyTable) -> String {
    let parts: Vec<String> = t
        .columns
        .iter()
        .filter(|c| !c.generated)
        .map(|c| {
            format!(
                "{} {}{}{}",
                quote_ident(&c.name),
                c.pg_type,
                if c.auto_increment
                    && matches!(c.pg_type.as_str(), "smallint" | "integer" | "bigint")
                {
                    " GENERATED BY DEFAULT AS IDENTITY"
                } else {
                    ""
                },
                if c.nullable { "" } else { " NOT NULL" }
            )
        })
        .collect();
    format!(
        "CREATE TABLE public.{} ({});\n",
        quote_ident(t.name()),
        parts.join(", ")
    )
}

/// Unique keys, indexes, foreign keys and identity counters, each step once.
async fn post_data(
    spec: &JobSpec,
    target: &mut Sink,
    store: &StateStore,
    catalog: &MyCatalog,
) -> Result<()> {
    let Sink::Postgres(target) = target else {
        return Ok(());
    };
    if store.step_done("mysql:post_data")? {
        return Ok(());
    }
    let idents = |cols: &[String]| {
        cols.iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // Per table: keys, indexes, identity counter (`steps[i]` for table i); built with up to
    // --jobs connections at once. Foreign keys after all of them.
    let mut per_table: Vec<Vec<(String, String)>> = Vec::new();
    for t in &catalog.tables {
        per_table.push(Vec::new());
        let steps = per_table.last_mut().expect("just pushed");
        let table = format!("public.{}", quote_ident(t.name()));
        if let Some(pk) = &t.table.primary_key {
            steps.push((
                format!("primary key of {}", t.name()),
                format!(
                    "ALTER TABLE {table} ADD CONSTRAINT {} PRIMARY KEY ({});",
                    quote_ident(&pk.name),
                    idents(&pk.columns)
                ),
            ));
        }
        for k in &t.table.unique_keys {
            steps.push((
                format!("unique key {} on {}", k.name, t.name()),
                format!(
                    "ALTER TABLE {table} ADD CONSTRAINT {} UNIQUE ({});",
                    quote_ident(&format!("{}_{}", t.name(), k.name)),
                    idents(&k.columns)
                ),
            ));
        }
        for index in &t.table.indexes {
            if index.columns.iter().any(|c| c == "<expression>") {
                tracing::warn!(
                    "index {} on {} has expressions; not created",
                    index.name,
                    t.name()
                );
                continue;
            }
            steps.push((
                format!("index {} on {}", index.name, t.name()),
                format!(
                    "CREATE INDEX {} ON {table} ({});",
                    quote_ident(&format!("{}_{}", t.name(), index.name)),
                    idents(&index.columns)
                ),
            ));
        }
        for c in t
            .columns
            .iter()
            .filter(|c| c.auto_increment && !c.generated)
        {
            steps.push((
                format!("identity counter of {}.{}", t.name(), c.name),
                format!(
                    "SELECT setval(pg_get_serial_sequence({}, {}), COALESCE(max({}), 0) + 1, false) FROM {table};",
                    quote_literal(&table),
                    quote_literal(&c.name),
                    quote_ident(&c.name)
                ),
            ));
        }
    }
    let queue = std::sync::Mutex::new(per_table.iter().collect::<std::collections::VecDeque<_>>());
    let workers = spec.jobs.clamp(1, per_table.len().max(1));
    let work = (0..workers).map(|_| async {
        let Sink::Postgres(client) = Sink::connect(&spec.target, "indexes").await? else {
            return Ok(());
        };
        client
            .batch_execute(&format!(
                "SET maintenance_work_mem = {}",
                quote_literal(&spec.index_memory)
            ))
            .await
            .map_err(|e| pg_error("setting maintenance_work_mem (--index-memory)", e))?;
        loop {
            let next = queue.lock().expect("index queue").pop_front();
            let Some(steps) = next else { break };
            run_steps(&client, store, steps).await?;
        }
        Ok::<(), Error>(())
    });
    futures_util::future::try_join_all(work).await?;
    let mut steps: Vec<(String, String)> = Vec::new();
    let names: Vec<&str> = catalog.tables.iter().map(|t| t.name()).collect();
    for t in &catalog.tables {
        for fk in &t.table.foreign_keys {
            if !names.contains(&fk.referenced_table.name.as_str()) {
                tracing::warn!(
                    "foreign key {} of {} references {}, which is not moved; not created",
                    fk.name,
                    t.name(),
                    fk.referenced_table.name
                );
                continue;
            }
            steps.push((
                format!("foreign key {} on {}", fk.name, t.name()),
                format!(
                    "ALTER TABLE public.{} ADD CONSTRAINT {} {} NOT VALID;",
                    quote_ident(t.name()),
                    quote_ident(&fk.name),
                    fk.definition
                ),
            ));
        }
    }
    run_steps(target, store, &steps).await?;
    store.mark_step("mysql:post_data", "post_data")?;
    Ok(())
}

/// Run post-data steps in order, each once (recorded in the state store).
async fn run_steps(target: &Client, store: &StateStore, steps: &[(String, String)]) -> Result<()> {
    for (what, sql) in steps {
        let step = format!("mysql:post:{what}");
        if store.step_done(&step)? {
            continue;
        }
        match target.batch_execute(sql).await {
            Ok(()) => {}
            // Done before a crash that came before the step was recorded.
            Err(e)
                if e.code().is_some_and(|c| {
                    *c == tokio_postgres::error::SqlState::DUPLICATE_OBJECT
                        || *c == tokio_postgres::error::SqlState::DUPLICATE_TABLE
                        || *c == tokio_postgres::error::SqlState::INVALID_TABLE_DEFINITION
                }) => {}
            Err(e) => return Err(pg_error(&format!("creating {what}"), e)),
        }
        store.mark_step(&step, "post_data")?;
    }
    Ok(())
}

/// Check the foreign keys created NOT VALID against the rows, once the target is
/// consistent (before that, tables copied at different instants may disagree). Ones the
/// source's own rows break (possible with `FOREIGN_KEY_CHECKS = 0` or MyISAM) stay NOT VALID
/// and are named.
async fn validate_foreign_keys(
    target: &mut Sink,
    store: &StateStore,
    catalog: &MyCatalog,
) -> Result<()> {
    // On MySQL foreign keys are added after the data without a check (foreign_key_checks=0).
    let Sink::Postgres(target) = target else {
        return Ok(());
    };
    if store.step_done("mysql:fk_validated")? {
        return Ok(());
    }
    for t in &catalog.tables {
        for fk in &t.table.foreign_keys {
            let sql = format!(
                "ALTER TABLE public.{} VALIDATE CONSTRAINT {};",
                quote_ident(t.name()),
                quote_ident(&fk.name)
            );
            if let Err(e) = target.batch_execute(&sql).await {
                if e.as_db_error().is_none() {
                    return Err(pg_error("validating foreign keys", e));
                }
                // Not valid yet: the constraint stays NOT VALID.
                tracing::warn!(
                    "foreign key {} of {} is kept NOT VALID: the source's rows break it ({}); new rows are checked",
                    fk.name,
                    t.name(),
                    e.as_db_error()
                        .map(|d| d.message().to_owned())
                        .unwrap_or_default()
                );
            }
        }
    }
    store.mark_step("mysql:fk_validated", "post_data")?;
    Ok(())
}

/// One unit of the copy: a key range of a table (or the whole table), read in its own
/// consistent snapshot and loaded by one target transaction with its marker row.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Chunk {
    table: String,
    /// Chunk number within the table; `None` for a table copied whole.
    number: Option<usize>,
    /// `key >= from` and `key < to` on the table's one integer key column.
    from: Option<i64>,
    to: Option<i64>,
}

impl Chunk {
    /// The row in `kuaka.row_copied` that says this chunk is in the target.
    fn marker(&self) -> String {
        match self.number {
            Some(n) => format!("{}#{n}", self.table),
            None => self.table.clone(),
        }
    }
}

/// Split tables with a single integer key into key ranges of about `chunk_rows` rows (by the
/// server's row estimate), so one big table loads with several workers. The plan is saved
/// in the state store before any chunk is read: a resumed copy uses the same ranges, whose
/// ends are open, so rows inserted later fall into some chunk.
async fn plan_chunks(
    source: &mut mysql_async::Conn,
    store: &StateStore,
    catalog: &MyCatalog,
    chunk_rows: i64,
) -> Result<Vec<Chunk>> {
    if let Some(json) = store.meta("mysql_chunks")? {
        return serde_json::from_str(&json)
            .map_err(|e| Error::Definite(format!("reading the stored chunk plan: {e}")));
    }
    let mut plan = Vec::new();
    for t in &catalog.tables {
        let whole = Chunk {
            table: t.name().to_owned(),
            number: None,
            from: None,
            to: None,
        };
        let estimate = t.table.estimated_rows.unwrap_or(0);
        let int_key = t.key.len() == 1 && t.columns.iter().any(|c| {
            c.name == t.key[0]
                && matches!(c.kind, catalog::Kind::Int { bits, unsigned } if bits < 64 || !unsigned)
        });
        if !int_key || estimate < 2 * chunk_rows {
            plan.push(whole);
            continue;
        }
        let key = my_ident(&t.key[0]);
        let bounds: Option<(Option<i64>, Option<i64>)> = source
            .query_first(format!(
                "SELECT MIN({key}), MAX({key}) FROM {}",
                my_ident(t.name())
            ))
            .await
            .map_err(|e| mysql::error(format!("reading the key range of {}", t.name()), e))?;
        let Some((Some(low), Some(high))) = bounds else {
            plan.push(whole);
            continue;
        };
        let chunks = (estimate / chunk_rows).clamp(2, 1024);
        let step = ((high - low) / chunks).max(1);
        let mut from = None;
        for n in 0..chunks {
            let to = (n + 1 < chunks).then(|| low + step * (n + 1));
            plan.push(Chunk {
                table: t.name().to_owned(),
                number: Some(n as usize),
                from,
                to,
            });
            from = to;
        }
    }
    let json = serde_json::to_string(&plan)
        .map_err(|e| Error::Definite(format!("saving the chunk plan: {e}")))?;
    store.set_meta("mysql_chunks", &json)?;
    Ok(plan)
}

/// Copy chunks, up to `--jobs` at once; returns the rows copied.
async fn copy_chunks(
    spec: &JobSpec,
    catalog: &MyCatalog,
    chunks: &[Chunk],
    job_id: &str,
    ui: &Ui,
    cancel: &CancellationToken,
) -> Result<u64> {
    if chunks.is_empty() {
        return Ok(0);
    }
    let tables: HashMap<&str, &MyTable> = catalog.tables.iter().map(|t| (t.name(), t)).collect();
    // One progress bar per table, finished with its last chunk.
    let mut left: HashMap<String, (usize, Arc<crate::ui::TableProgress>)> = HashMap::new();
    for c in chunks {
        let t = tables[c.table.as_str()];
        left.entry(c.table.clone())
            .or_insert_with(|| {
                (
                    0,
                    ui.table(
                        &format!("{}.{}", spec.source.database, t.name()),
                        t.table.estimated_rows.unwrap_or(0).max(0) as u64,
                        0,
                        0,
                    ),
                )
            })
            .0 += 1;
    }
    let left = std::sync::Mutex::new(left);
    let queue = std::sync::Mutex::new(chunks.iter().collect::<std::collections::VecDeque<_>>());
    // A SQLite file takes one writer at a time.
    let workers = if spec.target.engine == crate::config::EngineKind::Sqlite {
        1
    } else {
        spec.jobs.clamp(1, chunks.len())
    };
    let work = (0..workers).map(|_| async {
        let mut source = mysql::connect(&spec.source, "snapshot").await?;
        let mut target = Sink::connect(&spec.target, "snapshot").await?;
        let mut rows = 0u64;
        loop {
            let next = queue.lock().expect("copy queue").pop_front();
            let Some(chunk) = next else { break };
            let table = tables[chunk.table.as_str()];
            let progress = left.lock().expect("progress")[&chunk.table].1.clone();
            rows += copy_chunk(
                &mut source,
                &mut target,
                table,
                chunk,
                job_id,
                progress.as_ref(),
                cancel,
            )
            .await?;
            let mut left = left.lock().expect("progress");
            if let Some(entry) = left.get_mut(&chunk.table) {
                entry.0 -= 1;
                if entry.0 == 0 {
                    entry.1.finish();
                    tracing::info!(table = %chunk.table, "copied");
                }
            }
        }
        Ok::<u64, Error>(rows)
    });
    let counts = futures_util::future::try_join_all(work).await?;
    Ok(counts.into_iter().sum())
}

/// Bytes of COPY data gathered before they are sent to the target.
const COPY_SEND_BYTES: usize = 256 * 1024;

async fn copy_chunk(
    source: &mut mysql_async::Conn,
    target: &mut Sink,
    t: &MyTable,
    chunk: &Chunk,
    job_id: &str,
    progress: &crate::ui::TableProgress,
    cancel: &CancellationToken,
) -> Result<u64> {
    let shape = Shape::new(t, &MyCatalog::default(), target.dialect());
    let read_err = |e| mysql::error(format!("reading table {} from the source", t.name()), e);
    source
        .query_drop("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .await
        .map_err(read_err)?;
    source
        .query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT")
        .await
        .map_err(read_err)?;
    let mut conditions = Vec::new();
    if let Some(from) = chunk.from {
        conditions.push(format!("{} >= {from}", my_ident(&t.key[0])));
    }
    if let Some(to) = chunk.to {
        conditions.push(format!("{} < {to}", my_ident(&t.key[0])));
    }
    let select = format!(
        "SELECT {} FROM {}{}",
        shape
            .copied
            .iter()
            .map(|&i| my_ident(&t.columns[i].name))
            .collect::<Vec<_>>()
            .join(", "),
        my_ident(t.name()),
        if conditions.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conditions.join(" AND "))
        }
    );
    let count = match target {
        Sink::Postgres(client) => {
            copy_to_postgres(
                source, client, t, &shape, &select, chunk, job_id, progress, cancel,
            )
            .await?
        }
        Sink::Mysql(conn) => {
            copy_to_mysql(
                source, conn, t, &shape, &select, chunk, job_id, progress, cancel,
            )
            .await?
        }
        Sink::Sqlite(_) => {
            copy_to_sqlite(
                source, target, t, &shape, &select, chunk, job_id, progress, cancel,
            )
            .await?
        }
    };
    crate::failpoint::hit("snapshot.chunk.after_commit");
    Ok(count)
}

/// The fast path of the copy into PostgreSQL: a text-protocol value whose text PostgreSQL
/// reads as it is (numbers, text, non-zero dates, times), escaped for COPY without decoding.
/// `false` when the value needs [`decode::from_text`] (booleans, timestamps, bits, binary,
/// JSON, zero dates, text with a NUL byte).
fn copy_raw(kind: catalog::Kind, raw: Option<&[u8]>, out: &mut String) -> bool {
    use catalog::Kind::*;
    let Some(bytes) = raw else {
        out.push_str("\\N");
        return true;
    };
    let plain = match kind {
        Int { .. } | Decimal | Float | Double | Year | Time | Text | Enum | Set => true,
        Date | Datetime => {
            bytes.first().is_some_and(|b| *b != b'0') && !bytes.windows(3).any(|w| w == b"-00")
        }
        _ => false,
    };
    if !plain || bytes.contains(&0) {
        return false;
    }
    let Ok(text) = std::str::from_utf8(bytes) else {
        return false;
    };
    pgrows::copy_escape(text, out);
    true
}

/// One chunk into PostgreSQL: `COPY ... FROM STDIN` (binary when every column is of a kind
/// [`pg_binary`] writes, else text) and the chunk's marker in one transaction.
#[allow(clippy::too_many_arguments)]
async fn copy_to_postgres(
    source: &mut mysql_async::Conn,
    target: &mut Client,
    t: &MyTable,
    shape: &Shape,
    select: &str,
    chunk: &Chunk,
    job_id: &str,
    progress: &crate::ui::TableProgress,
    cancel: &CancellationToken,
) -> Result<u64> {
    let read_err = |e| mysql::error(format!("reading table {} from the source", t.name()), e);
    let write_err = |e| pg_error(&format!("writing to target table {}", t.name()), e);
    let transaction = target.transaction().await.map_err(write_err)?;
    let columns: Vec<&catalog::MyColumn> = shape.copied.iter().map(|&i| &t.columns[i]).collect();
    let binary = pg_binary::kinds(&columns, &shape.types);
    let copy = format!(
        "COPY public.{} ({}) FROM STDIN{}",
        quote_ident(t.name()),
        shape
            .columns
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", "),
        if binary.is_some() {
            " (FORMAT binary)"
        } else {
            ""
        }
    );
    let sink = transaction
        .copy_in::<_, bytes::Bytes>(&copy)
        .await
        .map_err(write_err)?;
    futures_util::pin_mut!(sink);
    let mut result = source.query_iter(select).await.map_err(read_err)?;
    let mut stream = result
        .stream::<mysql_async::Row>()
        .await
        .map_err(read_err)?
        .ok_or_else(|| Error::Definite(format!("reading table {}: no result set", t.name())))?;
    // One of the two buffers is used: text rows, or binary rows after the header.
    let mut buffer = String::new();
    let mut bin: Vec<u8> = Vec::new();
    if binary.is_some() {
        bin.extend_from_slice(pg_binary::HEADER);
    }
    let mut count: i64 = 0;
    let mut pending_rows = 0u64;
    while let Some(row) = stream.next().await.transpose().map_err(read_err)? {
        let named = |column: &catalog::MyColumn, e: String| {
            Error::Definite(format!("table {}, column {}: {e}", t.name(), column.name))
        };
        for (pos, column) in columns.iter().enumerate() {
            let raw = match row.as_ref(pos) {
                Some(mysql_async::Value::Bytes(b)) => Some(b.as_slice()),
                _ => None,
            };
            if let Some(kinds) = &binary {
                if pos == 0 {
                    bin.extend_from_slice(&(kinds.len() as i16).to_be_bytes());
                }
                pg_binary::field(kinds[pos], column, &shape.types[pos], raw, &mut bin)
                    .map_err(|e| named(column, e))?;
                continue;
            }
            if pos > 0 {
                buffer.push('\t');
            }
            if copy_raw(column.kind, raw, &mut buffer) {
                continue;
            }
            let value = decode::from_text(column, raw).map_err(|e| named(column, e))?;
            pgrows::copy_field(&value, &shape.types[pos], &mut buffer)
                .map_err(|e| named(column, e))?;
        }
        if binary.is_none() {
            buffer.push('\n');
        }
        count += 1;
        pending_rows += 1;
        if bin.len() + buffer.len() >= COPY_SEND_BYTES {
            if cancel.is_cancelled() {
                return Err(Error::Interrupted);
            }
            sink.send(take_copy_data(&mut bin, &mut buffer))
                .await
                .map_err(write_err)?;
            progress.add(pending_rows, 0);
            pending_rows = 0;
        }
    }
    drop(stream);
    drop(result);
    if binary.is_some() {
        bin.extend_from_slice(pg_binary::TRAILER);
    }
    if bin.len() + buffer.len() > 0 {
        sink.send(take_copy_data(&mut bin, &mut buffer))
            .await
            .map_err(write_err)?;
    }
    sink.as_mut().finish().await.map_err(write_err)?;
    source.query_drop("COMMIT").await.map_err(read_err)?;
    transaction
        .batch_execute(&Dialect::Postgres.copied_marker(job_id, &chunk.marker(), count))
        .await
        .map_err(write_err)?;
    transaction.commit().await.map_err(write_err)?;
    progress.add(pending_rows, 0);
    Ok(count as u64)
}

/// The COPY data gathered so far, from whichever buffer the chunk writes.
fn take_copy_data(bin: &mut Vec<u8>, text: &mut String) -> bytes::Bytes {
    if text.is_empty() {
        bytes::Bytes::from(std::mem::take(bin))
    } else {
        bytes::Bytes::from(std::mem::take(text))
    }
}

/// Statement size for the copy into MySQL (well under the default max_allowed_packet).
const INSERT_BYTES: usize = 1024 * 1024;

/// One chunk into MySQL/MariaDB (same engine): the source's text-protocol values go back as
/// literals without decoding, in multi-row INSERTs, with the chunk's marker in one transaction.
#[allow(clippy::too_many_arguments)]
async fn copy_to_mysql(
    source: &mut mysql_async::Conn,
    target: &mut mysql_async::Conn,
    t: &MyTable,
    shape: &Shape,
    select: &str,
    chunk: &Chunk,
    job_id: &str,
    progress: &crate::ui::TableProgress,
    cancel: &CancellationToken,
) -> Result<u64> {
    let read_err = |e| mysql::error(format!("reading table {} from the source", t.name()), e);
    let write_err = |e| mysql::error(format!("writing to target table {}", t.name()), e);
    target
        .query_drop("START TRANSACTION")
        .await
        .map_err(write_err)?;
    let head = format!(
        "INSERT INTO {} ({}) VALUES ",
        my_ident(t.name()),
        shape
            .columns
            .iter()
            .map(|c| my_ident(c))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let result = async {
        let mut statement = String::with_capacity(INSERT_BYTES + 64 * 1024);
        let mut count: i64 = 0;
        let mut pending_rows = 0u64;
        let mut result = source.query_iter(select).await.map_err(read_err)?;
        let mut stream = result
            .stream::<mysql_async::Row>()
            .await
            .map_err(read_err)?
            .ok_or_else(|| Error::Definite(format!("reading table {}: no result set", t.name())))?;
        loop {
            let next = stream.next().await.transpose().map_err(read_err)?;
            let done = next.is_none();
            if let Some(row) = next {
                statement.push_str(if pending_rows == 0 { &head } else { ", " });
                statement.push('(');
                for (pos, kind) in shape.kinds.iter().enumerate() {
                    if pos > 0 {
                        statement.push_str(", ");
                    }
                    let raw = match row.as_ref(pos) {
                        Some(mysql_async::Value::Bytes(b)) => Some(b.as_slice()),
                        _ => None,
                    };
                    myapply::raw_literal(*kind, raw, &mut statement);
                }
                statement.push(')');
                count += 1;
                pending_rows += 1;
            }
            if pending_rows > 0 && (statement.len() >= INSERT_BYTES || done) {
                if cancel.is_cancelled() {
                    return Err(Error::Interrupted);
                }
                target
                    .query_drop(std::mem::take(&mut statement))
                    .await
                    .map_err(write_err)?;
                progress.add(pending_rows, 0);
                pending_rows = 0;
            }
            if done {
                break;
            }
        }
        drop(stream);
        drop(result);
        source.query_drop("COMMIT").await.map_err(read_err)?;
        target
            .query_drop(format!(
                "{}COMMIT",
                Dialect::Mysql.copied_marker(job_id, &chunk.marker(), count)
            ))
            .await
            .map_err(write_err)?;
        Ok::<u64, Error>(count as u64)
    }
    .await;
    if result.is_err() {
        let _ = target.query_drop("ROLLBACK").await;
    }
    result
}

/// The copy into SQLite: rows decoded to model values, upserts of a few thousand rows in the
/// chunk's one transaction, with the chunk's marker.
#[allow(clippy::too_many_arguments)]
async fn copy_to_sqlite(
    source: &mut mysql_async::Conn,
    target: &mut Sink,
    t: &MyTable,
    shape: &Shape,
    select: &str,
    chunk: &Chunk,
    job_id: &str,
    progress: &crate::ui::TableProgress,
    cancel: &CancellationToken,
) -> Result<u64> {
    let read_err = |e| mysql::error(format!("reading table {} from the source", t.name()), e);
    let what = format!("writing to target table {}", t.name());
    target.execute("BEGIN IMMEDIATE", &what).await?;
    let result = async {
        let mut rows: Vec<crate::model::value::Row> = Vec::with_capacity(SQLITE_ROWS);
        let mut count: i64 = 0;
        let mut result = source.query_iter(select).await.map_err(read_err)?;
        let mut stream = result
            .stream::<mysql_async::Row>()
            .await
            .map_err(read_err)?
            .ok_or_else(|| Error::Definite(format!("reading table {}: no result set", t.name())))?;
        loop {
            let next = stream.next().await.transpose().map_err(read_err)?;
            let done = next.is_none();
            if let Some(row) = next {
                let mut values = Vec::with_capacity(shape.copied.len());
                for (pos, &i) in shape.copied.iter().enumerate() {
                    let column = &t.columns[i];
                    let raw = match row.as_ref(pos) {
                        Some(mysql_async::Value::Bytes(b)) => Some(b.as_slice()),
                        _ => None,
                    };
                    values.push(decode::from_text(column, raw).map_err(|e| {
                        Error::Definite(format!("table {}, column {}: {e}", t.name(), column.name))
                    })?);
                }
                rows.push(values);
                count += 1;
            }
            if !rows.is_empty() && (rows.len() >= SQLITE_ROWS || done) {
                if cancel.is_cancelled() {
                    return Err(Error::Interrupted);
                }
                let sql = shape.rows_sql_for_copy(&rows)?;
                target.execute(&sql, &what).await?;
                progress.add(rows.len() as u64, 0);
                rows.clear();
            }
            if done {
                break;
            }
        }
        drop(stream);
        drop(result);
        source.query_drop("COMMIT").await.map_err(read_err)?;
        target
            .execute(
                &format!(
                    "{}COMMIT",
                    Dialect::Sqlite.copied_marker(job_id, &chunk.marker(), count)
                ),
                &what,
            )
            .await?;
        Ok::<u64, Error>(count as u64)
    }
    .await;
    if result.is_err() {
        let _ = target.execute("ROLLBACK", "rolling back").await;
    }
    result
}

/// Rows per statement batch of the copy into SQLite.
const SQLITE_ROWS: usize = 5_000;

/// Stream the binlog from where the target is and apply it, reconnecting after transient
/// failures of either side.
#[allow(clippy::too_many_arguments)]
async fn stream(
    spec: &JobSpec,
    store: &Arc<StateStore>,
    job_id: &str,
    spool: &Spool,
    catalog: &MyCatalog,
    p0: &BinlogCursor,
    p1: &BinlogCursor,
    cancel: &CancellationToken,
    leg: Option<LegOf>,
) -> Result<MysqlSummary> {
    let dialect = match spec.target.engine {
        crate::config::EngineKind::Mysql => Dialect::Mysql,
        crate::config::EngineKind::Sqlite => Dialect::Sqlite,
        crate::config::EngineKind::Postgres => Dialect::Postgres,
    };
    let mut catalog = catalog.clone();
    let mut state = StreamState {
        summary: MysqlSummary {
            p0: cursor_text(p0),
            p1: cursor_text(p1),
            ..MysqlSummary::default()
        },
        consistent: false,
        goal: None,
        last_status: Instant::now() - Duration::from_secs(10),
        last_request_check: Instant::now(),
        last_cleanup: Instant::now(),
        switch: None,
        leg,
    };
    let mut reconnect = Reconnect::default();
    loop {
        let shapes: HashMap<String, Shape> = catalog
            .tables
            .iter()
            .map(|t| {
                let shape =
                    Shape::new(t, &catalog, dialect).with_newer_wins(spec.newer_wins.as_deref());
                (t.name().to_owned(), shape)
            })
            .collect();
        let before = state.summary.transactions;
        match session(
            spec, store, job_id, spool, &catalog, &shapes, p0, p1, &mut state, cancel,
        )
        .await
        {
            Ok(SessionEnd::CaughtUp) => return Ok(state.summary),
            Ok(SessionEnd::CutOver) => {
                state.summary.cut_over = true;
                return Ok(state.summary);
            }
            Ok(SessionEnd::CatalogChanged(changed)) => {
                // A followed DDL: the new shape is in the state store and the target.
                catalog = changed;
            }
            Err(e) if e.class() == crate::engine::ErrorClass::Transient => {
                if state.summary.transactions > before {
                    reconnect.progressed();
                }
                if !reconnect.wait("binlog stream", e, cancel).await? {
                    return Err(Error::Interrupted);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// How a streaming session ended without an error.
enum SessionEnd {
    /// `--until caught-up` reached its goal.
    CaughtUp,
    /// `kuaka cutover` finished: the application writes to the target now.
    CutOver,
    /// A followed DDL changed a table: stream again with this catalog.
    CatalogChanged(MyCatalog),
}

struct StreamState {
    summary: MysqlSummary,
    consistent: bool,
    goal: Option<BinlogCursor>,
    last_status: Instant,
    last_request_check: Instant,
    last_cleanup: Instant,
    switch: Option<Switch>,
    /// A reverse leg: its requests are fallbacks, in the job's own state directory.
    leg: Option<LegOf>,
}

/// A cutover under way, advanced by the streaming loop: first waiting for apply to reach the
/// source's position within `--max-lag` (nothing fenced yet), then, fenced, for the drain.
struct Switch {
    request: cutover::Request,
    reporter: cutover::Reporter,
    goal: BinlogCursor,
    deadline: Instant,
    fenced: bool,
    /// A fallback (the leg streams target → source): only the leg's source is fenced by it.
    reverse: bool,
}

impl Switch {
    /// Give up: lift what was fenced, say why; the job streams on.
    async fn abandon(mut self, spec: &JobSpec, e: Error) {
        use crate::engine::postgres::Side;
        let e = if self.fenced {
            let fenced = if self.reverse {
                vec![(&spec.source, Side::Target)]
            } else {
                vec![(&spec.source, Side::Source), (&spec.target, Side::Target)]
            };
            cutover::lift_fences(e, &fenced, &self.request.app_roles, &self.reporter.dir()).await
        } else {
            e
        };
        tracing::warn!("cutover did not happen: {e}");
        self.reporter.fail(&e);
        cutover::remove_request(&self.reporter.dir(), &self.request.id);
    }
}

/// The steps of a cutover or fallback once the leg's stream is drained: the drain reported,
/// verify, and the AUTO_INCREMENT counters of the leg's target raised to its source's. The
/// words follow the direction (a fallback's leg streams the job's target to its source).
async fn drained_steps(
    spec: &JobSpec,
    catalog: &MyCatalog,
    sw: &mut Switch,
    drained: &BinlogCursor,
) -> Result<()> {
    let (from, to) = if sw.reverse {
        ("target", "source")
    } else {
        ("source", "target")
    };
    sw.reporter.progress.drained_at = Some(cursor_text(drained));
    sw.reporter.step(
        "drain",
        format!(
            "every transaction the {from} committed before {} is applied to the {to}",
            cursor_text(drained)
        ),
    );
    cutover::verify_step(
        &mut sw.reporter,
        &spec.source,
        &spec.target,
        spec,
        sw.request.full_verify,
    )
    .await?;
    let moved = cutover::sync_auto_increment(&spec.source, &spec.target, catalog).await?;
    sw.reporter.step(
        "sequences",
        format!("{moved} AUTO_INCREMENT counters moved on the {to} to at least the {from}'s"),
    );
    Ok(())
}

/// The cutover's steps with the stream stopped at the drained position: verify, counters,
/// the switch (reverse replication from a PostgreSQL target, or direction `none` with
/// `--no-reverse`), the target unfenced.
async fn finish_switch(
    spec: &JobSpec,
    store: &StateStore,
    job_id: &str,
    catalog: &MyCatalog,
    sw: &mut Switch,
    drained: &BinlogCursor,
) -> Result<()> {
    drained_steps(spec, catalog, sw, drained).await?;
    if sw.request.no_reverse {
        store.set_meta("direction", "none")?;
        sw.reporter.step(
            "reverse replication",
            "not started (--no-reverse): the job ends here".into(),
        );
    } else if spec.target.engine == crate::config::EngineKind::Mysql {
        let (n, at) = create_mysql_reverse_leg(spec, store, job_id, catalog).await?;
        store.set_meta("cutovers", &n.to_string())?;
        store.set_meta("direction", "reverse")?;
        sw.reporter.progress.reverse_slot = Some(format!("the target's binlog from {at}"));
        sw.reporter.step(
            "reverse replication",
            format!("the target's binlog from {at} streams to the source: changes the application makes there from now on reach it"),
        );
    } else {
        // The moved tables as the PostgreSQL target holds them: the reverse leg captures
        // them there and applies to the source.
        let names: Vec<String> = catalog.tables.iter().map(|t| t.name().to_owned()).collect();
        let selection = crate::config::Selection {
            include: names
                .iter()
                .map(|t| crate::config::Pattern {
                    schema: "public".into(),
                    table: t.clone(),
                })
                .collect(),
            exclude: Vec::new(),
        };
        let client = crate::engine::postgres::connect(
            &spec.target,
            crate::engine::postgres::Side::Target,
            "cutover",
        )
        .await?;
        let schema = crate::engine::postgres::catalog::read_schema(&client, &selection).await?;
        drop(client);
        store.set_meta(
            "reverse_tables",
            &serde_json::to_string(&names).unwrap_or_default(),
        )?;
        let n = cutover::cutovers(store) + 1;
        let slot =
            cutover::create_reverse_leg(spec, store, &store.dir(), job_id, n, &schema).await?;
        store.set_meta("cutovers", &n.to_string())?;
        store.set_meta("direction", "reverse")?;
        sw.reporter.progress.reverse_slot = Some(slot.clone());
        sw.reporter.step(
            "reverse replication",
            format!("replication slot {slot} on the target: changes the application makes there from now on reach the source"),
        );
    }
    cutover::finish_cutover(spec, store, &sw.request, &mut sw.reporter).await?;
    cutover::remove_request(&sw.reporter.dir(), &sw.request.id);
    Ok(())
}

/// A reverse leg for a MySQL target: its own state store primed to stream the target's binlog
/// from its position now (the target is still fenced, so nothing of the application's is
/// before it), without a snapshot.
async fn create_mysql_reverse_leg(
    spec: &JobSpec,
    store: &StateStore,
    job_id: &str,
    catalog: &MyCatalog,
) -> Result<(u32, String)> {
    let names: Vec<String> = catalog.tables.iter().map(|t| t.name().to_owned()).collect();
    store.set_meta(
        "reverse_tables",
        &serde_json::to_string(&names).unwrap_or_default(),
    )?;
    let mut target = mysql::connect(&spec.target, "cutover").await?;
    let at = binlog::current_position(&mut target).await.map_err(|e| {
        Error::Definite(format!(
            "the target's binlog cannot be read for reverse replication ({e}); enable log_bin with binlog_format=ROW there, or cut over with --no-reverse"
        ))
    })?;
    let n = cutover::cutovers(store) + 1;
    let dir = cutover::reverse_dir(&store.dir(), n);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .map_err(|e| Error::Definite(format!("removing {}: {e}", dir.display())))?;
    }
    let leg = StateStore::open_locked(&dir)?;
    let reverse = cutover::reverse_spec(spec, store);
    leg.create_job(
        &cutover::reverse_job_id(job_id, n),
        &reverse.source.redacted(),
        &reverse.target.redacted(),
        &serde_json::to_string(&reverse).unwrap_or_default(),
    )?;
    let at = cursor_text(&at);
    leg.set_meta("mysql_p0", &at)?;
    leg.set_meta("mysql_p1", &at)?;
    leg.mark_step("mysql:pre_data", "pre_data")?;
    leg.mark_step("mysql:post_data", "post_data")?;
    leg.set_phase("streaming")?;
    Ok((n, at))
}

/// A fallback's steps in a MySQL reverse leg, stream stopped at the drained position: verify,
/// AUTO_INCREMENT counters on the source, then the switch back (forward position past
/// kuaka's writes, source unfenced). An error before the switch gives the switch back to be
/// abandoned; after it, none (the next start finishes it).
async fn finish_fallback(
    spec: &JobSpec,
    catalog: &MyCatalog,
    mut sw: Switch,
    drained: &BinlogCursor,
    leg: &LegOf,
) -> std::result::Result<(), (Error, Option<Switch>)> {
    if let Err(e) = drained_steps(spec, catalog, &mut sw, drained).await {
        return Err((e, Some(sw)));
    }
    let request = sw.request.clone();
    cutover::switch_back(
        &leg.main_spec,
        &leg.main,
        &leg.main_dir,
        &leg.base_job,
        &request,
        cutover::Prepared {
            reporter: sw.reporter,
        },
    )
    .await
    .map_err(|e| (e, None))
}

/// One connection's worth of streaming: from the target's applied position until caught up
/// (with `--until caught-up`), an error, or cancellation.
#[allow(clippy::too_many_arguments)]
async fn session(
    spec: &JobSpec,
    store: &Arc<StateStore>,
    job_id: &str,
    spool: &Spool,
    catalog: &MyCatalog,
    shapes: &HashMap<String, Shape>,
    p0: &BinlogCursor,
    p1: &BinlogCursor,
    state: &mut StreamState,
    cancel: &CancellationToken,
) -> Result<SessionEnd> {
    let mut target = Sink::connect(&spec.target, "apply").await?;
    let stored = target.applied_position(job_id).await?;
    let mut applied = stored
        .as_deref()
        .and_then(parse_cursor)
        .unwrap_or_else(|| p0.clone());
    let mut gtid = stored.as_deref().and_then(position_gtid);
    if cmp(&applied, p0) == Ordering::Less {
        applied = p0.clone();
        gtid = None;
    }
    let mut control = mysql::connect(&spec.source, "binlog position").await?;
    if gtid.is_none() && spool.flavour() == Flavour::Mariadb {
        // Where the applied position is in GTIDs, so that a later run can resume on another
        // server of the source's replication topology (a failover).
        gtid = gtid_at(&mut control, &applied).await;
    }
    let mut reader = spool.reader(&applied)?;
    tracing::info!(from = %cursor_text(&applied), "applying the spooled binlog");
    let mut assembler = Assembler::new(
        &spec.source.database,
        &catalog.tables,
        applied.clone(),
        match spec.target.engine {
            crate::config::EngineKind::Mysql => decode::ZeroDates::Keep,
            // Zero dates are NULL on PostgreSQL and SQLite (as the snapshot's decoding does).
            _ => decode::ZeroDates::Null,
        },
    );
    let mut batch = Batch::new(shapes, false);
    let mut transactions: Vec<binlog::Committed> = Vec::new();
    let mut last_flush = Instant::now();
    let mut last_timestamp: u32 = 0;
    let mut read = applied.clone();
    loop {
        if cancel.is_cancelled() {
            return Err(Error::Interrupted);
        }
        let next = tokio::select! {
            _ = cancel.cancelled() => return Err(Error::Interrupted),
            e = reader.next(APPLY_IDLE) => e?,
        };
        let mut idle = false;
        match next {
            Some(spooled) => {
                let event = spooled.event;
                if spooled.begins {
                    assembler.abandon();
                }
                // The spool knows where each event ends (the assembler's own tracking agrees).
                assembler.cursor = spooled.cursor;
                let item = assembler
                    .handle(&event, |id| reader.get_tme(id))
                    .map_err(Error::Definite)?;
                match item {
                    Some(StreamItem::Transaction(c)) => {
                        if let (Some(state), Some(g)) = (gtid.as_mut(), c.gtid.as_deref()) {
                            state.advance(g);
                        }
                        read = c.position.clone();
                        last_timestamp = c.timestamp;
                        for change in &c.changes {
                            batch.add(change)?;
                        }
                        batch.transactions += 1;
                        transactions.push(c);
                    }
                    Some(StreamItem::Statement {
                        position,
                        schema,
                        query,
                        gtid: statement_gtid,
                    }) => {
                        let action = statement_action(
                            &spec.source.database,
                            shapes,
                            &schema,
                            &query,
                            &position,
                        );
                        if action
                            .as_ref()
                            .map_or(true, |a| *a != StatementAction::Ignore)
                        {
                            // Apply what came before, then the statement, each with its position.
                            apply(
                                store,
                                &mut target,
                                &mut batch,
                                &mut transactions,
                                shapes,
                                job_id,
                                &mut applied,
                                gtid.as_ref(),
                                &mut state.summary,
                            )
                            .await?;
                        }
                        // A DDL that cannot be followed stops the job, after everything
                        // before it is in the target.
                        let action = action?;
                        if let (Some(state), Some(g)) = (gtid.as_mut(), statement_gtid.as_deref()) {
                            state.advance(g);
                        }
                        let tail = target.dialect().position_update(
                            job_id,
                            &position_text(&position, gtid.as_ref()),
                            event_time(&event),
                        );
                        match action {
                            StatementAction::Ignore => {}
                            StatementAction::Run(sql) => {
                                target
                                    .commit(&sql, &tail, "applying a TRUNCATE")
                                    .await
                                    .map_err(|e| e.error)?;
                                applied = position.clone();
                            }
                            StatementAction::AddColumns { table, added } => {
                                let changed = follow_add_columns(
                                    &mut control,
                                    &mut target,
                                    store,
                                    catalog,
                                    &spec.source.database,
                                    &table,
                                    added,
                                    &tail,
                                    &position,
                                )
                                .await?;
                                return Ok(SessionEnd::CatalogChanged(changed));
                            }
                        }
                        read = position;
                    }
                    Some(StreamItem::Progress {
                        position,
                        timestamp,
                    }) => {
                        // Between transactions: once those read are applied, so is this.
                        read = position;
                        if timestamp > 0 {
                            last_timestamp = timestamp;
                        }
                    }
                    None => {}
                }
            }
            None => idle = true,
        }
        if !transactions.is_empty()
            && (batch.changes >= APPLY_BATCH_CHANGES
                || idle
                || last_flush.elapsed() >= Duration::from_millis(500))
        {
            apply(
                store,
                &mut target,
                &mut batch,
                &mut transactions,
                shapes,
                job_id,
                &mut applied,
                gtid.as_ref(),
                &mut state.summary,
            )
            .await?;
            last_flush = Instant::now();
        }
        if transactions.is_empty() && cmp(&read, &applied) == Ordering::Greater {
            // Nothing of the job's pending: everything read so far is as good as applied.
            applied = read.clone();
        }
        if !state.consistent && transactions.is_empty() && cmp(&applied, p1) != Ordering::Less {
            state.consistent = true;
            validate_foreign_keys(&mut target, store, catalog).await?;
            store.set_phase("streaming")?;
            tracing::info!(applied = %cursor_text(&applied), "caught up: the target is consistent with the source");
        } else if !state.consistent && store.job()?.is_some_and(|j| j.phase != "catching_up") {
            store.set_phase("catching_up")?;
        }
        if state.last_status.elapsed() >= Duration::from_secs(1) {
            state.last_status = Instant::now();
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let lag = if transactions.is_empty() && idle {
                0
            } else {
                now.saturating_sub(u64::from(last_timestamp))
            };
            let _ = store.set_position("captured", &cursor_text(&read));
            let _ = store.set_position("applied", &cursor_text(&applied));
            let _ = store.set_position("lag_seconds", &lag.to_string());
            if let Some(g) = gtid.as_ref().filter(|_| transactions.is_empty()) {
                let _ = store.set_position("applied_gtid", &g.to_string());
            }
            if state.last_cleanup.elapsed() >= Duration::from_secs(10) {
                state.last_cleanup = Instant::now();
                // Up to what the target holds (`applied` may be ahead of it, past events
                // that needed no write): a restart reads the spool from there.
                if let Some(saved) = target
                    .applied_position(job_id)
                    .await?
                    .as_deref()
                    .and_then(parse_cursor)
                {
                    spool.remove_applied(&saved);
                }
            }
        }
        if state.consistent
            && state.switch.is_none()
            && state.last_request_check.elapsed() >= Duration::from_millis(100)
        {
            state.last_request_check = Instant::now();
            let requests = state
                .leg
                .as_ref()
                .map_or_else(|| store.dir(), |l| l.main_dir.clone());
            if let Some(request) = cutover::pending_request(&requests, state.leg.is_some()) {
                let mut reporter = cutover::Reporter::new(&requests, &request);
                reporter.progress.steps.clear();
                reporter.begin();
                let max_lag = Duration::from_secs_f64(request.max_lag_seconds.max(0.0));
                let sw = match binlog::current_position(&mut control).await {
                    Ok(goal) => Switch {
                        request,
                        reporter,
                        goal,
                        deadline: Instant::now() + max_lag,
                        fenced: false,
                        reverse: state.leg.is_some(),
                    },
                    Err(e) => {
                        reporter.fail(&e.into());
                        cutover::remove_request(&requests, &request.id);
                        continue;
                    }
                };
                state.switch = Some(sw);
            }
        }
        if let Some(sw) = state.switch.as_mut() {
            let reached = transactions.is_empty() && cmp(&applied, &sw.goal) != Ordering::Less;
            if reached && !sw.fenced {
                sw.reporter.step(
                    "check lag",
                    format!(
                        "applied everything the source held at {} (--max-lag {:.1} s)",
                        cursor_text(&sw.goal),
                        sw.request.max_lag_seconds
                    ),
                );
                // Fenced from here on: the target first (the application must not write
                // there before the switch), then the source.
                sw.fenced = true;
                sw.reporter.progress.fenced_at_ms = Some(cutover::unix_ms());
                let roles = sw.request.app_roles.clone();
                let reverse = sw.reverse;
                let dir = sw.reporter.dir();
                let fenced = async {
                    // A fallback fences the application's database only: the leg's target
                    // (the job's source) has been fenced since the cutover.
                    let t = if reverse {
                        String::new()
                    } else {
                        cutover::fence(
                            &spec.target,
                            crate::engine::postgres::Side::Target,
                            &roles,
                            &dir,
                        )
                        .await?
                    };
                    let s = cutover::fence(
                        &spec.source,
                        crate::engine::postgres::Side::Source,
                        &roles,
                        &dir,
                    )
                    .await?;
                    let goal = binlog::current_position(&mut control).await?;
                    let detail = if t.is_empty() { s } else { format!("{t}; {s}") };
                    Ok::<_, Error>((detail, goal))
                }
                .await;
                match fenced {
                    Ok((detail, goal)) => {
                        sw.reporter.step("fence", detail);
                        sw.goal = goal;
                        sw.deadline = Instant::now()
                            + Duration::from_secs_f64(sw.request.drain_timeout_seconds.max(1.0));
                    }
                    Err(e) => {
                        if let Some(sw) = state.switch.take() {
                            sw.abandon(spec, e).await;
                        }
                    }
                }
            } else if reached {
                let mut sw = state.switch.take().expect("a switch under way");
                if let Some(leg) = state.leg.clone() {
                    match finish_fallback(spec, catalog, sw, &applied, &leg).await {
                        Ok(()) => {
                            return Ok(SessionEnd::CutOver);
                        }
                        Err((e, Some(sw))) => sw.abandon(spec, e).await,
                        // Past the switch: finished when the job starts again (definite:
                        // the stream must not reconnect and go on this way).
                        Err((e, None)) => return Err(Error::Definite(e.to_string())),
                    }
                    continue;
                }
                match finish_switch(spec, store, job_id, catalog, &mut sw, &applied).await {
                    Ok(()) => {
                        state.summary.applied = cursor_text(&applied);
                        let _ = store.set_position("applied", &cursor_text(&applied));
                        return Ok(SessionEnd::CutOver);
                    }
                    Err(e) if cutover::direction(store)? != "forward" => {
                        // Past the switch: finished when the job starts again.
                        cutover::after_failure(
                            &mut sw.reporter,
                            &store.dir(),
                            &sw.request,
                            &e,
                            true,
                        );
                        // Definite: the stream must not reconnect and go on this way.
                        return Err(Error::Definite(e.to_string()));
                    }
                    Err(e) => sw.abandon(spec, e).await,
                }
            } else if Instant::now() > sw.deadline {
                let e = Error::Definite(if sw.fenced {
                    format!(
                        "apply did not catch up with the fenced source within --drain-timeout {:.0} s",
                        sw.request.drain_timeout_seconds
                    )
                } else {
                    format!(
                        "refused: apply did not catch up with the source within --max-lag {:.1} s; nothing was fenced (wait for the lag to fall, or raise --max-lag)",
                        sw.request.max_lag_seconds
                    )
                });
                if let Some(sw) = state.switch.take() {
                    sw.abandon(spec, e).await;
                }
            }
        }
        if state.consistent && spec.until == Some(Until::CaughtUp) {
            if state.goal.is_none() {
                state.goal = Some(binlog::current_position(&mut control).await?);
            }
            if let Some(goal) = &state.goal
                && transactions.is_empty()
                && cmp(&applied, goal) != Ordering::Less
            {
                state.summary.caught_up = true;
                state.summary.applied = cursor_text(&applied);
                let _ = store.set_position("applied", &cursor_text(&applied));
                return Ok(SessionEnd::CaughtUp);
            }
        }
    }
}

fn event_time(event: &mysql_async::binlog::events::Event) -> u32 {
    event.header().timestamp()
}

/// Commit the batch with the last transaction's position, in one target transaction. A
/// unique-key clash of the net-effect form is retried with every change in source order.
#[allow(clippy::too_many_arguments)]
async fn apply(
    store: &StateStore,
    target: &mut Sink,
    batch: &mut Batch<'_>,
    transactions: &mut Vec<binlog::Committed>,
    shapes: &HashMap<String, Shape>,
    job_id: &str,
    applied: &mut BinlogCursor,
    gtid: Option<&GtidState>,
    summary: &mut MysqlSummary,
) -> Result<()> {
    let Some(last) = transactions.last() else {
        return Ok(());
    };
    let position = last.position.clone();
    // Everything read is in this batch: the GTID state read so far is the batch's end.
    let tail =
        target
            .dialect()
            .position_update(job_id, &position_text(&position, gtid), last.timestamp);
    let (mut body, guarded) = batch.take_sql()?;
    let mut strict = false;
    loop {
        match target
            .commit(&body, &tail, "applying changes to the target")
            .await
        {
            Ok(()) => break,
            Err(e) if !strict && e.unique_violation => {
                strict = true;
                let mut ordered = Batch::new(shapes, true);
                for t in transactions.iter() {
                    for c in &t.changes {
                        ordered.add(c)?;
                    }
                }
                body = ordered.take_sql()?.0;
            }
            Err(e) => return Err(e.error),
        }
    }
    if !guarded.is_empty() {
        let kept = target.kept_back(&guarded).await?;
        if !kept.is_empty() {
            for (table, n) in &kept {
                tracing::warn!(
                    table = table.as_str(),
                    "--newer-wins kept {n} rows of {table} back: the target's row was newer"
                );
                *summary.kept_back.entry(table.clone()).or_default() += n;
            }
            store.set_meta(
                "newer_wins_kept_back",
                &serde_json::to_string(&summary.kept_back).unwrap_or_default(),
            )?;
        }
    }
    summary.transactions += transactions.len() as u64;
    summary.changes += batch.changes as u64;
    summary.applied = cursor_text(&position);
    *applied = position;
    transactions.clear();
    batch.changes = 0;
    batch.transactions = 0;
    Ok(())
}

/// Follow `ALTER TABLE t ADD COLUMN ...` (after the batch before it was applied): read the
/// table from the source, check that the only change is `added` columns at the end (a column
/// placed FIRST/AFTER, or later DDL already visible, cannot be followed safely), add them on
/// the target with the same default for existing rows, move the position past the DDL, and
/// save the new shape for this and later runs.
#[allow(clippy::too_many_arguments)]
async fn follow_add_columns(
    source: &mut mysql_async::Conn,
    target: &mut Sink,
    store: &StateStore,
    catalog: &MyCatalog,
    database: &str,
    table: &str,
    added: usize,
    position_tail: &str,
    position: &BinlogCursor,
) -> Result<MyCatalog> {
    let refuse = |why: String| {
        Error::Definite(format!(
            "cannot follow the source's ADD COLUMN on {table} at {}: {why}; add the column(s) on the target by hand and start a new job",
            cursor_text(position)
        ))
    };
    let fresh = catalog::read(source, database).await?;
    let old = catalog
        .tables
        .iter()
        .find(|t| t.name() == table)
        .ok_or_else(|| refuse("the table is not part of the job".into()))?;
    let new = fresh
        .tables
        .iter()
        .find(|t| t.name() == table)
        .ok_or_else(|| refuse("the table no longer exists on the source".into()))?;
    let same_prefix = new.columns.len() == old.columns.len() + added
        && old
            .columns
            .iter()
            .zip(&new.columns)
            .all(|(a, b)| a.name == b.name && a.column_type == b.column_type);
    if !same_prefix {
        return Err(refuse(
            "the table's columns now differ from the old ones plus the added ones at the end (FIRST/AFTER, or more DDL since)".into(),
        ));
    }
    let mut sql = String::new();
    for column in &new.columns[old.columns.len()..] {
        if column.generated {
            return Err(refuse(format!("{} is a generated column", column.name)));
        }
        let default = column
            .default
            .as_deref()
            .filter(|d| !d.eq_ignore_ascii_case("NULL"));
        match target.dialect() {
            dialect @ (Dialect::Postgres | Dialect::Sqlite) => {
                // Existing rows get the column's default on MySQL, with no row events: the
                // target must fill them the same way.
                let fill = match default {
                    None if column.nullable => None,
                    // NOT NULL without a default: MySQL fills the type's implicit default.
                    None => match column.kind {
                        catalog::Kind::Int { .. }
                        | catalog::Kind::Decimal
                        | catalog::Kind::Float
                        | catalog::Kind::Double
                        | catalog::Kind::Year => Some("0".to_owned()),
                        catalog::Kind::Text | catalog::Kind::Enum | catalog::Kind::Set => {
                            Some("''".to_owned())
                        }
                        _ => {
                            return Err(refuse(format!(
                                "NOT NULL column {} has no default PostgreSQL can take",
                                column.name
                            )));
                        }
                    },
                    Some(d) if d.parse::<f64>().is_ok() => Some(d.to_owned()),
                    Some(d)
                        if d.starts_with('\'')
                            && d.ends_with('\'')
                            && d.len() >= 2
                            && !d.contains('\\') =>
                    {
                        Some(d.to_owned())
                    }
                    Some(d) => {
                        return Err(refuse(format!(
                            "the default {d} of {} is an expression kuaka does not translate",
                            column.name
                        )));
                    }
                };
                let declared = if dialect == Dialect::Sqlite {
                    let model = new
                        .table
                        .columns
                        .iter()
                        .find(|c| c.name == column.name)
                        .map(|c| c.data_type.clone())
                        .unwrap_or(crate::model::DataType::Text);
                    crate::engine::sqlite::declared_type(&model).to_owned()
                } else {
                    column.pg_type.clone()
                };
                sql.push_str(&format!(
                    "ALTER TABLE {} ADD COLUMN {} {declared}{}{};\n",
                    dialect.table(table),
                    quote_ident(&column.name),
                    fill.map(|f| format!(" DEFAULT {f}")).unwrap_or_default(),
                    if column.nullable { "" } else { " NOT NULL" }
                ));
            }
            Dialect::Mysql => sql.push_str(&format!(
                "ALTER TABLE {} ADD COLUMN {} {}{}{};\n",
                my_ident(table),
                my_ident(&column.name),
                column.column_type,
                if column.nullable {
                    " NULL"
                } else {
                    " NOT NULL"
                },
                default.map(|d| format!(" DEFAULT {d}")).unwrap_or_default()
            )),
        }
    }
    match target.dialect() {
        // Transactional DDL: the columns and the position move together.
        Dialect::Postgres | Dialect::Sqlite => target
            .commit(&sql, position_tail, "adding columns on the target")
            .await
            .map_err(|e| e.error)?,
        // MySQL commits DDL on its own; after a crash in between, the rerun finds the column
        // there already (error 1060) and only moves the position.
        Dialect::Mysql => {
            match target.execute(&sql, "adding columns on the target").await {
                Ok(()) => {}
                Err(Error::Mysql(e)) if e.message.contains("(error 1060)") => {}
                Err(e) => return Err(e),
            }
            target
                .commit("", position_tail, "moving the position past the DDL")
                .await
                .map_err(|e| e.error)?;
        }
    }
    let mut changed = catalog.clone();
    if let Some(t) = changed.tables.iter_mut().find(|t| t.name() == table) {
        // The new shape, with the old columns as the job has them (their --column-type).
        let mut fresh = new.clone();
        for (f, o) in fresh.columns.iter_mut().zip(&t.columns) {
            f.pg_type = o.pg_type.clone();
        }
        for (f, o) in fresh.table.columns.iter_mut().zip(&t.table.columns) {
            f.data_type = o.data_type.clone();
        }
        *t = fresh;
    }
    store.set_meta(
        "mysql_catalog",
        &serde_json::to_string(&changed)
            .map_err(|e| Error::Definite(format!("saving the catalog: {e}")))?,
    )?;
    tracing::info!(table, added, position = %cursor_text(position), "followed ADD COLUMN");
    Ok(changed)
}

/// What a statement outside a transaction asks of the target.
#[derive(Debug, PartialEq, Eq)]
enum StatementAction {
    /// It does not touch the job's tables.
    Ignore,
    /// Run this on the target (a TRUNCATE).
    Run(String),
    /// `ALTER TABLE t ADD [COLUMN] ...` only: follow it.
    AddColumns { table: String, added: usize },
}

/// Split an ALTER TABLE's clauses on top-level commas (not inside parentheses or quotes).
fn alter_clauses(text: &str) -> Vec<String> {
    let mut clauses = Vec::new();
    let (mut depth, mut quote, mut current) = (0i32, None::<char>, String::new());
    for c in text.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"' | '`') => quote = Some(c),
            (None, '(') => depth += 1,
            (None, ')') => depth -= 1,
            (None, ',') if depth == 0 => {
                clauses.push(std::mem::take(&mut current).trim().to_owned());
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    if !current.trim().is_empty() {
        clauses.push(current.trim().to_owned());
    }
    clauses
}

/// How many columns an `ALTER TABLE <name> <clauses>` adds, if adding columns is all it does
/// (`ALGORITHM=` and `LOCK=` clauses aside).
fn added_columns(clauses_text: &str) -> Option<usize> {
    let mut added = 0;
    for clause in alter_clauses(clauses_text) {
        let lower = clause.to_ascii_lowercase();
        let words: Vec<&str> = lower.split_whitespace().collect();
        match words.as_slice() {
            [w, ..] if w.starts_with("algorithm") || w.starts_with("lock") => {}
            ["add", next, ..]
                if !matches!(
                    *next,
                    "index"
                        | "key"
                        | "unique"
                        | "constraint"
                        | "primary"
                        | "foreign"
                        | "fulltext"
                        | "spatial"
                        | "partition"
                        | "check"
                        | "period"
                        | "system"
                ) && !next.starts_with('(') =>
            {
                added += 1
            }
            _ => return None,
        }
    }
    (added > 0).then_some(added)
}

/// What a statement outside a transaction means for the job: SQL to run on the target
/// (TRUNCATE), columns to add, nothing when it does not touch the job's tables, or an error for DDL that would
/// change a replicated table's shape.
fn statement_action(
    database: &str,
    shapes: &HashMap<String, Shape>,
    schema: &str,
    query: &str,
    position: &BinlogCursor,
) -> Result<StatementAction> {
    let lower = query.to_ascii_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ';')
        .filter(|w| !w.is_empty())
        .collect();
    let first = words.first().copied().unwrap_or("");
    if !matches!(first, "alter" | "create" | "drop" | "rename" | "truncate") {
        return Ok(StatementAction::Ignore);
    }
    // Objects that hold no rows (CREATE [OR REPLACE] [DEFINER=…] [ALGORITHM=…] TRIGGER/VIEW/…):
    // the rows a trigger writes arrive as row events; kuaka moves triggers at cutover.
    if first != "truncate"
        && let Some(kind) = words.iter().skip(1).take(8).find(|w| {
            matches!(
                **w,
                "table" | "index" | "trigger" | "view" | "procedure" | "function" | "event"
            )
        })
        && matches!(
            *kind,
            "trigger" | "view" | "procedure" | "function" | "event"
        )
    {
        return Ok(StatementAction::Ignore);
    }
    let db = database.to_ascii_lowercase();
    let mentioned: Vec<&Shape> = shapes
        .values()
        .filter(|s| {
            let name = s.name.to_ascii_lowercase();
            words.iter().any(|w| {
                let w = w.trim_matches('`');
                let (in_db, table) = match w.rsplit_once('.') {
                    Some((d, t)) => (d.trim_matches('`') == db, t.trim_matches('`')),
                    None => (schema.eq_ignore_ascii_case(database), w),
                };
                in_db && table == name
            })
        })
        .collect();
    if mentioned.is_empty() {
        if first == "create"
            && words.get(1) == Some(&"table")
            && schema.eq_ignore_ascii_case(database)
        {
            tracing::warn!(
                "a new table was created on the source ({}); it is not part of this job and is not copied",
                query.chars().take(120).collect::<String>()
            );
        }
        return Ok(StatementAction::Ignore);
    }
    if first == "alter" && words.get(1) == Some(&"table") && mentioned.len() == 1 {
        // The clauses after `ALTER TABLE <name>`.
        let rest = query.trim_start()[5..].trim_start()[5..].trim_start();
        let name_end = if let Some(quoted) = rest.strip_prefix('`') {
            quoted.find('`').map(|i| i + 2).unwrap_or(rest.len())
        } else {
            rest.find(char::is_whitespace).unwrap_or(rest.len())
        };
        let mut name_end = name_end;
        // `db`.`t` or db.t: skip the table part after the dot.
        while rest[name_end..].starts_with('.') {
            let after = &rest[name_end + 1..];
            name_end += 1 + if let Some(quoted) = after.strip_prefix('`') {
                quoted.find('`').map(|i| i + 2).unwrap_or(after.len())
            } else {
                after.find(char::is_whitespace).unwrap_or(after.len())
            };
        }
        if let Some(added) = added_columns(&rest[name_end..]) {
            return Ok(StatementAction::AddColumns {
                table: mentioned[0].name.clone(),
                added,
            });
        }
    }
    if first == "truncate" && mentioned.len() == 1 {
        let shape = mentioned[0];
        return Ok(StatementAction::Run(match shape.dialect {
            Dialect::Postgres => format!("TRUNCATE {};\n", shape.dialect.table(&shape.name)),
            // MySQL's TRUNCATE commits on its own; DELETE stays in the position's transaction.
            Dialect::Mysql | Dialect::Sqlite => {
                format!("DELETE FROM {};\n", shape.dialect.table(&shape.name))
            }
        }));
    }
    Err(Error::Definite(format!(
        "the source ran DDL on {} at {}: {:?}; kuaka stopped before it so the target stays consistent up to that point. Apply the same change to the target and start a new job (kuaka follows only ALTER TABLE ... ADD COLUMN and TRUNCATE by itself)",
        mentioned
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        cursor_text(position),
        query.chars().take(200).collect::<String>()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_positions_carry_the_gtid_state_beside_the_coordinates() {
        let c = BinlogCursor {
            file: "binlog.000007".into(),
            offset: 5_000_000_000,
        };
        let g = GtidState::parse("0-1-100,2-3-4").unwrap();
        let text = position_text(&c, Some(&g));
        assert_eq!(text, "binlog:binlog.000007:5000000000 gtid:0-1-100,2-3-4");
        assert_eq!(parse_cursor(&text), Some(c.clone()));
        assert_eq!(position_gtid(&text), Some(g));
        // Positions written before GTIDs were recorded still read.
        let old = position_text(&c, None);
        assert_eq!(parse_cursor(&old), Some(c));
        assert_eq!(position_gtid(&old), None);
    }

    fn shape(name: &str) -> Shape {
        Shape::for_test(name, Dialect::Postgres, vec![])
    }

    #[test]
    fn copy_fast_path_takes_only_text_postgres_reads_as_is() {
        use catalog::Kind;
        let mut out = String::new();
        assert!(copy_raw(Kind::Text, Some(b"a\tb\\c"), &mut out));
        assert!(copy_raw(Kind::Date, Some(b"2024-02-29"), &mut out));
        assert!(copy_raw(Kind::Text, None, &mut out));
        assert_eq!(out, "a\\tb\\\\c2024-02-29\\N");
        for (kind, raw) in [
            (Kind::Date, &b"0000-00-00"[..]),
            (Kind::Datetime, b"2020-00-05 10:00:00"),
            (Kind::Bool, b"1"),
            (Kind::Timestamp, b"2020-01-01 00:00:00"),
            (Kind::Text, b"nul\0byte"),
            (Kind::Binary { pad_to: None }, b"x"),
            (Kind::Json, b"{}"),
        ] {
            assert!(!copy_raw(kind, Some(raw), &mut out), "{kind:?}");
        }
    }

    #[test]
    fn ddl_on_replicated_tables_stops_and_truncate_applies() {
        let shapes: HashMap<String, Shape> =
            [("film".to_owned(), shape("film"))].into_iter().collect();
        let at = BinlogCursor {
            file: "b.000001".into(),
            offset: 99,
        };
        let action =
            |schema: &str, query: &str| statement_action("shop", &shapes, schema, query, &at);
        assert_eq!(
            action(
                "shop",
                "ALTER TABLE `film` ADD COLUMN x decimal(10,2) DEFAULT 1, ADD y int, ALGORITHM=INSTANT"
            )
            .unwrap(),
            StatementAction::AddColumns {
                table: "film".into(),
                added: 2
            }
        );
        assert_eq!(
            action("other", "ALTER TABLE shop.film ADD COLUMN z text").unwrap(),
            StatementAction::AddColumns {
                table: "film".into(),
                added: 1
            }
        );
        assert!(action("shop", "ALTER TABLE `film` ADD INDEX (v)").is_err());
        assert!(action("shop", "ALTER TABLE film ADD x int, DROP v").is_err());
        assert!(action("other", "ALTER TABLE shop.film DROP COLUMN v").is_err());
        assert_eq!(
            action("other", "ALTER TABLE film ADD x int").unwrap(),
            StatementAction::Ignore
        );
        assert_eq!(
            action("shop", "TRUNCATE TABLE `film`").unwrap(),
            StatementAction::Run("TRUNCATE public.\"film\";\n".into())
        );
        assert_eq!(
            action("shop", "CREATE TABLE t2 (a int)").unwrap(),
            StatementAction::Ignore
        );
        assert_eq!(
            action("shop", "GRANT SELECT ON film TO x").unwrap(),
            StatementAction::Ignore
        );
        // Triggers, views and routines hold no rows: a trigger on a replicated table (as
        // cutover and fallback create and drop them) does not stop the job.
        for ddl in [
            "CREATE DEFINER=`root`@`localhost` TRIGGER film_ins AFTER INSERT ON film FOR EACH ROW INSERT INTO film_log VALUES (NEW.id)",
            "DROP TRIGGER IF EXISTS `film_ins`",
            "CREATE OR REPLACE ALGORITHM=UNDEFINED DEFINER=`a`@`%` SQL SECURITY DEFINER VIEW v AS SELECT * FROM film",
            "ALTER VIEW v AS SELECT id FROM film",
        ] {
            assert_eq!(
                action("shop", ddl).unwrap(),
                StatementAction::Ignore,
                "{ddl}"
            );
        }
        assert!(action("shop", "CREATE UNIQUE INDEX i ON film (v)").is_err());
        assert!(action("shop", "DROP TABLE film").is_err());
    }
}
