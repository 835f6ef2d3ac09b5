//! PostgreSQL change capture: checks, the job's publication and slot, and the pgoutput stream
//! spooled into the local change log.
//!
//! Contracts:
//! - The source is told a position is flushed only after every change up to it is durably in
//!   the change log ([`ChangeLog::sync`]); a quiet slot still advances through keepalives, so an
//!   idle job never holds WAL back.
//! - Transactions are deduplicated by commit position: after a reconnect the server may resend
//!   transactions the log already holds, and they are skipped.
//! - A change to a replicated table's columns is checked before any change in the new shape is
//!   logged: a nullable column added without a default is followed (a [`KuakaRecord::AddColumn`]
//!   goes into the log ahead of the new relation description); anything else stops the capture
//!   with an error naming the table and the change, leaving the log and the target as they were.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::decode::{self, PgOutput, RelationColumn};
use super::replication::{ReplicationConnection, ReplicationEvent};
use super::{Context, Error, Result};
use crate::changelog::{ChangeLog, RecordKind};
use crate::config::Endpoint;
use crate::engine::ErrorClass;
use crate::model::PgLsn;
use crate::model::schema::{QualifiedName, Schema, quote_ident};

/// How often the log is made durable and the source told, at most.
const SYNC_INTERVAL: Duration = Duration::from_millis(100);
/// Make the log durable after this many bytes even mid-stream.
const SYNC_BYTES: u64 = 32 * 1024 * 1024;
/// Send a status update at least this often even when nothing happens.
const STATUS_INTERVAL: Duration = Duration::from_secs(5);

/// The replication slot and publication names of a job (job ids are lowercase hex and `_`).
pub fn slot_name(job_id: &str) -> String {
    format!("kuaka_{job_id}")
}

pub fn publication_name(job_id: &str) -> String {
    format!("kuaka_{job_id}")
}

/// A column as a relation description sends it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShapeColumn {
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
    pub is_key: bool,
}

/// Columns of each replicated table (by `schema.name`), as of the last change logged.
pub type Shapes = BTreeMap<String, Vec<ShapeColumn>>;

/// Instructions kuaka writes into the change log next to the source's messages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KuakaRecord {
    /// Add a column on the target before applying the changes that follow.
    AddColumn {
        table: QualifiedName,
        column: String,
        type_sql: String,
        /// The column's type in the model, for targets of another engine (absent in logs
        /// written before kuaka recorded it: those columns arrive as text).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data_type: Option<crate::model::schema::DataType>,
    },
}

impl KuakaRecord {
    /// Read a record's payload back from the change log.
    pub fn parse(payload: &[u8]) -> Result<KuakaRecord> {
        serde_json::from_slice(payload)
            .map_err(|e| Error::Definite(format!("unreadable kuaka record in the change log: {e}")))
    }
}

/// Capture progress, shared with apply and status.
#[derive(Debug, Default)]
pub struct CaptureProgress {
    /// Server position last reported (keepalive or message).
    pub received: AtomicU64,
    /// Position the source was last told is flushed.
    pub confirmed: AtomicU64,
    /// Commit position of the last transaction in the log.
    pub last_commit: AtomicU64,
    /// Highest server position known to be fully received: every transaction committed before
    /// it is in the log (set from keepalives received outside a transaction).
    pub complete_through: AtomicU64,
    pub last_commit_time_us: AtomicI64,
    /// A position someone waits to see passed (`--until caught-up`): keepalives are requested
    /// until `complete_through` reaches it.
    pub wanted: AtomicU64,
}

/// Up-front checks of the source for change capture, each failing with what to do.
pub async fn preflight(client: &Client, schema: &Schema) -> Result<()> {
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'), \
               current_setting('max_replication_slots')::int, \
               (SELECT count(*)::int FROM pg_replication_slots), \
               current_setting('max_wal_senders')::int, \
               (SELECT count(*)::int FROM pg_stat_replication), \
               (SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user), \
               pg_is_in_recovery()",
            &[],
        )
        .await
        .ctx(|| "checking the source's replication settings".into())?;
    let wal_level: String = row.get(0);
    let (max_slots, used_slots): (i32, i32) = (row.get(1), row.get(2));
    let (max_senders, used_senders): (i32, i32) = (row.get(3), row.get(4));
    let can_replicate: Option<bool> = row.get(5);
    let in_recovery: bool = row.get(6);
    let mut problems = Vec::new();
    if wal_level != "logical" {
        problems.push(format!(
            "wal_level is '{wal_level}'; change capture needs 'logical' (ALTER SYSTEM SET wal_level = logical, then restart the source), or pass --snapshot-only"
        ));
    }
    if in_recovery {
        problems.push(
            "the source is a standby; capture from the primary (or pass --snapshot-only)"
                .to_owned(),
        );
    }
    if used_slots >= max_slots {
        problems.push(format!(
            "all {max_slots} replication slots are in use (max_replication_slots); free one (SELECT pg_drop_replication_slot(...)) or raise the setting"
        ));
    }
    if used_senders >= max_senders {
        problems.push(format!(
            "all {max_senders} WAL senders are in use (max_wal_senders); raise the setting"
        ));
    }
    if can_replicate != Some(true) {
        problems.push(
            "the source user has neither REPLICATION nor SUPERUSER; ALTER ROLE ... REPLICATION"
                .to_owned(),
        );
    }
    // Replica identity: updates and deletes must carry a key.
    let names: Vec<String> = schema.tables.iter().map(|t| t.name.to_string()).collect();
    let rows = client
        .query(
            "SELECT n.nspname, c.relname, c.relreplident::text, \
               EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = ANY (SELECT unnest($1::text[])::regclass)",
            &[&names],
        )
        .await
        .ctx(|| "checking REPLICA IDENTITY of the source tables".into())?;
    for r in rows {
        let name = format!("{}.{}", r.get::<_, String>(0), r.get::<_, String>(1));
        let ident: String = r.get(2);
        let has_pk: bool = r.get(3);
        match (ident.as_str(), has_pk) {
            ("d", true) | ("i", _) => {}
            ("f", true) => {}
            ("f", false) => problems.push(format!(
                "table {name} has REPLICA IDENTITY FULL but no primary key; kuaka applies changes by key: add a primary key, or --exclude it"
            )),
            ("n", _) => problems.push(format!(
                "table {name} has REPLICA IDENTITY NOTHING: its updates and deletes cannot be captured; ALTER TABLE {name} REPLICA IDENTITY DEFAULT (with a primary key), or --exclude it"
            )),
            _ => problems.push(format!(
                "table {name} has no primary key, so its updates and deletes carry no key (and, once published, would fail on the source); add a primary key or REPLICA IDENTITY USING INDEX, or --exclude it"
            )),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Definite(format!(
            "the source is not ready for change capture:\n  - {}",
            problems.join("\n  - ")
        )))
    }
}

/// Create the job's publication (idempotent): every selected table, partitions published
/// through their root so the target sees one table.
pub async fn ensure_publication(client: &Client, name: &str, schema: &Schema) -> Result<()> {
    let exists = client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
        .await
        .ctx(|| "looking up the job's publication".into())?
        .is_some();
    if exists {
        return Ok(());
    }
    let tables: Vec<String> = schema
        .tables
        .iter()
        .filter(|t| t.partitioning.partition_of.is_none())
        .map(|t| t.name.to_string())
        .collect();
    client
        .batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)",
            quote_ident(name),
            tables.join(", ")
        ))
        .await
        .ctx(|| {
            format!(
                "creating publication {name} on the source (needs CREATE on the database and ownership of the tables)"
            )
        })?;
    Ok(())
}

/// Slot state on the source: `Ok(None)` when it does not exist.
pub async fn slot_status(client: &Client, slot: &str) -> Result<Option<(PgLsn, String)>> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text, coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .ctx(|| format!("looking up replication slot {slot}"))?;
    Ok(row.map(|r| {
        let lsn: Option<String> = r.get(0);
        (
            lsn.and_then(|l| l.parse().ok()).unwrap_or(PgLsn(0)),
            r.get(1),
        )
    }))
}

/// Check that the job's slot still exists and can stream.
pub async fn check_slot(client: &Client, slot: &str, since: &str) -> Result<()> {
    match slot_status(client, slot).await? {
        None => Err(Error::Definite(format!(
            "replication slot {slot} no longer exists on the source: the changes since {since} cannot be captured, and the target would silently miss them; run `kuaka clean` and start the job again"
        ))),
        Some((_, status)) if status == "lost" => Err(Error::Definite(format!(
            "replication slot {slot} was invalidated by the source (WAL it needed was removed, see max_slot_wal_keep_size): changes since {since} are gone; run `kuaka clean` and start the job again"
        ))),
        Some(_) => Ok(()),
    }
}

/// Drop a slot kuaka itself was streaming from a moment ago (and its publication): the server
/// process that served the closed stream may not have exited yet, so wait for it (up to 10 s),
/// ending it if it lingers, instead of refusing as [`drop_slot_and_publication`] does.
pub async fn drop_own_slot_and_publication(
    client: &Client,
    slot: &str,
    publication: &str,
) -> Result<Vec<String>> {
    let started = std::time::Instant::now();
    while let Some(Some(pid)) = slot_holder(client, slot).await? {
        if started.elapsed() > std::time::Duration::from_secs(10) {
            return Err(Error::Definite(format!(
                "replication slot {slot} is still in use by server process {pid} after 10 s; stop whatever streams from it"
            )));
        }
        if started.elapsed() > std::time::Duration::from_secs(5) {
            client
                .execute("SELECT pg_terminate_backend($1)", &[&pid])
                .await
                .ctx(|| format!("ending server process {pid}, which holds slot {slot}"))?;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    drop_slot_and_publication(client, slot, publication).await
}

/// `None` when the slot does not exist, else the server process streaming from it, if any.
async fn slot_holder(client: &Client, slot: &str) -> Result<Option<Option<i32>>> {
    Ok(client
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .ctx(|| format!("looking up replication slot {slot}"))?
        .map(|r| r.get(0)))
}

/// Drop the job's slot and publication (for `kuaka clean`); missing ones are fine.
pub async fn drop_slot_and_publication(
    client: &Client,
    slot: &str,
    publication: &str,
) -> Result<Vec<String>> {
    let mut done = Vec::new();
    if let Some(pid) = slot_holder(client, slot).await? {
        if let Some(pid) = pid {
            return Err(Error::Definite(format!(
                "replication slot {slot} is in use by server process {pid} (a kuaka run on this job?); stop it first"
            )));
        }
        client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .ctx(|| format!("dropping replication slot {slot}"))?;
        done.push(format!("dropped replication slot {slot}"));
    }
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .ctx(|| "looking up the job's publication".into())?
        .is_some();
    if exists {
        client
            .batch_execute(&format!("DROP PUBLICATION {}", quote_ident(publication)))
            .await
            .ctx(|| format!("dropping publication {publication}"))?;
        done.push(format!("dropped publication {publication}"));
    }
    Ok(done)
}

/// The columns of each table as pgoutput will describe them (no generated or dropped columns).
pub async fn read_shapes(client: &Client, schema: &Schema) -> Result<Shapes> {
    let mut shapes = Shapes::new();
    for t in schema
        .tables
        .iter()
        .filter(|t| t.partitioning.partition_of.is_none())
    {
        let rows = client
            .query(
                "SELECT a.attname::text, a.atttypid::oid, a.atttypmod, \
                   coalesce(a.attnum = ANY (i.indkey), false) \
                 FROM pg_attribute a \
                 LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND (CASE (SELECT relreplident FROM pg_class WHERE oid = a.attrelid) \
                     WHEN 'i' THEN i.indisreplident ELSE i.indisprimary END) \
                 WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
                 ORDER BY a.attnum",
                &[&t.name.to_string()],
            )
            .await
            .ctx(|| format!("reading the columns of {}", t.name.display_name()))?;
        shapes.insert(
            t.name.display_name(),
            rows.iter()
                .map(|r| ShapeColumn {
                    name: r.get(0),
                    type_oid: r.get(1),
                    type_modifier: r.get(2),
                    is_key: r.get(3),
                })
                .collect(),
        );
    }
    Ok(shapes)
}

fn shape_of(columns: &[RelationColumn]) -> Vec<ShapeColumn> {
    columns
        .iter()
        .map(|c| ShapeColumn {
            name: c.name.clone(),
            type_oid: c.type_oid,
            type_modifier: c.type_modifier,
            is_key: c.is_key,
        })
        .collect()
}

/// What changed between two shapes of a table: `Ok(added columns)` when only columns were added
/// at the end, else a description of the change.
fn shape_change(old: &[ShapeColumn], new: &[ShapeColumn]) -> Result<Vec<ShapeColumn>, String> {
    let mut changes = Vec::new();
    for o in old {
        match new.iter().find(|n| n.name == o.name) {
            None => changes.push(format!("column {} was dropped or renamed", o.name)),
            Some(n) if n.type_oid != o.type_oid || n.type_modifier != o.type_modifier => {
                changes.push(format!("the type of column {} changed", o.name));
            }
            Some(n) if n.is_key != o.is_key => {
                changes.push(format!(
                    "the key (replica identity) changed at column {}",
                    o.name
                ));
            }
            Some(_) => {}
        }
    }
    if !changes.is_empty() {
        return Err(changes.join("; "));
    }
    let added: Vec<ShapeColumn> = new
        .iter()
        .filter(|n| !old.iter().any(|o| o.name == n.name))
        .cloned()
        .collect();
    if added.iter().any(|a| a.is_key) {
        return Err("a column was added to the key".to_owned());
    }
    Ok(added)
}

/// When to persist the table shapes. A shape change is logged (as a relation record and an
/// added-column instruction) inside the transaction that first shows it; the shapes may be saved
/// only once that transaction is complete in the log and the log is synced. Saved earlier, a
/// crash would cut the unfinished transaction (and the instruction) from the log, and the
/// resent relation would then match the saved shape: the column would never be added.
#[derive(Default)]
struct ShapeSave {
    changed_in_transaction: bool,
    /// Shapes whose changes are all in complete transactions, to save after the next sync.
    durable: Option<Shapes>,
}

impl ShapeSave {
    fn transaction_complete(&mut self, shapes: &Shapes) {
        if std::mem::take(&mut self.changed_in_transaction) {
            self.durable = Some(shapes.clone());
        }
    }
}

/// Everything the capture loop needs.
pub struct Capture {
    pub endpoint: Endpoint,
    pub slot: String,
    pub publication: String,
    pub shapes: Shapes,
    /// Called with the new shapes once they are durable in the log (persist them).
    pub on_shapes: Box<dyn Fn(&Shapes) + Send + Sync>,
    pub progress: Arc<CaptureProgress>,
    /// Ask for big in-progress transactions to be streamed (PostgreSQL 14+, protocol 2).
    pub streaming: bool,
    /// Leave out transactions whose replication origin starts with this: the writes kuaka
    /// itself applied to this database in the other direction (after a cutover), which must
    /// not travel back.
    pub skip_origin_prefix: Option<String>,
}

impl Capture {
    /// Stream into `log` until cancelled (then sync and confirm), reconnecting after transient
    /// failures. Definite failures (slot gone, schema change) end it with the error.
    pub async fn run(mut self, mut log: ChangeLog, cancel: CancellationToken) -> Result<()> {
        let mut reconnect = crate::pipeline::Reconnect::default();
        let mut shapes = ShapeSave::default();
        loop {
            let started = Instant::now();
            let result = self.stream(&mut log, &mut shapes, &cancel).await;
            // Whatever happened, what was written stays: make it durable.
            let synced = log.sync();
            match result {
                Ok(()) => {
                    synced.map_err(log_error)?;
                    return Ok(());
                }
                Err(e) if e.class() == ErrorClass::Transient && !cancel.is_cancelled() => {
                    synced.map_err(log_error)?;
                    if started.elapsed() > Duration::from_secs(60) {
                        reconnect.progressed();
                    }
                    if !reconnect.wait("change capture", e, &cancel).await? {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn stream(
        &mut self,
        log: &mut ChangeLog,
        save: &mut ShapeSave,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let mut conn = ReplicationConnection::connect(&self.endpoint, "change capture").await?;
        conn.identify_system().await?;
        // The server resumes at the slot's confirmed position; anything older it resends is
        // skipped below by commit position.
        let mut stream = conn
            .start(
                &self.slot,
                PgLsn(0),
                std::slice::from_ref(&self.publication),
                self.streaming,
            )
            .await
            .map_err(|e| match e.sqlstate() {
                Some("42704") => Error::Definite(format!(
                    "replication slot {} no longer exists on the source: changes after {} cannot be captured; run `kuaka clean` and start the job again",
                    self.slot,
                    PgLsn(log.last_commit())
                )),
                Some("55000") => Error::Definite(format!(
                    "replication slot {} cannot stream any more ({e}); the changes it held are gone: run `kuaka clean` and start the job again",
                    self.slot
                )),
                Some("55006") => Error::Query {
                    context: format!("replication slot {} is busy (a previous connection is still ending)", self.slot),
                    message: e.to_string(),
                    class: ErrorClass::Transient,
                    sqlstate: None,
                },
                _ => e,
            })?;
        tracing::info!(slot = %self.slot, after = %PgLsn(log.last_commit()), "change capture streaming");
        let progress = self.progress.clone();
        let mut skipping = false;
        // A Begin is held back until the next message says whether the transaction came
        // from a replication origin kuaka leaves out (the Origin message follows the Begin).
        let mut pending_begin: Option<(u64, Vec<u8>)> = None;
        let mut commit_end = PgLsn(0);
        let mut confirmed = PgLsn(progress.confirmed.load(Ordering::Relaxed));
        let mut last_sync = Instant::now();
        let mut last_status = Instant::now();
        let mut unsynced: u64 = 0;
        let mut idle_end = PgLsn(0);
        // Transactions streamed before their commit (protocol 2), by top-level xid. The server
        // sends them again after a reconnect, so spools never outlive this connection.
        let mut spools: HashMap<u32, Spool> = HashMap::new();
        let mut in_stream: Option<u32> = None;
        // Streamed transactions that carry one of kuaka's replication origins: dropped at
        // their commit.
        let mut ours_streamed: HashSet<u32> = HashSet::new();
        Spool::remove_leftovers(log.dir());
        let mut reply_due = false;
        loop {
            let event = tokio::select! {
                biased;
                _ = cancel.cancelled() => None,
                e = stream.next() => Some(e?),
                _ = tokio::time::sleep(SYNC_INTERVAL) => Some(None),
            };
            let Some(event) = event else {
                // Stop: make the log durable and tell the source, then leave.
                log.sync().map_err(log_error)?;
                if let Some(shapes) = save.durable.take() {
                    (self.on_shapes)(&shapes);
                }
                if !log.in_transaction() && pending_begin.is_none() {
                    let to = commit_end.max(idle_end).max(confirmed);
                    let _ = stream.send_status(to, to, to, false).await;
                }
                return Ok(());
            };
            match event {
                Some(ReplicationEvent::XLogData {
                    wal_start,
                    wal_end,
                    data,
                }) => 'msg: {
                    progress.received.fetch_max(wal_end.0, Ordering::Relaxed);
                    unsynced += data.len() as u64;
                    if let Some(control) = decode::decode_stream_control(&data) {
                        let control = control.map_err(|e| {
                            Error::Definite(format!(
                                "the source sent a message kuaka cannot read: {e}"
                            ))
                        })?;
                        if let Some(end) = self
                            .stream_control(
                                log,
                                &mut spools,
                                &mut in_stream,
                                &mut ours_streamed,
                                control,
                                save,
                            )
                            .await?
                        {
                            commit_end = commit_end.max(end);
                        }
                        break 'msg;
                    }
                    if let Some(top) = in_stream {
                        // A change of a transaction still in progress: spool it aside until
                        // its commit (or abort) arrives.
                        // The origin of a streamed transaction (sent with its first part,
                        // without an xid): kuaka's own writes are dropped at the commit.
                        if data.first() == Some(&b'O') {
                            if let (Ok(PgOutput::Origin { name, .. }), Some(prefix)) =
                                (decode::decode(&data), &self.skip_origin_prefix)
                                && name.starts_with(prefix.as_str())
                            {
                                ours_streamed.insert(top);
                            }
                            break 'msg;
                        }
                        let (xid, v1) = decode::strip_stream_xid(&data).map_err(|e| {
                            Error::Definite(format!(
                                "the source sent a message kuaka cannot read: {e}"
                            ))
                        })?;
                        let spool = match spools.entry(top) {
                            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                            std::collections::hash_map::Entry::Vacant(e) => {
                                e.insert(Spool::create(log.dir(), top).map_err(log_error)?)
                            }
                        };
                        spool.add(xid, wal_start.0, &v1).map_err(log_error)?;
                        break 'msg;
                    }
                    let message = decode::decode(&data).map_err(|e| {
                        Error::Definite(format!("the source sent a change kuaka cannot read: {e}"))
                    })?;
                    if let Some((pos, begin)) = pending_begin.take() {
                        let ours = matches!(
                            (&message, &self.skip_origin_prefix),
                            (PgOutput::Origin { name, .. }, Some(prefix)) if name.starts_with(prefix.as_str())
                        );
                        if ours {
                            tracing::debug!(
                                "leaving out a transaction kuaka applied (replication origin)"
                            );
                            skipping = true;
                        } else {
                            append(log, pos, &begin)?;
                        }
                    }
                    match message {
                        PgOutput::Begin { final_lsn, .. } => {
                            skipping = final_lsn.0 <= log.last_commit();
                            tracing::debug!(commit = %final_lsn, skipping, "transaction");
                            if !skipping {
                                pending_begin = Some((wal_start.0, data.to_vec()));
                            }
                        }
                        PgOutput::Commit {
                            commit_lsn,
                            end_lsn,
                            commit_time_us,
                            ..
                        } => {
                            if !skipping {
                                append(log, commit_lsn.0, &data)?;
                                log.publish().map_err(log_error)?;
                                progress.last_commit.store(commit_lsn.0, Ordering::Relaxed);
                                progress
                                    .last_commit_time_us
                                    .store(commit_time_us, Ordering::Relaxed);
                            }
                            commit_end = commit_end.max(end_lsn);
                            skipping = false;
                            save.transaction_complete(&self.shapes);
                        }
                        PgOutput::Relation { .. } => {
                            if self.relation(log, wal_start.0, &data, &message).await? {
                                save.changed_in_transaction = true;
                            }
                        }
                        PgOutput::Insert { .. }
                        | PgOutput::Update { .. }
                        | PgOutput::Delete { .. }
                        | PgOutput::Truncate { .. } => {
                            if !skipping {
                                append(log, wal_start.0, &data)?;
                            }
                        }
                        PgOutput::Origin { .. }
                        | PgOutput::Type { .. }
                        | PgOutput::Message { .. } => {}
                    }
                }
                Some(ReplicationEvent::Keepalive {
                    wal_end,
                    reply_requested,
                }) => {
                    progress.received.fetch_max(wal_end.0, Ordering::Relaxed);
                    tracing::debug!(%wal_end, in_transaction = log.in_transaction(), reply_requested, "keepalive");
                    if !log.in_transaction() && pending_begin.is_none() && spools.is_empty() {
                        idle_end = idle_end.max(wal_end);
                    }
                    reply_due |= reply_requested;
                }
                None => {}
            }
            let now = Instant::now();
            if reply_due
                || unsynced >= SYNC_BYTES
                || (now.duration_since(last_sync) >= SYNC_INTERVAL)
                || now.duration_since(last_status) >= STATUS_INTERVAL
            {
                let sync_started = Instant::now();
                tokio::task::block_in_place(|| log.sync()).map_err(log_error)?;
                if sync_started.elapsed() > Duration::from_secs(1) {
                    tracing::warn!(
                        "the change log took {:?} to sync to disk",
                        sync_started.elapsed()
                    );
                }
                unsynced = 0;
                last_sync = now;
                if let Some(shapes) = save.durable.take() {
                    (self.on_shapes)(&shapes);
                }
                if log.in_transaction() {
                    crate::failpoint::hit("capture.synced_in_transaction");
                }
                // Everything up to the last commit is durable; outside a transaction, so is
                // everything the server has passed (keepalive position).
                let mut to = commit_end.max(confirmed);
                if !log.in_transaction()
                    && pending_begin.is_none()
                    && spools.is_empty()
                    && in_stream.is_none()
                {
                    to = to.max(idle_end);
                    progress
                        .complete_through
                        .fetch_max(to.0.max(log.last_commit()), Ordering::Relaxed);
                }
                // Someone waits for a position the stream has not shown passing: ask the
                // server for a keepalive carrying its position.
                let want = progress.wanted.load(Ordering::Relaxed);
                let ask = want > progress.complete_through.load(Ordering::Relaxed);
                if to > confirmed
                    || reply_due
                    || ask
                    || now.duration_since(last_status) >= STATUS_INTERVAL
                {
                    tracing::debug!(flushed = %to, ask, "status update");
                    stream.send_status(to, to, to, ask).await?;
                    confirmed = to;
                    progress.confirmed.store(to.0, Ordering::Relaxed);
                    last_status = now;
                    reply_due = false;
                }
            }
        }
    }

    /// A relation description: check it against the table's known shape, log the columns to
    /// add (if any) and the description. `true` when the shapes changed.
    async fn relation(
        &mut self,
        log: &mut ChangeLog,
        pos: u64,
        data: &[u8],
        message: &PgOutput,
    ) -> Result<bool> {
        let PgOutput::Relation {
            namespace,
            name,
            columns,
            ..
        } = message
        else {
            return Ok(false);
        };
        let mut changed = false;
        let key = format!("{namespace}.{name}");
        let new_shape = shape_of(columns);
        if !self.shapes.contains_key(&key) {
            // Some changes of a partition arrive under its own name (e.g. a row moved between
            // partitions); the target has the same partitions, so they apply there as they are.
            self.check_partition(namespace, name).await?;
            self.shapes.insert(key.clone(), new_shape.clone());
            changed = true;
        }
        let old_shape = self.shapes.get(&key).cloned().unwrap_or_default();
        if old_shape != new_shape {
            let added = shape_change(&old_shape, &new_shape).map_err(|what| {
                Error::Definite(format!(
                    "the columns of source table {key} changed while the job ran: {what}. kuaka follows only added nullable columns without a default; the target is consistent up to {} and was left as it is. Make the same change on the target, then restart the job from a new state directory (or restore the column)",
                    PgLsn(log.last_commit())
                ))
            })?;
            let table = QualifiedName::new(namespace.clone(), name.clone());
            for column in &added {
                let (type_sql, data_type) = self.check_added_column(&table, &column.name).await?;
                let record = KuakaRecord::AddColumn {
                    table: table.clone(),
                    column: column.name.clone(),
                    type_sql,
                    data_type: Some(data_type),
                };
                let json = serde_json::to_vec(&record).unwrap_or_default();
                log.append(RecordKind::Kuaka, pos, &json)
                    .map_err(log_error)?;
                tracing::info!(table = %key, column = %column.name, "following a column added on the source");
            }
            self.shapes.insert(key, new_shape);
            changed = true;
        }
        append(log, pos, data)?;
        Ok(changed)
    }

    /// Handle a stream control message; a streamed transaction that commits is written to the
    /// log whole, as if it had arrived at once. Returns the commit's end position.
    async fn stream_control(
        &mut self,
        log: &mut ChangeLog,
        spools: &mut HashMap<u32, Spool>,
        in_stream: &mut Option<u32>,
        ours_streamed: &mut HashSet<u32>,
        control: decode::StreamControl,
        save: &mut ShapeSave,
    ) -> Result<Option<PgLsn>> {
        use decode::StreamControl;
        match control {
            StreamControl::Start { xid, .. } => *in_stream = Some(xid),
            StreamControl::Stop => *in_stream = None,
            StreamControl::Abort { xid, subxid } => {
                if xid == subxid {
                    spools.remove(&xid);
                    ours_streamed.remove(&xid);
                } else if let Some(spool) = spools.get_mut(&xid) {
                    spool.abort_subtransaction(subxid).map_err(log_error)?;
                }
            }
            StreamControl::Commit {
                xid,
                commit_lsn,
                end_lsn,
                commit_time_us,
            } => {
                let Some(mut spool) = spools.remove(&xid) else {
                    ours_streamed.remove(&xid);
                    return Ok(Some(end_lsn));
                };
                if ours_streamed.remove(&xid) {
                    tracing::debug!(
                        xid,
                        "leaving out a streamed transaction kuaka applied (replication origin)"
                    );
                    return Ok(Some(end_lsn));
                }
                if commit_lsn.0 > log.last_commit() {
                    append(
                        log,
                        commit_lsn.0,
                        &decode::encode_begin(commit_lsn, commit_time_us, xid),
                    )?;
                    let records = spool.records().map_err(log_error)?;
                    for record in records {
                        let (pos, data) = record.map_err(log_error)?;
                        if data.first() == Some(&b'R') {
                            let message = decode::decode(&data).map_err(|e| {
                                Error::Definite(format!("a spooled change cannot be read: {e}"))
                            })?;
                            if self.relation(log, pos, &data, &message).await? {
                                save.changed_in_transaction = true;
                            }
                        } else {
                            append(log, pos, &data)?;
                        }
                    }
                    append(
                        log,
                        commit_lsn.0,
                        &decode::encode_commit(commit_lsn, end_lsn, commit_time_us),
                    )?;
                    log.publish().map_err(log_error)?;
                    save.transaction_complete(&self.shapes);
                    let p = &self.progress;
                    p.last_commit.store(commit_lsn.0, Ordering::Relaxed);
                    p.last_commit_time_us
                        .store(commit_time_us, Ordering::Relaxed);
                }
                return Ok(Some(end_lsn));
            }
        }
        Ok(None)
    }

    /// A relation not in the job must be a partition of one of its tables.
    async fn check_partition(&self, namespace: &str, name: &str) -> Result<()> {
        let client = super::connect(&self.endpoint, super::Side::Source, "partition check").await?;
        let table = QualifiedName::new(namespace, name);
        let root: Option<String> = client
            .query_opt(
                "SELECT n.nspname || '.' || c.relname FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.oid = pg_partition_root($1::text::regclass)",
                &[&table.to_string()],
            )
            .await
            .ctx(|| format!("looking up the partition root of {}", table.display_name()))?
            .map(|r| r.get(0));
        match root {
            Some(root) if self.shapes.contains_key(&root) => Ok(()),
            _ => Err(Error::Definite(format!(
                "the source sent changes of table {}, which is not part of this job",
                table.display_name()
            ))),
        }
    }

    /// A column added on the source: followed only if nullable without a default (existing
    /// rows are NULL on both sides, and no table rewrite went unlogged). Returns its type.
    async fn check_added_column(
        &self,
        table: &QualifiedName,
        column: &str,
    ) -> Result<(String, crate::model::schema::DataType)> {
        let client =
            super::connect(&self.endpoint, super::Side::Source, "schema change check").await?;
        let row = client
            .query_opt(
                "SELECT format_type(a.atttypid, a.atttypmod), a.attnotnull, a.atthasdef, \
                        t.typname::text, t.typtype::text, tn.nspname::text, \
                        et.typname::text, et.typtype::text, etn.nspname::text, format_type(et.oid, NULL) \
                 FROM pg_attribute a \
                 JOIN pg_type t ON t.oid = a.atttypid JOIN pg_namespace tn ON tn.oid = t.typnamespace \
                 LEFT JOIN pg_type et ON et.oid = t.typelem AND t.typcategory = 'A' \
                 LEFT JOIN pg_namespace etn ON etn.oid = et.typnamespace \
                 WHERE a.attrelid = $1::text::regclass AND a.attname = $2 AND NOT a.attisdropped",
                &[&table.to_string(), &column],
            )
            .await
            .ctx(|| format!("reading the added column {column} of {}", table.display_name()))?;
        let Some(row) = row else {
            return Err(Error::Definite(format!(
                "column {column} was added to source table {} and dropped again while the job ran; restart the job from a new state directory",
                table.display_name()
            )));
        };
        let (type_sql, not_null, has_default): (String, bool, bool) =
            (row.get(0), row.get(1), row.get(2));
        if not_null || has_default {
            return Err(Error::Definite(format!(
                "column {column} was added to source table {} with {}; the values it gave existing rows are not in the change stream, so kuaka cannot follow it. The target is consistent up to the change before; add the column on the target with the same definition and start the job again from a new state directory",
                table.display_name(),
                if not_null { "NOT NULL" } else { "a DEFAULT" }
            )));
        }
        let element = match (
            row.get::<_, Option<String>>(6),
            row.get::<_, Option<String>>(7),
            row.get::<_, Option<String>>(8),
            row.get::<_, Option<String>>(9),
        ) {
            (Some(name), Some(kind), Some(schema), Some(formatted)) => Some(
                super::catalog::data_type(&name, &kind, &schema, &formatted, None),
            ),
            _ => None,
        };
        let data_type = super::catalog::data_type(
            &row.get::<_, String>(3),
            &row.get::<_, String>(4),
            &row.get::<_, String>(5),
            &type_sql,
            element,
        );
        Ok((type_sql, data_type))
    }
}

/// The changes of one streamed transaction so far, in a file beside the change log:
/// `pos u64 | len u32 | message` each. Removed when dropped.
struct Spool {
    path: PathBuf,
    file: BufWriter<std::fs::File>,
    offset: u64,
    /// Offset of the first change of each subtransaction (an abort cuts the spool there:
    /// nothing of the parent can follow a subtransaction before it ends).
    subtransactions: HashMap<u32, u64>,
    top: u32,
}

impl Spool {
    fn create(dir: &Path, xid: u32) -> crate::changelog::Result<Spool> {
        let path = dir.join(format!("stream-{xid}.spool"));
        let io = |source| crate::changelog::LogError::Io {
            path: path.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io)?;
        Ok(Spool {
            file: BufWriter::with_capacity(1 << 20, file),
            path,
            offset: 0,
            subtransactions: HashMap::new(),
            top: xid,
        })
    }

    fn remove_leftovers(dir: &Path) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().ends_with(".spool") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    fn io(&self) -> impl FnOnce(std::io::Error) -> crate::changelog::LogError + '_ {
        move |source| crate::changelog::LogError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn add(&mut self, xid: u32, pos: u64, data: &[u8]) -> crate::changelog::Result<()> {
        if xid != self.top {
            self.subtransactions.entry(xid).or_insert(self.offset);
        }
        let mut header = [0u8; 12];
        header[..8].copy_from_slice(&pos.to_be_bytes());
        header[8..].copy_from_slice(&(data.len() as u32).to_be_bytes());
        let r = self
            .file
            .write_all(&header)
            .and_then(|_| self.file.write_all(data));
        r.map_err(self.io())?;
        self.offset += 12 + data.len() as u64;
        Ok(())
    }

    fn abort_subtransaction(&mut self, subxid: u32) -> crate::changelog::Result<()> {
        let Some(at) = self.subtransactions.remove(&subxid) else {
            return Ok(());
        };
        self.file.flush().map_err(self.io())?;
        self.file.get_ref().set_len(at).map_err(self.io())?;
        self.file.seek(SeekFrom::Start(at)).map_err(self.io())?;
        self.offset = at;
        self.subtransactions.retain(|_, o| *o < at);
        Ok(())
    }

    /// The spooled changes, in order.
    fn records(
        &mut self,
    ) -> crate::changelog::Result<
        impl Iterator<Item = crate::changelog::Result<(u64, Vec<u8>)>> + use<>,
    > {
        self.file.flush().map_err(self.io())?;
        let mut reader =
            BufReader::with_capacity(1 << 20, std::fs::File::open(&self.path).map_err(self.io())?);
        let path = self.path.clone();
        let mut left = self.offset;
        Ok(std::iter::from_fn(move || {
            if left == 0 {
                return None;
            }
            let io = |source| crate::changelog::LogError::Io {
                path: path.clone(),
                source,
            };
            let mut header = [0u8; 12];
            if let Err(e) = reader.read_exact(&mut header) {
                left = 0;
                return Some(Err(io(e)));
            }
            let pos = u64::from_be_bytes(header[..8].try_into().unwrap_or_default());
            let len = u32::from_be_bytes(header[8..].try_into().unwrap_or_default()) as usize;
            let mut data = vec![0u8; len];
            if let Err(e) = reader.read_exact(&mut data) {
                left = 0;
                return Some(Err(io(e)));
            }
            left = left.saturating_sub(12 + len as u64);
            Some(Ok((pos, data)))
        }))
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn append(log: &mut ChangeLog, pos: u64, data: &[u8]) -> Result<()> {
    log.append(RecordKind::PgOutput, pos, data)
        .map_err(log_error)
}

fn log_error(e: crate::changelog::LogError) -> Error {
    Error::Definite(e.to_string())
}

/// The source's current WAL insert position (for lag figures).
pub async fn current_lsn(client: &Client) -> Result<PgLsn> {
    lsn_query(client, "SELECT pg_current_wal_insert_lsn()::text").await
}

/// A position that every transaction committed so far is before, and that the WAL sender will
/// reach. A transaction that writes WAL (a transactional logical message, which pgoutput does
/// not forward) and commits with `synchronous_commit = local` flushes the WAL up to its commit;
/// the goal is the end of the message record. Neither the write position nor an xid-only
/// transaction will do: PostgreSQL commits a transaction that wrote no WAL asynchronously even
/// with `synchronous_commit = on`, and with `synchronous_commit = off` (a setting many sources
/// use) a commit that already returned to its client can lie past the write position, so a
/// "caught up" check against it would return before that change arrived.
pub async fn commit_barrier(client: &Client) -> Result<PgLsn> {
    let messages = client
        .simple_query(
            "SET synchronous_commit = local; BEGIN; \
             SELECT pg_logical_emit_message(true, 'kuaka.barrier', '')::text; COMMIT",
        )
        .await
        .ctx(|| "flushing the source WAL up to now (pg_logical_emit_message)".into())?;
    let lsn = messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .ok_or_else(|| Error::Definite("pg_logical_emit_message returned no position".into()))?;
    lsn.parse()
        .map_err(|_| Error::Definite(format!("unreadable WAL position {lsn}")))
}

async fn lsn_query(client: &Client, sql: &str) -> Result<PgLsn> {
    let lsn: String = client
        .query_one(sql, &[])
        .await
        .ctx(|| "reading the source WAL position".into())?
        .get(0);
    lsn.parse()
        .map_err(|_| Error::Definite(format!("unreadable WAL position {lsn}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, oid: u32, key: bool) -> ShapeColumn {
        ShapeColumn {
            name: name.into(),
            type_oid: oid,
            type_modifier: -1,
            is_key: key,
        }
    }

    #[test]
    fn shape_changes_are_classified() {
        let old = vec![col("id", 23, true), col("a", 25, false)];
        assert_eq!(shape_change(&old, &old), Ok(vec![]));
        let added = vec![
            col("id", 23, true),
            col("a", 25, false),
            col("b", 20, false),
        ];
        assert_eq!(shape_change(&old, &added), Ok(vec![col("b", 20, false)]));
        let dropped = vec![col("id", 23, true)];
        assert!(
            shape_change(&old, &dropped)
                .unwrap_err()
                .contains("column a was dropped")
        );
        let retyped = vec![col("id", 23, true), col("a", 20, false)];
        assert!(
            shape_change(&old, &retyped)
                .unwrap_err()
                .contains("type of column a")
        );
        let rekeyed = vec![col("id", 23, true), col("a", 25, true)];
        assert!(shape_change(&old, &rekeyed).unwrap_err().contains("key"));
    }
}
