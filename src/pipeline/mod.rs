//! Wiring: the phases of a job, their tasks and the retry policy. No protocol logic lives here.

pub mod binlog_spool;
pub mod binlog_target;
pub mod cdc;
pub mod cutover;
pub mod mysql;
pub mod objects;
pub mod pg_binary;
pub mod pg_mysql;
pub mod rows;
pub mod snapshot;
pub mod sqlite_switch;

use crate::engine::ErrorClass;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Postgres(#[from] crate::engine::postgres::Error),
    #[error(transparent)]
    Mysql(crate::engine::mysql::Error),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Definite(String),
    #[error("interrupted; run the same command again to resume")]
    Interrupted,
}

impl Error {
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Postgres(e) => e.class(),
            Error::Mysql(e) => e.class(),
            _ => ErrorClass::Definite,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How often and how long to retry a transient failure of one unit of work (a chunk, a DDL
/// step): a restarting server or a dropped connection usually recovers within seconds.
pub const RETRY_DELAYS_MS: [u64; 5] = [200, 1_000, 3_000, 8_000, 15_000];

/// The one retry policy: `Some(delay)` to retry attempt `attempt` (0-based) of a failure.
pub fn retry_delay(error: &Error, attempt: usize) -> Option<std::time::Duration> {
    if error.class() == ErrorClass::Transient {
        RETRY_DELAYS_MS
            .get(attempt)
            .map(|ms| std::time::Duration::from_millis(*ms))
    } else {
        None
    }
}

/// Backoff for tasks that run indefinitely and reconnect after transient failures (change
/// capture, apply): the retry delays, then the longest one again, up to a cap of attempts; a
/// task that made progress since its last failure starts over with the shortest delay.
#[derive(Debug, Default)]
pub struct Reconnect {
    attempt: usize,
}

impl Reconnect {
    /// Consecutive failures without progress after which the task gives up.
    pub const MAX_ATTEMPTS: usize = 40;

    /// The last session made progress: the next failure waits the shortest delay.
    pub fn progressed(&mut self) {
        self.attempt = 0;
    }

    /// Log the failure and wait before the next attempt. `Ok(true)` to retry, `Ok(false)`
    /// when cancelled while waiting, `Err(error)` when the attempts are used up.
    pub async fn wait<E: std::fmt::Display>(
        &mut self,
        what: &str,
        error: E,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<bool, E> {
        let delay = RETRY_DELAYS_MS[self.attempt.min(RETRY_DELAYS_MS.len() - 1)];
        self.attempt += 1;
        if self.attempt > Self::MAX_ATTEMPTS {
            return Err(error);
        }
        tracing::warn!("{what}: {error}; reconnecting in {delay} ms");
        tokio::select! {
            _ = cancel.cancelled() => Ok(false),
            _ = tokio::time::sleep(std::time::Duration::from_millis(delay)) => Ok(true),
        }
    }
}
