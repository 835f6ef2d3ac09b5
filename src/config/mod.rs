//! Job configuration: endpoints, table selection and knobs, validated into a [`JobSpec`].
//!
//! Secrets (passwords) live only in [`Secret`], whose `Debug`/`Display` print `***`, and are
//! never written to the state store: the stored job holds [`Endpoint::redacted`] strings.

mod endpoint;
mod selection;

pub use endpoint::{Endpoint, EngineKind, Secret};
pub use selection::{Pattern, Selection};

use serde::{Deserialize, Serialize};

/// Default chunk size in bytes of source table data: big enough that per-chunk overhead (a
/// transaction and a round trip on each side) is negligible, small enough that `--jobs` workers
/// share a big table and a crash redoes little.
pub const DEFAULT_CHUNK_BYTES: i64 = 64 * 1024 * 1024;

/// Default cap on rows per chunk, for narrow tables where 64 MiB is many millions of rows.
pub const DEFAULT_CHUNK_ROWS: i64 = 1_000_000;

/// What to do when a table the job creates already exists on the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum TargetExists {
    /// Stop before writing anything, naming the tables.
    Error,
    /// Drop the existing objects (CASCADE) and create them from the source.
    Drop,
    /// Keep existing tables (their columns must include the source's), empty them, load them.
    Truncate,
}

/// How captured changes are applied to the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "snake_case")]
pub enum ApplyMode {
    /// Source transactions in commit order, several per target transaction.
    #[default]
    Transactional,
    /// Parallel workers by (table, key) hash, order kept per key.
    PerKey,
}

/// When a streaming run returns by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Until {
    /// Once the target is consistent and holds every change committed on the source before
    /// that moment.
    CaughtUp,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid {field}: {message}")]
    Invalid { field: String, message: String },
    #[error("environment variable {name} (from {field}) is not set")]
    MissingEnv { field: String, name: String },
}

/// The resolved job: what to move and how. Serialised (without secrets) into the state store.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobSpec {
    pub source: Endpoint,
    pub target: Endpoint,
    pub selection: Selection,
    pub snapshot_only: bool,
    pub jobs: usize,
    /// Target rows per chunk; `None` = automatic (by size).
    pub chunk_rows: Option<i64>,
    pub max_rows_per_sec: Option<u64>,
    pub target_exists: TargetExists,
    /// `maintenance_work_mem` for index builds on the target (each parallel build may use it).
    #[serde(default = "default_index_memory")]
    pub index_memory: String,
    #[serde(default)]
    pub apply_mode: ApplyMode,
    /// Workers of `--apply-mode per-key` (fixed for the life of the job: keys are routed by it).
    #[serde(default = "default_apply_workers")]
    pub apply_workers: usize,
    /// `--newer-wins COLUMN`: a property of the run (turned on for a dual-write period).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newer_wins: Option<String>,
    /// `--column-type TABLE.COLUMN=TYPE`: the target type of a column instead of the type
    /// map's (MySQL/MariaDB → PostgreSQL), fixed at the job's first run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub column_types: Vec<ColumnType>,
    /// Not stored with the job: a property of one run.
    #[serde(skip)]
    pub until: Option<Until>,
}

/// One `--column-type` override.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnType {
    pub table: String,
    pub column: String,
    pub target_type: String,
}

impl ColumnType {
    /// `table.column=type`.
    pub fn parse(text: &str) -> Result<ColumnType, String> {
        let (name, ty) = text
            .split_once('=')
            .ok_or_else(|| format!("{text:?} must look like TABLE.COLUMN=TYPE"))?;
        let (table, column) = name
            .rsplit_once('.')
            .ok_or_else(|| format!("{text:?} must name a column as TABLE.COLUMN"))?;
        let ty = ty.trim();
        // The type goes into CREATE TABLE as it is: a type name with its modifiers only.
        if table.is_empty()
            || column.is_empty()
            || ty.is_empty()
            || !ty
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || " _(),[]".contains(c))
        {
            return Err(format!(
                "{text:?} must look like TABLE.COLUMN=TYPE with a type such as smallint, text, varchar(40) or numeric(20,0)"
            ));
        }
        Ok(ColumnType {
            table: table.to_owned(),
            column: column.to_owned(),
            target_type: ty.to_owned(),
        })
    }
}

fn default_apply_workers() -> usize {
    4
}

fn default_index_memory() -> String {
    DEFAULT_INDEX_MEMORY.to_owned()
}

/// Index builds after the load: 512MB sorts a primary key of tens of millions of rows in
/// memory (measured: a 5M-row key builds in 2.4 s with 256MB and 3.4 s with the server's
/// default 64MB). With `--jobs N` up to N builds run at once, so the target may use N times this.
pub const DEFAULT_INDEX_MEMORY: &str = "512MB";

/// A PostgreSQL memory setting: digits with an optional kB, MB, GB or TB unit.
pub fn valid_memory_setting(value: &str) -> bool {
    let digits = value.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &value[digits.len()..];
    !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit())
        && matches!(unit, "" | "kB" | "MB" | "GB" | "TB")
}

impl JobSpec {
    /// A new job's id (lowercase hex and `_`, valid in replication slot names): a hash of its endpoints (recognisable across jobs between the same
    /// databases) and a unique suffix (two jobs never share bookkeeping rows on a target).
    /// Stored in the state store; a resumed job keeps its id.
    pub fn new_job_id(&self) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let unique = (nanos ^ u64::from(std::process::id()).rotate_left(32)) & 0xff_ffff;
        format!("{}_{unique:06x}", self.endpoint_hash())
    }

    fn endpoint_hash(&self) -> String {
        // FNV-1a: stable across builds and platforms, unlike `DefaultHasher`.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in format!("{}\u{0}{}", self.source.identity(), self.target.identity()).bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{:012x}", hash & 0xffff_ffff_ffff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_settings() {
        for ok in ["512MB", "2GB", "65536kB", "1024", "1TB"] {
            assert!(valid_memory_setting(ok), "{ok}");
        }
        for bad in [
            "",
            "MB",
            "5 MB",
            "1.5GB",
            "512mb",
            "1GB; DROP TABLE x",
            "-1MB",
        ] {
            assert!(!valid_memory_setting(bad), "{bad}");
        }
    }
}
