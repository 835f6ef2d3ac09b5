//! The snapshot phase of a job: check → target schema (before data) → parallel chunk copy →
//! target schema (after data), each step recorded in the state store so a rerun resumes.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::{Error, Result, retry_delay};
use crate::config::{EngineKind, JobSpec, TargetExists};
use crate::engine::postgres::snapshot::{
    ChunkMarker, ChunkOutcome, ChunkRange, Chunking, CopyFormat, CopyProgress, ExportedSnapshot,
    RateLimiter, SOURCE_SESSION_SETUP, TARGET_BOOKKEEPING, TARGET_SESSION_SETUP, chunk_committed,
    committed_chunks, copy_chunk, forget_all_chunks, forget_chunks, plan_chunks,
};
use crate::engine::postgres::wire::WireConnection;
use crate::engine::postgres::{self, Context, Side, catalog, ddl};
use crate::failpoint;
use crate::model::schema::{QualifiedName, Schema, Table, quote_literal};
use crate::state::{ChunkState, StateStore, TablePlan};
use crate::ui::{Ui, human_bytes};

/// What a finished snapshot reports.
#[derive(Debug, Default)]
pub struct Summary {
    pub tables: usize,
    pub rows: u64,
    pub bytes: u64,
    /// Rows and bytes copied by this run (less than the totals after a resume).
    pub rows_this_run: u64,
    pub bytes_this_run: u64,
    pub copy_seconds: f64,
    pub total_seconds: f64,
    pub resumed: bool,
    pub already_done: bool,
    /// The whole copy saw the replication slot's snapshot: consistent as soon as it is in.
    pub exact: bool,
    /// Change capture and apply, when the job streams.
    pub stream: Option<super::cdc::StreamSummary>,
    /// The same for a job whose source is SQLite.
    pub rows_stream: Option<super::rows::RowsSummary>,
    /// The same for a job whose source is MySQL/MariaDB.
    pub mysql_stream: Option<super::mysql::MysqlSummary>,
    /// The leg ended in a cutover or fallback: the job goes on in the other direction.
    pub handoff: bool,
    /// The job was cut over to its target without reverse replication: it has ended.
    pub cut_over: bool,
}

pub async fn run(
    spec: &JobSpec,
    state_dir: &Path,
    ui: &Ui,
    cancel: &CancellationToken,
) -> Result<Summary> {
    let started = Instant::now();
    let store = Arc::new(StateStore::open_locked(state_dir)?);
    let spec_json = serde_json::to_string(spec)
        .map_err(|e| Error::Definite(format!("serialising the job: {e}")))?;
    let (job_id, resumed) = match store.job()? {
        Some(job) => {
            if job.source != spec.source.redacted() || job.target != spec.target.redacted() {
                return Err(Error::Definite(format!(
                    "state directory {} belongs to the job {} -> {}, not {} -> {}; use another --state directory",
                    state_dir.display(),
                    job.source,
                    job.target,
                    spec.source,
                    spec.target
                )));
            }
            let mut stored: serde_json::Value = serde_json::from_str(&job.spec).unwrap_or_default();
            // A job that stopped before doing anything (refused by a check) may be rerun with
            // other settings: it starts over with them.
            let untouched = job.phase == "planned"
                && store.tables()?.is_empty()
                && store.meta("capture_start")?.is_none()
                && !store.step_done("phase:pre_data")?;
            if untouched {
                store.set_job_spec(&spec_json)?;
                stored = serde_json::from_str(&spec_json).unwrap_or_default();
            }
            if stored.get("selection") != serde_json::to_value(&spec.selection).ok().as_ref() {
                return Err(Error::Definite(format!(
                    "state directory {} holds a job with a different table selection (--tables/--exclude); rerun with the original selection or use another --state directory",
                    state_dir.display()
                )));
            }
            if stored.get("snapshot_only").and_then(|v| v.as_bool()) != Some(spec.snapshot_only) {
                return Err(Error::Definite(format!(
                    "state directory {} holds a job {} --snapshot-only; rerun it the same way or use another --state directory",
                    state_dir.display(),
                    if spec.snapshot_only {
                        "started without"
                    } else {
                        "started with"
                    }
                )));
            }
            if job.phase == "done" && spec.snapshot_only {
                tracing::info!(
                    "the snapshot of this job finished at {}; nothing to do",
                    job.updated_at
                );
                return Ok(Summary {
                    already_done: true,
                    ..Summary::default()
                });
            }
            tracing::info!(phase = %job.phase, "resuming the job from its state directory");
            (job.job_id, true)
        }
        None => {
            let job_id = spec.new_job_id();
            store.create_job(
                &job_id,
                &spec.source.redacted(),
                &spec.target.redacted(),
                &spec_json,
            )?;
            (job_id, false)
        }
    };
    let run_id = store.start_run()?;
    let result = if spec.source.engine == EngineKind::Sqlite {
        super::rows::run(spec, &store, &job_id, ui, cancel).await
    } else if spec.source.engine == EngineKind::Mysql {
        super::mysql::run(spec, &store, &job_id, ui, cancel).await
    } else if spec.snapshot_only && spec.target.engine != EngineKind::Postgres {
        super::pg_mysql::snapshot(spec, &store, &job_id, ui, cancel, None).await
    } else if spec.snapshot_only {
        run_phases(spec, &store, &job_id, resumed, ui, cancel, None).await
    } else {
        super::cdc::run(spec, &store, state_dir, &job_id, resumed, ui, cancel).await
    };
    let outcome = match &result {
        Ok(_) => "ok".to_owned(),
        Err(e) => {
            let _ = store.set_job_error(&e.to_string());
            format!("error: {e}")
        }
    };
    let _ = store.finish_run(run_id, &outcome);
    let mut summary = result?;
    summary.resumed = resumed;
    summary.total_seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// The snapshot phases. With change capture, `slot_snapshot` is the replication slot's
/// snapshot on a first run (the copy then sees exactly the slot's start), and the summary
/// tells the source position after the last chunk was read.
pub(crate) async fn run_phases(
    spec: &JobSpec,
    store: &Arc<StateStore>,
    job_id: &str,
    resumed: bool,
    ui: &Ui,
    cancel: &CancellationToken,
    slot_snapshot: Option<ExportedSnapshot>,
) -> Result<Summary> {
    let source = postgres::connect(&spec.source, Side::Source, "snapshot coordinator").await?;
    let target = postgres::connect(&spec.target, Side::Target, "schema").await?;
    target
        .batch_execute(TARGET_SESSION_SETUP)
        .await
        .ctx(|| "setting up the target session".into())?;
    check_versions(&source, &target).await?;

    let from_slot = slot_snapshot.is_some();
    let snapshot = match slot_snapshot {
        Some(s) => s,
        None => ExportedSnapshot::export(source).await?,
    };
    let lsn: String = snapshot
        .client
        // A hot standby has no current WAL position of its own; use what it has replayed.
        .query_one(
            "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END::text",
            &[],
        )
        .await
        .ctx(|| "reading the source WAL position".into())?
        .get(0);
    store.set_position("snapshot_lsn", &format!("pg:{lsn}"))?;

    // The schema as the source has it now; on resume, the schema recorded at the start must
    // still describe the tables, or the copy would mix two shapes.
    let fresh = catalog::read_schema(&snapshot.client, &spec.selection).await?;
    let schema = match store.meta("schema")? {
        Some(json) => {
            let stored: Schema = serde_json::from_str(&json)
                .map_err(|e| Error::Definite(format!("reading the stored schema: {e}")))?;
            check_unchanged(&stored, &fresh)?;
            stored
        }
        None => {
            check_source(&snapshot.client, &fresh).await?;
            let json = serde_json::to_string(&fresh)
                .map_err(|e| Error::Definite(format!("serialising the schema: {e}")))?;
            store.set_meta("schema", &json)?;
            fresh
        }
    };
    for note in &schema.skipped {
        tracing::warn!("{note}");
    }
    if schema.tables.is_empty() {
        return Err(Error::Definite(format!(
            "no tables selected on {}: check --tables/--exclude (patterns are schema.table globs)",
            spec.source
        )));
    }
    for t in schema
        .tables
        .iter()
        .filter(|t| t.holds_rows() && t.primary_key.is_none())
    {
        tracing::warn!(
            table = %t.name.display_name(),
            "table {} has no primary key: it is copied whole, and after an interruption it is copied again from the start",
            t.name.display_name()
        );
    }

    // Target schema, part 1.
    if !store.step_done("phase:pre_data")? {
        create_pre_data(&target, &schema, spec, job_id, resumed).await?;
        store.mark_step("phase:pre_data", "phase")?;
        tracing::info!("target schema created (tables, types, functions, views)");
    }
    failpoint::hit("snapshot.after_schema");

    // The chunk plan, made once; a resume reuses it so finished chunks keep their meaning.
    if store.tables()?.is_empty() {
        let mut plan = Vec::new();
        for t in schema.tables.iter().filter(|t| t.holds_rows()) {
            let (chunking, ranges, rows) = plan_chunks(
                &snapshot.client,
                t,
                spec.chunk_rows,
                crate::config::DEFAULT_CHUNK_BYTES,
                crate::config::DEFAULT_CHUNK_ROWS,
            )
            .await?;
            let ranges = ranges
                .iter()
                .map(|r| serde_json::to_string(r).unwrap_or_default())
                .collect();
            plan.push(TablePlan {
                schema: t.name.schema.clone(),
                name: t.name.name.clone(),
                chunking: serde_json::to_string(&chunking).unwrap_or_default(),
                copy_format: serde_json::to_string(&CopyFormat::for_table(t)).unwrap_or_default(),
                rows_estimated: rows,
                ranges,
            });
        }
        store.save_plan(&plan)?;
        failpoint::hit("snapshot.planned");
    } else if resumed && spec.snapshot_only {
        tracing::warn!(
            "resuming a snapshot-only copy: chunks copied before the interruption come from the earlier snapshot, the rest from a new one"
        );
    }

    let copy_started = Instant::now();
    let mut snapshot = snapshot;
    let mut renewals = 0;
    let (rows, bytes) = loop {
        match copy_tables(spec, store, &schema, &snapshot, &target, job_id, ui, cancel).await {
            // The source restarted (or the connection holding the snapshot broke): resume
            // from the target's chunk markers under a new snapshot, as a rerun would.
            Err(Error::Postgres(postgres::Error::SnapshotLost { .. }))
                if renewals < MAX_SNAPSHOT_RENEWALS =>
            {
                renewals += 1;
                tracing::warn!(
                    "the source snapshot was lost (source restart?); continuing with a new snapshot: chunks copied from now on see a later instant than the ones before"
                );
                snapshot = renew_snapshot(spec, cancel).await?;
            }
            other => break other?,
        }
    };
    let copy_seconds = copy_started.elapsed().as_secs_f64();
    // All chunks are in: the exported snapshot is no longer needed.
    let _ = snapshot.client.batch_execute("COMMIT").await;
    drop(snapshot);

    failpoint::hit("snapshot.before_post_data");
    drop(target);
    create_post_data(spec, store, &schema, ui, cancel).await?;

    let target = postgres::connect(&spec.target, Side::Target, "schema").await?;
    target
        .execute(
            "UPDATE kuaka.jobs SET snapshot_done_at = now() WHERE job_id = $1",
            &[&job_id],
        )
        .await
        .ctx(|| "recording the finished snapshot on the target".into())?;
    if spec.snapshot_only {
        store.set_phase("done")?;
    }
    let tables = store.tables()?;
    Ok(Summary {
        tables: schema.tables.len(),
        rows_this_run: rows,
        bytes_this_run: bytes,
        rows: tables
            .iter()
            .map(|t| t.rows_copied as u64)
            .sum::<u64>()
            .max(rows),
        bytes: tables
            .iter()
            .map(|t| t.bytes_copied as u64)
            .sum::<u64>()
            .max(bytes),
        copy_seconds,
        exact: from_slot && renewals == 0,
        ..Summary::default()
    })
}

/// How often one run replaces a lost snapshot before giving up.
const MAX_SNAPSHOT_RENEWALS: usize = 3;

/// Connect to the source again (it may still be starting) and export a new snapshot.
async fn renew_snapshot(spec: &JobSpec, cancel: &CancellationToken) -> Result<ExportedSnapshot> {
    let mut attempt = 0;
    loop {
        let result = async {
            let client =
                postgres::connect(&spec.source, Side::Source, "snapshot coordinator").await?;
            Ok::<_, Error>(ExportedSnapshot::export(client).await?)
        }
        .await;
        match result {
            Ok(s) => return Ok(s),
            Err(e) => match retry_delay(&e, attempt) {
                Some(delay) if !cancel.is_cancelled() => {
                    attempt += 1;
                    tokio::time::sleep(delay).await;
                }
                _ => return Err(e),
            },
        }
    }
}

async fn check_versions(source: &Client, target: &Client) -> Result<()> {
    let s = postgres::server_version(source).await?;
    let t = postgres::server_version(target).await?;
    // The catalog queries use columns that appeared in PostgreSQL 13 (pg_trigger.tgparentid).
    if s < 130000 || t < 130000 {
        return Err(Error::Definite(format!(
            "kuaka needs PostgreSQL 13 or newer on both sides (source is {}, target is {}); for an older source, copy it with pg_dump into a PostgreSQL 13+ server first",
            s / 10000,
            t / 10000
        )));
    }
    if t < s {
        tracing::warn!(
            "the target server (version {}) is older than the source ({}); objects using newer features may fail to create",
            t / 10000,
            s / 10000
        );
    }
    Ok(())
}

/// Up-front checks on the source: can we read every table?
async fn check_source(client: &Client, schema: &Schema) -> Result<()> {
    let names: Vec<String> = schema
        .tables
        .iter()
        .filter(|t| t.holds_rows())
        .map(|t| t.name.to_string())
        .collect();
    let rows = client
        .query(
            "SELECT n FROM unnest($1::text[]) n WHERE NOT has_table_privilege(n, 'SELECT')",
            &[&names],
        )
        .await
        .ctx(|| "checking read privileges on the source".into())?;
    if !rows.is_empty() {
        let list: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        return Err(Error::Definite(format!(
            "the source user cannot read {} (missing SELECT privilege); GRANT SELECT on them or exclude them with --exclude",
            list.join(", ")
        )));
    }
    Ok(())
}

fn check_unchanged(stored: &Schema, fresh: &Schema) -> Result<()> {
    for t in &stored.tables {
        let Some(now) = fresh.table(&t.name) else {
            return Err(Error::Definite(format!(
                "table {} was dropped or renamed on the source since the job started; start over with a new --state directory and an empty target",
                t.name.display_name()
            )));
        };
        let shape = |t: &Table| {
            t.copied_columns()
                .map(|c| (c.name.clone(), c.native_type.clone()))
                .collect::<Vec<_>>()
        };
        if shape(t) != shape(now) {
            return Err(Error::Definite(format!(
                "the columns of table {} changed on the source since the job started (was {:?}, now {:?}); start over with a new --state directory and an empty target",
                t.name.display_name(),
                shape(t),
                shape(now)
            )));
        }
    }
    Ok(())
}

/// SQLSTATEs meaning "something this statement needs is created by a later step".
fn is_missing_dependency(code: Option<&str>) -> bool {
    matches!(
        code,
        Some("42704" | "42P01" | "42883" | "3F000" | "42703" | "42P16")
    )
}

/// SQLSTATEs meaning "an object with this name already exists".
fn is_duplicate(code: Option<&str>) -> bool {
    matches!(code, Some("42P07" | "42710" | "42723" | "42P06"))
}

/// Existing target tables that the job would create, with whether they hold rows.
async fn conflicting_tables(
    target: &Client,
    schema: &Schema,
) -> Result<Vec<(QualifiedName, bool)>> {
    let names: Vec<String> = schema.tables.iter().map(|t| t.name.to_string()).collect();
    let rows = target
        .query(
            &format!(
                "SELECT n.nspname::text, c.relname::text, c.relkind::text FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE {} = ANY($1) ORDER BY 1, 2",
                catalog::QUOTED_RELATION
            ),
            &[&names],
        )
        .await
        .ctx(|| "looking for existing tables on the target".into())?;
    let mut out = Vec::new();
    for r in &rows {
        let name = QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1));
        let has_rows = if r.get::<_, String>(2) == "r" {
            target
                .query_one(&format!("SELECT EXISTS (SELECT 1 FROM ONLY {name})"), &[])
                .await
                .ctx(|| {
                    format!(
                        "checking whether target table {} holds rows",
                        name.display_name()
                    )
                })?
                .get(0)
        } else {
            false
        };
        out.push((name, has_rows));
    }
    Ok(out)
}

/// Whether this job's schema step already committed on the target (crash after COMMIT and
/// before the state store recorded it).
async fn target_marker(target: &Client, job_id: &str) -> Result<bool> {
    let exists: bool = target
        .query_one("SELECT to_regclass('kuaka.jobs') IS NOT NULL", &[])
        .await
        .ctx(|| "looking for kuaka's bookkeeping on the target".into())?
        .get(0);
    if !exists {
        return Ok(false);
    }
    Ok(target
        .query_opt("SELECT 1 FROM kuaka.jobs WHERE job_id = $1", &[&job_id])
        .await
        .ctx(|| "reading kuaka.jobs on the target".into())?
        .is_some())
}

async fn create_pre_data(
    target: &Client,
    schema: &Schema,
    spec: &JobSpec,
    job_id: &str,
    resumed: bool,
) -> Result<()> {
    if resumed && target_marker(target, job_id).await? {
        return Ok(());
    }
    let privilege: bool = target
        .query_one(
            "SELECT has_database_privilege(current_database(), 'CREATE')",
            &[],
        )
        .await
        .ctx(|| "checking privileges on the target".into())?
        .get(0);
    if !privilege {
        return Err(Error::Definite(format!(
            "the target user {} cannot create schemas in database {} (missing CREATE privilege); GRANT CREATE ON DATABASE {} TO {}",
            spec.target.user, spec.target.database, spec.target.database, spec.target.user
        )));
    }
    let conflicts = conflicting_tables(target, schema).await?;
    if !conflicts.is_empty() && spec.target_exists == TargetExists::Error {
        let list: Vec<String> = conflicts
            .iter()
            .map(|(n, rows)| {
                format!(
                    "{}{}",
                    n.display_name(),
                    if *rows { " (has rows)" } else { " (empty)" }
                )
            })
            .collect();
        return Err(Error::Definite(format!(
            "the target already has {} of the tables to copy: {}; nothing was written. Use --target-exists drop to replace them, --target-exists truncate to keep their definitions and reload them, or an empty target database",
            conflicts.len(),
            list.join(", ")
        )));
    }
    let keep: Vec<QualifiedName> = if spec.target_exists == TargetExists::Truncate {
        conflicts.iter().map(|(n, _)| n.clone()).collect()
    } else {
        Vec::new()
    };

    // One transaction: the target gets the whole schema or none of it.
    target
        .batch_execute("BEGIN")
        .await
        .ctx(|| "starting the schema transaction".into())?;
    let result = async {
        target.batch_execute(TARGET_BOOKKEEPING).await.ctx(|| "creating kuaka's bookkeeping schema on the target".into())?;
        // The schema is being (re)created: no chunk of this job is on the target.
        forget_all_chunks(target, job_id).await?;
        let mut pending: VecDeque<ddl::DdlStep> = ddl::pre_data(schema).into();
        if !keep.is_empty() {
            pending.retain(|s| !(s.kind == ddl::ObjectKind::Table && keep.iter().any(|k| s.key == format!("table:{k}"))));
            for k in &keep {
                let t = schema.table(k).expect("conflicts come from the schema");
                check_kept_columns(target, t).await?;
                if t.holds_rows() {
                    target.batch_execute(&format!("TRUNCATE ONLY {k}")).await.ctx(|| format!("emptying {}", k.display_name()))?;
                }
            }
        }
        let mut waiting: Vec<(ddl::DdlStep, String)> = Vec::new();
        let mut deferred_views = false;
        loop {
            let mut progressed = false;
            while let Some(step) = pending.pop_front() {
                match exec_in_savepoint(target, &step.sql).await {
                    Ok(()) => progressed = true,
                    // 42803: a view grouping by a primary key, which is built after the data;
                    // the post-data phase creates it.
                    Err(e) if step.kind == ddl::ObjectKind::View && e.sqlstate() == Some("42803") => {
                        tracing::debug!(object = %step.object, "deferred until the keys exist");
                        deferred_views = true;
                        progressed = true
                    }
                    Err(e) if is_missing_dependency(e.sqlstate()) => waiting.push((step, e.to_string())),
                    Err(e) if is_duplicate(e.sqlstate()) => match (spec.target_exists, &step.drop_sql) {
                        (TargetExists::Drop, Some(drop)) => {
                            exec_in_savepoint(target, drop).await?;
                            exec_in_savepoint(target, &step.sql).await.map_err(|e| {
                                Error::Definite(format!("creating {} on the target failed: {e}", step.object))
                            })?;
                            progressed = true;
                        }
                        (TargetExists::Truncate, _) => progressed = true,
                        _ if matches!(step.kind, ddl::ObjectKind::Schema | ddl::ObjectKind::Extension) => progressed = true,
                        _ => {
                            return Err(Error::Definite(format!(
                                "{} already exists on the target; nothing was written. Use --target-exists drop to replace existing objects or an empty target database",
                                step.object
                            )));
                        }
                    },
                    Err(e) => {
                        return Err(Error::Definite(format!(
                            "creating {} on the target failed: {e}; nothing was written",
                            step.object
                        )));
                    }
                }
            }
            if waiting.is_empty() {
                break;
            }
            // Views waiting on a deferred view are created after the data with it.
            if !progressed && deferred_views && waiting.iter().all(|(s, _)| s.kind == ddl::ObjectKind::View) {
                for (step, _) in &waiting {
                    tracing::debug!(object = %step.object, "deferred with the views it depends on");
                }
                break;
            }
            if !progressed {
                let (unresolved, others): (Vec<_>, Vec<_>) = waiting.into_iter().partition(|(s, _)| {
                    !(spec.selection.is_filtered() && matches!(s.kind, ddl::ObjectKind::View | ddl::ObjectKind::Comment))
                });
                for (step, e) in &others {
                    tracing::warn!("{} is not created: it depends on objects outside the selected tables ({e})", step.object);
                }
                if let Some((step, e)) = unresolved.first() {
                    return Err(Error::Definite(format!(
                        "creating {} on the target failed: {e}; nothing was written",
                        step.object
                    )));
                }
                break;
            }
            pending = waiting.drain(..).map(|(s, _)| s).collect();
        }
        target
            .execute(
                "INSERT INTO kuaka.jobs (job_id, source) VALUES ($1, $2) ON CONFLICT (job_id) DO UPDATE SET source = excluded.source",
                &[&job_id, &spec.source.redacted()],
            )
            .await
            .ctx(|| "recording the job on the target".into())?;
        Ok::<_, Error>(())
    }
    .await;
    match result {
        Ok(()) => Ok(target
            .batch_execute("COMMIT")
            .await
            .ctx(|| "committing the target schema".into())?),
        Err(e) => {
            let _ = target.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

async fn check_kept_columns(target: &Client, table: &Table) -> Result<()> {
    let rows = target
        .query(
            "SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped",
            &[&table.name.to_string()],
        )
        .await
        .ctx(|| format!("reading the columns of target table {}", table.name.display_name()))?;
    let have: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let missing: Vec<&str> = table
        .copied_columns()
        .map(|c| c.name.as_str())
        .filter(|c| !have.iter().any(|h| h == c))
        .collect();
    if !missing.is_empty() {
        return Err(Error::Definite(format!(
            "target table {} lacks the source's columns {}; --target-exists truncate needs compatible tables (use --target-exists drop instead)",
            table.name.display_name(),
            missing.join(", ")
        )));
    }
    Ok(())
}

async fn exec_in_savepoint(client: &Client, sql: &str) -> postgres::Result<()> {
    client
        .batch_execute("SAVEPOINT kuaka_step")
        .await
        .ctx(|| "savepoint".into())?;
    match client.batch_execute(sql).await {
        Ok(()) => client
            .batch_execute("RELEASE SAVEPOINT kuaka_step")
            .await
            .ctx(|| "release savepoint".into()),
        Err(e) => {
            let err = postgres::Error::query("executing DDL", e);
            client
                .batch_execute("ROLLBACK TO SAVEPOINT kuaka_step")
                .await
                .ctx(|| "rollback to savepoint".into())?;
            Err(err)
        }
    }
}

struct ChunkTask {
    table_index: usize,
    table_id: i64,
    chunk_no: i64,
    chunking: Chunking,
    format: CopyFormat,
    range: ChunkRange,
    marker: ChunkMarker,
}

struct TableRun {
    progress: Arc<crate::ui::TableProgress>,
    /// Exact rows and bytes of the chunks this run committed.
    rows_this_run: AtomicU64,
    bytes_this_run: AtomicU64,
    chunks_left: std::sync::atomic::AtomicI64,
    table_id: i64,
    name: String,
}

/// Copy every pending chunk with `spec.jobs` workers. Returns rows and bytes copied in this run.
#[allow(clippy::too_many_arguments)]
async fn copy_tables(
    spec: &JobSpec,
    store: &Arc<StateStore>,
    schema: &Schema,
    snapshot: &ExportedSnapshot,
    target: &Client,
    job_id: &str,
    ui: &Ui,
    cancel: &CancellationToken,
) -> Result<(u64, u64)> {
    let records = store.tables()?;
    let committed = committed_chunks(target, job_id).await?;
    let by_name: HashMap<(String, String), usize> = schema
        .tables
        .iter()
        .enumerate()
        .map(|(i, t)| ((t.name.schema.clone(), t.name.name.clone()), i))
        .collect();
    let mut queue: Vec<(i64, ChunkTask)> = Vec::new();
    let mut runs: HashMap<i64, Arc<TableRun>> = HashMap::new();
    for rec in &records {
        let Some(&index) = by_name.get(&(rec.schema.clone(), rec.name.clone())) else {
            continue;
        };
        let table = &schema.tables[index];
        let chunking: Chunking = serde_json::from_str(&rec.chunking).map_err(|e| {
            Error::Definite(format!(
                "reading the stored plan of {}: {e}",
                table.name.display_name()
            ))
        })?;
        let format: CopyFormat = serde_json::from_str(&rec.copy_format).map_err(|e| {
            Error::Definite(format!(
                "reading the stored plan of {}: {e}",
                table.name.display_name()
            ))
        })?;
        let mut chunks = store.chunks(rec.id)?;
        // Quoted: `"a.b"."c"` and `"a"."b.c"` must not share markers.
        let table_key = table.name.to_string();
        // The target is the record of what committed; the state store may be behind (a crash
        // between COMMIT and its update) or ahead (a target that lost commits).
        for c in chunks.iter_mut() {
            match (c.state, committed.get(&(table_key.clone(), c.chunk_no))) {
                (ChunkState::Done, Some(_)) => {}
                (_, Some(&rows)) => {
                    store.set_chunk_state(rec.id, c.chunk_no, ChunkState::Done, rows, 0)?;
                    c.state = ChunkState::Done;
                }
                (ChunkState::Pending, None) => {}
                (_, None) => {
                    store.set_chunk_state(rec.id, c.chunk_no, ChunkState::Pending, 0, 0)?;
                    c.state = ChunkState::Pending;
                }
            }
        }
        if chunks.iter().all(|c| c.state == ChunkState::Done) {
            continue;
        }
        // Without a key, rows cannot be matched to chunks across snapshots (an update moves a
        // row to another page): a partly copied table starts over.
        if matches!(chunking, Chunking::Pages) && chunks.iter().any(|c| c.state == ChunkState::Done)
        {
            tracing::info!(table = %table_key, "copying the interrupted table {table_key} again from the start");
            target
                .batch_execute("BEGIN")
                .await
                .ctx(|| "starting a reset".into())?;
            target
                .batch_execute(&format!("TRUNCATE ONLY {}", table.name))
                .await
                .ctx(|| format!("emptying {table_key} on the target"))?;
            forget_chunks(target, job_id, &table_key).await?;
            target
                .batch_execute("COMMIT")
                .await
                .ctx(|| format!("emptying {table_key} on the target"))?;
            store.reset_table_chunks(rec.id)?;
            chunks = store.chunks(rec.id)?;
        }
        let pending: Vec<_> = chunks
            .iter()
            .filter(|c| c.state != ChunkState::Done)
            .collect();
        let (rows_done, bytes_done) = (
            rec.rows_copied.max(0) as u64,
            rec.bytes_copied.max(0) as u64,
        );
        let label = table.name.display_name();
        let run = Arc::new(TableRun {
            progress: ui.table(
                &label,
                rec.rows_estimated.max(0) as u64,
                rows_done,
                bytes_done,
            ),
            rows_this_run: AtomicU64::new(0),
            bytes_this_run: AtomicU64::new(0),
            chunks_left: std::sync::atomic::AtomicI64::new(pending.len() as i64),
            table_id: rec.id,
            name: label,
        });
        runs.insert(rec.id, run);
        store.set_table_state(rec.id, "copying", None)?;
        for c in pending {
            let range: ChunkRange = serde_json::from_str(&c.range).map_err(|e| {
                Error::Definite(format!(
                    "reading the stored plan of {}: {e}",
                    table.name.display_name()
                ))
            })?;
            queue.push((
                table.estimated_bytes,
                ChunkTask {
                    table_index: index,
                    table_id: rec.id,
                    chunk_no: c.chunk_no,
                    chunking: chunking.clone(),
                    format,
                    range,
                    marker: ChunkMarker {
                        job_id: job_id.to_owned(),
                        table: table_key.clone(),
                        chunk_no: c.chunk_no,
                    },
                },
            ));
        }
    }
    // Biggest tables first so the long pole starts early; a table's chunks stay together.
    queue.sort_by(|a, b| {
        b.0.cmp(&a.0)
            .then(a.1.table_id.cmp(&b.1.table_id))
            .then(a.1.chunk_no.cmp(&b.1.chunk_no))
    });
    let total_chunks = queue.len();
    if total_chunks == 0 {
        return Ok((0, 0));
    }
    tracing::info!(
        chunks = total_chunks,
        tables = runs.len(),
        jobs = spec.jobs,
        "copying data"
    );
    let queue = Arc::new(std::sync::Mutex::new(
        queue.into_iter().map(|(_, t)| t).collect::<VecDeque<_>>(),
    ));
    let limiter = spec.max_rows_per_sec.map(RateLimiter::new);
    let schema = Arc::new(schema.clone());
    let runs = Arc::new(runs);
    let workers = spec.jobs.min(total_chunks).max(1);
    let mut set = JoinSet::new();
    let stop = cancel.child_token();
    let ticker = (!ui.has_bars()).then(|| spawn_ticker(runs.clone(), stop.clone()));
    for worker in 0..workers {
        let (spec, store, schema, runs, queue, limiter, stop) = (
            spec.clone(),
            store.clone(),
            schema.clone(),
            runs.clone(),
            queue.clone(),
            limiter.clone(),
            stop.clone(),
        );
        let snapshot_id = snapshot.id.clone();
        set.spawn(async move {
            tokio::select! {
                r = worker_loop(worker, &spec, &store, &schema, &runs, &queue, &snapshot_id, limiter.as_deref()) => r,
                _ = stop.cancelled() => Err(Error::Interrupted),
            }
        });
    }
    let mut first_error: Option<Error> = None;
    while let Some(joined) = set.join_next().await {
        let result =
            joined.unwrap_or_else(|e| Err(Error::Definite(format!("a copy worker failed: {e}"))));
        if let Err(e) = result
            && first_error.is_none()
        {
            stop.cancel();
            first_error = Some(e);
        }
    }
    stop.cancel();
    if let Some(t) = ticker {
        let _ = t.await;
    }
    if let Some(e) = first_error {
        return Err(if cancel.is_cancelled() {
            Error::Interrupted
        } else {
            e
        });
    }
    let rows = runs
        .values()
        .map(|r| r.rows_this_run.load(Ordering::Relaxed))
        .sum();
    let bytes = runs
        .values()
        .map(|r| r.bytes_this_run.load(Ordering::Relaxed))
        .sum();
    Ok((rows, bytes))
}

fn spawn_ticker(
    runs: Arc<HashMap<i64, Arc<TableRun>>>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let started = Instant::now();
        let mut interval = tokio::time::interval(Duration::from_secs(5));
        interval.tick().await;
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = stop.cancelled() => return,
            }
            let rows: u64 = runs
                .values()
                .map(|r| r.progress.rows.load(Ordering::Relaxed))
                .sum();
            let bytes: u64 = runs
                .values()
                .map(|r| r.progress.bytes.load(Ordering::Relaxed))
                .sum();
            let left = runs
                .values()
                .filter(|r| r.chunks_left.load(Ordering::Relaxed) > 0)
                .count();
            let secs = started.elapsed().as_secs_f64().max(0.001);
            tracing::info!(
                "copying: {left} of {} tables in progress, {rows} rows, {} ({:.0} rows/s, {}/s)",
                runs.len(),
                human_bytes(bytes),
                rows as f64 / secs,
                human_bytes((bytes as f64 / secs) as u64)
            );
        }
    })
}

/// Counts one chunk's rows while forwarding them to its table's display, so a chunk's live
/// estimate can be replaced by its exact count even when several chunks of a table run at once.
struct ChunkCounter<'a> {
    table: &'a crate::ui::TableProgress,
    rows: AtomicU64,
}

impl CopyProgress for ChunkCounter<'_> {
    fn add(&self, rows: u64, bytes: u64) {
        self.rows.fetch_add(rows, Ordering::Relaxed);
        self.table.add(rows, bytes);
    }
}

/// A worker's pair of wire connections (the data path; see `engine::postgres::wire`).
async fn open_worker_connections(
    spec: &JobSpec,
    worker: usize,
) -> Result<(WireConnection, WireConnection)> {
    let role = format!("copy {worker}");
    let mut source = WireConnection::connect(&spec.source, Side::Source, &role).await?;
    source
        .simple_query(SOURCE_SESSION_SETUP, "setting up a source session")
        .await?;
    let mut target = WireConnection::connect(&spec.target, Side::Target, &role).await?;
    target
        .simple_query(TARGET_SESSION_SETUP, "setting up a target session")
        .await?;
    Ok((source, target))
}

#[allow(clippy::too_many_arguments)]
async fn worker_loop(
    worker: usize,
    spec: &JobSpec,
    store: &StateStore,
    schema: &Schema,
    runs: &HashMap<i64, Arc<TableRun>>,
    queue: &std::sync::Mutex<VecDeque<ChunkTask>>,
    snapshot_id: &str,
    limiter: Option<&RateLimiter>,
) -> Result<()> {
    let mut connections = Some(open_worker_connections(spec, worker).await?);
    loop {
        let Some(task) = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front() else {
            return Ok(());
        };
        let table = &schema.tables[task.table_index];
        let run = &runs[&task.table_id];
        let mut attempt = 0;
        let outcome = loop {
            let attempt_result: Result<ChunkOutcome> = async {
                if connections.is_none() {
                    connections = Some(open_worker_connections(spec, worker).await?);
                }
                let (source, target) = connections.as_mut().expect("connected above");
                // A failed attempt may have died after its COMMIT reached the target.
                if attempt > 0
                    && let Some(rows) = chunk_committed(target, &task.marker).await?
                {
                    return Ok(ChunkOutcome {
                        rows: rows as u64,
                        bytes: 0,
                    });
                }
                store.set_chunk_state(task.table_id, task.chunk_no, ChunkState::Started, 0, 0)?;
                let counter = ChunkCounter {
                    table: run.progress.as_ref(),
                    rows: AtomicU64::new(0),
                };
                let result = copy_chunk(
                    source,
                    target,
                    snapshot_id,
                    table,
                    task.format,
                    &task.chunking,
                    &task.range,
                    &task.marker,
                    limiter,
                    &counter,
                    &|| failpoint::hit("snapshot.chunk.before_commit"),
                )
                .await;
                // Replace the live estimate of this chunk's rows with the exact count (or zero).
                let counted = counter.rows.load(Ordering::Relaxed);
                let exact = result.as_ref().map(|o| o.rows).unwrap_or(0);
                run.progress.correct(counted, exact);
                Ok(result?)
            }
            .await;
            match attempt_result {
                Ok(outcome) => break outcome,
                Err(e) => match retry_delay(&e, attempt) {
                    Some(delay) => {
                        tracing::warn!(table = %run.name, "copying a chunk of {} failed ({e}); retrying in {delay:?}", run.name);
                        attempt += 1;
                        connections = None;
                        tokio::time::sleep(delay).await;
                    }
                    None if matches!(e, Error::Postgres(postgres::Error::SnapshotLost { .. })) => {
                        return Err(e);
                    }
                    None => {
                        let message = format!("copying {} failed: {e}", run.name);
                        store.set_table_state(run.table_id, "failed", Some(&message))?;
                        return Err(Error::Definite(message));
                    }
                },
            }
        };
        failpoint::hit("snapshot.chunk.after_commit");
        run.rows_this_run.fetch_add(outcome.rows, Ordering::Relaxed);
        run.bytes_this_run
            .fetch_add(outcome.bytes, Ordering::Relaxed);
        store.set_chunk_state(
            task.table_id,
            task.chunk_no,
            ChunkState::Done,
            outcome.rows as i64,
            outcome.bytes as i64,
        )?;
        if run.chunks_left.fetch_sub(1, Ordering::SeqCst) == 1 {
            store.set_table_state(run.table_id, "copied", None)?;
            run.progress.finish();
            if let Some(rec) = store.tables()?.into_iter().find(|t| t.id == run.table_id) {
                tracing::info!(
                    table = %run.name,
                    "copied {}: {} rows, {} in {:.1}s",
                    run.name,
                    rec.rows_copied,
                    human_bytes(rec.bytes_copied.max(0) as u64),
                    run.progress.elapsed().as_secs_f64()
                );
            }
        }
    }
}

async fn create_post_data(
    spec: &JobSpec,
    store: &StateStore,
    schema: &Schema,
    ui: &Ui,
    cancel: &CancellationToken,
) -> Result<()> {
    let phases = ddl::post_data(schema);
    let total: usize = phases.iter().map(|p| p.steps.len()).sum();
    let mut todo = Vec::new();
    for phase in phases {
        let mut steps = Vec::new();
        for step in phase.steps {
            if !store.step_done(&step.key)? {
                steps.push(step);
            }
        }
        todo.push((steps, phase.parallel));
    }
    let remaining: usize = todo.iter().map(|p| p.0.len()).sum();
    if remaining == 0 {
        return Ok(());
    }
    tracing::info!(
        "creating indexes, constraints, triggers and materialized views ({remaining} of {total} steps)"
    );
    let bar = ui.steps("indexes & constraints", total as u64);
    if let Some(b) = &bar {
        b.set_position((total - remaining) as u64);
    }
    // Fresh connections: the one that created the schema may have died with a target restart
    // during the copy, which the copy workers survived by reconnecting.
    let mut clients = vec![];
    let workers = spec.jobs.max(1);
    for i in 0..workers {
        let c = postgres::connect(&spec.target, Side::Target, &format!("index {i}")).await?;
        let client_ref = &c;
        client_ref
            .batch_execute(TARGET_SESSION_SETUP)
            .await
            .ctx(|| "setting up a target session".into())?;
        client_ref
            .batch_execute(&format!(
                "SET maintenance_work_mem = {}",
                quote_literal(&spec.index_memory)
            ))
            .await
            .ctx(|| "setting maintenance_work_mem on the target".into())?;
        clients.push(c);
    }
    let clients: Vec<&Client> = clients.iter().collect();
    for (steps, parallel) in todo {
        let parallel = if parallel { clients.len() } else { 1 };
        let queue = std::sync::Mutex::new(VecDeque::from(steps));
        let work = clients.iter().take(parallel).map(|client| async {
            loop {
                if cancel.is_cancelled() {
                    return Err(Error::Interrupted);
                }
                let Some(step) = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front() else {
                    return Ok(());
                };
                let started = Instant::now();
                let mut attempt = 0;
                loop {
                    match client.batch_execute(&step.sql).await {
                        Ok(()) => break,
                        Err(e) => {
                            let e = postgres::Error::query(format!("creating {} on the target", step.object), e);
                            if is_duplicate(e.sqlstate()) {
                                break;
                            }
                            // With --tables/--exclude, a view may need a table left out.
                            if spec.selection.is_filtered()
                                && is_missing_dependency(e.sqlstate())
                                && matches!(
                                    step.kind,
                                    ddl::ObjectKind::View | ddl::ObjectKind::MaterializedView | ddl::ObjectKind::Comment
                                )
                            {
                                tracing::warn!(
                                    "{} is not created: it depends on objects outside the selected tables ({e})",
                                    step.object
                                );
                                break;
                            }
                            let e = Error::from(e);
                            match retry_delay(&e, attempt) {
                                Some(delay) if e.to_string().contains("deadlock") => {
                                    attempt += 1;
                                    tokio::time::sleep(delay).await;
                                }
                                _ => return Err(e),
                            }
                        }
                    }
                }
                store.mark_step(&step.key, "post_data")?;
                tracing::debug!(object = %step.object, seconds = started.elapsed().as_secs_f64(), "created");
                if let Some(b) = &bar {
                    b.inc(1);
                }
                failpoint::hit("snapshot.post_data.after_step");
            }
        });
        let results = futures_util::future::join_all(work).await;
        for r in results {
            r?;
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(())
}
