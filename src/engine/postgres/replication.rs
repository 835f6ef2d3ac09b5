//! Logical replication connection: slots with exported snapshots and the pgoutput stream.
//!
//! A `replication=database` session speaks the replication commands over the simple query
//! protocol; `START_REPLICATION` turns the connection into a COPY BOTH stream of XLogData
//! (`w`) and primary keepalive (`k`) messages, answered with standby status updates (`r`).
//! <https://www.postgresql.org/docs/15/protocol-replication.html>
//!
//! Contract: the snapshot exported by [`ReplicationConnection::create_slot`] lives only until
//! the next command on this connection, so every reader must import it before
//! [`ReplicationConnection::start`] is called. Feedback must only acknowledge positions whose
//! changes are durably stored: the server may recycle WAL up to the flushed position.
//!

use bytes::Bytes;

use super::wire::WireConnection;
use super::{Error, Result, Side};
use crate::config::Endpoint;
use crate::model::PgLsn;
use crate::model::schema::{quote_ident, quote_literal};

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// What `CREATE_REPLICATION_SLOT` returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreatedSlot {
    pub name: String,
    /// Changes committed after this position are streamed; the exported snapshot sees the rest.
    pub consistent_point: PgLsn,
    pub snapshot: Option<String>,
}

/// One message of the replication stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicationEvent {
    /// A pgoutput message (decode it with [`super::decode::decode`]).
    XLogData {
        wal_start: PgLsn,
        wal_end: PgLsn,
        data: Bytes,
    },
    /// The server's position; reply at once when asked, or it may end the connection.
    Keepalive {
        wal_end: PgLsn,
        reply_requested: bool,
    },
}

fn bad(context: &str, what: &str) -> Error {
    Error::Query {
        context: context.to_owned(),
        message: format!("unexpected replication message: {what}"),
        class: crate::engine::ErrorClass::Transient,
        sqlstate: None,
    }
}

fn lsn_text(context: &str, text: Option<&str>) -> Result<PgLsn> {
    text.and_then(|t| t.parse().ok())
        .ok_or_else(|| bad(context, "position"))
}

pub struct ReplicationConnection {
    wire: WireConnection,
}

impl ReplicationConnection {
    pub async fn connect(endpoint: &Endpoint, role: &str) -> Result<ReplicationConnection> {
        let wire = WireConnection::connect_with(
            endpoint,
            Side::Source,
            role,
            &[("replication", "database")],
        )
        .await?;
        Ok(ReplicationConnection { wire })
    }

    /// `(system id, timeline, current WAL position)`.
    pub async fn identify_system(&mut self) -> Result<(String, i32, PgLsn)> {
        let context = "IDENTIFY_SYSTEM";
        let rows = self.wire.simple_query("IDENTIFY_SYSTEM", context).await?;
        let row = rows.first().ok_or_else(|| bad(context, "no row"))?;
        let field = |i: usize| row.get(i).cloned().flatten();
        Ok((
            field(0).unwrap_or_default(),
            field(1).and_then(|t| t.parse().ok()).unwrap_or_default(),
            lsn_text(context, field(2).as_deref())?,
        ))
    }

    /// Create a pgoutput slot; with `export`, also a snapshot of the instant it starts from.
    pub async fn create_slot(
        &mut self,
        name: &str,
        temporary: bool,
        export: bool,
    ) -> Result<CreatedSlot> {
        let context = format!("creating replication slot {name}");
        let sql = format!(
            "CREATE_REPLICATION_SLOT {}{} LOGICAL pgoutput {}",
            quote_ident(name),
            if temporary { " TEMPORARY" } else { "" },
            if export {
                "EXPORT_SNAPSHOT"
            } else {
                "NOEXPORT_SNAPSHOT"
            }
        );
        let rows = self.wire.simple_query(&sql, &context).await?;
        let row = rows.first().ok_or_else(|| bad(&context, "no row"))?;
        Ok(CreatedSlot {
            name: row.first().cloned().flatten().unwrap_or_default(),
            consistent_point: lsn_text(&context, row.get(1).cloned().flatten().as_deref())?,
            snapshot: row.get(2).cloned().flatten(),
        })
    }

    pub async fn drop_slot(&mut self, name: &str) -> Result<()> {
        self.wire
            .simple_query(
                &format!("DROP_REPLICATION_SLOT {} WAIT", quote_ident(name)),
                "dropping a replication slot",
            )
            .await?;
        Ok(())
    }

    /// Stream the slot's changes for `publications` from `start` (pgoutput protocol version 1).
    /// With `streaming`, protocol version 2: transactions too big for the server's
    /// `logical_decoding_work_mem` are streamed before they commit (PostgreSQL 14+).
    pub async fn start(
        mut self,
        slot: &str,
        start: PgLsn,
        publications: &[String],
        streaming: bool,
    ) -> Result<ReplicationStream> {
        let names = publications
            .iter()
            .map(|p| quote_ident(p))
            .collect::<Vec<_>>()
            .join(",");
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start} (proto_version '{}', publication_names {}{})",
            quote_ident(slot),
            if streaming { 2 } else { 1 },
            quote_literal(&names),
            if streaming { ", streaming 'on'" } else { "" }
        );
        // pgoutput sends values in their text form, made with this session's settings: the
        // same fixed ones as the snapshot's sessions (UTC, ISO dates, exact floats, hex
        // bytea), so a target of another engine can read them.
        for setting in [
            "SET TimeZone = 'UTC'",
            "SET DateStyle = 'ISO, YMD'",
            "SET IntervalStyle = 'postgres'",
            "SET extra_float_digits = 3",
            "SET bytea_output = 'hex'",
        ] {
            self.wire
                .simple_query(setting, "setting up the replication session")
                .await?;
        }
        self.wire.copy_both(&sql, "starting replication").await?;
        Ok(ReplicationStream { wire: self.wire })
    }
}

/// A running replication stream.
pub struct ReplicationStream {
    wire: WireConnection,
}

impl ReplicationStream {
    /// The next event; `None` when the server ends the stream.
    pub async fn next(&mut self) -> Result<Option<ReplicationEvent>> {
        let context = "reading the replication stream";
        let Some(msg) = self.wire.copy_both_next(context).await? else {
            return Ok(None);
        };
        let u64_at = |at: usize| -> Result<u64> {
            msg.get(at..at + 8)
                .map(|b| u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                .ok_or_else(|| bad(context, "short message"))
        };
        match msg.first() {
            // w, wal start, wal end, send time, data
            Some(b'w') if msg.len() >= 25 => Ok(Some(ReplicationEvent::XLogData {
                wal_start: PgLsn(u64_at(1)?),
                wal_end: PgLsn(u64_at(9)?),
                data: msg.slice(25..),
            })),
            // k, wal end, send time, reply requested
            Some(b'k') if msg.len() >= 18 => Ok(Some(ReplicationEvent::Keepalive {
                wal_end: PgLsn(u64_at(1)?),
                reply_requested: msg[17] == 1,
            })),
            _ => Err(bad(context, "unknown or short stream message")),
        }
    }

    /// Standby status update: written, flushed (durably stored: the server may recycle WAL
    /// before it) and applied positions.
    pub async fn send_status(
        &mut self,
        written: PgLsn,
        flushed: PgLsn,
        applied: PgLsn,
        reply_requested: bool,
    ) -> Result<()> {
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0)
            - PG_EPOCH_OFFSET_US;
        let mut payload = Vec::with_capacity(34);
        payload.push(b'r');
        payload.extend(written.0.to_be_bytes());
        payload.extend(flushed.0.to_be_bytes());
        payload.extend(applied.0.to_be_bytes());
        payload.extend(now_us.to_be_bytes());
        payload.push(u8::from(reply_requested));
        self.wire
            .send_copy_data(&payload, "sending replication feedback")
            .await
    }
}
