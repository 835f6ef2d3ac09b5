//! The job's state store: an embedded SQLite database in the state directory.
//!
//! It holds the job definition (endpoints without secrets), the schema read from the source,
//! per-table and per-chunk progress, completed DDL steps and positions. It is a cache of
//! progress, never the only record of data: every chunk is redone safely if the store lost its
//! completion (see `engine::postgres::snapshot`). One process at a time owns a state directory,
//! enforced with an OS file lock that dies with the process (SIGKILL included).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

/// Bumped whenever the tables below change; older stores are migrated in [`migrate`].
pub const SCHEMA_VERSION: i64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "state directory {dir} is in use by another kuaka process (pid {pid}); wait for it to finish or stop it first"
    )]
    Locked { dir: String, pid: String },
    #[error("state directory {dir}: {message}")]
    Io { dir: String, message: String },
    #[error("state store {path}: {source}")]
    Sqlite {
        path: String,
        source: rusqlite::Error,
    },
    #[error(
        "state store {path} has schema version {found}, newer than this kuaka understands ({SCHEMA_VERSION}); use a newer kuaka"
    )]
    TooNew { path: String, found: i64 },
    #[error("{0}")]
    Mismatch(String),
}

type Result<T, E = StateError> = std::result::Result<T, E>;

/// Progress of one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkState {
    Pending,
    /// A copy began; its target transaction may or may not have committed.
    Started,
    Done,
}

impl ChunkState {
    fn as_str(self) -> &'static str {
        match self {
            ChunkState::Pending => "pending",
            ChunkState::Started => "started",
            ChunkState::Done => "done",
        }
    }
    fn parse(s: &str) -> ChunkState {
        match s {
            "started" => ChunkState::Started,
            "done" => ChunkState::Done,
            _ => ChunkState::Pending,
        }
    }
}

#[derive(Clone, Debug)]
pub struct TableRecord {
    pub id: i64,
    pub schema: String,
    pub name: String,
    pub chunking: String,
    pub copy_format: String,
    pub state: String,
    pub rows_estimated: i64,
    pub rows_copied: i64,
    pub bytes_copied: i64,
    pub chunks_total: i64,
    pub chunks_done: i64,
    pub last_error: Option<String>,
}

/// The chunk plan of one table, as stored (chunking, format and ranges as JSON).
#[derive(Clone, Debug)]
pub struct TablePlan {
    pub schema: String,
    pub name: String,
    pub chunking: String,
    pub copy_format: String,
    pub rows_estimated: i64,
    pub ranges: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct ChunkRecord {
    pub table_id: i64,
    pub chunk_no: i64,
    pub range: String,
    pub state: ChunkState,
}

#[derive(Clone, Debug)]
pub struct JobRecord {
    pub job_id: String,
    pub source: String,
    pub target: String,
    pub spec: String,
    pub phase: String,
    pub created_at: String,
    pub updated_at: String,
    pub last_error: Option<String>,
}

/// An open state store. Methods take `&self`; the connection sits behind a mutex held only for
/// the duration of one statement (never across an `.await`).
pub struct StateStore {
    conn: Mutex<Connection>,
    path: PathBuf,
    _lock: Option<File>,
}

fn now() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // RFC 3339 in UTC without pulling a date crate: civil-from-days (Howard Hinnant).
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = if month <= 2 { y + 1 } else { y };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Whether a process holds the directory's lock (a `kuaka run` is working on it).
pub fn is_locked(dir: &Path) -> bool {
    let Ok(lock) = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("lock"))
    else {
        return false;
    };
    match lock.try_lock() {
        Ok(()) => {
            let _ = lock.unlock();
            false
        }
        Err(_) => true,
    }
}

impl StateStore {
    /// Open (creating if needed) the store in `dir` and take the directory's lock.
    pub fn open_locked(dir: &Path) -> Result<StateStore> {
        let dir_s = dir.display().to_string();
        std::fs::create_dir_all(dir).map_err(|e| StateError::Io {
            dir: dir_s.clone(),
            message: e.to_string(),
        })?;
        let lock_path = dir.join("lock");
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| StateError::Io {
                dir: dir_s.clone(),
                message: format!("opening lock file: {e}"),
            })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let pid = std::fs::read_to_string(&lock_path)
                    .unwrap_or_default()
                    .trim()
                    .to_owned();
                return Err(StateError::Locked {
                    dir: dir_s,
                    pid: if pid.is_empty() {
                        "unknown".into()
                    } else {
                        pid
                    },
                });
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(StateError::Io {
                    dir: dir_s,
                    message: format!("locking: {e}"),
                });
            }
        }
        lock.set_len(0).ok();
        let _ = write!(lock, "{}", std::process::id());
        let mut store = Self::open_at(&dir.join("state.db"))?;
        store._lock = Some(lock);
        Ok(store)
    }

    /// Open without the lock, read-only use (`kuaka status`). `None` when there is no store.
    pub fn open_for_reading(dir: &Path) -> Result<Option<StateStore>> {
        let path = dir.join("state.db");
        if !path.exists() {
            return Ok(None);
        }
        Self::open_at(&path).map(Some)
    }

    fn open_at(path: &Path) -> Result<StateStore> {
        let p = path.display().to_string();
        let err = |source| StateError::Sqlite {
            path: p.clone(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(err)?;
        // WAL + NORMAL: a killed process loses nothing committed; only power loss can drop the
        // last transactions, and every chunk is safe to redo.
        // Switching to WAL and creating the schema take locks for which SQLite may answer
        // "busy" at once, without waiting, when another process opens the same new store (a
        // `status` beside a starting `run`): retry for a while.
        let mut attempt = 0;
        let setup = loop {
            let result = conn
                .execute_batch(
                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
                )
                .map_err(MigrateError::Sqlite)
                .and_then(|()| migrate(&conn));
            match result {
                Err(MigrateError::Sqlite(e))
                    if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
                        && attempt < 200 =>
                {
                    attempt += 1;
                    std::thread::sleep(std::time::Duration::from_millis(25));
                }
                other => break other,
            }
        };
        setup.map_err(|e| match e {
            MigrateError::Sqlite(source) => StateError::Sqlite {
                path: p.clone(),
                source,
            },
            MigrateError::TooNew(found) => StateError::TooNew {
                path: p.clone(),
                found,
            },
        })?;
        Ok(StateStore {
            conn: Mutex::new(conn),
            path: path.to_owned(),
            _lock: None,
        })
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        f(&conn).map_err(|source| StateError::Sqlite {
            path: self.path.display().to_string(),
            source,
        })
    }

    /// The state directory this store lives in.
    pub fn dir(&self) -> PathBuf {
        self.path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    pub fn job(&self) -> Result<Option<JobRecord>> {
        self.with(|c| {
            c.query_row(
                "SELECT job_id, source, target, spec, phase, created_at, updated_at, last_error FROM job WHERE id = 1",
                [],
                |r| {
                    Ok(JobRecord {
                        job_id: r.get(0)?,
                        source: r.get(1)?,
                        target: r.get(2)?,
                        spec: r.get(3)?,
                        phase: r.get(4)?,
                        created_at: r.get(5)?,
                        updated_at: r.get(6)?,
                        last_error: r.get(7)?,
                    })
                },
            )
            .optional()
        })
    }

    pub fn create_job(&self, job_id: &str, source: &str, target: &str, spec: &str) -> Result<()> {
        let t = now();
        self.with(|c| {
            c.execute(
                "INSERT INTO job (id, job_id, source, target, spec, phase, created_at, updated_at) \
                 VALUES (1, ?1, ?2, ?3, ?4, 'planned', ?5, ?5)",
                params![job_id, source, target, spec, t],
            )
            .map(|_| ())
        })
    }

    /// Replace the stored job spec (only before the job has done anything).
    pub fn set_job_spec(&self, spec: &str) -> Result<()> {
        let t = now();
        self.with(|c| {
            c.execute(
                "UPDATE job SET spec = ?1, updated_at = ?2 WHERE id = 1",
                params![spec, t],
            )
            .map(|_| ())
        })
    }

    pub fn set_phase(&self, phase: &str) -> Result<()> {
        let t = now();
        self.with(|c| {
            c.execute(
                "UPDATE job SET phase = ?1, updated_at = ?2, last_error = NULL WHERE id = 1",
                params![phase, t],
            )
            .map(|_| ())
        })
    }

    pub fn set_job_error(&self, error: &str) -> Result<()> {
        let t = now();
        self.with(|c| {
            c.execute(
                "UPDATE job SET last_error = ?1, updated_at = ?2 WHERE id = 1",
                params![error, t],
            )
            .map(|_| ())
        })
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>> {
        self.with(|c| {
            c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
        })
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )
            .map(|_| ())
        })
    }

    /// Record the chunk plan of every table at once (one transaction: all or nothing).
    pub fn save_plan(&self, tables: &[TablePlan]) -> Result<()> {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let path = self.path.display().to_string();
        let run = |conn: &mut Connection| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            for t in tables {
                tx.execute(
                    "INSERT INTO tables (schema_name, table_name, chunking, copy_format, state, rows_estimated, chunks_total) \
                     VALUES (?1, ?2, ?3, ?4, 'pending', ?5, ?6)",
                    params![t.schema, t.name, t.chunking, t.copy_format, t.rows_estimated, t.ranges.len() as i64],
                )?;
                let id = tx.last_insert_rowid();
                for (i, range) in t.ranges.iter().enumerate() {
                    tx.execute(
                        "INSERT INTO chunks (table_id, chunk_no, range, state) VALUES (?1, ?2, ?3, 'pending')",
                        params![id, i as i64, range],
                    )?;
                }
            }
            tx.execute(
                "UPDATE job SET phase = 'copying', updated_at = ?1 WHERE id = 1",
                [now()],
            )?;
            tx.commit()
        };
        run(&mut conn).map_err(|source| StateError::Sqlite { path, source })
    }

    pub fn tables(&self) -> Result<Vec<TableRecord>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT t.id, t.schema_name, t.table_name, t.chunking, t.copy_format, t.state, t.rows_estimated, \
                        COALESCE((SELECT sum(rows) FROM chunks k WHERE k.table_id = t.id AND k.state = 'done'), 0), \
                        COALESCE((SELECT sum(bytes) FROM chunks k WHERE k.table_id = t.id AND k.state = 'done'), 0), \
                        t.chunks_total, \
                        (SELECT count(*) FROM chunks k WHERE k.table_id = t.id AND k.state = 'done'), t.last_error \
                 FROM tables t ORDER BY t.id",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(TableRecord {
                    id: r.get(0)?,
                    schema: r.get(1)?,
                    name: r.get(2)?,
                    chunking: r.get(3)?,
                    copy_format: r.get(4)?,
                    state: r.get(5)?,
                    rows_estimated: r.get(6)?,
                    rows_copied: r.get(7)?,
                    bytes_copied: r.get(8)?,
                    chunks_total: r.get(9)?,
                    chunks_done: r.get(10)?,
                    last_error: r.get(11)?,
                })
            })?;
            rows.collect()
        })
    }

    pub fn chunks(&self, table_id: i64) -> Result<Vec<ChunkRecord>> {
        self.with(|c| {
            let mut stmt =
                c.prepare("SELECT table_id, chunk_no, range, state FROM chunks WHERE table_id = ?1 ORDER BY chunk_no")?;
            let rows = stmt.query_map([table_id], |r| {
                Ok(ChunkRecord {
                    table_id: r.get(0)?,
                    chunk_no: r.get(1)?,
                    range: r.get(2)?,
                    state: ChunkState::parse(&r.get::<_, String>(3)?),
                })
            })?;
            rows.collect()
        })
    }

    pub fn set_chunk_state(
        &self,
        table_id: i64,
        chunk_no: i64,
        state: ChunkState,
        rows: i64,
        bytes: i64,
    ) -> Result<()> {
        let t = now();
        self.with(|c| {
            c.execute(
                "UPDATE chunks SET state = ?3, rows = ?4, bytes = ?5, updated_at = ?6, \
                        attempts = attempts + CASE WHEN ?3 = 'started' THEN 1 ELSE 0 END \
                 WHERE table_id = ?1 AND chunk_no = ?2",
                params![table_id, chunk_no, state.as_str(), rows, bytes, t],
            )
            .map(|_| ())
        })
    }

    /// Mark every chunk of a table pending again (a table re-copied whole).
    pub fn reset_table_chunks(&self, table_id: i64) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE chunks SET state = 'pending', rows = 0, bytes = 0 WHERE table_id = ?1",
                [table_id],
            )
            .map(|_| ())
        })
    }

    pub fn set_table_state(&self, table_id: i64, state: &str, error: Option<&str>) -> Result<()> {
        let t = now();
        self.with(|c| {
            c.execute(
                "UPDATE tables SET state = ?2, last_error = ?3, \
                        started_at = COALESCE(started_at, CASE WHEN ?2 = 'copying' THEN ?4 END), \
                        finished_at = CASE WHEN ?2 = 'copied' THEN ?4 ELSE finished_at END \
                 WHERE id = ?1",
                params![table_id, state, error, t],
            )
            .map(|_| ())
        })
    }

    pub fn step_done(&self, key: &str) -> Result<bool> {
        self.with(|c| {
            c.query_row("SELECT 1 FROM steps WHERE key = ?1", [key], |_| Ok(()))
                .optional()
                .map(|r| r.is_some())
        })
    }

    pub fn mark_step(&self, key: &str, phase: &str) -> Result<()> {
        let t = now();
        self.with(|c| {
            c.execute(
                "INSERT INTO steps (key, phase, finished_at) VALUES (?1, ?2, ?3) ON CONFLICT (key) DO NOTHING",
                params![key, phase, t],
            )
            .map(|_| ())
        })
    }

    pub fn steps_done(&self, phase: &str) -> Result<i64> {
        self.with(|c| {
            c.query_row(
                "SELECT count(*) FROM steps WHERE phase = ?1",
                [phase],
                |r| r.get(0),
            )
        })
    }

    pub fn set_position(&self, name: &str, value: &str) -> Result<()> {
        let t = now();
        self.with(|c| {
            c.execute(
                "INSERT INTO positions (name, value, recorded_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value, recorded_at = excluded.recorded_at",
                params![name, value, t],
            )
            .map(|_| ())
        })
    }

    pub fn positions(&self) -> Result<Vec<(String, String, String)>> {
        self.with(|c| {
            let mut stmt =
                c.prepare("SELECT name, value, recorded_at FROM positions ORDER BY name")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect()
        })
    }

    pub fn start_run(&self) -> Result<i64> {
        let t = now();
        self.with(|c| {
            c.execute(
                "INSERT INTO runs (started_at, pid) VALUES (?1, ?2)",
                params![t, std::process::id()],
            )?;
            Ok(c.last_insert_rowid())
        })
    }

    pub fn finish_run(&self, run: i64, outcome: &str) -> Result<()> {
        let t = now();
        self.with(|c| {
            c.execute(
                "UPDATE runs SET finished_at = ?2, outcome = ?3 WHERE id = ?1",
                params![run, t, outcome],
            )
            .map(|_| ())
        })
    }

    pub fn run_count(&self) -> Result<i64> {
        self.with(|c| c.query_row("SELECT count(*) FROM runs", [], |r| r.get(0)))
    }
}

enum MigrateError {
    Sqlite(rusqlite::Error),
    TooNew(i64),
}

impl From<rusqlite::Error> for MigrateError {
    fn from(e: rusqlite::Error) -> Self {
        MigrateError::Sqlite(e)
    }
}

/// Bring the store's schema up to date. Another process (a `status` next to a starting `run`)
/// may be doing the same: the version is read under the write lock, so only one creates.
fn migrate(conn: &Connection) -> std::result::Result<(), MigrateError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(MigrateError::TooNew(version));
    }
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let version: i64 = match conn.query_row("PRAGMA user_version", [], |r| r.get(0)) {
        Ok(v) => v,
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e.into());
        }
    };
    if version >= 1 {
        conn.execute_batch("COMMIT")?;
        return Ok(());
    }
    {
        conn.execute_batch(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE job (
                 id INTEGER PRIMARY KEY CHECK (id = 1),
                 job_id TEXT NOT NULL, source TEXT NOT NULL, target TEXT NOT NULL, spec TEXT NOT NULL,
                 phase TEXT NOT NULL, created_at TEXT NOT NULL, updated_at TEXT NOT NULL, last_error TEXT);
             CREATE TABLE tables (
                 id INTEGER PRIMARY KEY, schema_name TEXT NOT NULL, table_name TEXT NOT NULL,
                 chunking TEXT NOT NULL, copy_format TEXT NOT NULL, state TEXT NOT NULL,
                 rows_estimated INTEGER NOT NULL DEFAULT 0, chunks_total INTEGER NOT NULL DEFAULT 0,
                 started_at TEXT, finished_at TEXT, last_error TEXT,
                 UNIQUE (schema_name, table_name));
             CREATE TABLE chunks (
                 table_id INTEGER NOT NULL REFERENCES tables (id), chunk_no INTEGER NOT NULL,
                 range TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
                 rows INTEGER NOT NULL DEFAULT 0, bytes INTEGER NOT NULL DEFAULT 0, updated_at TEXT,
                 PRIMARY KEY (table_id, chunk_no));
             CREATE TABLE steps (key TEXT PRIMARY KEY, phase TEXT NOT NULL, finished_at TEXT NOT NULL);
             CREATE TABLE positions (name TEXT PRIMARY KEY, value TEXT NOT NULL, recorded_at TEXT NOT NULL);
             CREATE TABLE runs (id INTEGER PRIMARY KEY, started_at TEXT NOT NULL, finished_at TEXT,
                                pid INTEGER NOT NULL, outcome TEXT);
             PRAGMA user_version = 1;
             COMMIT;",
        )
        .inspect_err(|_| {
            let _ = conn.execute_batch("ROLLBACK");
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_first_opens_create_the_schema_once() {
        // A `status` polling next to a starting `run` used to race on CREATE TABLE.
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("state.db");
            let threads: Vec<_> = (0..6)
                .map(|_| {
                    let path = path.clone();
                    std::thread::spawn(move || StateStore::open_at(&path).map(|_| ()))
                })
                .collect();
            for t in threads {
                t.join().unwrap().expect("open");
            }
        }
    }

    #[test]
    fn second_open_of_a_locked_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateStore::open_locked(dir.path()).unwrap();
        let err = StateStore::open_locked(dir.path())
            .err()
            .expect("second open must fail");
        assert!(matches!(err, StateError::Locked { .. }), "{err}");
        assert!(
            err.to_string().contains(&std::process::id().to_string()),
            "{err}"
        );
        drop(first);
        StateStore::open_locked(dir.path()).unwrap();
    }

    #[test]
    fn plan_and_chunk_progress_persist() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = StateStore::open_locked(dir.path()).unwrap();
            s.create_job("j1", "postgres://a@h:1/x", "postgres://b@h:2/y", "{}")
                .unwrap();
            s.save_plan(&[TablePlan {
                schema: "public".into(),
                name: "t".into(),
                chunking: "{}".into(),
                copy_format: "binary".into(),
                rows_estimated: 10,
                ranges: vec!["r0".into(), "r1".into()],
            }])
            .unwrap();
            let t = &s.tables().unwrap()[0];
            s.set_chunk_state(t.id, 1, ChunkState::Started, 0, 0)
                .unwrap();
            s.set_chunk_state(t.id, 0, ChunkState::Done, 7, 70).unwrap();
        }
        let s = StateStore::open_locked(dir.path()).unwrap();
        assert_eq!(s.job().unwrap().unwrap().phase, "copying");
        let t = &s.tables().unwrap()[0];
        assert_eq!((t.rows_copied, t.chunks_done, t.chunks_total), (7, 1, 2));
        let chunks = s.chunks(t.id).unwrap();
        assert_eq!(chunks[1].state, ChunkState::Started);
        assert!(now().ends_with('Z') && now().len() == 24, "{}", now());
    }
}
