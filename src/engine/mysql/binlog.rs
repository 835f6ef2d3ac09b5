//! The binlog stream: kuaka registers as a replica and reads row events from a file and
//! offset, and [`Assembler`] turns events into committed transactions of full row images.
//!
//! Transaction boundaries: `BEGIN` (a QUERY event, or a GTID event that MariaDB sends in its
//! place when the replica announces `@mariadb_slave_capability = 4`), then TABLE_MAP + rows
//! events, then XID (InnoDB) or a QUERY `COMMIT` (non-transactional engines such as MyISAM).
//! A transaction's position is the cursor after its commit event, so a restart from it never
//! sees it again, and one from before it sees it whole.
//!
//! Statements outside a transaction (DDL, `TRUNCATE`) arrive as QUERY events; the caller
//! decides what they mean for the job ([`StreamItem::Statement`]).

use std::collections::HashMap;
use std::sync::Arc;

use mysql_async::binlog::events::{Event, EventData, RowsEventData, TableMapEvent};
use mysql_async::prelude::Queryable;
use mysql_async::{BinlogStream, BinlogStreamRequest};

use super::catalog::MyTable;
use super::decode::{self, BinlogCursor};
use super::{Flavour, Result, connect, error};
use crate::config::Endpoint;
use crate::engine::ErrorClass;
use crate::model::value::Row;

/// One row change with full images, columns in the catalog's order.
#[derive(Clone, Debug, PartialEq)]
pub struct RowEvent {
    pub table: String,
    pub before: Option<Row>,
    pub after: Option<Row>,
}

/// A committed source transaction.
#[derive(Clone, Debug, PartialEq)]
pub struct Committed {
    /// The cursor right after the commit event.
    pub position: BinlogCursor,
    pub changes: Vec<RowEvent>,
    /// Commit time on the source (seconds since the epoch), for lag.
    pub timestamp: u32,
    /// The transaction's GTID (MySQL `uuid:n` or MariaDB `d-s-n`), when the server has them.
    pub gtid: Option<String>,
}

/// What the stream yields.
#[derive(Clone, Debug, PartialEq)]
pub enum StreamItem {
    Transaction(Committed),
    /// A statement outside any transaction in the job's database (DDL, TRUNCATE, ...).
    Statement {
        position: BinlogCursor,
        schema: String,
        query: String,
    },
    /// The cursor moved without a change for the job (other databases, heartbeats).
    Progress {
        position: BinlogCursor,
        timestamp: u32,
    },
}

/// Turns events into [`StreamItem`]s for the tables of one database.
pub struct Assembler {
    database: String,
    tables: HashMap<String, Arc<MyTable>>,
    pub cursor: BinlogCursor,
    open: Option<Vec<RowEvent>>,
    gtid: Option<String>,
    zero_dates: decode::ZeroDates,
}

/// Event type numbers kuaka acts on beyond what `mysql_common` decodes.
const MARIADB_GTID_EVENT: u8 = 162;
const MARIADB_GTID_LIST_EVENT: u8 = 163;

impl Assembler {
    pub fn new(
        database: &str,
        tables: &[MyTable],
        cursor: BinlogCursor,
        zero_dates: decode::ZeroDates,
    ) -> Assembler {
        Assembler {
            zero_dates,
            database: database.to_owned(),
            tables: tables
                .iter()
                .map(|t| (t.name().to_owned(), Arc::new(t.clone())))
                .collect(),
            cursor,
            open: None,
            gtid: None,
        }
    }

    /// Handle one event; `table_map` finds the TABLE_MAP event of a rows event's table id.
    pub fn handle<'t>(
        &mut self,
        event: &Event,
        table_map: impl Fn(u64) -> Option<&'t TableMapEvent<'static>>,
    ) -> std::result::Result<Option<StreamItem>, String> {
        let header = event.header();
        let event_type = header.event_type_raw();
        let data = event
            .read_data()
            .map_err(|e| format!("cannot decode binlog event type {event_type}: {e}"))?;
        let rotate = match &data {
            Some(EventData::RotateEvent(r)) => {
                // The server's first, made-up ROTATE comes before the FORMAT_DESCRIPTION event
                // that announces checksums, so the name still carries the 4 checksum bytes.
                let mut name = r.name_raw().to_vec();
                let current = self.cursor.file.as_bytes();
                if name.len() == current.len() + 4 && name.starts_with(current) {
                    name.truncate(current.len());
                }
                Some((String::from_utf8_lossy(&name).into_owned(), r.position()))
            }
            _ => None,
        };
        self.cursor.advance(
            event_type,
            header.flags_raw(),
            header.log_pos(),
            rotate.as_ref().map(|(f, p)| (f.as_str(), *p)),
        );
        let timestamp = header.timestamp();
        let progress = |cursor: &BinlogCursor| {
            Some(StreamItem::Progress {
                position: cursor.clone(),
                timestamp,
            })
        };
        match data {
            Some(EventData::QueryEvent(q)) => {
                let query = q.query();
                let trimmed = query.trim();
                let upper = trimmed.to_ascii_uppercase();
                if upper == "BEGIN" || upper.starts_with("XA START") {
                    self.open = Some(Vec::new());
                    return Ok(None);
                }
                if upper == "COMMIT"
                    || upper.starts_with("XA END")
                    || upper.starts_with("XA COMMIT")
                {
                    return Ok(self.commit(timestamp));
                }
                if upper.starts_with("SAVEPOINT")
                    || upper.starts_with("ROLLBACK TO")
                    || upper.starts_with('#')
                {
                    return Ok(None);
                }
                if upper == "ROLLBACK" {
                    self.open = None;
                    return Ok(progress(&self.cursor));
                }
                let schema = q.schema().into_owned();
                // A statement outside a transaction: DDL and the like.
                self.open = None;
                self.gtid = None;
                Ok(Some(StreamItem::Statement {
                    position: self.cursor.clone(),
                    schema,
                    query: trimmed.to_owned(),
                }))
            }
            Some(EventData::XidEvent(_)) => Ok(self.commit(timestamp)),
            Some(EventData::GtidEvent(g)) => {
                let sid = g.sid();
                let hex: String = sid.iter().map(|b| format!("{b:02x}")).collect();
                self.gtid = Some(format!(
                    "{}-{}-{}-{}-{}:{}",
                    &hex[0..8],
                    &hex[8..12],
                    &hex[12..16],
                    &hex[16..20],
                    &hex[20..32],
                    g.gno()
                ));
                Ok(None)
            }
            Some(EventData::RowsEvent(rows)) => {
                let tme = table_map(rows.table_id()).ok_or_else(|| {
                    format!(
                        "rows event for table id {} without its TABLE_MAP event",
                        rows.table_id()
                    )
                })?;
                if tme.database_name() != self.database {
                    return Ok(None);
                }
                let name = tme.table_name().into_owned();
                let Some(table) = self.tables.get(&name).cloned() else {
                    return Ok(None);
                };
                if tme.columns_count() as usize != table.columns.len() {
                    return Err(format!(
                        "table {name} has {} columns in the binlog but {} when the job read the catalog: its shape changed (DDL) without kuaka seeing it",
                        tme.columns_count(),
                        table.columns.len()
                    ));
                }
                let changes = convert_rows(&table, &rows, tme, self.zero_dates)?;
                match &mut self.open {
                    Some(open) => open.extend(changes),
                    // Rows outside BEGIN/COMMIT (should not happen with ROW format): a
                    // transaction of its own, committed at the next commit event.
                    None => self.open = Some(changes),
                }
                Ok(None)
            }
            _ if event_type == MARIADB_GTID_EVENT => {
                let body = event.data();
                if let Some(g) = decode::mariadb_gtid(header.server_id(), body) {
                    self.gtid = Some(g.to_string());
                    if !g.standalone {
                        // MariaDB's GTID event stands in for BEGIN.
                        self.open = Some(Vec::new());
                    }
                }
                Ok(None)
            }
            _ if event_type == MARIADB_GTID_LIST_EVENT => Ok(progress(&self.cursor)),
            _ => Ok(if self.open.is_none() {
                progress(&self.cursor)
            } else {
                None
            }),
        }
    }

    fn commit(&mut self, timestamp: u32) -> Option<StreamItem> {
        let changes = self.open.take().unwrap_or_default();
        Some(StreamItem::Transaction(Committed {
            position: self.cursor.clone(),
            changes,
            timestamp,
            gtid: self.gtid.take(),
        }))
    }
}

fn convert_rows(
    table: &MyTable,
    rows: &RowsEventData<'_>,
    tme: &TableMapEvent<'_>,
    zero: decode::ZeroDates,
) -> std::result::Result<Vec<RowEvent>, String> {
    let mut out = Vec::new();
    if matches!(rows, RowsEventData::PartialUpdateRowsEvent(_)) {
        return Err(format!(
            "table {} has a partial JSON update in the binlog; set binlog_row_value_options = '' on the source",
            table.name()
        ));
    }
    for pair in rows.rows(tme) {
        let (before, after) =
            pair.map_err(|e| format!("cannot decode a row of {}: {e}", table.name()))?;
        let convert = |row: Option<mysql_async::binlog::row::BinlogRow>| -> std::result::Result<Option<Row>, String> {
            let Some(row) = row else { return Ok(None) };
            let mut values = Vec::with_capacity(table.columns.len());
            for (i, column) in table.columns.iter().enumerate() {
                let value = decode::from_binlog_as(column, row.as_ref(i), zero).map_err(|e| {
                    format!("table {}, column {}: {e}", table.name(), column.name)
                })?;
                values.push(value);
            }
            Ok(Some(values))
        };
        out.push(RowEvent {
            table: table.name().to_owned(),
            before: convert(before)?,
            after: convert(after)?,
        });
    }
    Ok(out)
}

/// A replica server id for the job: stable per job, in a range real servers rarely use.
pub fn server_id(job_id: &str) -> u32 {
    let mut hash: u32 = 2_166_136_261;
    for b in job_id.bytes() {
        hash = (hash ^ u32::from(b)).wrapping_mul(16_777_619);
    }
    0x6b00_0000 | (hash & 0x00ff_ffff)
}

/// Open the binlog stream at `cursor` (a transaction boundary).
pub async fn open(
    endpoint: &Endpoint,
    flavour: Flavour,
    server_id: u32,
    cursor: &BinlogCursor,
) -> Result<BinlogStream> {
    if cursor.offset > u64::from(u32::MAX) {
        return Err(super::Error {
            context: format!("starting the binlog stream at {}:{}", cursor.file, cursor.offset),
            message: "COM_BINLOG_DUMP takes a 32-bit offset; resuming past 4 GiB inside one binlog file needs GTID positioning, which this version does not use yet".into(),
            class: ErrorClass::Definite,
        });
    }
    let mut conn = connect(endpoint, "binlog").await?;
    let context = "preparing the binlog stream";
    if flavour == Flavour::Mariadb {
        // Announce a MariaDB 10 replica: GTID events arrive as themselves, not as BEGIN.
        conn.query_drop("SET @mariadb_slave_capability = 4")
            .await
            .map_err(|e| error(context, e))?;
    }
    // Heartbeats every second, so a quiet server still shows the stream is alive.
    conn.query_drop("SET @master_heartbeat_period = 1000000000")
        .await
        .map_err(|e| error(context, e))?;
    let request = BinlogStreamRequest::new(server_id)
        .with_filename(cursor.file.as_bytes())
        .with_pos(cursor.offset);
    conn.get_binlog_stream(request).await.map_err(|e| {
        error(
            format!(
                "starting the binlog stream at {}:{}",
                cursor.file, cursor.offset
            ),
            e,
        )
    })
}

/// The server's current binlog end (`SHOW MASTER STATUS`).
pub async fn current_position(conn: &mut mysql_async::Conn) -> Result<BinlogCursor> {
    let row: Option<mysql_async::Row> = conn
        .query_first("SHOW MASTER STATUS")
        .await
        .map_err(|e| error("reading the binlog position (SHOW MASTER STATUS; needs REPLICATION CLIENT or BINLOG MONITOR)", e))?;
    let row = row.ok_or_else(|| super::Error {
        context: "reading the binlog position".into(),
        message: "SHOW MASTER STATUS returned nothing: binary logging is off; start the server with log_bin".into(),
        class: ErrorClass::Definite,
    })?;
    let file: String = row
        .get::<Option<String>, _>(0)
        .flatten()
        .unwrap_or_default();
    let offset: u64 = row.get::<Option<u64>, _>(1).flatten().unwrap_or(4);
    Ok(BinlogCursor { file, offset })
}
