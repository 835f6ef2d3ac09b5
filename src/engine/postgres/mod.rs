//! PostgreSQL as a source and a target.
//!
//! Protocol notes:
//! - Snapshot reads use an exported snapshot (`pg_export_snapshot()` in a `REPEATABLE READ`
//!   transaction on a coordinator connection, imported with `SET TRANSACTION SNAPSHOT` by each
//!   chunk's transaction), so every chunk sees the same instant even though chunks run in
//!   separate short transactions that hold table locks only while they copy.
//!   <https://www.postgresql.org/docs/15/functions-admin.html#FUNCTIONS-SNAPSHOT-SYNCHRONIZATION>
//! - Rows move as `COPY ... TO STDOUT (FORMAT binary)` piped into `COPY ... FROM STDIN (FORMAT
//!   binary)` without decoding. The binary form of arrays and composites embeds element type
//!   OIDs, which differ between databases for user types, so tables with such columns use the
//!   text format (still pass-through) instead.
//!   <https://www.postgresql.org/docs/15/sql-copy.html#id-1.9.3.55.9.4>

pub mod apply;
pub mod capture;
pub mod catalog;
pub mod ddl;
pub mod decode;
pub mod replication;
pub mod rows;
pub mod snapshot;
pub mod tls;
pub mod wire;

use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use crate::config::Endpoint;
use crate::engine::ErrorClass;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to {endpoint}: {message}")]
    Connect {
        endpoint: String,
        message: String,
        class: ErrorClass,
    },
    #[error(
        "password authentication failed for user {user:?} at {endpoint}; check the password (URL or --{side}-password-env)"
    )]
    Auth {
        endpoint: String,
        user: String,
        side: String,
    },
    #[error("{context}: {message}")]
    Query {
        context: String,
        message: String,
        class: ErrorClass,
        sqlstate: Option<String>,
    },
    #[error("{0}")]
    Definite(String),
    /// The exported snapshot no longer exists (its connection ended, e.g. a source restart).
    #[error(
        "the source snapshot is gone (the source restarted or kuaka's connection holding it dropped) while reading {table}; run the same command again to resume"
    )]
    SnapshotLost { table: String },
}

impl Error {
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Connect { class, .. } | Error::Query { class, .. } => *class,
            Error::Auth { .. } | Error::Definite(_) | Error::SnapshotLost { .. } => {
                ErrorClass::Definite
            }
        }
    }

    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Error::Query { sqlstate, .. } => sqlstate.as_deref(),
            _ => None,
        }
    }

    /// Wrap a driver error with what we were doing.
    pub fn query(context: impl Into<String>, e: tokio_postgres::Error) -> Error {
        let sqlstate = e.code().map(|c| c.code().to_owned());
        Error::Query {
            context: context.into(),
            message: describe(&e),
            class: classify(&e),
            sqlstate,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Extension to attach context to driver results.
pub trait Context<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, tokio_postgres::Error> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::query(context(), e))
    }
}

/// The server's message with detail and hint, or the client-side error chain.
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} ({})", db.message(), db.code().code());
        if let Some(d) = db.detail() {
            s.push_str(&format!("; detail: {d}"));
        }
        if let Some(h) = db.hint() {
            s.push_str(&format!("; hint: {h}"));
        }
        return s;
    }
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    s
}

fn classify(e: &tokio_postgres::Error) -> ErrorClass {
    match e.code() {
        Some(code) => classify_sqlstate(code.code()),
        // No SQLSTATE: an I/O or protocol error, i.e. the connection.
        None => ErrorClass::Transient,
    }
}

/// Whether a server error with this SQLSTATE may go away on retry.
pub fn classify_sqlstate(c: &str) -> ErrorClass {
    let transient = c.starts_with("08") // connection exception
        || c == "40001" // serialization_failure
        || c == "40P01" // deadlock_detected
        || c == "53300" // too_many_connections
        || c.starts_with("57P") // admin/crash shutdown, cannot connect now
        || c == "55P03"; // lock_not_available
    if transient {
        ErrorClass::Transient
    } else {
        ErrorClass::Definite
    }
}

/// Which side of the job an endpoint is, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Source,
    Target,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Target => "target",
        }
    }
}

/// Open a connection and drive it on a background task.
pub async fn connect(endpoint: &Endpoint, side: Side, role: &str) -> Result<Client> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(&endpoint.host)
        .port(endpoint.port)
        .user(&endpoint.user)
        .dbname(&endpoint.database)
        .application_name(format!("kuaka {role}"))
        .connect_timeout(endpoint.connect_timeout())
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30));
    // kuaka's sessions write through a cutover's fence (`default_transaction_read_only` set
    // for the database while the application is held off).
    let fence_exempt = "-c default_transaction_read_only=off";
    match endpoint.param("options") {
        Some(options) => config.options(format!("{options} {fence_exempt}")),
        None => config.options(fence_exempt),
    };
    if let Some(password) = &endpoint.password {
        config.password(password.expose());
    }
    let mode = tls::mode_of(endpoint)?;
    config.ssl_mode(mode.negotiation());
    let connector = tls::connector(
        mode,
        endpoint.param("sslrootcert").map(std::path::Path::new),
    )
    .map_err(|e| Error::Connect {
        endpoint: format!("{} ({})", endpoint.redacted(), side.name()),
        message: e.to_string(),
        class: ErrorClass::Definite,
    })?;
    let connected = match connector {
        None => config.connect(NoTls).await.map(|(client, connection)| {
            drive(connection);
            client
        }),
        Some(tls) => config.connect(tls).await.map(|(client, connection)| {
            drive(connection);
            client
        }),
    };
    let client = match connected {
        Ok(client) => client,
        Err(e) => {
            let code = e.code().map(|c| c.code().to_owned());
            if code.as_deref() == Some("28P01") || code.as_deref() == Some("28000") {
                if code.as_deref() == Some("28P01") {
                    return Err(Error::Auth {
                        endpoint: endpoint.host_port(),
                        user: endpoint.user.clone(),
                        side: side.name().to_owned(),
                    });
                }
                return Err(Error::Connect {
                    endpoint: endpoint.redacted(),
                    message: format!("{}; check pg_hba.conf and the user name", describe(&e)),
                    class: ErrorClass::Definite,
                });
            }
            if code.as_deref() == Some("3D000") {
                return Err(Error::Connect {
                    endpoint: endpoint.redacted(),
                    message: format!(
                        "database {:?} does not exist; create it first",
                        endpoint.database
                    ),
                    class: ErrorClass::Definite,
                });
            }
            let message = describe(&e);
            let message = if message.contains("password missing") {
                format!(
                    "the server asks for a password and none was given; put it in the URL or use --{}-password-env",
                    side.name()
                )
            } else {
                tls::with_trust_hint(message)
            };
            return Err(Error::Connect {
                endpoint: format!("{} ({})", endpoint.redacted(), side.name()),
                message,
                class: classify(&e),
            });
        }
    };
    Ok(client)
}

/// Run a connection's I/O on a background task until it closes.
fn drive<F>(connection: F)
where
    F: std::future::Future<Output = std::result::Result<(), tokio_postgres::Error>>
        + Send
        + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %describe(&e), "connection ended");
        }
    });
}

/// Server version as `server_version_num` (e.g. 150008).
pub async fn server_version(client: &Client) -> Result<i32> {
    let row = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .ctx(|| "reading server_version_num".into())?;
    Ok(row.get(0))
}
