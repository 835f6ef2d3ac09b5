//! Command-line interface (clap derive). Validation into a [`JobSpec`] happens here too, so
//! every flag error names the flag.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{ConfigError, Endpoint, JobSpec, Pattern, Secret, Selection, TargetExists};

#[derive(Parser, Debug)]
#[command(
    name = "kuaka",
    version,
    about = "Migrate and continuously sync live databases with near-zero downtime"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// No progress bars, even on a terminal.
    #[arg(long, global = true)]
    pub no_progress: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Copy the source into the target (schema, then data in parallel, then indexes and constraints).
    Run(RunArgs),
    /// Print what a run would do (tables, chunks, target DDL) without changing anything.
    Plan(PlanArgs),
    /// Show the progress of the job in a state directory.
    Status(StatusArgs),
    /// Migrate a generated shop database (SQLite → SQLite, no server needed) while a writer
    /// keeps changing it: snapshot, capture, apply, catch up, verify.
    Demo(DemoArgs),
    /// Compare source and target row by row (any engine pair kuaka moves): exit 0 when equal,
    /// 1 when differences are found, 2 on error.
    Verify(VerifyArgs),
    /// Switch the application to the target: fence the source, drain, verify, move
    /// sequences, start reverse replication, unfence the target. Performed by the job's
    /// running `kuaka run`; returns when done.
    Cutover(CutoverArgs),
    /// Go back after a cutover: fence the target, drain the reverse stream, unfence the
    /// source; the job streams source → target again.
    Fallback(FallbackArgs),
    /// Remove a job: drop its replication slot and publication on the source, its positions
    /// on the target, and its state directory.
    Clean(CleanArgs),
}

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Where to put the source, target and state (default: a new directory under the system's
    /// temp dir). Left in place afterwards so you can look inside.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Size of the generated shop: about 42,500 rows per unit.
    #[arg(long, default_value_t = 8)]
    pub scale: u32,
    /// How long the writer keeps changing the source while kuaka streams, in seconds.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
}

#[derive(Args, Debug, Clone)]
pub struct SwitchArgs {
    /// The state directory of the running job.
    #[arg(long, env = "KUAKA_STATE", default_value = "./kuaka-state")]
    pub state: PathBuf,
    /// Refuse (before fencing anything) unless apply catches up with the database the
    /// application writes to within this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0)]
    pub max_lag: f64,
    /// Fence only these roles (repeatable): their sessions are ended and their new ones are
    /// read-only. Default: every session but kuaka's, on the whole database.
    #[arg(long = "app-role", value_name = "ROLE")]
    pub app_roles: Vec<String>,
    /// Give up when the drain takes longer than this (the fences are lifted again).
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    pub drain_timeout: f64,
    /// Give up waiting for the running job after this long.
    #[arg(long, value_name = "SECONDS", default_value_t = 600.0)]
    pub timeout: f64,
}

#[derive(Args, Debug, Clone)]
pub struct CutoverArgs {
    #[command(flatten)]
    pub switch: SwitchArgs,
    /// Compare every row after the drain instead of counts and key ranges.
    #[arg(long)]
    pub full_verify: bool,
    /// Do not start reverse replication: no way back with `kuaka fallback`; the job ends.
    #[arg(long)]
    pub no_reverse: bool,
}

#[derive(Args, Debug, Clone)]
pub struct FallbackArgs {
    #[command(flatten)]
    pub switch: SwitchArgs,
    /// Compare every row after the drain instead of counts and key ranges.
    #[arg(long)]
    pub full_verify: bool,
}

#[derive(Args, Debug, Clone)]
pub struct VerifyArgs {
    /// The job's state directory: its source and target (and re-reads of differences, since
    /// the job may be applying changes).
    #[arg(long, env = "KUAKA_STATE")]
    pub state: Option<PathBuf>,
    /// Source URL (default: the job's, with --state).
    #[arg(long, hide_env_values = true)]
    pub source: Option<String>,
    /// Target URL (default: the job's, with --state).
    #[arg(long, hide_env_values = true)]
    pub target: Option<String>,
    #[arg(long, value_name = "VAR")]
    pub source_password_env: Option<String>,
    #[arg(long, value_name = "VAR")]
    pub target_password_env: Option<String>,
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// Only row counts and smallest/largest keys per table (seconds, for a cutover window).
    #[arg(long)]
    pub quick: bool,
    /// Print the report as JSON on standard output.
    #[arg(long)]
    pub json: bool,
    /// Show the differing rows' values (they may be sensitive; off by default).
    #[arg(long)]
    pub show_values: bool,
    /// Re-read differing rows this many times (0.5 s, 1 s, 2 s, ... apart) before reporting
    /// them (default: 3 with --state, where a job may be applying changes; else 0).
    #[arg(long)]
    pub rechecks: Option<u32>,
    /// Re-copy the differing rows from the source (upsert, or delete where the source has no
    /// row), then read them again; exit 0 when nothing is left different.
    #[arg(long)]
    pub repair: bool,
    /// MySQL/MariaDB ⇄ PostgreSQL: let each server hash its rows (MD5) so only digests
    /// travel, for tables whose columns both engines print alike. For slow links between
    /// kuaka and the databases; on a fast link streaming the rows is quicker (the default).
    #[arg(long)]
    pub server_digests: bool,
    /// Source keys per compared chunk.
    #[arg(long, default_value_t = 10_000)]
    pub chunk_rows: usize,
    /// Tables compared at once.
    #[arg(long, default_value_t = default_jobs())]
    pub jobs: usize,
}

#[derive(Args, Debug, Clone)]
pub struct CleanArgs {
    #[arg(long, env = "KUAKA_STATE", default_value = "./kuaka-state")]
    pub state: PathBuf,
    /// Source URL with credentials (default: the job's, with the password from
    /// --source-password-env or PGPASSWORD).
    #[arg(long, hide_env_values = true)]
    pub source: Option<String>,
    /// Target URL with credentials (default: the job's, as for the source).
    #[arg(long, hide_env_values = true)]
    pub target: Option<String>,
    #[arg(long, value_name = "VAR")]
    pub source_password_env: Option<String>,
    #[arg(long, value_name = "VAR")]
    pub target_password_env: Option<String>,
    /// Keep the state directory (only drop the slot, publication and target positions).
    #[arg(long)]
    pub keep_state: bool,
}

impl CleanArgs {
    /// The job's endpoints: given URLs, else the stored (password-less) ones, with passwords
    /// from the environment.
    pub fn endpoints(
        &self,
        stored_source: &str,
        stored_target: &str,
    ) -> Result<(Endpoint, Endpoint), Vec<ConfigError>> {
        EndpointArgs {
            source: self
                .source
                .clone()
                .unwrap_or_else(|| stored_source.to_owned()),
            target: self
                .target
                .clone()
                .unwrap_or_else(|| stored_target.to_owned()),
            source_password_env: self.source_password_env.clone(),
            target_password_env: self.target_password_env.clone(),
        }
        .resolve()
    }
}

#[derive(Args, Debug, Clone)]
pub struct EndpointArgs {
    /// Source database URL: postgres://user[:password]@host[:port]/database
    #[arg(long, env = "KUAKA_SOURCE", hide_env_values = true)]
    pub source: String,
    /// Target database URL (the database must exist).
    #[arg(long, env = "KUAKA_TARGET", hide_env_values = true)]
    pub target: String,
    /// Read the source password from this environment variable (default: PGPASSWORD).
    #[arg(long, value_name = "VAR")]
    pub source_password_env: Option<String>,
    /// Read the target password from this environment variable (default: PGPASSWORD).
    #[arg(long, value_name = "VAR")]
    pub target_password_env: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct SelectionArgs {
    /// Copy only tables matching this pattern (`table`, `schema.table`, globs `*` `?`); repeatable.
    #[arg(long = "tables", value_name = "PATTERN")]
    pub tables: Vec<String>,
    /// Skip tables matching this pattern; repeatable.
    #[arg(long = "exclude", value_name = "PATTERN")]
    pub exclude: Vec<String>,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub endpoints: EndpointArgs,
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// Directory of the job's state store; rerunning with the same directory resumes.
    #[arg(long, env = "KUAKA_STATE", default_value = "./kuaka-state")]
    pub state: PathBuf,
    /// Copy a consistent snapshot and stop (no change capture).
    #[arg(long)]
    pub snapshot_only: bool,
    /// Return once this is reached instead of streaming until stopped (`caught-up`: the
    /// target is consistent and holds every change committed before that moment).
    #[arg(long, value_enum, value_name = "WHEN")]
    pub until: Option<crate::config::Until>,
    /// How captured changes are applied: in source commit order (`transactional`) or in
    /// parallel by key (`per-key`, order kept per key, eventually consistent between rows).
    #[arg(long, value_enum, default_value_t = crate::config::ApplyMode::Transactional)]
    pub apply_mode: crate::config::ApplyMode,
    /// During a dual-write period: never let a change replace a target row whose COLUMN (a
    /// version or modification time, e.g. gmt_modified) is greater; such changes are counted
    /// and logged. PostgreSQL → PostgreSQL jobs, --apply-mode transactional.
    #[arg(long, value_name = "COLUMN")]
    pub newer_wins: Option<String>,
    /// The target type of one column instead of the type map's, as TABLE.COLUMN=TYPE
    /// (repeatable; MySQL/MariaDB → PostgreSQL jobs; fixed at the job's first run), e.g.
    /// `--column-type film.rating=text --column-type users.active=smallint`.
    #[arg(long = "column-type", value_name = "TABLE.COLUMN=TYPE")]
    pub column_types: Vec<String>,
    /// Workers for `--apply-mode per-key` (fixed when the job starts).
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub apply_workers: usize,
    /// Parallel copy workers (each holds one source and one target connection).
    #[arg(long, default_value_t = default_jobs())]
    pub jobs: usize,
    /// Split tables into chunks of about this many rows (default: about 64 MiB or 1M rows).
    #[arg(long, value_name = "N")]
    pub chunk_rows: Option<i64>,
    /// Cap the copy at this many rows per second over all workers.
    #[arg(long, value_name = "N")]
    pub max_rows_per_sec: Option<u64>,
    /// What to do with target tables that already exist.
    #[arg(long, value_enum, default_value_t = TargetExists::Error)]
    pub target_exists: TargetExists,
    /// Memory per index build on the target (maintenance_work_mem), e.g. 256MB or 2GB.
    #[arg(long, value_name = "SIZE", default_value = crate::config::DEFAULT_INDEX_MEMORY)]
    pub index_memory: String,
}

#[derive(Args, Debug, Clone)]
pub struct PlanArgs {
    #[command(flatten)]
    pub endpoints: EndpointArgs,
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// Rows per chunk, as for `run`.
    #[arg(long, value_name = "N")]
    pub chunk_rows: Option<i64>,
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    #[arg(long, env = "KUAKA_STATE", default_value = "./kuaka-state")]
    pub state: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Workers default to the machine's cores, at least 2 and at most 8: each worker holds a
/// connection on both databases, and a big host should not open dozens of them unasked.
fn default_jobs() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8)
}

fn password_from_env(field: &str, var: Option<&str>) -> Result<Option<Secret>, ConfigError> {
    match var {
        Some(name) => match std::env::var(name) {
            Ok(v) => Ok(Some(Secret::new(v))),
            Err(_) => Err(ConfigError::MissingEnv {
                field: field.to_owned(),
                name: name.to_owned(),
            }),
        },
        None => Ok(std::env::var("PGPASSWORD").ok().map(Secret::new)),
    }
}

impl EndpointArgs {
    /// Parse both endpoints, collecting every error.
    pub fn resolve(&self) -> Result<(Endpoint, Endpoint), Vec<ConfigError>> {
        let mut errors = Vec::new();
        let mut source = Endpoint::parse("--source", &self.source)
            .map_err(|e| errors.push(e))
            .ok();
        let mut target = Endpoint::parse("--target", &self.target)
            .map_err(|e| errors.push(e))
            .ok();
        for (endpoint, field, var) in [
            (
                &mut source,
                "--source-password-env",
                &self.source_password_env,
            ),
            (
                &mut target,
                "--target-password-env",
                &self.target_password_env,
            ),
        ] {
            match password_from_env(field, var.as_deref()) {
                Ok(pw) => {
                    if let Some(e) = endpoint.as_mut()
                        && (e.password.is_none() || var.is_some())
                    {
                        e.password = pw.or(e.password.take());
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        match (source, target) {
            (Some(s), Some(t)) if errors.is_empty() => Ok((s, t)),
            _ => Err(errors),
        }
    }
}

impl SelectionArgs {
    pub fn resolve(&self) -> Result<Selection, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let mut parse = |field: &str, list: &[String]| {
            list.iter()
                .filter_map(|p| Pattern::parse(field, p).map_err(|e| errors.push(e)).ok())
                .collect()
        };
        let include = parse("--tables", &self.tables);
        let exclude = parse("--exclude", &self.exclude);
        if errors.is_empty() {
            Ok(Selection { include, exclude })
        } else {
            Err(errors)
        }
    }
}

impl RunArgs {
    pub fn resolve(&self) -> Result<JobSpec, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let endpoints = self.endpoints.resolve().map_err(|e| errors.extend(e)).ok();
        let selection = self.selection.resolve().map_err(|e| errors.extend(e)).ok();
        let invalid = |field: &str, message: &str| ConfigError::Invalid {
            field: field.into(),
            message: message.into(),
        };
        if self.jobs == 0 || self.jobs > 256 {
            errors.push(invalid("--jobs", "must be between 1 and 256"));
        }
        if matches!(self.chunk_rows, Some(n) if n < 1) {
            errors.push(invalid("--chunk-rows", "must be at least 1"));
        }
        if !crate::config::valid_memory_setting(&self.index_memory) {
            errors.push(invalid(
                "--index-memory",
                "must look like 512MB, 2GB or 65536kB",
            ));
        }
        if self.apply_workers == 0 || self.apply_workers > 64 {
            errors.push(invalid("--apply-workers", "must be between 1 and 64"));
        }
        if self.snapshot_only && self.until.is_some() {
            errors.push(invalid(
                "--until",
                "applies to change capture; a --snapshot-only run always ends after the copy",
            ));
        }
        if let Some(c) = &self.newer_wins {
            if c.is_empty() || c.contains('\0') {
                errors.push(invalid("--newer-wins", "must name a column"));
            }
            if self.apply_mode != crate::config::ApplyMode::Transactional {
                errors.push(invalid(
                    "--newer-wins",
                    "works with --apply-mode transactional only",
                ));
            }
            if let Some((s, _)) = &endpoints
                && s.engine == crate::config::EngineKind::Sqlite
            {
                errors.push(invalid(
                    "--newer-wins",
                    "is not implemented for jobs from SQLite",
                ));
            }
        }
        if self.apply_mode != crate::config::ApplyMode::Transactional
            && let Some((s, t)) = &endpoints
            && s.engine == crate::config::EngineKind::Postgres
            && t.engine != crate::config::EngineKind::Postgres
        {
            errors.push(invalid(
                "--apply-mode",
                "per-key apply is implemented for PostgreSQL targets only; a PostgreSQL → MySQL/MariaDB or SQLite job applies transactionally",
            ));
        }
        let mut column_types = Vec::new();
        for c in &self.column_types {
            match crate::config::ColumnType::parse(c) {
                Ok(ct) => column_types.push(ct),
                Err(e) => errors.push(invalid("--column-type", &e)),
            }
        }
        if !column_types.is_empty()
            && let Some((s, t)) = &endpoints
            && (s.engine != crate::config::EngineKind::Mysql
                || t.engine != crate::config::EngineKind::Postgres)
        {
            errors.push(invalid(
                "--column-type",
                "is implemented for MySQL/MariaDB → PostgreSQL jobs only",
            ));
        }
        if self.max_rows_per_sec == Some(0) {
            errors.push(invalid("--max-rows-per-sec", "must be at least 1"));
        }
        if let Some((s, t)) = &endpoints
            && s.identity() == t.identity()
        {
            {
                errors.push(invalid(
                    "--target",
                    "the target is the same database as the source",
                ));
            }
        }
        match (endpoints, selection) {
            (Some((source, target)), Some(selection)) if errors.is_empty() => Ok(JobSpec {
                source,
                target,
                selection,
                snapshot_only: self.snapshot_only,
                jobs: self.jobs,
                chunk_rows: self.chunk_rows,
                max_rows_per_sec: self.max_rows_per_sec,
                target_exists: self.target_exists,
                index_memory: self.index_memory.clone(),
                apply_mode: self.apply_mode,
                apply_workers: self.apply_workers,
                newer_wins: self.newer_wins.clone(),
                column_types,
                until: self.until,
            }),
            _ => Err(errors),
        }
    }
}
