//! The MySQL/MariaDB binlog spooled to the local change log, as PostgreSQL's WAL is: a capture
//! task reads the binlog from the job's start position on, from before the first table is
//! copied, and writes every event to `STATE/changes/`; apply reads the events back from there.
//! A MySQL server purges binlog files by age whatever its replicas have read, so a long
//! snapshot or a slow apply no longer loses the changes it has not reached: once an event is in
//! the spool the source may purge it.
//!
//! Rows events of other databases, and their TABLE_MAP events, are left out (the server sends
//! its whole binlog to a replica); every other event is kept, so positions and GTIDs advance
//! through other databases' transactions too.
//!
//! Records (kind [`RecordKind::Binlog`]) carry a tag byte and then the event as the server
//! sent it (header, body, checksum):
//! - `B` (no event) opens a transaction; its position is the boundary it starts at.
//! - `E` is an event inside a transaction.
//! - `C` is an event after which the stream is at a transaction boundary: the commit (XID, a
//!   `COMMIT`/`ROLLBACK` query) or an event outside any transaction (DDL, ROTATE, GTID, ...).
//! - `R` is the FORMAT_DESCRIPTION event (then 4 zero bytes, the change log's relation id 0),
//!   which every segment repeats so a reader can start at any segment.
//!
//! A record's position is the cursor after its event, as one ordered u64 ([`encode`]): the
//! binlog file's sequence number above the offset's 40 bits. A capture that reconnects in the
//! middle of a transaction starts again at the last boundary, so the log may hold a partial
//! transaction followed by a `B` and the whole one; readers drop the partial one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use mysql_async::binlog::events::{Event, EventData, TableMapEvent};
use mysql_common::binlog::EventStreamReader;
use mysql_common::binlog::consts::BinlogVersion;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Error, Reconnect, Result};
use crate::changelog::{self, ChangeLog, LogEnd, LogReader, RecordKind};
use crate::config::Endpoint;
use crate::engine::mysql::binlog::{
    self, MARIADB_GTID_EVENT, QueryKind, TRANSACTION_PAYLOAD_EVENT, query_kind,
};
use crate::engine::mysql::decode::{self, ARTIFICIAL, BinlogCursor, HEARTBEAT_EVENT};
use crate::engine::mysql::{self, Flavour};
use crate::state::StateStore;

const OFFSET_BITS: u32 = 40;
/// Readers see new events at most this long after they arrive.
const PUBLISH_EVERY: Duration = Duration::from_millis(10);
/// Everything spooled is on disk at most this long after it arrived.
const SYNC_EVERY: Duration = Duration::from_secs(1);

/// Failpoint: the spool was synced while a transaction was partly written.
const SYNCED_IN_TRANSACTION: &str = "capture.synced_in_transaction";

const FORMAT_DESCRIPTION_EVENT: u8 = 15;
const QUERY_EVENT: u8 = 2;
const XID_EVENT: u8 = 16;
const TABLE_MAP_EVENT: u8 = 19;
/// MySQL 8.0.26+'s heartbeat (the older one is [`decode::HEARTBEAT_EVENT`]).
const HEARTBEAT_V2_EVENT: u8 = 41;

/// Where the job's spool lives (the same directory as a PostgreSQL job's change log).
pub fn dir(state_dir: &Path) -> PathBuf {
    super::cdc::log_dir(state_dir)
}

/// Remove the job's spool (it will capture again from the position apply needs).
pub fn discard(state_dir: &Path) -> Result<()> {
    let dir = dir(state_dir);
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::Definite(format!(
            "removing the binlog spool {}: {e}",
            dir.display()
        ))),
        _ => Ok(()),
    }
}

/// `base.NNNNNN` → `(base, N)`; the number has at least 6 digits, as the servers write it.
fn split_name(file: &str) -> Option<(&str, u64)> {
    let (base, digits) = file.rsplit_once('.')?;
    if digits.len() < 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seq: u64 = digits.parse().ok()?;
    (format!("{base}.{seq:06}") == file).then_some((base, seq))
}

/// The binlog file name's base (`mysql-bin` of `mysql-bin.000042`).
pub fn base_name(cursor: &BinlogCursor) -> Result<String> {
    split_name(&cursor.file)
        .map(|(b, _)| b.to_owned())
        .ok_or_else(|| {
            Error::Definite(format!(
                "binlog file name {:?} does not end in a sequence number (like mysql-bin.000042); kuaka cannot order its positions",
                cursor.file
            ))
        })
}

/// The cursor as one ordered number: file sequence above a 40-bit offset.
pub fn encode(cursor: &BinlogCursor) -> Result<u64> {
    let (_, seq) = split_name(&cursor.file).ok_or_else(|| {
        Error::Definite(format!(
            "binlog file name {:?} does not end in a sequence number",
            cursor.file
        ))
    })?;
    if cursor.offset >> OFFSET_BITS != 0 || seq >> (64 - OFFSET_BITS) != 0 {
        return Err(Error::Definite(format!(
            "binlog position {}:{} is beyond what the spool orders (files up to 2^24, 1 TiB each)",
            cursor.file, cursor.offset
        )));
    }
    Ok(seq << OFFSET_BITS | cursor.offset)
}

/// The cursor of an encoded position, for binlog files named `base.NNNNNN`.
pub fn decode(base: &str, pos: u64) -> BinlogCursor {
    BinlogCursor {
        file: format!("{base}.{:06}", pos >> OFFSET_BITS),
        offset: pos & ((1 << OFFSET_BITS) - 1),
    }
}

/// Append `event` as the server sent it, so that a reader with the stream's FORMAT_DESCRIPTION
/// event reads it back whole. The events of a MySQL 8 compressed transaction come out of its
/// payload without checksums, but `Event::write` appends one (the format says CRC32) without
/// counting it in the header's size: the size is corrected, so the checksum-aware reader
/// strips exactly those 4 bytes.
fn write_event(event: &Event, out: &mut Vec<u8>) -> std::io::Result<()> {
    let start = out.len();
    event.write(BinlogVersion::Version4, &mut *out)?;
    let written = out.len() - start;
    let size_at = start + 9;
    if let Some(size) = out.get(size_at..size_at + 4) {
        let size = u32::from_le_bytes([size[0], size[1], size[2], size[3]]) as usize;
        if written == size + 4 {
            out[size_at..size_at + 4].copy_from_slice(&(written as u32).to_le_bytes());
        }
    }
    Ok(())
}

fn log_err(e: changelog::LogError) -> Error {
    Error::Definite(e.to_string())
}

fn query(data: Option<&EventData<'_>>) -> Option<QueryKind> {
    match data {
        Some(EventData::QueryEvent(q)) => Some(query_kind(&q.query())),
        _ => None,
    }
}

/// Does this event, outside a transaction, open one? (The same boundaries as
/// [`binlog::Assembler`]: `BEGIN`, MariaDB's GTID in its place, MySQL 8's compressed
/// transaction, and rows without a `BEGIN`.)
fn opens(event: &Event, data: Option<&EventData<'_>>) -> bool {
    let header = event.header();
    match header.event_type_raw() {
        QUERY_EVENT => query(data) == Some(QueryKind::Begin),
        MARIADB_GTID_EVENT => {
            decode::mariadb_gtid(header.server_id(), event.data()).is_some_and(|g| !g.standalone)
        }
        TRANSACTION_PAYLOAD_EVENT | TABLE_MAP_EVENT => true,
        _ => matches!(data, Some(EventData::RowsEvent(_))),
    }
}

/// Does this event, inside a transaction, end it? (XID, or a query other than the ones a
/// transaction holds: `COMMIT`, `ROLLBACK`, `XA END`, a DDL's implicit commit.)
fn closes(event: &Event, data: Option<&EventData<'_>>) -> bool {
    match event.header().event_type_raw() {
        XID_EVENT => true,
        QUERY_EVENT => {
            query(data).is_some_and(|k| !matches!(k, QueryKind::Begin | QueryKind::Within))
        }
        _ => false,
    }
}

/// What the capture task reports while it runs.
#[derive(Default)]
struct Shared {
    /// Why the capture stopped, when it stopped on an error.
    failure: Mutex<Option<String>>,
}

/// The running capture of one job and the means to read what it spooled.
pub struct Spool {
    dir: PathBuf,
    base: String,
    flavour: Flavour,
    end: watch::Receiver<LogEnd>,
    shared: Arc<Shared>,
    stop: CancellationToken,
    task: Option<JoinHandle<Result<()>>>,
}

struct Capture {
    /// The server the job's positions belong to ([`binlog::server_identity`]).
    identity: String,
    endpoint: Endpoint,
    /// The job's database: rows of others are left out of the spool.
    database: String,
    flavour: Flavour,
    server_id: u32,
    base: String,
    store: Arc<StateStore>,
}

impl Spool {
    /// Open the job's spool and start capturing. `from` is the position apply needs next (the
    /// job's P0, or what the target has applied): a spool that does not reach back to it, or
    /// that stops short of it, is dropped and capture starts at `from`.
    pub fn start(
        endpoint: &Endpoint,
        flavour: Flavour,
        identity: &str,
        server_id: u32,
        store: &Arc<StateStore>,
        from: &BinlogCursor,
        cancel: &CancellationToken,
    ) -> Result<Spool> {
        let dir = dir(&store.dir());
        let base = base_name(from)?;
        if let Some(saved) = store.meta("binlog_base")?
            && saved != base
        {
            // The server's binlog was renamed (log_bin changed): the old spool orders
            // differently, and is not needed if the new name holds `from`.
            discard(&store.dir())?;
        }
        store.set_meta("binlog_base", &base)?;
        let start = encode(from)?;
        let names = changelog::segments(&dir).map_err(log_err)?;
        let mut log = ChangeLog::open(&dir, start, changelog::SEGMENT_BYTES).map_err(log_err)?;
        if names.first().is_some_and(|oldest| *oldest > start) || log.last_commit() < start {
            tracing::info!(
                from = %format!("{}:{}", from.file, from.offset),
                "binlog spool: the saved spool does not cover the position apply needs; capturing again from there"
            );
            drop(log);
            discard(&store.dir())?;
            log = ChangeLog::open(&dir, start, changelog::SEGMENT_BYTES).map_err(log_err)?;
        }
        let end = log.subscribe();
        let shared = Arc::new(Shared::default());
        let stop = cancel.child_token();
        let capture = Capture {
            identity: identity.to_owned(),
            endpoint: endpoint.clone(),
            database: endpoint.database.clone(),
            flavour,
            server_id,
            base: base.clone(),
            store: store.clone(),
        };
        let (task_shared, task_stop) = (shared.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut log = log;
            let result = capture.run(&mut log, &task_stop).await;
            if let Err(e) = &result {
                *task_shared
                    .failure
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            }
            // Readers learn the capture ended when the log goes: the reason is there first.
            drop(log);
            result
        });
        Ok(Spool {
            dir,
            base,
            flavour,
            end,
            shared,
            stop,
            task: Some(task),
        })
    }

    pub fn flavour(&self) -> Flavour {
        self.flavour
    }

    /// A reader of the events after `applied` (a transaction boundary).
    pub fn reader(&self, applied: &BinlogCursor) -> Result<SpoolReader> {
        let applied = encode(applied)?;
        let reader = LogReader::open(&self.dir, applied, self.end.clone()).map_err(log_err)?;
        Ok(SpoolReader {
            dir: self.dir.clone(),
            reader,
            end: self.end.clone(),
            esr: EventStreamReader::new(BinlogVersion::Version4),
            base: self.base.clone(),
            applied,
            in_transaction: false,
            skipping: false,
            begins: false,
            shared: self.shared.clone(),
        })
    }

    /// Drop the segments apply is done with.
    pub fn remove_applied(&self, applied: &BinlogCursor) {
        if let Ok(pos) = encode(applied)
            && let Err(e) = changelog::remove_applied(&self.dir, pos)
        {
            tracing::warn!("removing applied binlog spool segments: {e}");
        }
    }

    /// Resolves when the capture stopped on its own (an error it could not get past).
    pub async fn failed(&mut self) -> Error {
        let Some(task) = self.task.as_mut() else {
            return std::future::pending().await;
        };
        let result = task.await;
        self.task = None;
        match result {
            // Stopped because the job is stopping (a signal).
            _ if self.stop.is_cancelled() => Error::Interrupted,
            Ok(Ok(())) => Error::Definite("binlog capture stopped".into()),
            Ok(Err(e)) => e,
            Err(e) => Error::Definite(format!("binlog capture failed: {e}")),
        }
    }

    /// Stop the capture (everything spooled is synced first).
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            match task.await {
                Ok(Err(e)) if !matches!(e, Error::Interrupted) => {
                    tracing::warn!("binlog capture: {e}")
                }
                _ => {}
            }
        }
    }
}

impl Capture {
    async fn run(self, log: &mut ChangeLog, cancel: &CancellationToken) -> Result<()> {
        let mut reconnect = Reconnect::default();
        loop {
            let before = log.last_commit();
            let result = self.stream(log, cancel).await;
            let synced = log.sync().map_err(log_err);
            match result {
                Ok(()) => return synced,
                Err(e)
                    if e.class() == crate::engine::ErrorClass::Transient
                        && !cancel.is_cancelled() =>
                {
                    synced?;
                    if log.last_commit() > before {
                        reconnect.progressed();
                    }
                    if !reconnect.wait("binlog capture", e, cancel).await? {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn stream(&self, log: &mut ChangeLog, cancel: &CancellationToken) -> Result<()> {
        let mut cursor = decode(&self.base, log.last_commit());
        let mut boundary = log.last_commit();
        // The same server? After a failover behind the same address the file and offset
        // would point into another server's binlog.
        let mut conn = mysql::connect(&self.endpoint, "binlog capture").await?;
        let now = binlog::server_identity(&mut conn, self.flavour).await?;
        let _ = conn.disconnect().await;
        if now != self.identity {
            return Err(Error::Definite(format!(
                "the source is another server now (its server_id or server_uuid is {now}; the job read {}): run the job again, it resumes on the new server by GTID position (MariaDB)",
                self.identity
            )));
        }
        let mut stream =
            binlog::open(&self.endpoint, self.flavour, self.server_id, &cursor).await?;
        tracing::info!(from = %format!("{}:{}", cursor.file, cursor.offset), "binlog capture streaming into the spool");
        let mut in_transaction = false;
        let mut events_in_transaction = 0u32;
        let mut foreign_tables: std::collections::HashSet<u64> = Default::default();
        let mut last_publish = Instant::now();
        let mut last_sync = Instant::now();
        let mut last_status = Instant::now() - Duration::from_secs(10);
        let mut record = Vec::with_capacity(1 << 16);
        loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => {
                    let _ = stream.close().await;
                    return Ok(());
                }
                e = tokio::time::timeout(PUBLISH_EVERY, stream.next()) => e,
            };
            match next {
                Err(_) => {}
                Ok(None) => {
                    return Err(Error::Mysql(mysql::Error {
                        context: "reading the binlog stream".into(),
                        message: "the server ended the stream".into(),
                        class: crate::engine::ErrorClass::Transient,
                    }));
                }
                Ok(Some(Err(e))) => {
                    return Err(mysql::error("reading the binlog stream", e).into());
                }
                Ok(Some(Ok(event))) => {
                    let header = event.header();
                    let event_type = header.event_type_raw();
                    if event_type == HEARTBEAT_EVENT || event_type == HEARTBEAT_V2_EVENT {
                        continue;
                    }
                    let data = event.read_data().map_err(|e| {
                        Error::Definite(format!(
                            "cannot decode binlog event type {event_type} at {}:{}: {e}",
                            cursor.file, cursor.offset
                        ))
                    })?;
                    let rotate = binlog::rotation(data.as_ref(), &cursor.file);
                    cursor.advance(
                        event_type,
                        header.flags_raw(),
                        header.log_pos(),
                        rotate.as_ref().map(|(f, p)| (f.as_str(), *p)),
                    );
                    if rotate.is_some() && header.flags_raw() & ARTIFICIAL != 0 {
                        // The server's note of where this stream starts: not an event.
                        continue;
                    }
                    let pos = encode(&cursor)
                        .map_err(|e| Error::Definite(format!("binlog capture: {e}")))?;
                    record.clear();
                    let tag = if event_type == FORMAT_DESCRIPTION_EVENT {
                        record.extend_from_slice(b"R\0\0\0\0");
                        b'R'
                    } else if in_transaction {
                        let tag = if closes(&event, data.as_ref()) {
                            b'C'
                        } else {
                            b'E'
                        };
                        record.push(tag);
                        tag
                    } else if opens(&event, data.as_ref()) {
                        log.append(RecordKind::Binlog, boundary, b"B")
                            .map_err(log_err)?;
                        in_transaction = true;
                        record.push(b'E');
                        b'E'
                    } else {
                        record.push(b'C');
                        b'C'
                    };
                    // Rows of other databases (and their TABLE_MAPs) are not the job's: the
                    // transaction's frame is kept, its foreign rows are not spooled.
                    let foreign = match data.as_ref() {
                        Some(EventData::TableMapEvent(t)) if t.database_name() != self.database => {
                            foreign_tables.insert(t.table_id());
                            true
                        }
                        Some(EventData::RowsEvent(r)) => foreign_tables.contains(&r.table_id()),
                        _ => false,
                    };
                    drop(data);
                    if foreign {
                        continue;
                    }
                    write_event(&event, &mut record)
                        .map_err(|e| Error::Definite(format!("binlog capture: {e}")))?;
                    log.append(RecordKind::Binlog, pos, &record)
                        .map_err(log_err)?;
                    if tag == b'C' {
                        in_transaction = false;
                        boundary = pos;
                        foreign_tables.clear();
                        events_in_transaction = 0;
                    } else if in_transaction {
                        events_in_transaction += 1;
                        if events_in_transaction == 4
                            && crate::failpoint::armed_for(SYNCED_IN_TRANSACTION)
                        {
                            // Crash tests: part of a transaction is durable in the spool.
                            log.sync().map_err(log_err)?;
                            crate::failpoint::hit(SYNCED_IN_TRANSACTION);
                        }
                    }
                }
            }
            if last_sync.elapsed() >= SYNC_EVERY {
                log.sync().map_err(log_err)?;
                last_sync = Instant::now();
                last_publish = last_sync;
            } else if !in_transaction && last_publish.elapsed() >= PUBLISH_EVERY {
                log.publish().map_err(log_err)?;
                last_publish = Instant::now();
            }
            if last_status.elapsed() >= Duration::from_secs(1) {
                last_status = Instant::now();
                let at = decode(&self.base, boundary);
                let at = crate::model::Position::BinlogFile {
                    file: at.file,
                    offset: at.offset,
                };
                let _ = self.store.set_position("spooled", &at.to_string());
            }
        }
    }
}

/// Reads the spooled events after a position, in order, as the binlog stream would give them.
pub struct SpoolReader {
    dir: PathBuf,
    reader: LogReader,
    end: watch::Receiver<LogEnd>,
    esr: EventStreamReader,
    base: String,
    /// Events at or before this (and transactions starting before it) were applied.
    applied: u64,
    in_transaction: bool,
    skipping: bool,
    /// A `B` was read: the next event starts a transaction from its beginning.
    begins: bool,
    shared: Arc<Shared>,
}

/// One spooled event.
pub struct Spooled {
    pub event: Event,
    /// The cursor after the event.
    pub cursor: BinlogCursor,
    /// The event is the first of a transaction: anything left open before it is abandoned.
    pub begins: bool,
}

impl SpoolReader {
    /// The next event, or `None` when none came within `idle`.
    pub async fn next(&mut self, idle: Duration) -> Result<Option<Spooled>> {
        let deadline = tokio::time::Instant::now() + idle;
        loop {
            self.end.borrow_and_update();
            let Some(record) = self.reader.try_next().map_err(log_err)? else {
                tokio::select! {
                    changed = self.end.changed() => {
                        if changed.is_err() {
                            let why = self
                                .shared
                                .failure
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .clone();
                            return Err(match why {
                                Some(why) => Error::Definite(format!("binlog capture stopped: {why}")),
                                None => Error::Interrupted,
                            });
                        }
                    }
                    _ = tokio::time::sleep_until(deadline) => return Ok(None),
                }
                continue;
            };
            if record.kind != RecordKind::Binlog || record.payload.is_empty() {
                return Err(Error::Definite(format!(
                    "the binlog spool in {} holds a record that is not a binlog event; remove the state directory's changes/ to capture again",
                    self.reader_dir()
                )));
            }
            let tag = record.payload[0];
            let bytes = match tag {
                b'R' => {
                    self.read_event(&record.payload[5..])?;
                    continue;
                }
                b'B' => {
                    self.in_transaction = true;
                    self.skipping = record.pos < self.applied;
                    self.begins = !self.skipping;
                    continue;
                }
                b'E' | b'C' => &record.payload[1..],
                _ => {
                    return Err(Error::Definite(format!(
                        "the binlog spool in {} holds a record with the unknown tag {tag}",
                        self.reader_dir()
                    )));
                }
            };
            let standalone = !self.in_transaction;
            if tag == b'C' {
                self.in_transaction = false;
            }
            if self.skipping {
                if tag == b'C' {
                    self.skipping = false;
                }
                continue;
            }
            if standalone && record.pos <= self.applied {
                continue;
            }
            let event = self.read_event(bytes)?;
            let begins = std::mem::take(&mut self.begins);
            return Ok(Some(Spooled {
                event,
                cursor: decode(&self.base, record.pos),
                begins,
            }));
        }
    }

    fn reader_dir(&self) -> String {
        self.dir.display().to_string()
    }

    fn read_event(&mut self, bytes: &[u8]) -> Result<Event> {
        self.esr
            .read(bytes)
            .map_err(|e| Error::Definite(format!("reading a spooled binlog event: {e}")))?
            .ok_or_else(|| Error::Definite("an empty spooled binlog event".into()))
    }

    /// The TABLE_MAP event of a rows event's table id.
    pub fn get_tme(&self, table_id: u64) -> Option<&TableMapEvent<'static>> {
        self.esr.get_tme(table_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor(file: &str, offset: u64) -> BinlogCursor {
        BinlogCursor {
            file: file.into(),
            offset,
        }
    }

    /// An event: 19-byte header (size counts `body`), then `body`.
    fn event(kind: u8, log_pos: u32, body: &[u8]) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend_from_slice(&1_700_000_000u32.to_le_bytes());
        e.push(kind);
        e.extend_from_slice(&7u32.to_le_bytes());
        e.extend_from_slice(&((19 + body.len()) as u32).to_le_bytes());
        e.extend_from_slice(&log_pos.to_le_bytes());
        e.extend_from_slice(&0u16.to_le_bytes());
        e.extend_from_slice(body);
        e
    }

    /// A MySQL 8 FORMAT_DESCRIPTION event announcing CRC32 checksums.
    fn format_description() -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&4u16.to_le_bytes());
        let mut version = b"8.0.36".to_vec();
        version.resize(50, 0);
        body.extend_from_slice(&version);
        body.extend_from_slice(&0u32.to_le_bytes());
        body.push(19);
        body.extend_from_slice(&[0u8; 41]); // post-header lengths
        body.push(1); // checksum algorithm: CRC32
        body.extend_from_slice(&[0u8; 4]); // its checksum (not verified on read)
        event(FORMAT_DESCRIPTION_EVENT, 0, &body)
    }

    #[test]
    fn events_round_trip_through_the_spool_encoding_with_and_without_checksums() {
        let fde = format_description();
        let mut live = EventStreamReader::new(BinlogVersion::Version4);
        live.read(&fde[..]).unwrap();
        let mut spooled = EventStreamReader::new(BinlogVersion::Version4);
        spooled.read(&fde[..]).unwrap();
        let xid = |n: u64| n.to_le_bytes();
        // A plain event carries its checksum (counted in its size); an event out of a
        // compressed transaction has none.
        let mut plain = event(XID_EVENT, 500, &xid(41));
        plain.extend_from_slice(&[1, 2, 3, 4]);
        let size = plain.len() as u32;
        plain[9..13].copy_from_slice(&size.to_le_bytes());
        let inner = event(XID_EVENT, 0, &xid(42));
        let events = [
            live.read(&plain[..]).unwrap().unwrap(),
            live.read_decompressed(&inner[..]).unwrap().unwrap(),
        ];
        for (event, want) in events.iter().zip([41u64, 42]) {
            let mut record = Vec::new();
            write_event(event, &mut record).unwrap();
            let back = spooled.read(&record[..]).unwrap().unwrap();
            assert_eq!(back.data(), event.data());
            match back.read_data().unwrap() {
                Some(EventData::XidEvent(x)) => assert_eq!(x.xid, want),
                other => panic!("not an XID event: {other:?}"),
            }
        }
    }

    #[test]
    fn positions_order_across_files_and_past_4_gib() {
        let a = encode(&cursor("mysql-bin.000009", (5 << 32) + 7)).unwrap();
        let b = encode(&cursor("mysql-bin.000010", 4)).unwrap();
        assert!(a < b);
        assert_eq!(
            decode("mysql-bin", a),
            cursor("mysql-bin.000009", (5 << 32) + 7)
        );
        assert_eq!(decode("mysql-bin", b), cursor("mysql-bin.000010", 4));
        let c = cursor("log.bin.1234567", 123);
        assert_eq!(base_name(&c).unwrap(), "log.bin");
        assert_eq!(decode("log.bin", encode(&c).unwrap()), c);
        for bad in [
            "mysql-bin",
            "mysql-bin.12",
            "mysql-bin.0000012",
            "mysql-bin.00001x",
        ] {
            assert!(encode(&cursor(bad, 4)).is_err(), "{bad}");
        }
        assert!(encode(&cursor("mysql-bin.000001", 1 << 40)).is_err());
    }
}
