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
        /// The statement's GTID (MariaDB logs DDL as a standalone GTID, then the query).
        gtid: Option<String>,
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
pub const MARIADB_GTID_EVENT: u8 = 162;
const MARIADB_GTID_LIST_EVENT: u8 = 163;
pub const TRANSACTION_PAYLOAD_EVENT: u8 = 40;

/// What a QUERY event is to transaction boundaries. One classification serves the
/// [`Assembler`] and the binlog spool's framing, so the two always agree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueryKind {
    /// `BEGIN`, `XA START`: a transaction opens.
    Begin,
    /// `COMMIT`, `XA END`, `XA COMMIT`: the open transaction commits.
    Commit,
    /// `ROLLBACK`: the open transaction is dropped.
    Rollback,
    /// `SAVEPOINT`, `ROLLBACK TO`, a comment: part of the open transaction.
    Within,
    /// Anything else (DDL, `TRUNCATE`, ...): a statement of its own, ending any open
    /// transaction.
    Statement,
}

/// Classify a QUERY event's text.
pub fn query_kind(query: &str) -> QueryKind {
    let q = query.trim();
    let starts = |prefix: &str| {
        q.get(..prefix.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
    };
    if q.eq_ignore_ascii_case("BEGIN") || starts("XA START") {
        QueryKind::Begin
    } else if q.eq_ignore_ascii_case("COMMIT") || starts("XA END") || starts("XA COMMIT") {
        QueryKind::Commit
    } else if starts("SAVEPOINT") || starts("ROLLBACK TO") || q.starts_with('#') {
        QueryKind::Within
    } else if q.eq_ignore_ascii_case("ROLLBACK") {
        QueryKind::Rollback
    } else {
        QueryKind::Statement
    }
}

/// Where a ROTATE event points: `(file, position)`. The server's first, made-up ROTATE comes
/// before the FORMAT_DESCRIPTION event that announces checksums, so its name may still carry
/// the 4 checksum bytes after `current`'s name.
pub fn rotation(data: Option<&EventData<'_>>, current: &str) -> Option<(String, u64)> {
    let Some(EventData::RotateEvent(r)) = data else {
        return None;
    };
    let mut name = r.name_raw().to_vec();
    let current = current.as_bytes();
    if name.len() == current.len() + 4 && name.starts_with(current) {
        name.truncate(current.len());
    }
    Some((String::from_utf8_lossy(&name).into_owned(), r.position()))
}

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
        let rotate = rotation(data.as_ref(), &self.cursor.file);
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
                match query_kind(trimmed) {
                    QueryKind::Begin => {
                        self.open = Some(Vec::new());
                        return Ok(None);
                    }
                    QueryKind::Commit => return Ok(self.commit(timestamp)),
                    QueryKind::Within => return Ok(None),
                    QueryKind::Rollback => {
                        self.open = None;
                        return Ok(progress(&self.cursor));
                    }
                    QueryKind::Statement => {}
                }
                let schema = q.schema().into_owned();
                // A statement outside a transaction: DDL and the like.
                self.open = None;
                Ok(Some(StreamItem::Statement {
                    position: self.cursor.clone(),
                    schema,
                    query: trimmed.to_owned(),
                    gtid: self.gtid.take(),
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
            // MySQL 8's compressed transaction: its end position is the transaction's, but
            // its events (which follow it, decompressed) are not applied yet.
            _ if event_type == TRANSACTION_PAYLOAD_EVENT => Ok(None),
            _ => Ok(if self.open.is_none() {
                progress(&self.cursor)
            } else {
                None
            }),
        }
    }

    /// Forget a transaction left open: its events will come again from its start (the
    /// capture reconnected in the middle of it).
    pub fn abandon(&mut self) {
        self.open = None;
        self.gtid = None;
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

/// Where MariaDB GTID state `state` is in this server's binlog: the file and offset right
/// after the last transaction the state names, so streaming from there misses nothing and
/// repeats nothing. It lets a job resume on another server of the same replication topology
/// (a failover), whose binlog has the same transactions under other file names and offsets.
pub async fn mariadb_gtid_anchor(
    endpoint: &Endpoint,
    server_id: u32,
    state: &decode::GtidState,
) -> Result<BinlogCursor> {
    use futures_util::StreamExt;
    let context = format!("finding GTID position {state} in the source's binlog");
    let mut conn = connect(endpoint, "gtid position").await?;
    // Nothing after `state` on this server: its binlog end is the place (read between two
    // looks at the GTID position, so no commit slipped in between).
    let gtid_pos = async |conn: &mut mysql_async::Conn| -> Result<Option<decode::GtidState>> {
        let text: Option<String> = conn
            .query_first("SELECT @@gtid_binlog_pos")
            .await
            .map_err(|e| error(context.clone(), e))?;
        Ok(text.as_deref().and_then(decode::GtidState::parse))
    };
    let before = gtid_pos(&mut conn).await?;
    let end = current_position(&mut conn).await?;
    let after = gtid_pos(&mut conn).await?;
    if before.as_ref() == Some(state) && after.as_ref() == Some(state) {
        return Ok(end);
    }
    // The first, made-up ROTATE names the file but may carry the 4 checksum bytes after
    // the name (it comes before the FORMAT_DESCRIPTION event): the server's list of binlog
    // files tells which reading is the file.
    let files: Vec<String> = conn
        .query_map("SHOW BINARY LOGS", |row: mysql_async::Row| {
            row.get::<String, _>(0).unwrap_or_default()
        })
        .await
        .map_err(|e| error(context.clone(), e))?;
    // Otherwise the server streams from `state` on: the first transaction it sends starts
    // at the place.
    for sql in [
        "SET @mariadb_slave_capability = 4".to_owned(),
        format!("SET @slave_connect_state = '{state}'"),
        "SET @slave_gtid_strict_mode = 1".to_owned(),
        "SET @master_heartbeat_period = 1000000000".to_owned(),
    ] {
        conn.query_drop(sql)
            .await
            .map_err(|e| error(context.clone(), e))?;
    }
    let request = BinlogStreamRequest::new(server_id)
        .with_filename(b"")
        .with_pos(4u64);
    let mut stream = conn.get_binlog_stream(request).await.map_err(|e| {
        let mut e = error(context.clone(), e);
        e.message.push_str(
            " (the server's binlog does not hold the transactions after this GTID position: it is behind what kuaka applied, or purged them)",
        );
        e.class = ErrorClass::Definite;
        e
    })?;
    let mut file = String::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let next = tokio::time::timeout_at(deadline, stream.next())
            .await
            .map_err(|_| super::Error {
                context: context.clone(),
                message: "the server sent no transaction after it within 30 s".into(),
                class: ErrorClass::Transient,
            })?;
        let event = match next {
            Some(Ok(event)) => event,
            Some(Err(e)) => {
                let mut e = error(context.clone(), e);
                e.class = ErrorClass::Definite;
                return Err(e);
            }
            None => {
                return Err(super::Error {
                    context,
                    message: "the server ended the stream".into(),
                    class: ErrorClass::Transient,
                });
            }
        };
        let header = event.header();
        let data = event.read_data().ok().flatten();
        if let Some(EventData::RotateEvent(r)) = &data {
            let raw = r.name_raw();
            let whole = String::from_utf8_lossy(raw).into_owned();
            let trimmed = String::from_utf8_lossy(&raw[..raw.len().saturating_sub(4)]).into_owned();
            file = if files.contains(&whole) {
                whole
            } else if files.contains(&trimmed) {
                trimmed
            } else {
                return Err(super::Error {
                    context,
                    message: format!(
                        "the server streams from a binlog file it does not list ({whole:?})"
                    ),
                    class: ErrorClass::Definite,
                });
            };
            continue;
        }
        if header.event_type_raw() == MARIADB_GTID_EVENT
            && header.flags_raw() & decode::ARTIFICIAL == 0
        {
            let offset = u64::from(header.log_pos()).saturating_sub(u64::from(header.event_size()));
            let _ = stream.close().await;
            return Ok(BinlogCursor { file, offset });
        }
    }
}

/// What tells this server from the others of its replication topology: `@@server_uuid` on
/// MySQL (server ids are often reused), `@@server_id` on MariaDB (which has no uuid).
pub async fn server_identity(conn: &mut mysql_async::Conn, flavour: Flavour) -> Result<String> {
    let sql = match flavour {
        Flavour::Mysql => "SELECT @@server_uuid",
        Flavour::Mariadb => "SELECT CAST(@@server_id AS CHAR)",
    };
    let id: Option<String> = conn
        .query_first(sql)
        .await
        .map_err(|e| error("reading the source's server identity", e))?;
    Ok(id.unwrap_or_default())
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

#[cfg(test)]
mod tests {
    //! MySQL 8 cannot run on this machine: these events are built byte by byte from the
    //! documented formats (MySQL's "Binary Log Events" pages and `rows_event.h`,
    //! `json_binary.h`) and fed through the same reader and assembler as the live stream.

    use mysql_common::binlog::EventStreamReader;
    use mysql_common::binlog::consts::BinlogVersion;

    use super::*;
    use crate::engine::mysql::catalog::{Kind, MyColumn, map_type};
    use crate::model::value::Value;

    fn event(kind: u8, log_pos: u32, body: &[u8]) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend_from_slice(&1_700_000_000u32.to_le_bytes()); // timestamp
        e.push(kind);
        e.extend_from_slice(&7u32.to_le_bytes()); // server id
        e.extend_from_slice(&((19 + body.len()) as u32).to_le_bytes());
        e.extend_from_slice(&log_pos.to_le_bytes());
        e.extend_from_slice(&0u16.to_le_bytes()); // flags
        e.extend_from_slice(body);
        e
    }

    fn column(name: &str, dt: &str, ct: &str) -> MyColumn {
        let (kind, _, pg_type) = map_type(dt, ct, None, Some(10), Some(0), None, false);
        MyColumn {
            name: name.into(),
            kind,
            column_type: ct.into(),
            charset: None,
            labels: vec![],
            nullable: true,
            generated: false,
            auto_increment: false,
            default: None,
            on_update_now: false,
            pg_type,
        }
    }

    fn table() -> MyTable {
        let columns = vec![
            column("id", "int", "int(11)"),
            column("doc", "json", "json"),
        ];
        MyTable {
            table: crate::model::schema::Table {
                name: crate::model::schema::QualifiedName::new("public", "t"),
                kind: crate::model::schema::TableKind::Plain,
                unlogged: false,
                columns: vec![],
                primary_key: None,
                unique_keys: vec![],
                checks: vec![],
                exclusions: vec![],
                foreign_keys: vec![],
                indexes: vec![],
                triggers: vec![],
                partitioning: crate::model::schema::Partitioning {
                    partition_by: None,
                    partition_of: None,
                },
                comment: None,
                estimated_rows: None,
                estimated_bytes: 0,
            },
            columns,
            key: vec!["id".into()],
            engine: "InnoDB".into(),
        }
    }

    #[test]
    fn mysql8_gtid_json_transaction_from_bytes() {
        let sid: [u8; 16] = [
            0x3e, 0x11, 0xfa, 0x47, 0x71, 0xca, 0x11, 0xe1, 0x9e, 0x33, 0xc8, 0x0a, 0xa9, 0x42,
            0x95, 0x62,
        ];
        // GTID_LOG_EVENT (33): flags, SID, GNO, logical clock (type 2, last committed, seq).
        let mut gtid = vec![1u8];
        gtid.extend_from_slice(&sid);
        gtid.extend_from_slice(&42u64.to_le_bytes());
        gtid.push(2);
        gtid.extend_from_slice(&0i64.to_le_bytes());
        gtid.extend_from_slice(&1i64.to_le_bytes());
        // QUERY_EVENT (2) "BEGIN": thread id, exec time, schema length, error code,
        // status-vars length, schema + NUL, query.
        let mut begin = Vec::new();
        begin.extend_from_slice(&1u32.to_le_bytes());
        begin.extend_from_slice(&0u32.to_le_bytes());
        begin.push(4);
        begin.extend_from_slice(&0u16.to_le_bytes());
        begin.extend_from_slice(&0u16.to_le_bytes());
        begin.extend_from_slice(b"shop\0BEGIN");
        // TABLE_MAP_EVENT (19): table id (6), flags, db, table, column count, types
        // (LONG, JSON), metadata (JSON: 4 length bytes), null bitmap.
        let mut map = Vec::new();
        map.extend_from_slice(&[0x55, 0, 0, 0, 0, 0]);
        map.extend_from_slice(&1u16.to_le_bytes());
        map.extend_from_slice(b"\x04shop\0\x01t\0");
        map.extend_from_slice(&[2, 3, 245, 1, 4, 0b10]);
        // {"a":1} in MySQL's binary JSON: small object, 1 element, 12 bytes; key entry
        // (offset 11, length 1); value entry int16 inlined = 1; the key "a".
        let json: &[u8] = &[0x00, 1, 0, 12, 0, 11, 0, 1, 0, 0x05, 1, 0, b'a'];
        // WRITE_ROWS_EVENT v2 (30): table id, flags, extra-data length 2, 2 columns, all
        // present; one row: null bitmap 0, id 7, JSON length + bytes.
        let mut rows = Vec::new();
        rows.extend_from_slice(&[0x55, 0, 0, 0, 0, 0]);
        rows.extend_from_slice(&1u16.to_le_bytes());
        rows.extend_from_slice(&2u16.to_le_bytes());
        rows.extend_from_slice(&[2, 0b11, 0]);
        rows.extend_from_slice(&7i32.to_le_bytes());
        rows.extend_from_slice(&(json.len() as u32).to_le_bytes());
        rows.extend_from_slice(json);
        // XID_EVENT (16).
        let xid = 99u64.to_le_bytes();

        let mut reader = EventStreamReader::new(BinlogVersion::Version4);
        let mut assembler = Assembler::new(
            "shop",
            &[table()],
            BinlogCursor {
                file: "binlog.000003".into(),
                offset: 4_294_967_000,
            },
            decode::ZeroDates::Null,
        );
        // log_pos values wrap past 4 GiB like a real server's.
        let events = [
            event(33, 4_294_967_100, &gtid),
            event(2, 4_294_967_200, &begin),
            event(19, 4_294_967_290, &map),
            event(30, 100, &rows),
            event(16, 200, &xid),
        ];
        let mut out = Vec::new();
        for bytes in &events {
            let e = reader
                .read(bytes.as_slice())
                .expect("event parses")
                .expect("an event");
            if let Some(item) = assembler.handle(&e, |id| reader.get_tme(id)).unwrap() {
                out.push(item);
            }
        }
        assert_eq!(out.len(), 1, "{out:?}");
        let StreamItem::Transaction(c) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(c.position.offset, (1 << 32) + 200);
        assert_eq!(
            c.gtid.as_deref(),
            Some("3e11fa47-71ca-11e1-9e33-c80aa9429562:42")
        );
        assert_eq!(
            c.changes,
            vec![RowEvent {
                table: "t".into(),
                before: None,
                after: Some(vec![Value::Int(7), Value::Text(r#"{"a":1}"#.into())]),
            }]
        );
        assert_eq!(Kind::Json, table().columns[1].kind);
    }

    #[test]
    fn query_kinds_mark_transaction_boundaries() {
        for (q, kind) in [
            ("BEGIN", QueryKind::Begin),
            (" begin ", QueryKind::Begin),
            ("XA START 'x'", QueryKind::Begin),
            ("COMMIT", QueryKind::Commit),
            ("XA END 'x'", QueryKind::Commit),
            ("xa commit 'x'", QueryKind::Commit),
            ("ROLLBACK", QueryKind::Rollback),
            ("ROLLBACK TO SAVEPOINT s", QueryKind::Within),
            ("SAVEPOINT s", QueryKind::Within),
            ("# a comment", QueryKind::Within),
            ("BEGIN NOT ATOMIC SELECT 1; END", QueryKind::Statement),
            ("ALTER TABLE t ADD COLUMN c int", QueryKind::Statement),
            ("TRUNCATE t", QueryKind::Statement),
        ] {
            assert_eq!(query_kind(q), kind, "{q}");
        }
    }

    #[test]
    fn mariadb_gtid_event_opens_the_transaction() {
        let mut reader = EventStreamReader::new(BinlogVersion::Version4);
        let mut assembler = Assembler::new(
            "shop",
            &[table()],
            BinlogCursor {
                file: "b.000001".into(),
                offset: 4,
            },
            decode::ZeroDates::Null,
        );
        let mut body = Vec::new();
        body.extend_from_slice(&11u64.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        body.push(0);
        let gtid = reader
            .read(event(162, 100, &body).as_slice())
            .unwrap()
            .unwrap();
        assert!(
            assembler
                .handle(&gtid, |id| reader.get_tme(id))
                .unwrap()
                .is_none()
        );
        let xid = reader
            .read(event(16, 150, &5u64.to_le_bytes()).as_slice())
            .unwrap()
            .unwrap();
        let item = assembler.handle(&xid, |id| reader.get_tme(id)).unwrap();
        let Some(StreamItem::Transaction(c)) = item else {
            panic!("{item:?}")
        };
        assert_eq!(c.gtid.as_deref(), Some("0-7-11"));
        assert_eq!(c.position.offset, 150);
    }
}
