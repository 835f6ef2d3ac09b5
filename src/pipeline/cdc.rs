//! A streaming job: capture first (slot and publication, position P0), snapshot under the
//! slot's own snapshot, then apply the change log to the target from P0, exactly once, until
//! stopped or (with `--until caught-up`) until the target holds every change committed before
//! the moment it caught up.
//!
//! Phases in the state store: `snapshot` → `catching_up` (the target is not yet consistent:
//! apply has not passed P1) → `streaming`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::snapshot::{Summary, run_phases};
use super::{Error, Result, cutover};
use crate::changelog::{self, ChangeLog, LogEnd, LogReader, RecordKind};
use crate::config::{ApplyMode, Endpoint, JobSpec, Until};
use crate::engine::ErrorClass;
use crate::engine::postgres::apply::{self, ApplyProgress, Batch, Relation, RowChange};
use crate::engine::postgres::capture::{self, Capture, CaptureProgress, KuakaRecord, Shapes};
use crate::engine::postgres::decode::PgOutput;
use crate::engine::postgres::replication::ReplicationConnection;
use crate::engine::postgres::snapshot::ExportedSnapshot;
use crate::engine::postgres::{self, Side, catalog};
use crate::failpoint;
use crate::model::PgLsn;
use crate::model::schema::QualifiedName;
use crate::state::StateStore;
use crate::ui::Ui;

/// A batch stops growing at this many changes or this much time (at a transaction boundary):
/// with a backlog, batches are big; caught up, each transaction goes alone at once.
const MAX_BATCH_CHANGES: usize = 50_000;
const MAX_BATCH_TIME: Duration = Duration::from_millis(500);
/// Execute the SQL of an open batch once it is this big (a huge source transaction streams
/// into one target transaction without being held in memory).
const MAX_PENDING_SQL: usize = 4 << 20;

/// What the streaming part of a run did.
#[derive(Debug, Default, Clone)]
pub struct StreamSummary {
    pub p0: PgLsn,
    pub p1: PgLsn,
    pub applied: PgLsn,
    pub transactions: u64,
    pub changes: u64,
    pub caught_up: bool,
}

/// Where the job's change log lives.
pub fn log_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("changes")
}

pub async fn run(
    spec: &JobSpec,
    store: &Arc<StateStore>,
    state_dir: &Path,
    job_id: &str,
    resumed: bool,
    ui: &Ui,
    cancel: &CancellationToken,
) -> Result<Summary> {
    // A cutover or fallback turns the job around; each turn is a leg with its own streams.
    let leg = Leg {
        job: spec,
        state_dir,
        main: store,
        base_job: job_id,
        reverse: false,
    };
    cutover::run_legs(
        spec,
        store,
        state_dir,
        job_id,
        async || run_leg(spec, store, state_dir, job_id, resumed, ui, cancel, &leg).await,
        async || run_reverse(spec, store, state_dir, job_id, ui, cancel).await,
    )
    .await
}

/// The job after a cutover: the target's changes streamed back to the source until a
/// fallback (the summary then says `handoff`) or a stop.
pub(super) async fn run_reverse(
    spec: &JobSpec,
    store: &Arc<StateStore>,
    state_dir: &Path,
    job_id: &str,
    ui: &Ui,
    cancel: &CancellationToken,
) -> Result<Summary> {
    let n = cutover::cutovers(store).max(1);
    let dir = cutover::reverse_dir(state_dir, n);
    let leg_store = Arc::new(StateStore::open_locked(&dir)?);
    let reverse = cutover::reverse_spec(spec, store);
    let leg = Leg {
        job: spec,
        state_dir,
        main: store,
        base_job: job_id,
        reverse: true,
    };
    tracing::info!("the job is cut over: streaming the target's changes back to the source");
    run_leg(
        &reverse,
        &leg_store,
        &dir,
        &cutover::reverse_job_id(job_id, n),
        true,
        ui,
        cancel,
        &leg,
    )
    .await
}

/// One direction of a job.
pub(crate) struct Leg<'a> {
    /// The job as the user started it (source → target), whichever way this leg streams.
    job: &'a JobSpec,
    /// The job's state directory: cutover requests and progress live there.
    state_dir: &'a Path,
    main: &'a Arc<StateStore>,
    base_job: &'a str,
    /// Target → source, after a cutover.
    reverse: bool,
}

/// How a leg's supervision ended.
enum Outcome {
    Stopped,
    CaughtUp,
    Handoff(cutover::Request),
}

#[allow(clippy::too_many_arguments)]
async fn run_leg(
    spec: &JobSpec,
    store: &Arc<StateStore>,
    state_dir: &Path,
    job_id: &str,
    resumed: bool,
    ui: &Ui,
    cancel: &CancellationToken,
    leg: &Leg<'_>,
) -> Result<Summary> {
    let slot = capture::slot_name(job_id);
    let publication = capture::publication_name(job_id);
    // MySQL/MariaDB or SQLite: rows rendered from the model (see `pg_mysql`).
    let to_mysql = spec.target.engine != crate::config::EngineKind::Postgres;
    let source = postgres::connect(&spec.source, Side::Source, "capture setup").await?;

    let (p0, slot_snapshot) = match store.meta("capture_start")? {
        Some(p) => {
            capture::check_slot(&source, &slot, &p).await?;
            let p0: PgLsn = p.parse().map_err(|_| {
                Error::Definite(format!("unreadable capture start {p:?} in the state store"))
            })?;
            (p0, None)
        }
        None => {
            let schema = catalog::read_schema(&source, &spec.selection).await?;
            if schema.tables.is_empty() {
                return Err(Error::Definite(format!(
                    "no tables selected on {}: check --tables/--exclude (patterns are schema.table globs)",
                    spec.source
                )));
            }
            capture::preflight(&source, &schema).await?;
            store.set_meta("slot", &slot)?;
            store.set_meta("publication", &publication)?;
            capture::ensure_publication(&source, &publication, &schema).await?;
            let shapes = capture::read_shapes(&source, &schema).await?;
            store.set_meta(
                "shapes",
                &serde_json::to_string(&shapes).unwrap_or_default(),
            )?;
            // A slot left by a run that died before recording its start is useless (its
            // snapshot is gone): make a new one.
            if capture::slot_status(&source, &slot).await?.is_some() {
                capture::drop_slot_and_publication(&source, &slot, "")
                    .await
                    .ok();
            }
            let mut repl = ReplicationConnection::connect(&spec.source, "capture setup").await?;
            let created = repl.create_slot(&slot, false, true).await?;
            let id = created.snapshot.clone().ok_or_else(|| {
                Error::Definite("the source did not export a snapshot with the slot".into())
            })?;
            let coordinator =
                postgres::connect(&spec.source, Side::Source, "snapshot coordinator").await?;
            let snapshot = ExportedSnapshot::import(coordinator, &id).await?;
            drop(repl);
            store.set_meta("capture_start", &created.consistent_point.to_string())?;
            store.set_position("p0", &format!("pg:{}", created.consistent_point))?;
            tracing::info!(slot = %slot, p0 = %created.consistent_point, "replication slot created; changes from here on are captured");
            (created.consistent_point, Some(snapshot))
        }
    };
    let streaming = postgres::server_version(&source).await? >= 140_000;
    drop(source);
    let shapes: Shapes = store
        .meta("shapes")?
        .and_then(|j| serde_json::from_str(&j).ok())
        .unwrap_or_default();

    // Capture runs from now on, through the snapshot, spooling to the change log.
    let dir = log_dir(state_dir);
    let log = ChangeLog::open(&dir, p0.0, changelog::SEGMENT_BYTES)
        .map_err(|e| Error::Definite(e.to_string()))?;
    let log_end = log.subscribe();
    let capture_progress = Arc::new(CaptureProgress::default());
    capture_progress
        .last_commit
        .store(log.last_commit(), Ordering::Relaxed);
    let stop = cancel.child_token();
    let store_for_shapes = store.clone();
    let capture = Capture {
        endpoint: spec.source.clone(),
        slot: slot.clone(),
        publication,
        shapes,
        on_shapes: Box::new(move |shapes| {
            if let Err(e) = store_for_shapes
                .set_meta("shapes", &serde_json::to_string(shapes).unwrap_or_default())
            {
                tracing::warn!("saving table shapes: {e}");
            }
        }),
        progress: capture_progress.clone(),
        streaming,
        skip_origin_prefix: Some(cutover::origin_prefix(leg.base_job)),
    };
    let capture_stop = stop.clone();
    let mut capture_task: JoinHandle<Result<()>> =
        tokio::spawn(async move { capture.run(log, capture_stop).await.map_err(Error::from) });

    // The snapshot, unless an earlier run finished it.
    let mut summary = Summary::default();
    let p1 = match store.meta("capture_p1")? {
        Some(p) => p.parse().unwrap_or(p0),
        None => {
            store.set_phase("snapshot")?;
            let snap = async {
                if to_mysql {
                    super::pg_mysql::snapshot(spec, store, job_id, ui, cancel, slot_snapshot).await
                } else {
                    run_phases(spec, store, job_id, resumed, ui, cancel, slot_snapshot).await
                }
            };
            tokio::pin!(snap);
            let result = tokio::select! {
                r = &mut snap => r,
                r = &mut capture_task => {
                    stop.cancel();
                    return Err(join_error(r).err().unwrap_or_else(|| Error::Definite("change capture stopped during the snapshot".into())));
                }
            };
            let s = match result {
                Ok(s) => s,
                Err(e) => {
                    stop.cancel();
                    let _ = capture_task.await;
                    return Err(e);
                }
            };
            if let Err(e) = copied_tables_are_published(store) {
                stop.cancel();
                let _ = capture_task.await;
                return Err(e);
            }
            // Not exact: consistent once every change committed before the copy ended is
            // applied; a barrier taken now is past all of them.
            let p1 = if s.exact {
                p0
            } else {
                let client = postgres::connect(&spec.source, Side::Source, "position").await?;
                capture::commit_barrier(&client).await?.max(p0)
            };
            store.set_meta("capture_p1", &p1.to_string())?;
            store.set_position("p1", &format!("pg:{p1}"))?;
            summary = s;
            p1
        }
    };
    if cancel.is_cancelled() {
        stop.cancel();
        let _ = capture_task.await;
        return Err(Error::Interrupted);
    }
    let phase = store.job()?.map(|j| j.phase).unwrap_or_default();
    if phase != "streaming" {
        store.set_phase("catching_up")?;
    }
    tracing::info!(p0 = %p0, p1 = %p1, mode = ?spec.apply_mode, "applying captured changes to the target");

    // The apply mode is fixed for the life of the job: per-key workers own positions of the
    // keys routed to them, and another count or mode would route keys elsewhere.
    let mode = match spec.apply_mode {
        ApplyMode::Transactional => "transactional".to_owned(),
        ApplyMode::PerKey => format!("per-key:{}", spec.apply_workers.max(1)),
    };
    match store.meta("apply_mode")? {
        Some(stored) if stored != mode => {
            stop.cancel();
            let _ = capture_task.await;
            let shown = stored.replace(':', " with --apply-workers ");
            return Err(Error::Definite(format!(
                "this job applies changes with --apply-mode {shown}; the apply mode and worker count cannot change during a job (rerun with them, or start a new job)"
            )));
        }
        Some(_) => {}
        None => store.set_meta("apply_mode", &mode)?,
    }
    let apply_progress = Arc::new(ApplyProgress::default());
    let out_tables = if to_mysql {
        let schema: crate::model::schema::Schema = store
            .meta("schema")?
            .and_then(|j| serde_json::from_str(&j).ok())
            .ok_or_else(|| {
                Error::Definite("the job's schema is missing from the state store".into())
            })?;
        Some(Arc::new(super::pg_mysql::apply_tables(&schema)?))
    } else {
        None
    };
    let ctx = ApplyContext {
        out_tables,
        target: spec.target.clone(),
        job_id: job_id.to_owned(),
        dir: dir.clone(),
        log_end,
        p0,
        progress: apply_progress.clone(),
        workers: match spec.apply_mode {
            ApplyMode::Transactional => 1,
            ApplyMode::PerKey => spec.apply_workers.max(1),
        },
        origin: leg.reverse.then(|| format!("kuaka_{job_id}")),
        newer_wins: spec.newer_wins.clone(),
    };
    let apply_stop = stop.clone();
    let apply_task: JoinHandle<Result<()>> =
        tokio::spawn(async move { apply_loop(ctx, apply_stop).await });

    let mut handoff = None;
    let result = loop {
        let outcome = supervise(
            spec,
            store,
            p1,
            &capture_progress,
            &apply_progress,
            &capture_task,
            &apply_task,
            cancel,
            &dir,
            leg,
        )
        .await;
        let Ok(Outcome::Handoff(request)) = outcome else {
            break outcome;
        };
        let live = cutover::Live {
            spec,
            main: leg.main,
            state_dir: leg.state_dir,
            leg_store: store,
            reverse: leg.reverse,
            capture: &capture_progress,
            applied: &apply_progress.applied,
            capture_task: &capture_task,
            apply_task: &apply_task,
        };
        match cutover::prepare(&live, &request).await {
            Ok(prepared) => {
                handoff = Some((request, prepared));
                break Ok(Outcome::Stopped);
            }
            // Refused or failed and undone: keep streaming this way.
            Err(e) => tracing::warn!("{} did not happen: {e}", request.action),
        }
    };
    stop.cancel();
    let capture_result = join_error(capture_task.await);
    let apply_result = join_error(apply_task.await);
    write_status(store, &capture_progress, &apply_progress, None);
    capture_result?;
    apply_result?;
    if let Some((request, prepared)) = handoff {
        if leg.reverse {
            cutover::switch_back(
                leg.job,
                leg.main,
                leg.state_dir,
                leg.base_job,
                &request,
                prepared,
            )
            .await?;
        } else {
            cutover::switch_forward(
                leg.job,
                leg.main,
                leg.state_dir,
                leg.base_job,
                &request,
                prepared,
            )
            .await?;
        }
        summary.handoff = true;
        return Ok(summary);
    }
    let caught_up = matches!(result?, Outcome::CaughtUp);
    summary.stream = Some(StreamSummary {
        p0,
        p1,
        applied: PgLsn(apply_progress.applied.load(Ordering::Relaxed)),
        transactions: apply_progress.transactions.load(Ordering::Relaxed),
        changes: apply_progress.changes.load(Ordering::Relaxed),
        caught_up,
    });
    if !caught_up {
        return Err(Error::Interrupted);
    }
    Ok(summary)
}

/// Every table the snapshot copied must be in the publication (its columns were recorded
/// when the publication was made); a table created in between would silently miss its changes.
fn copied_tables_are_published(store: &StateStore) -> Result<()> {
    let schema: Option<crate::model::schema::Schema> = store
        .meta("schema")?
        .and_then(|j| serde_json::from_str(&j).ok());
    let shapes: Shapes = store
        .meta("shapes")?
        .and_then(|j| serde_json::from_str(&j).ok())
        .unwrap_or_default();
    let missing: Vec<String> = schema
        .map(|s| s.tables)
        .unwrap_or_default()
        .iter()
        .filter(|t| t.partitioning.partition_of.is_none())
        .map(|t| t.name.display_name())
        .filter(|n| !shapes.contains_key(n))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::Definite(format!(
            "tables created on the source while the job started are not in its publication, so their changes would be missed: {}; run `kuaka clean` and start the job again",
            missing.join(", ")
        )))
    }
}

fn join_error(r: std::result::Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    match r {
        Ok(r) => r,
        Err(e) => Err(Error::Definite(format!("a task failed: {e}"))),
    }
}

/// Watch the tasks; return `Ok(true)` when `--until caught-up` is reached, `Ok(false)` when
/// stopped by a signal.
#[allow(clippy::too_many_arguments)]
async fn supervise(
    spec: &JobSpec,
    store: &Arc<StateStore>,
    p1: PgLsn,
    capture: &Arc<CaptureProgress>,
    apply: &Arc<ApplyProgress>,
    capture_task: &JoinHandle<Result<()>>,
    apply_task: &JoinHandle<Result<()>>,
    cancel: &CancellationToken,
    dir: &Path,
    leg: &Leg<'_>,
) -> Result<Outcome> {
    let mut source: Option<Client> = None;
    let mut consistent = store.job()?.map(|j| j.phase).as_deref() == Some("streaming");
    // Waiting to see the stream pass this position, then for apply to pass this commit.
    let mut goal: Option<PgLsn> = if consistent { None } else { Some(p1) };
    let mut goal_commit: Option<u64> = None;
    let mut last_status = Instant::now() - Duration::from_secs(10);
    let mut last_cleanup = Instant::now();
    let mut source_lsn: Option<PgLsn> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(Outcome::Stopped),
            _ = tick.tick() => {}
        }
        // A task that ended tells why when the caller joins it.
        if capture_task.is_finished() || apply_task.is_finished() {
            return if cancel.is_cancelled() {
                Ok(Outcome::Stopped)
            } else {
                Err(Error::Definite(
                    "change capture or apply stopped unexpectedly".into(),
                ))
            };
        }
        let applied = apply.applied.load(Ordering::Relaxed);
        // The goal: every transaction committed before `goal` is applied.
        if let Some(g) = goal {
            capture.wanted.fetch_max(g.0, Ordering::Relaxed);
            if goal_commit.is_none() && capture.complete_through.load(Ordering::Relaxed) >= g.0 {
                goal_commit = Some(capture.last_commit.load(Ordering::Relaxed));
            }
            if let Some(c) = goal_commit
                && applied >= c
            {
                goal = None;
                goal_commit = None;
                if !consistent {
                    consistent = true;
                    store.set_phase("streaming")?;
                    tracing::info!(applied = %PgLsn(applied), "caught up: the target is consistent with the source");
                } else {
                    tracing::info!(applied = %PgLsn(applied), "caught up with every change committed before the check");
                    return Ok(Outcome::CaughtUp);
                }
            }
        }
        if consistent && let Some(request) = cutover::pending_request(leg.state_dir, leg.reverse) {
            return Ok(Outcome::Handoff(request));
        }
        if consistent && goal.is_none() && spec.until == Some(Until::CaughtUp) {
            // Now take the source's current position and wait to have applied up to it.
            match current_lsn(&spec.source, &mut source, true).await {
                Ok(lsn) => goal = Some(lsn),
                Err(e) => tracing::warn!("reading the source position: {e}"),
            }
        }
        if last_status.elapsed() >= Duration::from_secs(1) {
            last_status = Instant::now();
            if let Ok(lsn) = current_lsn(&spec.source, &mut source, false).await {
                source_lsn = Some(lsn);
            }
            write_status(store, capture, apply, source_lsn);
        }
        if last_cleanup.elapsed() >= Duration::from_secs(10) {
            last_cleanup = Instant::now();
            if let Err(e) = changelog::remove_applied(dir, applied) {
                tracing::warn!("removing applied change log segments: {e}");
            }
        }
    }
}

/// The source's position; with `barrier`, one that every commit so far is before and that
/// the stream will reach (see [`capture::commit_barrier`]).
async fn current_lsn(
    endpoint: &Endpoint,
    client: &mut Option<Client>,
    barrier: bool,
) -> Result<PgLsn> {
    if client.as_ref().is_none_or(|c| c.is_closed()) {
        *client = Some(postgres::connect(endpoint, Side::Source, "position").await?);
    }
    let c = client
        .as_ref()
        .ok_or_else(|| Error::Definite("no source connection".into()))?;
    let lsn = if barrier {
        capture::commit_barrier(c).await
    } else {
        capture::current_lsn(c).await
    };
    match lsn {
        Ok(l) => Ok(l),
        Err(e) => {
            *client = None;
            Err(e.into())
        }
    }
}

/// Positions, lag and per-table counters into the state store, for `kuaka status`.
fn write_status(
    store: &StateStore,
    capture: &CaptureProgress,
    apply: &ApplyProgress,
    source_lsn: Option<PgLsn>,
) {
    let applied = apply.applied.load(Ordering::Relaxed);
    let captured = capture.last_commit.load(Ordering::Relaxed);
    let received = capture.received.load(Ordering::Relaxed);
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
        - 946_684_800_000_000;
    // Lag in time: how old the last applied commit is, while something is left to apply.
    let behind = captured > applied;
    let applied_time = apply.applied_commit_time_us.load(Ordering::Relaxed);
    let lag_seconds = if behind && applied_time > 0 {
        ((now_us - applied_time) as f64 / 1e6).max(0.0)
    } else {
        0.0
    };
    let mut values = vec![
        ("captured", format!("pg:{}", PgLsn(captured))),
        ("received", format!("pg:{}", PgLsn(received))),
        (
            "confirmed",
            format!("pg:{}", PgLsn(capture.confirmed.load(Ordering::Relaxed))),
        ),
        ("applied", format!("pg:{}", PgLsn(applied))),
        ("lag_seconds", format!("{lag_seconds:.3}")),
        (
            "applied_transactions",
            apply.transactions.load(Ordering::Relaxed).to_string(),
        ),
        (
            "applied_changes",
            apply.changes.load(Ordering::Relaxed).to_string(),
        ),
    ];
    if let Some(s) = source_lsn {
        values.push(("source_current", format!("pg:{s}")));
        // Caught up with everything captured: what is left is WAL the stream has not shown yet.
        let done_through = if applied >= captured {
            applied.max(capture.complete_through.load(Ordering::Relaxed))
        } else {
            applied
        };
        values.push(("lag_bytes", s.0.saturating_sub(done_through).to_string()));
    }
    for (k, v) in values {
        let _ = store.set_position(k, &v);
    }
    if let Ok(counts) = apply.counts.lock() {
        let _ = store.set_meta(
            "apply_counts",
            &serde_json::to_string(&*counts).unwrap_or_default(),
        );
    }
    if let Ok(kept) = apply.kept_back.lock()
        && !kept.is_empty()
    {
        let _ = store.set_meta(
            "newer_wins_kept_back",
            &serde_json::to_string(&*kept).unwrap_or_default(),
        );
    }
}

pub(super) struct ApplyContext {
    pub(super) target: Endpoint,
    pub(super) job_id: String,
    pub(super) dir: PathBuf,
    pub(super) log_end: watch::Receiver<LogEnd>,
    pub(super) p0: PgLsn,
    pub(super) progress: Arc<ApplyProgress>,
    /// A MySQL/MariaDB or SQLite target: the moved tables with their model types.
    pub(super) out_tables: Option<Arc<HashMap<QualifiedName, crate::engine::sqlite::SourceTable>>>,
    workers: usize,
    /// Replication origin (prefix; `_w<N>` per session) the writes are marked with.
    origin: Option<String>,
    /// `--newer-wins COLUMN`.
    pub(super) newer_wins: Option<String>,
}

enum SessionEnd {
    Stopped,
    /// A unique constraint other than the key tripped over the reduced batch: redo the
    /// transactions up to this position one statement per change.
    Conflict(u64),
}

/// Apply with reconnects: a target restart or a dropped connection resumes from the target's
/// recorded position.
async fn apply_loop(ctx: ApplyContext, cancel: CancellationToken) -> Result<()> {
    let mut reconnect = super::Reconnect::default();
    let mut strict_until = 0u64;
    loop {
        let before = ctx.progress.applied.load(Ordering::Relaxed);
        let result = if ctx.out_tables.is_some() {
            super::pg_mysql::apply_session(&ctx, &cancel)
                .await
                .map(|()| SessionEnd::Stopped)
        } else if ctx.workers > 1 {
            per_key::session(&ctx, &cancel)
                .await
                .map(|()| SessionEnd::Stopped)
        } else {
            apply_session(&ctx, strict_until, &cancel).await
        };
        match result {
            Ok(SessionEnd::Stopped) => return Ok(()),
            Ok(SessionEnd::Conflict(at)) => {
                tracing::warn!(
                    "a unique constraint conflicted within a reduced batch; applying the changes up to {} one by one",
                    PgLsn(at)
                );
                strict_until = at;
            }
            Err(e) if e.class() == ErrorClass::Transient && !cancel.is_cancelled() => {
                if ctx.progress.applied.load(Ordering::Relaxed) > before {
                    reconnect.progressed();
                }
                if !reconnect.wait("apply", e, &cancel).await? {
                    return Ok(());
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// A binlog event in a PostgreSQL job's change log: the state directory belongs to another job.
fn not_pgoutput() -> Error {
    Error::Definite(
        "the change log holds MySQL binlog events, not PostgreSQL changes: this state directory belongs to a MySQL job".into(),
    )
}

fn log_err(e: changelog::LogError) -> Error {
    Error::Definite(e.to_string())
}

fn is_conflict(e: &postgres::Error) -> bool {
    matches!(e.sqlstate(), Some("23505" | "23P01"))
}

async fn apply_session(
    ctx: &ApplyContext,
    strict_until: u64,
    cancel: &CancellationToken,
) -> Result<SessionEnd> {
    let client = apply::connect(&ctx.target, "apply").await?;
    if let Some(origin) = &ctx.origin {
        cutover::setup_origin(&client, &format!("{origin}_w0")).await?;
    }
    apply::init_position(&client, &ctx.job_id, 0, ctx.p0).await?;
    let mut applied = apply::applied_position(&client, &ctx.job_id, 0)
        .await?
        .unwrap_or(ctx.p0)
        .0;
    ctx.progress.applied.store(applied, Ordering::Relaxed);
    let mut log = TxnLog::open(&ctx.dir, applied, ctx.log_end.clone())?;
    loop {
        let strict = applied < strict_until;
        let mut batch = Batch::new(strict).with_newer_wins(ctx.newer_wins.as_deref());
        let mut kept: BTreeMap<String, u64> = BTreeMap::new();
        let mut open = false;
        log.start_batch();
        let mut seen = applied;
        let started = Instant::now();
        loop {
            let full =
                strict || batch.rows >= MAX_BATCH_CHANGES || started.elapsed() >= MAX_BATCH_TIME;
            let record = match log.next(full, cancel).await? {
                Next::Record(r) => r,
                Next::EndOfBatch => break,
                Next::Stopped => return Ok(SessionEnd::Stopped),
            };
            seen = seen.max(record.pos);
            for item in log.items(&record, applied)? {
                match item {
                    Item::Instruction(i) => batch.instruction(&i),
                    Item::Relation(name) => batch.relation_changed(&name),
                    Item::Change(c) => batch.add(c),
                }
            }
            if batch.sql_len() > MAX_PENDING_SQL {
                let mut sql = batch.take_sql();
                if !open {
                    sql.insert_str(0, "BEGIN;\n");
                    open = true;
                }
                let guarded = batch.take_guarded();
                if let Err(e) = execute_counted(&client, &sql, &guarded, &mut kept).await {
                    return conflict_or(e, strict, seen);
                }
            }
        }
        let Some((lsn, commit_time)) = log.last else {
            continue;
        };
        let txns = log.txns;
        batch.flush_all();
        let mut sql = batch.take_sql();
        if !open {
            sql.insert_str(0, "BEGIN;\n");
        }
        sql.push_str(&apply::position_update(
            &ctx.job_id,
            0,
            PgLsn(lsn),
            commit_time,
        ));
        let guarded = batch.take_guarded();
        if let Err(e) = execute_counted(&client, &sql, &guarded, &mut kept).await {
            return conflict_or(e, strict, seen);
        }
        failpoint::hit("apply.before_commit");
        execute(&client, "COMMIT").await?;
        failpoint::hit("apply.after_commit");
        if !kept.is_empty() {
            for (table, n) in &kept {
                tracing::warn!(table = %table, rows = n, "newer wins: the target's rows were newer; these changes were not applied");
            }
            ctx.progress.add_kept_back(&kept);
        }
        applied = lsn;
        let p = &ctx.progress;
        p.applied.store(lsn, Ordering::Relaxed);
        p.applied_commit_time_us
            .store(commit_time, Ordering::Relaxed);
        p.transactions.fetch_add(txns, Ordering::Relaxed);
        p.changes.fetch_add(batch.rows as u64, Ordering::Relaxed);
        p.add_counts(&batch.counts);
    }
}

/// What a change-log record means for an apply batch.
pub(super) enum Item {
    Instruction(KuakaRecord),
    /// A table's description changed: what is pending of it goes out in the old shape.
    Relation(QualifiedName),
    Change(RowChange),
}

/// How [`TxnLog::next`] answered.
pub(super) enum Next {
    Record(changelog::Record),
    /// At a transaction boundary with the batch full, or nothing more ready.
    EndOfBatch,
    Stopped,
}

/// The change log read transaction by transaction for one apply session: source
/// transactions at or before the target's position are skipped whole; a batch ends only
/// between transactions.
pub(super) struct TxnLog {
    reader: LogReader,
    relations: HashMap<u32, Arc<Relation>>,
    in_txn: bool,
    skip: bool,
    /// Transactions of the current batch, and the commit position and time of its last.
    pub txns: u64,
    pub last: Option<(u64, i64)>,
}

impl TxnLog {
    pub(super) fn open(dir: &Path, from: u64, end: watch::Receiver<LogEnd>) -> Result<TxnLog> {
        Ok(TxnLog {
            reader: LogReader::open(dir, from, end).map_err(log_err)?,
            relations: HashMap::new(),
            in_txn: false,
            skip: false,
            txns: 0,
            last: None,
        })
    }

    pub(super) fn start_batch(&mut self) {
        self.txns = 0;
        self.last = None;
    }

    /// The next record. Inside a transaction, or before the batch has one, it waits for it;
    /// between transactions it ends the batch when `full` or when nothing more is ready.
    pub(super) async fn next(&mut self, full: bool, cancel: &CancellationToken) -> Result<Next> {
        if self.in_txn || self.txns == 0 {
            return tokio::select! {
                _ = cancel.cancelled() => Ok(Next::Stopped),
                r = self.reader.next() => Ok(match r.map_err(log_err)? {
                    Some(r) => Next::Record(r),
                    None => Next::Stopped,
                }),
            };
        }
        if full {
            return Ok(Next::EndOfBatch);
        }
        Ok(match self.reader.try_next().map_err(log_err)? {
            Some(r) => Next::Record(r),
            None => Next::EndOfBatch,
        })
    }

    /// What `record` asks of the batch, given the target's position `applied`.
    pub(super) fn items(&mut self, record: &changelog::Record, applied: u64) -> Result<Vec<Item>> {
        match record.kind {
            RecordKind::Kuaka if !self.skip => Ok(vec![Item::Instruction(KuakaRecord::parse(
                &record.payload,
            )?)]),
            RecordKind::Kuaka => Ok(Vec::new()),
            RecordKind::Binlog => Err(not_pgoutput()),
            RecordKind::PgOutput => match apply::decode_record(&record.payload)? {
                PgOutput::Begin { final_lsn, .. } => {
                    self.in_txn = true;
                    self.skip = final_lsn.0 <= applied;
                    Ok(Vec::new())
                }
                PgOutput::Commit {
                    commit_lsn,
                    commit_time_us,
                    ..
                } => {
                    self.in_txn = false;
                    if !self.skip {
                        self.txns += 1;
                        self.last = Some((commit_lsn.0, commit_time_us));
                    }
                    self.skip = false;
                    Ok(Vec::new())
                }
                message @ PgOutput::Relation { .. } => Ok(match Relation::from_message(&message) {
                    Some((id, rel)) => {
                        let name = rel.name.clone();
                        self.relations.insert(id, Arc::new(rel));
                        vec![Item::Relation(name)]
                    }
                    None => Vec::new(),
                }),
                m @ (PgOutput::Insert { .. }
                | PgOutput::Update { .. }
                | PgOutput::Delete { .. }
                | PgOutput::Truncate { .. })
                    if !self.skip =>
                {
                    Ok(apply::resolve(m, &self.relations)?
                        .into_iter()
                        .map(Item::Change)
                        .collect())
                }
                _ => Ok(Vec::new()),
            },
        }
    }
}

fn conflict_or(e: postgres::Error, strict: bool, seen: u64) -> Result<SessionEnd> {
    if !strict && is_conflict(&e) {
        Ok(SessionEnd::Conflict(seen))
    } else {
        Err(e.into())
    }
}

/// [`execute`], counting per table the rows the `--newer-wins` guard kept back: each
/// guarded statement returns the rows it wrote.
async fn execute_counted(
    client: &Client,
    sql: &str,
    guarded: &[(String, u64)],
    kept: &mut BTreeMap<String, u64>,
) -> std::result::Result<(), postgres::Error> {
    if guarded.is_empty() {
        return execute(client, sql).await;
    }
    let messages = client
        .simple_query(sql)
        .await
        .map_err(|e| postgres::Error::query("applying changes to the target", e))?;
    let mut next = guarded.iter();
    let mut returning = false;
    for m in messages {
        match m {
            tokio_postgres::SimpleQueryMessage::RowDescription(_) => returning = true,
            tokio_postgres::SimpleQueryMessage::CommandComplete(written) => {
                if returning
                    && let Some((table, rows)) = next.next()
                    && *rows > written
                {
                    *kept.entry(table.clone()).or_default() += rows - written;
                }
                returning = false;
            }
            _ => {}
        }
    }
    Ok(())
}

async fn execute(client: &Client, sql: &str) -> std::result::Result<(), postgres::Error> {
    client.batch_execute(sql).await.map_err(|e| {
        let mut err = postgres::Error::query("applying changes to the target", e);
        if let postgres::Error::Query { message, .. } = &mut err {
            // Name the statement that failed without dumping row values (they may be secret).
            if let Some(first) = sql.lines().find(|l| !l.is_empty() && *l != "BEGIN;") {
                let head: String = first.chars().take(80).collect();
                message.push_str(&format!(" (in a batch starting with: {head}...)"));
            }
        }
        err
    })
}

/// `--apply-mode per-key`: changes spread over workers by (table, key) hash, each worker with
/// its own target connection, transaction and position row. Order is kept per key; between
/// keys the target is eventually consistent. Truncates and added columns are barriers: every
/// worker commits what it holds, then one applies the barrier and moves all positions.
mod per_key {
    use super::*;
    use std::hash::{Hash, Hasher};
    use tokio::sync::mpsc;

    enum Work {
        Change(RowChange),
        Instruction(KuakaRecord),
        Relation(QualifiedName),
        /// The source transaction with this commit position is complete.
        Commit(u64, i64),
        /// Commit what you hold and report the position.
        Flush(tokio::sync::oneshot::Sender<Result<()>>),
    }

    fn worker_of(table: &QualifiedName, key: &[&apply::Cell], workers: usize) -> usize {
        // FNV-1a over the table and key text: stable across runs (a restart routes each key
        // to the worker that holds its position).
        struct Fnv(u64);
        impl Hasher for Fnv {
            fn finish(&self) -> u64 {
                self.0
            }
            fn write(&mut self, bytes: &[u8]) {
                for b in bytes {
                    self.0 ^= u64::from(*b);
                    self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
                }
            }
        }
        let mut h = Fnv(0xcbf2_9ce4_8422_2325);
        table.display_name().hash(&mut h);
        for c in key {
            c.hash(&mut h);
        }
        (h.finish() % workers as u64) as usize
    }

    pub(super) async fn session(ctx: &ApplyContext, cancel: &CancellationToken) -> Result<()> {
        let n = ctx.workers;
        let mut positions = Vec::with_capacity(n);
        let mut clients = Vec::with_capacity(n);
        for w in 0..n {
            let client = apply::connect(&ctx.target, &format!("apply worker {w}")).await?;
            if let Some(origin) = &ctx.origin {
                cutover::setup_origin(&client, &format!("{origin}_w{w}")).await?;
            }
            apply::init_position(&client, &ctx.job_id, w as i32, ctx.p0).await?;
            let pos = apply::applied_position(&client, &ctx.job_id, w as i32)
                .await?
                .unwrap_or(ctx.p0)
                .0;
            positions.push(pos);
            clients.push(client);
        }
        let start = positions.iter().copied().min().unwrap_or(ctx.p0.0);
        let applied: Arc<Vec<std::sync::atomic::AtomicU64>> = Arc::new(
            positions
                .iter()
                .map(|p| std::sync::atomic::AtomicU64::new(*p))
                .collect(),
        );
        ctx.progress.applied.store(start, Ordering::Relaxed);
        let mut senders = Vec::with_capacity(n);
        let mut tasks = tokio::task::JoinSet::new();
        for (w, client) in clients.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel::<Work>(4096);
            senders.push(tx);
            let job_id = ctx.job_id.clone();
            let progress = ctx.progress.clone();
            let applied = applied.clone();
            tasks.spawn(async move { worker(w, client, job_id, rx, progress, applied).await });
        }
        let mut reader = LogReader::open(&ctx.dir, start, ctx.log_end.clone()).map_err(log_err)?;
        let mut relations: HashMap<u32, Arc<Relation>> = HashMap::new();
        let mut skip_all = false;
        let mut pending: Vec<Work> = Vec::new();
        // The commit position of the transaction being read, and whether it grew too big to
        // hold: then every worker commits what it has and worker 0 takes the transaction as
        // it streams in (memory stays bounded; it is applied like a barrier).
        let mut current = 0u64;
        let mut big = false;
        loop {
            let record = tokio::select! {
                _ = cancel.cancelled() => break,
                r = reader.next() => match r.map_err(log_err)? { Some(r) => r, None => break },
                Some(r) = tasks.join_next() => {
                    match r {
                        Ok(Ok(())) => return Err(Error::Definite("an apply worker stopped".into())),
                        Ok(Err(e)) => return Err(e),
                        Err(e) => return Err(Error::Definite(format!("an apply worker failed: {e}"))),
                    }
                }
            };
            match record.kind {
                RecordKind::Kuaka => {
                    if !skip_all {
                        let instruction = KuakaRecord::parse(&record.payload)?;
                        pending.push(Work::Instruction(instruction));
                    }
                }
                RecordKind::Binlog => return Err(not_pgoutput()),
                RecordKind::PgOutput => match apply::decode_record(&record.payload)? {
                    PgOutput::Begin { final_lsn, .. } => {
                        // Workers past this commit get none of it; if all are, skip it here.
                        skip_all = final_lsn.0 <= start;
                        current = final_lsn.0;
                    }
                    PgOutput::Commit {
                        commit_lsn,
                        commit_time_us,
                        ..
                    } => {
                        if big {
                            stream_to_first(&senders, &positions, &mut pending, current).await?;
                            for (i, s) in senders.iter().enumerate() {
                                if positions[i] < commit_lsn.0 {
                                    s.send(Work::Commit(commit_lsn.0, commit_time_us))
                                        .await
                                        .map_err(|_| worker_gone())?;
                                }
                            }
                            flush_all(&senders).await?;
                            big = false;
                        } else if !skip_all {
                            dispatch(
                                &senders,
                                &positions,
                                std::mem::take(&mut pending),
                                commit_lsn.0,
                                commit_time_us,
                                n,
                            )
                            .await?;
                        }
                        pending.clear();
                        skip_all = false;
                    }
                    message @ PgOutput::Relation { .. } => {
                        if let Some((id, rel)) = Relation::from_message(&message) {
                            pending.push(Work::Relation(rel.name.clone()));
                            relations.insert(id, Arc::new(rel));
                        }
                    }
                    m @ (PgOutput::Insert { .. }
                    | PgOutput::Update { .. }
                    | PgOutput::Delete { .. }
                    | PgOutput::Truncate { .. })
                        if !skip_all =>
                    {
                        for c in apply::resolve(m, &relations)? {
                            pending.push(Work::Change(c));
                        }
                        if !big && pending.len() >= PER_KEY_TRANSACTION_LIMIT {
                            flush_all(&senders).await?;
                            big = true;
                        }
                        if big && pending.len() >= 1_000 {
                            stream_to_first(&senders, &positions, &mut pending, current).await?;
                        }
                    }
                    _ => {}
                },
            }
        }
        drop(senders);
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(r) => r?,
                Err(e) => return Err(Error::Definite(format!("an apply worker failed: {e}"))),
            }
        }
        Ok(())
    }

    /// A per-key transaction bigger than this is not held in memory (see `big` above).
    const PER_KEY_TRANSACTION_LIMIT: usize = 20_000;

    fn worker_gone() -> Error {
        Error::Definite("an apply worker is gone".into())
    }

    /// Every worker commits what it holds (complete transactions only).
    async fn flush_all(senders: &[mpsc::Sender<Work>]) -> Result<()> {
        for s in senders {
            let (tx, rx) = tokio::sync::oneshot::channel();
            s.send(Work::Flush(tx)).await.map_err(|_| worker_gone())?;
            rx.await.map_err(|_| worker_gone())??;
        }
        Ok(())
    }

    /// Hand the changes read so far of a big transaction to worker 0 (unless it applied the
    /// transaction before a restart).
    async fn stream_to_first(
        senders: &[mpsc::Sender<Work>],
        positions: &[u64],
        pending: &mut Vec<Work>,
        commit: u64,
    ) -> Result<()> {
        if positions[0] >= commit {
            pending.clear();
            return Ok(());
        }
        for w in pending.drain(..) {
            senders[0].send(w).await.map_err(|_| worker_gone())?;
        }
        Ok(())
    }

    /// Route one complete source transaction: barriers (truncate, added column, a partial
    /// key-changing update) go to worker 0 after every worker flushed.
    async fn dispatch(
        senders: &[mpsc::Sender<Work>],
        positions: &[u64],
        work: Vec<Work>,
        commit: u64,
        commit_time: i64,
        n: usize,
    ) -> Result<()> {
        let closed = || Error::Definite("an apply worker is gone".into());
        // A worker already past this transaction (before a restart) gets nothing of it.
        let live = |w: usize| positions[w] < commit;
        let barrier = work.iter().any(|w| match w {
            Work::Instruction(_) | Work::Change(RowChange::Truncate { .. }) => true,
            Work::Change(c) => c.moves_key(),
            _ => false,
        });
        if barrier {
            // Every worker commits what it holds; then worker 0 applies the whole transaction
            // and the others just move their position past it.
            for s in senders {
                let (tx, rx) = tokio::sync::oneshot::channel();
                s.send(Work::Flush(tx)).await.map_err(|_| closed())?;
                rx.await.map_err(|_| closed())??;
            }
            if live(0) {
                for w in work {
                    senders[0].send(w).await.map_err(|_| closed())?;
                }
            }
            for (i, s) in senders.iter().enumerate() {
                if live(i) {
                    s.send(Work::Commit(commit, commit_time))
                        .await
                        .map_err(|_| closed())?;
                }
            }
            for s in senders {
                let (tx, rx) = tokio::sync::oneshot::channel();
                s.send(Work::Flush(tx)).await.map_err(|_| closed())?;
                rx.await.map_err(|_| closed())??;
            }
            return Ok(());
        }
        for w in work {
            match w {
                Work::Change(c) => {
                    let target = match c.routing_key() {
                        Some((t, k)) => worker_of(t, &k, n),
                        None => 0,
                    };
                    if live(target) {
                        senders[target]
                            .send(Work::Change(c))
                            .await
                            .map_err(|_| closed())?;
                    }
                }
                Work::Relation(name) => {
                    for s in senders {
                        s.send(Work::Relation(name.clone()))
                            .await
                            .map_err(|_| closed())?;
                    }
                }
                other => {
                    if live(0) {
                        senders[0].send(other).await.map_err(|_| closed())?;
                    }
                }
            }
        }
        for (i, s) in senders.iter().enumerate() {
            if live(i) {
                s.send(Work::Commit(commit, commit_time))
                    .await
                    .map_err(|_| closed())?;
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn worker(
        w: usize,
        client: Client,
        job_id: String,
        mut rx: mpsc::Receiver<Work>,
        progress: Arc<ApplyProgress>,
        applied: Arc<Vec<std::sync::atomic::AtomicU64>>,
    ) -> Result<()> {
        let mut batch = Batch::new(false);
        let mut open = false;
        let mut last: Option<(u64, i64)> = None;
        let mut txns = 0u64;
        let mut started = Instant::now();
        loop {
            // With a complete transaction in hand, take more only while it is cheap.
            let work = if last.is_some() {
                if batch.rows >= MAX_BATCH_CHANGES || started.elapsed() >= MAX_BATCH_TIME {
                    None
                } else {
                    rx.try_recv().ok()
                }
            } else {
                match rx.recv().await {
                    Some(w) => Some(w),
                    None => return Ok(()),
                }
            };
            let (commit_now, ack) = match work {
                Some(Work::Change(c)) => {
                    batch.add(c);
                    (false, None)
                }
                Some(Work::Instruction(i)) => {
                    batch.instruction(&i);
                    (false, None)
                }
                Some(Work::Relation(name)) => {
                    batch.relation_changed(&name);
                    (false, None)
                }
                Some(Work::Commit(lsn, time)) => {
                    if last.is_none() {
                        started = Instant::now();
                    }
                    last = Some((lsn, time));
                    txns += 1;
                    (false, None)
                }
                Some(Work::Flush(ack)) => (true, Some(ack)),
                None => (true, None),
            };
            if commit_now {
                if let Some((lsn, time)) = last.take() {
                    batch.flush_all();
                    let mut sql = batch.take_sql();
                    if !open {
                        sql.insert_str(0, "BEGIN;\n");
                    }
                    sql.push_str(&apply::position_update(&job_id, w as i32, PgLsn(lsn), time));
                    let result = async {
                        execute(&client, &sql).await?;
                        failpoint::hit("apply.before_commit");
                        execute(&client, "COMMIT").await
                    }
                    .await;
                    if let Err(e) = result {
                        let e: Error = e.into();
                        if let Some(ack) = ack {
                            let _ = ack.send(Err(Error::Definite(e.to_string())));
                        }
                        return Err(e);
                    }
                    open = false;
                    applied[w].store(lsn, Ordering::Relaxed);
                    let min = applied
                        .iter()
                        .map(|a| a.load(Ordering::Relaxed))
                        .min()
                        .unwrap_or(lsn);
                    progress.applied.fetch_max(min, Ordering::Relaxed);
                    progress
                        .applied_commit_time_us
                        .store(time, Ordering::Relaxed);
                    if w == 0 {
                        progress.transactions.fetch_add(txns, Ordering::Relaxed);
                    }
                    progress
                        .changes
                        .fetch_add(batch.rows as u64, Ordering::Relaxed);
                    progress.add_counts(&batch.counts);
                    txns = 0;
                    batch = Batch::new(false);
                }
                if let Some(ack) = ack {
                    let _ = ack.send(Ok(()));
                }
            } else if batch.sql_len() > MAX_PENDING_SQL {
                let mut sql = batch.take_sql();
                if !open {
                    sql.insert_str(0, "BEGIN;\n");
                    open = true;
                }
                execute(&client, &sql).await?;
            }
        }
    }
}
