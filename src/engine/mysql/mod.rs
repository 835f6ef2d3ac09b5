//! MySQL and MariaDB: connections, flavour detection, error classification.
//!
//! - `catalog`: `information_schema` → model tables, with the MySQL column details that value
//!   conversion needs (signedness, ENUM/SET labels, character set).
//! - `decode`: pure conversion of binlog events and text-protocol values into model values,
//!   the binlog position tracker (u64 offsets), and MariaDB's GTID events, which
//!   `mysql_common` does not parse.
//! - `binlog`: the replication connection (`COM_REGISTER_SLAVE` + `COM_BINLOG_DUMP` from a file
//!   and offset) and the state machine that turns events into committed transactions.
//!
//! kuaka talks to the server as a replica would: it never takes `FLUSH TABLES WITH READ LOCK`
//! (managed services forbid it). The snapshot → binlog hand-off uses binlog positions read
//! before and after the copy (DESIGN.md's P0/P1 rule).

pub mod apply;
pub mod binlog;
pub mod catalog;
pub mod decode;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder, SslOpts};

use crate::config::Endpoint;
use crate::engine::ErrorClass;
use crate::pipeline::Error as PipelineError;

/// A MySQL/MariaDB failure with what kuaka was doing and whether a retry can help.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {message}")]
pub struct Error {
    pub context: String,
    pub message: String,
    pub class: ErrorClass,
}

impl Error {
    pub fn class(&self) -> ErrorClass {
        self.class
    }
}

/// Server error codes that a retry after reconnecting can get past.
const TRANSIENT_CODES: &[u16] = &[
    1040, // too many connections
    1053, // server shutdown in progress
    1205, // lock wait timeout
    1213, // deadlock
    1290, // --read-only while a failover is under way
    1927, // connection was killed
    2006, // server has gone away
    2013, // lost connection during query
];

/// Classify a driver error: network trouble and a restarting server are transient.
pub fn error(context: impl Into<String>, e: mysql_async::Error) -> Error {
    let context = context.into();
    let (message, class) = match &e {
        mysql_async::Error::Server(s) => (
            format!("{} (error {})", s.message, s.code),
            // Codes below 1000 are the server's operating-system errors (a file it could
            // not create, read or delete): usually passing, retried a few times.
            if TRANSIENT_CODES.contains(&s.code) || s.code < 1000 {
                ErrorClass::Transient
            } else {
                ErrorClass::Definite
            },
        ),
        mysql_async::Error::Io(_) => (e.to_string(), ErrorClass::Transient),
        mysql_async::Error::Driver(d) => (
            d.to_string(),
            match d {
                mysql_async::DriverError::ConnectionClosed
                | mysql_async::DriverError::PoolDisconnected => ErrorClass::Transient,
                _ => ErrorClass::Definite,
            },
        ),
        other => (other.to_string(), ErrorClass::Definite),
    };
    Error {
        context,
        message,
        class,
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which server: the binlog protocol and GTIDs differ between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    Mysql,
    Mariadb,
}

/// Connection options for an endpoint. TLS follows `sslmode` like on PostgreSQL: `disable`
/// (default `prefer` is treated as disable: the driver cannot fall back), `require` (encrypt,
/// no certificate check), `verify-ca`/`verify-full` (check against `sslrootcert` or the
/// built-in roots).
pub fn options(endpoint: &Endpoint) -> OptsBuilder {
    let mut builder = OptsBuilder::default()
        .ip_or_hostname(endpoint.host.clone())
        .tcp_port(endpoint.port)
        .user(Some(endpoint.user.clone()))
        .pass(endpoint.password.as_ref().map(|p| p.expose().to_owned()))
        .db_name(Some(endpoint.database.clone()))
        .prefer_socket(false)
        .stmt_cache_size(Some(0))
        // Text in and out as UTF-8 (4-byte characters included); session time zone UTC so
        // TIMESTAMP values read in the snapshot match the binlog's (which stores UTC seconds).
        .init(vec![
            "SET NAMES utf8mb4",
            "SET SESSION time_zone = '+00:00'",
            "SET SESSION sql_mode = ''",
        ]);
    match endpoint.param("sslmode") {
        Some("require") => {
            builder = builder.ssl_opts(Some(
                SslOpts::default()
                    .with_danger_accept_invalid_certs(true)
                    .with_danger_skip_domain_validation(true),
            ))
        }
        Some(mode @ ("verify-ca" | "verify-full")) => {
            let mut ssl =
                SslOpts::default().with_danger_skip_domain_validation(mode == "verify-ca");
            if let Some(ca) = endpoint.param("sslrootcert") {
                ssl = ssl.with_root_certs(vec![std::path::PathBuf::from(ca).into()]);
            }
            builder = builder.ssl_opts(Some(ssl));
        }
        _ => {}
    }
    builder
}

/// Connect, with the endpoint's `connect_timeout`.
pub async fn connect(endpoint: &Endpoint, role: &str) -> Result<Conn> {
    let context = format!("connecting to {} ({role})", endpoint.redacted());
    match tokio::time::timeout(endpoint.connect_timeout(), Conn::new(options(endpoint))).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(error(context, e)),
        Err(_) => Err(Error {
            context,
            message: format!(
                "no answer within {} s (connect_timeout)",
                endpoint.connect_timeout().as_secs()
            ),
            class: ErrorClass::Transient,
        }),
    }
}

/// MySQL or MariaDB, from `SELECT VERSION()`.
pub async fn flavour(conn: &mut Conn) -> Result<(Flavour, String)> {
    let version: String = conn
        .query_first("SELECT VERSION()")
        .await
        .map_err(|e| error("reading the server version", e))?
        .unwrap_or_default();
    let flavour = if version.to_ascii_lowercase().contains("mariadb") {
        Flavour::Mariadb
    } else {
        Flavour::Mysql
    };
    Ok((flavour, version))
}

/// Quote a MySQL identifier with backticks.
pub fn quote_ident(ident: &str) -> String {
    format!("`{}`", ident.replace('`', "``"))
}

/// Quote a MySQL string literal (backslashes escaped too: the default `sql_mode` treats them
/// as escapes).
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

impl From<Error> for PipelineError {
    fn from(e: Error) -> Self {
        PipelineError::Mysql(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: u16) -> mysql_async::Error {
        mysql_async::Error::Server(mysql_async::ServerError {
            code,
            message: "m".into(),
            state: "HY000".into(),
        })
    }

    #[test]
    fn server_errors_are_classified() {
        // An OS error on the server (a temporary file vanished), a deadlock: retried.
        assert_eq!(error("c", server(6)).class, ErrorClass::Transient);
        assert_eq!(error("c", server(1213)).class, ErrorClass::Transient);
        // Access denied, unknown table: not.
        assert_eq!(error("c", server(1045)).class, ErrorClass::Definite);
        assert_eq!(error("c", server(1146)).class, ErrorClass::Definite);
    }
}
