//! Cutover and fallback of a live PostgreSQL → PostgreSQL job.
//!
//! `kuaka cutover` / `kuaka fallback` do not touch the databases themselves: they drop a
//! request file into the job's state directory and follow the progress file the running
//! `kuaka run` writes, because only that process holds the capture and apply streams that must
//! be drained and turned around. The running job performs the steps:
//!
//! cutover (forward → reverse): check lag → fence the target and then the source for the
//! application → drain (a barrier on the fenced source, applied on the target) → quick (or
//! full) verify → sequences on the target to at least the source's → stop the forward streams →
//! create the reverse publication and slot on the target (still fenced, so no application
//! write can precede the slot) → unfence the target → stream target → source.
//!
//! fallback (reverse → forward): check lag → fence the target → drain the reverse stream →
//! verify → sequences back on the source → stop the reverse streams, drop their slot → unfence
//! the source → stream source → target again from the forward slot, which kept its place.
//!
//! A failure before the switch undoes the fences and the job keeps streaming the way it did.
//! Every step is idempotent; a process killed mid-way finishes the switch when it restarts
//! (see [`finish_interrupted`]) or redoes the steps when the command is run again.
//!
//! Fence on PostgreSQL: `default_transaction_read_only = on` for the database (or for the
//! `--app-role` roles in it) and the application's open sessions ended; kuaka's own sessions
//! set it off for themselves. It stops applications, not a determined user (`SET
//! default_transaction_read_only = off` lifts it for one session).
//!
//! Loop prevention: the reverse apply writes under the replication origin
//! `kuaka_<job>_r<N>_w0`; capture in either direction leaves out transactions whose origin
//! starts with `kuaka_<job>_`, so what kuaka applied never travels back.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use super::{Error, Result};
use crate::config::{Endpoint, EngineKind, JobSpec};
use crate::engine::postgres::capture::{self, CaptureProgress};
use crate::engine::postgres::replication::ReplicationConnection;
use crate::engine::postgres::{self, Context, Side};
use crate::model::position::PgLsn;
use crate::model::schema::{Schema, quote_ident, quote_literal};
use crate::state::StateStore;

/// Written by the commands, read by the running job.
pub const REQUEST_FILE: &str = "cutover.request";
/// Written by the running job, followed by the commands and `kuaka status`.
pub const PROGRESS_FILE: &str = "cutover.json";
/// Per fenced database (its URL without password): whether it was read-only for the
/// application before kuaka's first fence of it. A switch that fails leaves such a database
/// read-only; the others are made writable again.
pub const FENCES_FILE: &str = "fences.json";

type Fences = std::collections::BTreeMap<String, bool>;

fn read_fences(state_dir: &Path) -> Fences {
    std::fs::read(state_dir.join(FENCES_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn write_fences(state_dir: &Path, fences: &Fences) -> Result<()> {
    let path = state_dir.join(FENCES_FILE);
    if fences.is_empty() {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::Definite(format!("removing {}: {e}", path.display())))
            }
            _ => Ok(()),
        };
    }
    write_json(&path, fences)
        .map_err(|e| Error::Definite(format!("writing {}: {e}", path.display())))
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Request {
    pub id: String,
    /// `cutover` or `fallback`.
    pub action: String,
    pub max_lag_seconds: f64,
    #[serde(default)]
    pub app_roles: Vec<String>,
    #[serde(default)]
    pub full_verify: bool,
    /// Cutover without reverse replication: the job ends once the target is writable.
    #[serde(default)]
    pub no_reverse: bool,
    pub drain_timeout_seconds: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Step {
    pub name: String,
    pub seconds: f64,
    pub detail: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Progress {
    pub request_id: String,
    pub action: String,
    /// `running`, `done` or `failed`.
    pub state: String,
    pub steps: Vec<Step>,
    pub error: Option<String>,
    /// Unix milliseconds: when the application lost its writable database, and got one back.
    pub fenced_at_ms: Option<u64>,
    pub writable_at_ms: Option<u64>,
    pub window_seconds: Option<f64>,
    pub drained_at: Option<String>,
    pub rows_verified: u64,
    pub reverse_slot: Option<String>,
    /// The direction the job streams in afterwards: `forward`, `reverse` or `none`.
    pub direction: String,
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value).unwrap_or_default())?;
    std::fs::rename(&tmp, path)
}

pub fn read_progress(state_dir: &Path) -> Option<Progress> {
    std::fs::read(state_dir.join(PROGRESS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

pub fn write_request(state_dir: &Path, request: &Request) -> std::io::Result<()> {
    write_json(&state_dir.join(REQUEST_FILE), request)
}

pub fn remove_request(state_dir: &Path, id: &str) {
    let path = state_dir.join(REQUEST_FILE);
    let same = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Request>(&b).ok())
        .is_some_and(|r| r.id == id);
    if same {
        let _ = std::fs::remove_file(path);
    }
}

/// The direction the job streams in: `forward` (source → target), `reverse` (after a
/// cutover) or `none` (cut over without reverse replication).
pub fn direction(store: &StateStore) -> Result<String> {
    Ok(store.meta("direction")?.unwrap_or_else(|| "forward".into()))
}

/// A request waiting for the running job, if there is one for this direction. A request that
/// does not fit (fallback while streaming forward) is answered as failed and removed.
pub fn pending_request(state_dir: &Path, reverse: bool) -> Option<Request> {
    let path = state_dir.join(REQUEST_FILE);
    if !path.exists() {
        return None;
    }
    let request: Request = match std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
    {
        Some(r) => r,
        None => {
            // Half written (the command writes a temporary file and renames it, so this is
            // someone else's file): leave it.
            return None;
        }
    };
    let fits = (request.action == "cutover") != reverse;
    if fits {
        return Some(request);
    }
    let mut p = Reporter::new(state_dir, &request);
    p.fail(&Error::Definite(if reverse {
        "the job already streams in reverse (cut over): run `kuaka fallback` to go back".into()
    } else {
        "the job streams forward (not cut over): there is nothing to fall back from".into()
    }));
    let _ = std::fs::remove_file(path);
    None
}

/// Progress of one request, rewritten after every step.
pub struct Reporter {
    path: PathBuf,
    pub progress: Progress,
    step_started: Instant,
}

impl Reporter {
    pub fn new(state_dir: &Path, request: &Request) -> Reporter {
        let path = state_dir.join(PROGRESS_FILE);
        // The same request again (after a restart): keep what it already did.
        let progress = read_progress(state_dir)
            .filter(|p| p.request_id == request.id && p.state == "running")
            .unwrap_or_else(|| Progress {
                request_id: request.id.clone(),
                action: request.action.clone(),
                state: "running".into(),
                ..Progress::default()
            });
        let r = Reporter {
            path,
            progress,
            step_started: Instant::now(),
        };
        r.save();
        r
    }

    /// The state directory the progress is written to.
    pub fn dir(&self) -> PathBuf {
        self.path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    fn save(&self) {
        if let Err(e) = write_json(&self.path, &self.progress) {
            tracing::warn!("writing {}: {e}", self.path.display());
        }
    }

    pub fn begin(&mut self) {
        self.step_started = Instant::now();
    }

    pub fn step(&mut self, name: &str, detail: String) {
        let seconds = self.step_started.elapsed().as_secs_f64();
        tracing::info!(step = name, seconds = format!("{seconds:.3}"), "{detail}");
        self.progress.steps.push(Step {
            name: name.into(),
            seconds,
            detail,
        });
        self.save();
        crate::failpoint::hit(&format!("{}.after_step", self.progress.action));
        self.step_started = Instant::now();
    }

    pub fn fail(&mut self, e: &Error) {
        tracing::error!("{} failed: {e}", self.progress.action);
        self.progress.state = "failed".into();
        self.progress.error = Some(e.to_string());
        self.save();
    }

    pub fn done(&mut self, direction: &str) {
        self.progress.direction = direction.into();
        if let (Some(a), Some(b)) = (self.progress.fenced_at_ms, self.progress.writable_at_ms) {
            self.progress.window_seconds = Some(b.saturating_sub(a) as f64 / 1000.0);
        }
        self.progress.state = "done".into();
        // An error that stopped an earlier attempt past the switch point is behind us.
        self.progress.error = None;
        self.save();
    }
}

/// The running streams of one direction, as the steps before the switch need them.
pub struct Live<'a> {
    pub spec: &'a JobSpec,
    pub main: &'a StateStore,
    pub state_dir: &'a Path,
    /// The leg's own store (the reverse leg has one under the state directory).
    pub leg_store: &'a StateStore,
    pub reverse: bool,
    pub capture: &'a Arc<CaptureProgress>,
    pub applied: &'a std::sync::atomic::AtomicU64,
    pub capture_task: &'a JoinHandle<Result<()>>,
    pub apply_task: &'a JoinHandle<Result<()>>,
}

impl Live<'_> {
    /// Where the application writes now, and where it will.
    fn writes(&self) -> &Endpoint {
        &self.spec.source
    }
    fn moves(&self) -> &Endpoint {
        &self.spec.target
    }
    /// Sides as the user knows them (the job's source and target), not the leg's.
    fn writes_side(&self) -> Side {
        if self.reverse {
            Side::Target
        } else {
            Side::Source
        }
    }
    fn moves_side(&self) -> Side {
        if self.reverse {
            Side::Source
        } else {
            Side::Target
        }
    }

    /// Take a barrier on the leg's source and wait until apply has applied every transaction
    /// committed before it. Returns the barrier.
    async fn drain(&self, timeout: Duration) -> Result<Option<PgLsn>> {
        let client = postgres::connect(self.writes(), self.writes_side(), "cutover drain").await?;
        let barrier = capture::commit_barrier(&client).await?;
        drop(client);
        self.capture.wanted.fetch_max(barrier.0, Ordering::Relaxed);
        let started = Instant::now();
        let mut goal_commit: Option<u64> = None;
        loop {
            if self.capture_task.is_finished() || self.apply_task.is_finished() {
                return Err(Error::Definite(
                    "change capture or apply stopped while draining".into(),
                ));
            }
            if goal_commit.is_none()
                && self.capture.complete_through.load(Ordering::Relaxed) >= barrier.0
            {
                goal_commit = Some(self.capture.last_commit.load(Ordering::Relaxed));
            }
            if let Some(c) = goal_commit
                && self.applied.load(Ordering::Relaxed) >= c
            {
                return Ok(Some(barrier));
            }
            if started.elapsed() >= timeout {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// What the steps before the switch leave for it.
pub struct Prepared {
    pub reporter: Reporter,
}

/// Steps 1–5 (cutover) or 1–5 of fallback, with the streams running. On failure the fences
/// are lifted again, the progress says why, and the job goes on as before.
pub async fn prepare(live: &Live<'_>, request: &Request) -> Result<Prepared> {
    let mut rep = Reporter::new(live.state_dir, request);
    rep.progress.steps.clear();
    match prepare_steps(live, request, &mut rep).await {
        Ok(()) => Ok(Prepared { reporter: rep }),
        Err(e) => {
            // Undo the fences: the application gets its database back.
            let mut fenced = vec![(live.writes(), live.writes_side())];
            if !live.reverse {
                fenced.push((live.moves(), live.moves_side()));
            }
            let e = lift_fences(e, &fenced, &request.app_roles, live.state_dir).await;
            rep.fail(&e);
            remove_request(live.state_dir, &request.id);
            Err(e)
        }
    }
}

async fn prepare_steps(live: &Live<'_>, request: &Request, rep: &mut Reporter) -> Result<()> {
    let lag = Duration::from_secs_f64(request.max_lag_seconds.max(0.0));
    let drain_timeout = Duration::from_secs_f64(request.drain_timeout_seconds.max(1.0));
    // 1. The job must be consistent and close behind.
    rep.begin();
    let phase = live.leg_store.job()?.map(|j| j.phase).unwrap_or_default();
    if phase != "streaming" {
        return Err(Error::Definite(format!(
            "refused: the job is not streaming yet (phase {phase}); wait until `kuaka status` says streaming"
        )));
    }
    match live.drain(lag).await? {
        Some(at) => rep.step(
            "check lag",
            format!(
                "applied everything the {} held at {at} within {:.3} s (--max-lag {:.1} s)",
                live.writes_side().name(),
                rep.step_started.elapsed().as_secs_f64(),
                request.max_lag_seconds
            ),
        ),
        None => {
            return Err(Error::Definite(format!(
                "refused: apply did not catch up with the {} within --max-lag {:.1} s; nothing was fenced (wait for the lag to fall, or raise --max-lag)",
                live.writes_side().name(),
                request.max_lag_seconds
            )));
        }
    }
    // 2. Fence: the database the application moves to first (it must not write there before
    // the switch), then the one it writes to now.
    let mut fenced = Vec::new();
    if !live.reverse {
        fenced.push(
            fence(
                live.moves(),
                live.moves_side(),
                &request.app_roles,
                live.state_dir,
            )
            .await?,
        );
    }
    // The application loses its writable database from here.
    if rep.progress.fenced_at_ms.is_none() {
        rep.progress.fenced_at_ms = Some(unix_ms());
    }
    let from_fence = fence(
        live.writes(),
        live.writes_side(),
        &request.app_roles,
        live.state_dir,
    )
    .await?;
    fenced.push(from_fence);
    rep.step("fence", fenced.join("; "));
    // 3. Drain.
    match live.drain(drain_timeout).await? {
        Some(at) => {
            rep.progress.drained_at = Some(format!("pg:{at}"));
            rep.step(
                "drain",
                format!(
                    "every transaction the {} committed before {at} is applied",
                    live.writes_side().name()
                ),
            );
        }
        None => {
            return Err(Error::Definite(format!(
                "apply did not catch up with the fenced {} within --drain-timeout {:.0} s",
                live.writes_side().name(),
                request.drain_timeout_seconds
            )));
        }
    }
    // 4. Verify.
    verify_step(
        rep,
        live.writes(),
        live.moves(),
        live.spec,
        request.full_verify,
    )
    .await?;
    // 5. Sequences. InnoDB moves a table's AUTO_INCREMENT past every key written to it, so a
    // MySQL/MariaDB side is ahead already.
    if live.moves().engine == crate::config::EngineKind::Mysql {
        rep.step(
            "sequences",
            format!(
                "AUTO_INCREMENT counters on the {} are past every applied key",
                live.moves_side().name()
            ),
        );
        return Ok(());
    }
    let schema = stored_schema(live.main)?;
    let moved = sync_sequences(
        live.writes(),
        live.writes_side(),
        live.moves(),
        live.moves_side(),
        &schema,
    )
    .await?;
    rep.step(
        "sequences",
        format!(
            "{moved} sequences on the {} set to at least the {}'s values",
            live.moves_side().name(),
            live.writes_side().name()
        ),
    );
    Ok(())
}

/// Step 4: the quick (or full) verification after the drain; differences fail the switch.
pub async fn verify_step(
    rep: &mut Reporter,
    from: &Endpoint,
    to: &Endpoint,
    spec: &JobSpec,
    full: bool,
) -> Result<()> {
    let options =
        crate::verify::Options::once(from.clone(), to.clone(), spec.selection.clone(), !full);
    let report = crate::verify::run(&options).await?;
    rep.progress.rows_verified = report.rows;
    let kind = if full { "full" } else { "quick" };
    if !report.equal {
        let tables: Vec<String> = report
            .tables
            .iter()
            .filter(|t| !t.equal())
            .map(|t| t.source.clone())
            .collect();
        return Err(Error::Definite(format!(
            "{kind} verification found differences after the drain in {}; run `kuaka verify` to see them",
            tables.join(", ")
        )));
    }
    rep.step(
        "verify",
        format!(
            "{kind} verification: {} tables, {} rows, equal",
            report.tables.len(),
            report.rows
        ),
    );
    Ok(())
}

fn stored_schema(store: &StateStore) -> Result<Schema> {
    store
        .meta("schema")?
        .and_then(|j| serde_json::from_str(&j).ok())
        .ok_or_else(|| Error::Definite("the state store holds no schema for this job".into()))
}

/// How many cutovers the job has made (the number of its latest reverse leg); 0 before the
/// first. An unreadable value counts as none.
pub fn cutovers(store: &StateStore) -> u32 {
    store
        .meta("cutovers")
        .ok()
        .flatten()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(0)
}

/// The state directory of the n-th reverse leg.
pub fn reverse_dir(state_dir: &Path, n: u32) -> PathBuf {
    state_dir.join(format!("reverse-{n}"))
}

pub fn reverse_job_id(base_job: &str, n: u32) -> String {
    format!("{base_job}_r{n}")
}

/// Origins kuaka's reverse apply writes under start with this; capture leaves them out.
pub fn origin_prefix(base_job: &str) -> String {
    format!("kuaka_{base_job}_")
}

/// Cutover steps 6–8, after the forward streams stopped: the reverse slot on the (still
/// fenced) target, the direction switched, the target unfenced.
pub async fn switch_forward(
    spec: &JobSpec,
    main: &StateStore,
    state_dir: &Path,
    base_job: &str,
    request: &Request,
    mut prepared: Prepared,
) -> Result<()> {
    let rep = &mut prepared.reporter;
    let result = async {
        if request.no_reverse {
            main.set_meta("direction", "none")?;
            rep.step(
                "reverse replication",
                "not started (--no-reverse): the job ends here".into(),
            );
        } else {
            let n = cutovers(main) + 1;
            let schema = stored_schema(main)?;
            let slot = create_reverse_leg(spec, main, state_dir, base_job, n, &schema).await?;
            main.set_meta("cutovers", &n.to_string())?;
            main.set_meta("direction", "reverse")?;
            rep.progress.reverse_slot = Some(slot.clone());
            rep.step(
                "reverse replication",
                format!("replication slot {slot} on the target: changes the application makes there from now on reach the source"),
            );
        }
        finish_cutover(spec, main, request, rep).await
    }
    .await;
    match &result {
        Err(e) => {
            let switched = direction(main)? != "forward";
            after_failure(rep, state_dir, request, e, switched);
        }
        Ok(()) => remove_request(state_dir, &request.id),
    }
    result
}

/// After a switch's steps failed. Before the switch point the request is answered as failed
/// (the job goes on as before; fences left up are lifted by a rerun of the command). Past it,
/// the progress stays "running" and the request file stays, so the next start of the job
/// finishes the switch with the same request (its `--app-role` fences included) instead of
/// streaming the new way with the application held off both databases.
pub fn after_failure(
    rep: &mut Reporter,
    state_dir: &Path,
    request: &Request,
    e: &Error,
    switched: bool,
) {
    if switched {
        tracing::error!(
            "the {} failed past its switch point ({e}); it is finished when the job starts again",
            request.action
        );
        // Still `running`: the waiting command shows why the job stopped.
        rep.progress.error = Some(e.to_string());
        rep.save();
    } else {
        rep.fail(e);
        remove_request(state_dir, &request.id);
    }
}

pub async fn finish_cutover(
    spec: &JobSpec,
    main: &StateStore,
    request: &Request,
    rep: &mut Reporter,
) -> Result<()> {
    if let Some(said) = super::objects::at_cutover(spec, main, !request.no_reverse).await? {
        rep.step("triggers", said);
    }
    unfence(&spec.target, Side::Target, &request.app_roles, &main.dir()).await?;
    rep.progress.writable_at_ms = Some(unix_ms());
    rep.step(
        "unfence target",
        "the target accepts the application's writes".into(),
    );
    let direction = if request.no_reverse {
        "none"
    } else {
        "reverse"
    };
    rep.done(direction);
    Ok(())
}

/// The publication and slot on the target, and the reverse leg's own state store primed to
/// stream from the slot's start (no snapshot: the two databases are equal at this point).
pub async fn create_reverse_leg(
    spec: &JobSpec,
    main: &StateStore,
    state_dir: &Path,
    base_job: &str,
    n: u32,
    schema: &Schema,
) -> Result<String> {
    let job_id = reverse_job_id(base_job, n);
    let slot = capture::slot_name(&job_id);
    let publication = capture::publication_name(&job_id);
    let target = postgres::connect(&spec.target, Side::Target, "cutover").await?;
    capture::preflight(&target, schema).await.map_err(|e| {
        Error::Definite(format!(
            "the target cannot be captured for reverse replication: {e} (use --no-reverse to cut over without a way back)"
        ))
    })?;
    // A slot from an attempt that died before the switch: its start may be before writes
    // kuaka made since; make a new one.
    if capture::slot_status(&target, &slot).await?.is_some() {
        capture::drop_own_slot_and_publication(&target, &slot, "").await?;
    }
    capture::ensure_publication(&target, &publication, schema).await?;
    let shapes = capture::read_shapes(&target, schema).await?;
    let mut repl = ReplicationConnection::connect(&spec.target, "cutover").await?;
    let created = repl.create_slot(&slot, false, false).await?;
    drop(repl);
    let dir = reverse_dir(state_dir, n);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .map_err(|e| Error::Definite(format!("removing {}: {e}", dir.display())))?;
    }
    let leg = StateStore::open_locked(&dir)?;
    let reverse = reverse_spec(spec, main);
    leg.create_job(
        &job_id,
        &reverse.source.redacted(),
        &reverse.target.redacted(),
        &serde_json::to_string(&reverse).unwrap_or_default(),
    )?;
    let start = created.consistent_point.to_string();
    leg.set_meta("slot", &slot)?;
    leg.set_meta("publication", &publication)?;
    leg.set_meta("schema", &serde_json::to_string(schema).unwrap_or_default())?;
    leg.set_meta(
        "shapes",
        &serde_json::to_string(&shapes).unwrap_or_default(),
    )?;
    leg.set_meta("capture_start", &start)?;
    leg.set_meta("capture_p1", &start)?;
    leg.set_meta("apply_mode", "transactional")?;
    leg.set_position("p0", &format!("pg:{start}"))?;
    leg.set_position("p1", &format!("pg:{start}"))?;
    leg.set_phase("streaming")?;
    Ok(slot)
}

/// The job turned around: target → source, one apply session in commit order. A MySQL
/// job's selection named `database.table`; turned around it names the moved tables in the
/// PostgreSQL target's `public` schema (recorded at the cutover).
pub fn reverse_spec(spec: &JobSpec, main: &StateStore) -> JobSpec {
    let mut r = spec.clone();
    std::mem::swap(&mut r.source, &mut r.target);
    if let Some(tables) = main
        .meta("reverse_tables")
        .ok()
        .flatten()
        .and_then(|j| serde_json::from_str::<Vec<String>>(&j).ok())
    {
        // PostgreSQL holds them in `public`; a MySQL target in its own database.
        let schema = if r.source.engine == EngineKind::Postgres {
            "public"
        } else {
            "*"
        };
        r.selection = crate::config::Selection {
            include: tables
                .into_iter()
                .map(|t| crate::config::Pattern {
                    schema: schema.into(),
                    table: t,
                })
                .collect(),
            exclude: Vec::new(),
        };
    }
    r.apply_mode = crate::config::ApplyMode::Transactional;
    r.until = None;
    r
}

/// Fallback steps 6–8, after the reverse streams stopped: forward again, the reverse slot
/// dropped, the source unfenced.
pub async fn switch_back(
    spec: &JobSpec,
    main: &StateStore,
    state_dir: &Path,
    base_job: &str,
    request: &Request,
    mut prepared: Prepared,
) -> Result<()> {
    let rep = &mut prepared.reporter;
    let result = async {
        main.set_meta("direction", "forward")?;
        rep.step(
            "stop reverse replication",
            "the source's changes flow to the target again from where the forward stream stopped"
                .into(),
        );
        finish_fallback(spec, main, base_job, request, rep).await
    }
    .await;
    match &result {
        Err(e) => {
            let switched = direction(main)? == "forward";
            after_failure(rep, state_dir, request, e, switched);
        }
        Ok(()) => remove_request(state_dir, &request.id),
    }
    result
}

async fn finish_fallback(
    spec: &JobSpec,
    main: &StateStore,
    base_job: &str,
    request: &Request,
    rep: &mut Reporter,
) -> Result<()> {
    let n = cutovers(main);
    if spec.target.engine == EngineKind::Sqlite {
        let removed = tokio::task::block_in_place(|| {
            crate::engine::sqlite::remove_capture(&crate::engine::sqlite::open(
                &spec.target.database,
                false,
            )?)
        })?;
        rep.step(
            "drop reverse capture",
            format!("{removed} capture triggers and the change table removed from the target"),
        );
    } else if n > 0 && spec.target.engine == EngineKind::Postgres {
        let job_id = reverse_job_id(base_job, n);
        let target = postgres::connect(&spec.target, Side::Target, "fallback").await?;
        let dropped = capture::drop_own_slot_and_publication(
            &target,
            &capture::slot_name(&job_id),
            &capture::publication_name(&job_id),
        )
        .await?;
        rep.step(
            "drop reverse slot",
            if dropped.is_empty() {
                "nothing left to drop".into()
            } else {
                dropped.join(", ")
            },
        );
    }
    // Before the forward position: the source's CREATE TRIGGERs are then behind it.
    if let Some(said) = super::objects::at_fallback(spec, main).await? {
        rep.step("triggers", said);
    }
    if matches!(spec.source.engine, EngineKind::Mysql | EngineKind::Sqlite) {
        let at = if spec.source.engine == EngineKind::Mysql {
            super::mysql::resume_forward_from_now(spec, base_job).await?
        } else {
            tokio::task::block_in_place(|| super::rows::resume_forward_from_now(spec, base_job))?
        };
        rep.step(
            "forward position",
            format!(
                "the forward stream resumes at {at}, after the changes kuaka applied to the source"
            ),
        );
    }
    unfence(&spec.source, Side::Source, &request.app_roles, &main.dir()).await?;
    rep.progress.writable_at_ms = Some(unix_ms());
    rep.step(
        "unfence source",
        "the source accepts the application's writes".into(),
    );
    rep.done("forward");
    Ok(())
}

/// A job leg after leg: each cutover or fallback turns it around (a switch interrupted after
/// its switch point is finished first); `none` (cut over without a way back) ends it.
pub async fn run_legs(
    spec: &JobSpec,
    store: &StateStore,
    state_dir: &Path,
    job_id: &str,
    mut forward: impl AsyncFnMut() -> Result<super::snapshot::Summary>,
    mut reverse: impl AsyncFnMut() -> Result<super::snapshot::Summary>,
) -> Result<super::snapshot::Summary> {
    loop {
        finish_interrupted(spec, store, state_dir, job_id).await?;
        let summary = match direction(store)?.as_str() {
            "none" => {
                return Ok(super::snapshot::Summary {
                    cut_over: true,
                    ..Default::default()
                });
            }
            "reverse" => reverse().await?,
            _ => forward().await?,
        };
        if !summary.handoff {
            return Ok(summary);
        }
    }
}

/// A process killed after the switch point (the direction is recorded) but before the last
/// steps: finish them now, before streaming.
pub async fn finish_interrupted(
    spec: &JobSpec,
    main: &StateStore,
    state_dir: &Path,
    base_job: &str,
) -> Result<()> {
    let Some(progress) = read_progress(state_dir) else {
        return Ok(());
    };
    if progress.state != "running" {
        return Ok(());
    }
    let direction = direction(main)?;
    let request_path = state_dir.join(REQUEST_FILE);
    let request: Option<Request> = std::fs::read(&request_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(|r: &Request| r.id == progress.request_id);
    let switched = match progress.action.as_str() {
        "cutover" => direction != "forward",
        "fallback" => direction == "forward",
        _ => false,
    };
    if !switched {
        // Killed before the switch: the request (if still there) is picked up again by the
        // running job; the fences stay until then.
        return Ok(());
    }
    let request = request.unwrap_or_else(|| Request {
        id: progress.request_id.clone(),
        action: progress.action.clone(),
        max_lag_seconds: 0.0,
        app_roles: Vec::new(),
        full_verify: false,
        no_reverse: direction == "none",
        drain_timeout_seconds: 60.0,
    });
    tracing::info!(
        "finishing the {} interrupted after the switch",
        progress.action
    );
    let mut rep = Reporter::new(state_dir, &request);
    let result = if progress.action == "cutover" {
        finish_cutover(spec, main, &request, &mut rep).await
    } else {
        finish_fallback(spec, main, base_job, &request, &mut rep).await
    };
    match &result {
        // Still past the switch: the next start tries again.
        Err(e) => after_failure(&mut rep, state_dir, &request, e, true),
        Ok(()) => remove_request(state_dir, &request.id),
    }
    result
}

/// After a failed switch: lift the fences again (the application gets its databases back).
/// Returns the error, extended when lifting failed too.
pub async fn lift_fences(
    e: Error,
    fenced: &[(&Endpoint, Side)],
    roles: &[String],
    state_dir: &Path,
) -> Error {
    for (endpoint, side) in fenced {
        if let Err(u) = unfence_to(endpoint, *side, roles, state_dir, true).await {
            return Error::Definite(format!(
                "{e}; lifting the fences again also failed: {u} (the application may not write anywhere: rerun the command or lift them by hand)"
            ));
        }
    }
    e
}

/// Make the database read-only for the application, the way its engine allows (see the
/// module's notes). Returns what was done, for the log. The first fence of a database
/// records in the state directory whether it was read-only already.
pub async fn fence(
    endpoint: &Endpoint,
    side: Side,
    roles: &[String],
    state_dir: &Path,
) -> Result<String> {
    let key = endpoint.redacted();
    let mut fences = read_fences(state_dir);
    let before = match fences.get(&key) {
        Some(b) => *b,
        None => {
            let b = already_read_only(endpoint, side, roles).await?;
            fences.insert(key, b);
            write_fences(state_dir, &fences)?;
            b
        }
    };
    let said = match endpoint.engine {
        EngineKind::Postgres => pg_fence(endpoint, side, roles).await,
        EngineKind::Mysql => my_fence(endpoint, side, roles).await,
        EngineKind::Sqlite => {
            tokio::task::block_in_place(|| super::sqlite_switch::fence(&endpoint.database))
        }
    }?;
    Ok(if before {
        format!("{said} (it was read-only before: a failed switch leaves it so)")
    } else {
        said
    })
}

/// Whether the application could not write to the database before kuaka fenced it: MySQL's
/// `read_only`, PostgreSQL's `default_transaction_read_only` set for the database (or for
/// each `--app-role` in it).
async fn already_read_only(endpoint: &Endpoint, side: Side, roles: &[String]) -> Result<bool> {
    match endpoint.engine {
        EngineKind::Mysql => {
            use mysql_async::prelude::Queryable;
            let mut conn = crate::engine::mysql::connect(endpoint, "fence").await?;
            let on: Option<u8> = conn
                .query_first("SELECT @@GLOBAL.read_only")
                .await
                .map_err(|e| {
                    crate::engine::mysql::error(
                        format!("reading read_only on the {}", side.name()),
                        e,
                    )
                })?;
            conn.disconnect().await.ok();
            Ok(on == Some(1))
        }
        EngineKind::Postgres => {
            let client = postgres::connect(endpoint, side, "fence").await?;
            let roles: Vec<String> = roles.to_vec();
            let row = client
                .query_one(
                    "WITH wanted AS (                        SELECT CASE WHEN cardinality($1::text[]) = 0 THEN ARRAY[0::oid]                               ELSE ARRAY(SELECT oid FROM pg_roles WHERE rolname = ANY ($1::text[])) END AS oids)                      SELECT count(*) FILTER (WHERE EXISTS (                               SELECT 1 FROM pg_db_role_setting s, unnest(s.setconfig) c                               WHERE s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())                                 AND s.setrole = r                                 AND lower(c) IN ('default_transaction_read_only=on', 'default_transaction_read_only=true',                                                  'default_transaction_read_only=1', 'default_transaction_read_only=yes')))                             = count(*) AND count(*) > 0                      FROM wanted, unnest(wanted.oids) r",
                    &[&roles],
                )
                .await
                .ctx(|| format!("reading default_transaction_read_only on the {}", side.name()))?;
            Ok(row.get(0))
        }
        EngineKind::Sqlite => Ok(false),
    }
}

/// Lift [`fence`] for the switch: the database becomes writable for the application.
pub async fn unfence(
    endpoint: &Endpoint,
    side: Side,
    roles: &[String],
    state_dir: &Path,
) -> Result<()> {
    unfence_to(endpoint, side, roles, state_dir, false).await
}

/// Lift [`fence`]; with `restore`, a database that was read-only before stays so.
async fn unfence_to(
    endpoint: &Endpoint,
    side: Side,
    roles: &[String],
    state_dir: &Path,
    restore: bool,
) -> Result<()> {
    let key = endpoint.redacted();
    let mut fences = read_fences(state_dir);
    if !(restore && fences.get(&key).copied().unwrap_or(false)) {
        unfence_now(endpoint, side, roles).await?;
    }
    if fences.remove(&key).is_some() {
        write_fences(state_dir, &fences)?;
    }
    Ok(())
}

async fn unfence_now(endpoint: &Endpoint, side: Side, roles: &[String]) -> Result<()> {
    match endpoint.engine {
        EngineKind::Postgres => pg_unfence(endpoint, side, roles).await,
        EngineKind::Mysql => my_unfence(endpoint, side).await,
        EngineKind::Sqlite => {
            tokio::task::block_in_place(|| super::sqlite_switch::unfence(&endpoint.database))
        }
    }
}

/// MySQL/MariaDB: end the application's sessions (every user but kuaka's connected to the
/// job's database, or every session of the `--app-role` users), then `SET GLOBAL read_only = ON` for the whole server (it waits for
/// transactions being committed; users with SUPER / READ ONLY ADMIN are not held off).
async fn my_fence(endpoint: &Endpoint, side: Side, roles: &[String]) -> Result<String> {
    use mysql_async::prelude::Queryable;
    let what = |e| crate::engine::mysql::error(format!("fencing the {}", side.name()), e);
    let mut conn = crate::engine::mysql::connect(endpoint, "fence").await?;
    let me: String = conn
        .query_first("SELECT SUBSTRING_INDEX(CURRENT_USER(), '@', 1)")
        .await
        .map_err(what)?
        .unwrap_or_default();
    let ids: Vec<u64> = conn
        .query(
            "SELECT ID, USER, DB FROM information_schema.PROCESSLIST WHERE ID <> CONNECTION_ID() \
                AND COMMAND NOT IN ('Binlog Dump', 'Binlog Dump GTID', 'Daemon', 'Killed') \
                AND USER NOT IN ('system user', 'event_scheduler', 'unauthenticated user')",
        )
        .await
        .map_err(what)?
        .into_iter()
        .filter(|(_, user, db): &(u64, String, Option<String>)| {
            if roles.is_empty() {
                // The application's sessions: other users', in the job's database (sessions
                // of other databases are held off by read_only but left connected).
                *user != me && db.as_deref() == Some(endpoint.database.as_str())
            } else {
                roles.contains(user)
            }
        })
        .map(|(id, _, _)| id)
        .collect();
    for id in &ids {
        match conn.query_drop(format!("KILL CONNECTION {id}")).await {
            Ok(()) => {}
            // Gone meanwhile.
            Err(mysql_async::Error::Server(e)) if e.code == 1094 => {}
            Err(e) => return Err(what(e).into()),
        }
    }
    conn.query_drop("SET SESSION lock_wait_timeout = 30")
        .await
        .map_err(what)?;
    conn.query_drop("SET GLOBAL read_only = ON")
        .await
        .map_err(what)?;
    // The ended sessions are gone (a commit one was in has finished or was rolled back).
    let started = Instant::now();
    loop {
        let list = ids
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let left: u64 = if ids.is_empty() {
            0
        } else {
            conn.query_first(format!(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID IN ({list})"
            ))
            .await
            .map_err(what)?
            .unwrap_or(0)
        };
        if left == 0 {
            break;
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err(Error::Definite(format!(
                "{left} of the application's sessions on the {} did not end within 30 s of KILL CONNECTION",
                side.name()
            )));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    conn.disconnect().await.ok();
    Ok(format!(
        "{} {}: read_only = ON for the server, {} sessions of {} ended",
        side.name(),
        endpoint.host_port(),
        ids.len(),
        if roles.is_empty() {
            format!("users other than {me} in {}", endpoint.database)
        } else {
            format!("users {}", roles.join(", "))
        }
    ))
}

async fn my_unfence(endpoint: &Endpoint, side: Side) -> Result<()> {
    use mysql_async::prelude::Queryable;
    let mut conn = crate::engine::mysql::connect(endpoint, "unfence").await?;
    conn.query_drop("SET GLOBAL read_only = OFF")
        .await
        .map_err(|e| {
            crate::engine::mysql::error(format!("lifting the fence on the {}", side.name()), e)
        })?;
    conn.disconnect().await.ok();
    Ok(())
}

/// MySQL/MariaDB source: every AUTO_INCREMENT counter of the job on the target (identity
/// sequence on PostgreSQL, `AUTO_INCREMENT` on MySQL) moved to at least the source's.
pub async fn sync_auto_increment(
    source: &Endpoint,
    target: &Endpoint,
    catalog: &crate::engine::mysql::catalog::MyCatalog,
) -> Result<usize> {
    use mysql_async::prelude::Queryable;
    let mut conn = crate::engine::mysql::connect(source, "sequences").await?;
    let mut next = Vec::new();
    for t in &catalog.tables {
        let Some(col) = t.columns.iter().find(|c| c.auto_increment) else {
            continue;
        };
        let value: Option<Option<u64>> = conn
            .exec_first(
                "SELECT AUTO_INCREMENT FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
                (t.name(),),
            )
            .await
            .map_err(|e| crate::engine::mysql::error(format!("reading the AUTO_INCREMENT of {}", t.name()), e))?;
        if let Some(Some(v)) = value
            && v > 1
        {
            next.push((t.name().to_owned(), col.name.clone(), v));
        }
    }
    conn.disconnect().await.ok();
    match target.engine {
        EngineKind::Postgres => {
            let client = postgres::connect(target, Side::Target, "sequences").await?;
            for (table, column, v) in &next {
                let seq = format!(
                    "pg_catalog.pg_get_serial_sequence({}, {})",
                    quote_literal(&format!("public.{}", quote_ident(table))),
                    quote_literal(column)
                );
                // No identity there (a column kuaka did not make one of): nothing to move.
                client
                    .query_opt(
                        &format!(
                            "SELECT pg_catalog.setval({seq}, greatest($1::bigint, coalesce(pg_catalog.pg_sequence_last_value({seq}), $1::bigint)), true) \
                             WHERE {seq} IS NOT NULL"
                        ),
                        &[&((*v - 1) as i64)],
                    )
                    .await
                    .ctx(|| format!("setting the identity of {table}.{column}"))?;
            }
        }
        _ => {
            let mut t = crate::engine::mysql::connect(target, "sequences").await?;
            for (table, _, v) in &next {
                t.query_drop(format!(
                    "ALTER TABLE {} AUTO_INCREMENT = {v}",
                    crate::engine::mysql::quote_ident(table)
                ))
                .await
                .map_err(|e| {
                    crate::engine::mysql::error(
                        format!("setting the AUTO_INCREMENT of {table} on the target"),
                        e,
                    )
                })?;
            }
            t.disconnect().await.ok();
        }
    }
    Ok(next.len())
}

/// `ALTER DATABASE db <setting>`, or `ALTER ROLE r IN DATABASE db <setting>` per role.
fn read_only_default(database: &str, roles: &[String], setting: &str) -> String {
    let db = quote_ident(database);
    if roles.is_empty() {
        return format!("ALTER DATABASE {db} {setting};");
    }
    roles
        .iter()
        .map(|r| format!("ALTER ROLE {} IN DATABASE {db} {setting};", quote_ident(r)))
        .collect()
}

/// Make the database read-only for the application and end its open sessions (which
/// aborts their transactions; a transaction already committing finishes first). Returns
/// what was done, for the log.
async fn pg_fence(endpoint: &Endpoint, side: Side, roles: &[String]) -> Result<String> {
    let client = postgres::connect(endpoint, side, "fence").await?;
    let sql = read_only_default(
        &endpoint.database,
        roles,
        "SET default_transaction_read_only = on",
    );
    client.batch_execute(&sql).await.ctx(|| {
        format!(
            "fencing the {} ({})",
            side.name(),
            sql.trim_end_matches(';')
        )
    })?;
    let (ended, left) = end_sessions(&client, roles)
        .await
        .ctx(|| format!("ending the application's sessions on the {}", side.name()))?;
    if left > 0 {
        return Err(Error::Definite(format!(
            "{left} of the application's sessions on the {} did not end within 30 s of pg_terminate_backend",
            side.name()
        )));
    }
    Ok(format!(
        "{} {}: default_transaction_read_only = on for {}, {ended} open sessions ended",
        side.name(),
        endpoint.database,
        if roles.is_empty() {
            "the database".to_owned()
        } else {
            format!("roles {}", roles.join(", "))
        }
    ))
}

async fn end_sessions(
    client: &tokio_postgres::Client,
    roles: &[String],
) -> std::result::Result<(usize, i64), tokio_postgres::Error> {
    // Signal every session first, then wait for all of them to be gone: a transaction one
    // was committing is then either in the WAL before the drain's barrier, or aborted.
    // (`pg_terminate_backend(pid, timeout)` would wait for them one by one, polling.)
    let roles: Vec<String> = roles.to_vec();
    let row = client
        .query_one(
            // The filter must run before the termination: a CTE kept as it is, and the
            // termination in the aggregate's FILTER (a qual next to the others could be
            // evaluated first, ending sessions of every database on the server).
            "WITH victims AS MATERIALIZED ( \
               SELECT pid FROM pg_stat_activity \
               WHERE datname = current_database() AND pid <> pg_backend_pid() \
                 AND backend_type = 'client backend' \
                 AND coalesce(application_name, '') NOT LIKE 'kuaka %' \
                 AND (cardinality($1::text[]) = 0 OR usename = ANY ($1::text[]))) \
             SELECT coalesce(array_agg(pid) FILTER (WHERE pg_terminate_backend(pid)), '{}') FROM victims",
            &[&roles],
        )
        .await?;
    let pids: Vec<i32> = row.get(0);
    let started = Instant::now();
    let mut left;
    loop {
        left = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY ($1)",
                &[&pids],
            )
            .await?
            .get(0);
        if left == 0 || started.elapsed() > Duration::from_secs(30) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok((pids.len(), left))
}

async fn pg_unfence(endpoint: &Endpoint, side: Side, roles: &[String]) -> Result<()> {
    let client = postgres::connect(endpoint, side, "unfence").await?;
    let sql = read_only_default(
        &endpoint.database,
        roles,
        "RESET default_transaction_read_only",
    );
    client
        .batch_execute(&sql)
        .await
        .ctx(|| format!("lifting the fence on the {}", side.name()))?;
    Ok(())
}

/// Every sequence of the job on `to` set to at least its value on `from` (the fenced side).
async fn sync_sequences(
    from: &Endpoint,
    from_side: Side,
    to: &Endpoint,
    to_side: Side,
    schema: &Schema,
) -> Result<usize> {
    if schema.sequences.is_empty() {
        return Ok(0);
    }
    let from = postgres::connect(from, from_side, "sequences").await?;
    let to = postgres::connect(to, to_side, "sequences").await?;
    let mut moved = 0;
    for s in &schema.sequences {
        let regclass = match &s.identity_of {
            Some((table, column)) => format!(
                "pg_catalog.pg_get_serial_sequence({}, {})",
                quote_literal(&table.to_string()),
                quote_literal(column)
            ),
            None => format!("{}::regclass", quote_literal(&s.name.to_string())),
        };
        let read = format!("SELECT pg_catalog.pg_sequence_last_value({regclass})");
        let value: Option<i64> = from
            .query_one(&read, &[])
            .await
            .ctx(|| format!("reading sequence {}", s.name.display_name()))?
            .get(0);
        let Some(value) = value else { continue };
        let set = format!(
            "SELECT pg_catalog.setval({regclass}, greatest($1::bigint, coalesce(pg_catalog.pg_sequence_last_value({regclass}), $1::bigint)), true)"
        );
        to.query_one(&set, &[&value])
            .await
            .ctx(|| format!("setting sequence {}", s.name.display_name()))?;
        moved += 1;
    }
    Ok(moved)
}

/// Make (if needed) and take the replication origin a reverse apply session writes under.
pub async fn setup_origin(client: &tokio_postgres::Client, name: &str) -> Result<()> {
    let name = quote_literal(name);
    client
        .simple_query(&format!(
            "SELECT pg_catalog.pg_replication_origin_create({name}) \
             WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_origin WHERE roname = {name}); \
             SELECT pg_catalog.pg_replication_origin_session_setup({name})"
        ))
        .await
        .ctx(|| format!("taking replication origin {name} (kuaka marks its reverse writes with it so they are not captured back; needs superuser or EXECUTE on pg_replication_origin_session_setup)"))?;
    Ok(())
}
