//! Consistent, parallel, resumable table copies between PostgreSQL servers.
//!
//! A coordinator transaction exports a snapshot; every chunk runs in its own short source
//! transaction that imports it, so locks are held only while a chunk copies and all chunks see
//! the same instant. Chunks are key ranges of the primary key (integer keys split arithmetically,
//! other keys at sampled boundaries) or, for tables without a primary key, page (`ctid`) ranges.
//!
//! Exactly once: each chunk's target transaction also inserts its [`ChunkMarker`] into
//! `kuaka.snapshot_chunks`, so after any crash a chunk is on the target whole (marker present)
//! or not at all, and an interrupted chunk is simply copied again — nothing is deleted. The one
//! exception is a table without a key whose copy was interrupted between chunks: a new snapshot
//! may have moved rows between pages, so it is emptied and copied again whole.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::wire::WireConnection;
use super::{Context, Error, Result};
use crate::model::schema::{DataType, Table, quote_ident, quote_literal};

/// Tables up to this size are counted exactly when never analysed (no `reltuples`).
const EXACT_COUNT_MAX_BYTES: i64 = 256 * 1024 * 1024;

/// Reads of the source (up to about 256 KiB each) buffered between reader and writer.
const COPY_QUEUE_DEPTH: usize = 8;

/// How a table is split.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Chunking {
    /// One chunk, the whole table.
    Whole,
    /// Ranges of the primary key; `types` are the columns' native types for casting bounds.
    Key {
        columns: Vec<String>,
        types: Vec<String>,
        /// Schemas to search for the key types' comparison operators (empty for built-in
        /// types). Without them `citext_col >= 'x'::public.citext` would compare as text.
        #[serde(default)]
        search_path: Vec<String>,
    },
    /// Ranges of heap pages (tables without a primary key).
    Pages,
}

/// One chunk's bounds: `lower <= key < upper`, open where `None`. For `Pages` each bound is one
/// page number.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChunkRange {
    pub lower: Option<Vec<String>>,
    pub upper: Option<Vec<String>>,
}

/// Text or binary COPY for a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyFormat {
    Binary,
    Text,
}

impl CopyFormat {
    pub fn for_table(table: &Table) -> CopyFormat {
        if table.copied_columns().all(|c| c.binary_portable) {
            CopyFormat::Binary
        } else {
            CopyFormat::Text
        }
    }
    fn option(self) -> &'static str {
        match self {
            CopyFormat::Binary => "(FORMAT binary)",
            CopyFormat::Text => "(FORMAT text)",
        }
    }
}

/// Session settings that make text COPY output exact and parseable anywhere.
pub const SOURCE_SESSION_SETUP: &str = "SET search_path = ''; SET DateStyle = 'ISO, YMD'; \
     SET IntervalStyle = 'postgres'; SET extra_float_digits = 3; SET bytea_output = 'hex'; \
     SET statement_timeout = 0; SET lock_timeout = 0; SET idle_in_transaction_session_timeout = 0";

pub const TARGET_SESSION_SETUP: &str = "SET search_path = ''; SET DateStyle = 'ISO, YMD'; \
     SET IntervalStyle = 'postgres'; SET statement_timeout = 0; SET lock_timeout = 0; \
     SET check_function_bodies = false; SET client_min_messages = warning";

/// Holds the exported snapshot open on a coordinator connection.
pub struct ExportedSnapshot {
    pub id: String,
    pub client: Client,
}

impl ExportedSnapshot {
    pub async fn export(client: Client) -> Result<ExportedSnapshot> {
        client
            .batch_execute(SOURCE_SESSION_SETUP)
            .await
            .ctx(|| "setting up the source session".into())?;
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .ctx(|| "starting the snapshot transaction".into())?;
        let row = client
            .query_one("SELECT pg_export_snapshot()", &[])
            .await
            .ctx(|| "exporting a snapshot (pg_export_snapshot)".into())?;
        Ok(ExportedSnapshot {
            id: row.get(0),
            client,
        })
    }

    /// Hold a snapshot exported elsewhere (a replication slot's, which lives only until its
    /// connection's next command) and export it again from a transaction this process owns.
    pub async fn import(client: Client, id: &str) -> Result<ExportedSnapshot> {
        client
            .batch_execute(SOURCE_SESSION_SETUP)
            .await
            .ctx(|| "setting up the source session".into())?;
        client
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
                quote_literal(id)
            ))
            .await
            .ctx(|| "importing the replication slot's snapshot".into())?;
        let row = client
            .query_one("SELECT pg_export_snapshot()", &[])
            .await
            .ctx(|| "exporting the slot's snapshot again (pg_export_snapshot)".into())?;
        Ok(ExportedSnapshot {
            id: row.get(0),
            client,
        })
    }
}

fn column_list(table: &Table) -> String {
    table
        .copied_columns()
        .map(|c| quote_ident(&c.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Plan the chunks of one table (run inside the snapshot transaction).
///
/// The queries run in a savepoint that is rolled back: the table lock they take is released
/// at once instead of being held until the copy ends. A held lock would let one application
/// `TRUNCATE` (or other DDL) queue behind the coordinator, and the chunk readers queue behind
/// that `TRUNCATE` — a wait cycle through kuaka's own process that the server cannot see.
pub async fn plan_chunks(
    client: &Client,
    table: &Table,
    chunk_rows: Option<i64>,
    chunk_bytes: i64,
    default_chunk_rows: i64,
) -> Result<(Chunking, Vec<ChunkRange>, i64)> {
    client
        .batch_execute("SAVEPOINT kuaka_plan")
        .await
        .ctx(|| format!("planning the chunks of {}", table.name.display_name()))?;
    let planned = plan_chunks_in(client, table, chunk_rows, chunk_bytes, default_chunk_rows).await;
    client
        .batch_execute("ROLLBACK TO SAVEPOINT kuaka_plan; RELEASE SAVEPOINT kuaka_plan")
        .await
        .ctx(|| format!("planning the chunks of {}", table.name.display_name()))?;
    planned
}

async fn plan_chunks_in(
    client: &Client,
    table: &Table,
    chunk_rows: Option<i64>,
    chunk_bytes: i64,
    default_chunk_rows: i64,
) -> Result<(Chunking, Vec<ChunkRange>, i64)> {
    let name = &table.name;
    let rows = match table.estimated_rows {
        Some(r) if r > 0 || table.estimated_bytes == 0 => r,
        _ if table.estimated_bytes <= EXACT_COUNT_MAX_BYTES => {
            let row = client
                .query_one(&format!("SELECT count(*) FROM ONLY {name}"), &[])
                .await
                .ctx(|| format!("counting rows of {}", name.display_name()))?;
            row.get(0)
        }
        _ => table.estimated_bytes / 100,
    };
    let wanted = match chunk_rows {
        Some(n) => (rows + n - 1) / n.max(1),
        None => ((rows + default_chunk_rows - 1) / default_chunk_rows)
            .max((table.estimated_bytes + chunk_bytes - 1) / chunk_bytes),
    }
    .max(1);
    let whole = vec![ChunkRange {
        lower: None,
        upper: None,
    }];
    if wanted <= 1 {
        return Ok((Chunking::Whole, whole, rows));
    }
    let Some(pk) = &table.primary_key else {
        let pages = (table.estimated_bytes / 8192).max(1);
        let n = wanted.min(pages);
        if n <= 1 {
            return Ok((Chunking::Whole, whole, rows));
        }
        let bounds: Vec<i64> = (1..n).map(|i| pages * i / n).collect();
        return Ok((
            Chunking::Pages,
            ranges(bounds.into_iter().map(|b| vec![b.to_string()]).collect()),
            rows,
        ));
    };
    let types: Vec<String> = pk
        .columns
        .iter()
        .map(|c| {
            table
                .column(c)
                .map(|c| c.native_type.clone())
                .unwrap_or_default()
        })
        .collect();
    let mut search_path: Vec<String> = pk
        .columns
        .iter()
        .filter_map(|c| table.column(c).and_then(|c| c.type_schema.clone()))
        .collect();
    search_path.dedup();
    let chunking = Chunking::Key {
        columns: pk.columns.clone(),
        types: types.clone(),
        search_path,
    };
    let integer = pk.columns.len() == 1
        && table.column(&pk.columns[0]).is_some_and(|c| {
            matches!(
                c.data_type,
                DataType::Int16 | DataType::Int32 | DataType::Int64
            )
        });
    let key = pk
        .columns
        .iter()
        .map(|c| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ");
    let bounds: Vec<Vec<String>> = if integer {
        let row = client
            .query_one(
                &format!("SELECT min({key})::int8, max({key})::int8 FROM ONLY {name}"),
                &[],
            )
            .await
            .ctx(|| format!("reading the key range of {}", name.display_name()))?;
        let (Some(min), Some(max)) = (row.get::<_, Option<i64>>(0), row.get::<_, Option<i64>>(1))
        else {
            return Ok((Chunking::Whole, whole, rows));
        };
        let span = i128::from(max) - i128::from(min) + 1;
        let n = i128::from(wanted).min(span);
        let mut out: Vec<Vec<String>> = (1..n)
            .map(|i| vec![(i128::from(min) + span * i / n).to_string()])
            .collect();
        out.dedup();
        out
    } else {
        let text_key = pk
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| format!("s.{}::text AS k{i}", quote_ident(c)))
            .collect::<Vec<_>>()
            .join(", ");
        // Qualified with `s.`: an unqualified ORDER BY name would bind to the `::text` output
        // column of the same name and sort the keys as text.
        let order = pk
            .columns
            .iter()
            .map(|c| format!("s.{}", quote_ident(c)))
            .collect::<Vec<_>>()
            .join(", ");
        // Sample about 32 keys per chunk; all keys for small tables.
        let sample = if rows <= 200_000 {
            String::new()
        } else {
            let percent = (100.0 * (wanted as f64 * 32.0) / rows as f64).clamp(0.001, 100.0);
            format!(" TABLESAMPLE SYSTEM ({percent})")
        };
        let sql = format!(
            "SELECT {text_key} FROM (SELECT {key} FROM ONLY {name}{sample}) s ORDER BY {order}"
        );
        let sampled = client
            .query(&sql, &[])
            .await
            .ctx(|| format!("sampling the key of {}", name.display_name()))?;
        let keys: Vec<Vec<String>> = sampled
            .iter()
            .map(|r| {
                (0..pk.columns.len())
                    .map(|i| r.get::<_, String>(i))
                    .collect()
            })
            .collect();
        if keys.len() < 2 {
            return Ok((Chunking::Whole, whole, rows));
        }
        let n = (wanted as usize).min(keys.len());
        let mut out: Vec<Vec<String>> = (1..n).map(|i| keys[keys.len() * i / n].clone()).collect();
        out.dedup();
        out
    };
    if bounds.is_empty() {
        return Ok((Chunking::Whole, whole, rows));
    }
    check_increasing(client, table, &chunking, &bounds).await?;
    Ok((chunking, ranges(bounds), rows))
}

/// `SET search_path` for comparing key values, or `None` when only built-in types are involved.
fn set_search_path(schemas: &[String]) -> Option<String> {
    (!schemas.is_empty()).then(|| {
        format!(
            "SET search_path = {}",
            schemas
                .iter()
                .map(|s| quote_ident(s))
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// Chunks are only disjoint and complete if their bounds strictly increase in the server's own
/// ordering of the key; ask the server rather than trust the text round trip.
async fn check_increasing(
    client: &Client,
    table: &Table,
    chunking: &Chunking,
    bounds: &[Vec<String>],
) -> Result<()> {
    let Chunking::Key {
        types, search_path, ..
    } = chunking
    else {
        return Ok(());
    };
    if bounds.len() < 2 {
        return Ok(());
    }
    if let Some(set) = set_search_path(search_path) {
        client
            .batch_execute(&set)
            .await
            .ctx(|| "setting search_path".into())?;
    }
    let tuple = |values: &[String]| {
        let inner = values
            .iter()
            .zip(types)
            .map(|(v, t)| format!("{}::{t}", quote_literal(v)))
            .collect::<Vec<_>>()
            .join(", ");
        format!("ROW({inner})")
    };
    let checks = bounds
        .windows(2)
        .map(|w| format!("{} < {}", tuple(&w[0]), tuple(&w[1])))
        .collect::<Vec<_>>();
    let checked = client
        .query_one(&format!("SELECT {}", checks.join(" AND ")), &[])
        .await
        .ctx(|| {
            format!(
                "checking the chunk boundaries of {}",
                table.name.display_name()
            )
        })
        .map(|row| row.get::<_, Option<bool>>(0));
    if !search_path.is_empty() {
        client
            .batch_execute("SET search_path = ''")
            .await
            .ctx(|| "resetting search_path".into())?;
    }
    let ok = checked?;
    if ok != Some(true) {
        return Err(Error::Definite(format!(
            "the primary key of {} does not order consistently through its text form, so it cannot be split into chunks; use --chunk-rows larger than the table to copy it whole",
            table.name.display_name()
        )));
    }
    Ok(())
}

fn ranges(bounds: Vec<Vec<String>>) -> Vec<ChunkRange> {
    let mut out = Vec::with_capacity(bounds.len() + 1);
    let mut lower = None;
    for b in bounds {
        out.push(ChunkRange {
            lower: lower.take(),
            upper: Some(b.clone()),
        });
        lower = Some(b);
    }
    out.push(ChunkRange { lower, upper: None });
    out
}

/// `WHERE` condition selecting a chunk, or `None` for the whole table.
pub fn chunk_condition(chunking: &Chunking, range: &ChunkRange) -> Option<String> {
    let mut parts = Vec::new();
    match chunking {
        Chunking::Whole => return None,
        Chunking::Key { columns, types, .. } => {
            let tuple = |values: &[String]| {
                values
                    .iter()
                    .zip(types)
                    .map(|(v, t)| format!("{}::{t}", quote_literal(v)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let key = columns
                .iter()
                .map(|c| quote_ident(c))
                .collect::<Vec<_>>()
                .join(", ");
            let (open, close) = if columns.len() > 1 {
                ("(", ")")
            } else {
                ("", "")
            };
            if let Some(l) = &range.lower {
                parts.push(format!("{open}{key}{close} >= {open}{}{close}", tuple(l)));
            }
            if let Some(u) = &range.upper {
                parts.push(format!("{open}{key}{close} < {open}{}{close}", tuple(u)));
            }
        }
        Chunking::Pages => {
            if let Some(l) = &range.lower {
                parts.push(format!("ctid >= '({},0)'::tid", l[0]));
            }
            if let Some(u) = &range.upper {
                parts.push(format!("ctid < '({},0)'::tid", u[0]));
            }
        }
    }
    if parts.is_empty() {
        None
    } else {
        Some(parts.join(" AND "))
    }
}

/// Limits the total rows per second across all workers.
pub struct RateLimiter {
    rows_per_sec: u64,
    state: std::sync::Mutex<(Instant, f64)>,
}

impl RateLimiter {
    pub fn new(rows_per_sec: u64) -> Arc<RateLimiter> {
        Arc::new(RateLimiter {
            rows_per_sec: rows_per_sec.max(1),
            state: std::sync::Mutex::new((Instant::now(), 0.0)),
        })
    }

    /// Wait until `rows` more rows may pass.
    pub async fn acquire(&self, rows: u64) {
        let wait = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            // Tokens accrue at the rate, with at most one second of burst.
            let rate = self.rows_per_sec as f64;
            let available = (s.1 + now.duration_since(s.0).as_secs_f64() * rate).min(rate);
            let after = available - rows as f64;
            *s = (now, after);
            if after >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-after / rate)
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Counters a chunk copy reports while it runs.
pub trait CopyProgress: Send + Sync {
    fn add(&self, rows: u64, bytes: u64);
}

/// What a chunk copy did.
#[derive(Debug, Clone, Copy)]
pub struct ChunkOutcome {
    pub rows: u64,
    pub bytes: u64,
}

/// The target-side record of a committed chunk, written in the chunk's own transaction. It is
/// what makes a chunk load exactly once: after any crash, a chunk either has its marker and all
/// its rows on the target, or neither, so nothing is ever deleted to redo a chunk (a key-range
/// delete on the target could pick other rows if the target orders text keys differently).
#[derive(Debug, Clone)]
pub struct ChunkMarker {
    pub job_id: String,
    /// `"schema"."table"`, quoted.
    pub table: String,
    pub chunk_no: i64,
}

/// Bookkeeping tables kuaka keeps on a PostgreSQL target.
pub const TARGET_BOOKKEEPING: &str = "CREATE SCHEMA IF NOT EXISTS kuaka; \
     CREATE TABLE IF NOT EXISTS kuaka.jobs (job_id text PRIMARY KEY, source text NOT NULL, \
       schema_created_at timestamptz NOT NULL DEFAULT now(), snapshot_done_at timestamptz); \
     CREATE TABLE IF NOT EXISTS kuaka.snapshot_chunks (job_id text NOT NULL, table_name text NOT NULL, \
       chunk_no integer NOT NULL, rows bigint NOT NULL, committed_at timestamptz NOT NULL DEFAULT now(), \
       PRIMARY KEY (job_id, table_name, chunk_no))";

/// Committed chunks of a job on the target: `(table, chunk_no) -> rows`.
pub async fn committed_chunks(
    target: &Client,
    job_id: &str,
) -> Result<std::collections::HashMap<(String, i64), i64>> {
    let rows = target
        .query(
            "SELECT table_name, chunk_no::int8, rows FROM kuaka.snapshot_chunks WHERE job_id = $1",
            &[&job_id],
        )
        .await
        .ctx(|| "reading committed chunks from kuaka.snapshot_chunks on the target".into())?;
    Ok(rows
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect())
}

/// Forget every chunk of a job, in the caller's transaction.
pub async fn forget_all_chunks(target: &Client, job_id: &str) -> Result<()> {
    target
        .execute(
            "DELETE FROM kuaka.snapshot_chunks WHERE job_id = $1",
            &[&job_id],
        )
        .await
        .ctx(|| "resetting kuaka.snapshot_chunks on the target".into())?;
    Ok(())
}

/// Rows of one chunk if its marker committed on the target.
pub async fn chunk_committed(
    target: &mut WireConnection,
    marker: &ChunkMarker,
) -> Result<Option<i64>> {
    let rows = target
        .simple_query(
            &format!(
                "SELECT rows FROM kuaka.snapshot_chunks WHERE job_id = {} AND table_name = {} AND chunk_no = {}",
                quote_literal(&marker.job_id),
                quote_literal(&marker.table),
                marker.chunk_no
            ),
            &format!("looking up a chunk of {} on the target", marker.table),
        )
        .await?;
    Ok(rows
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .and_then(|v| v.parse().ok()))
}

/// Forget a table's committed chunks (the table is being emptied and copied again), in the
/// caller's transaction.
pub async fn forget_chunks(target: &Client, job_id: &str, table: &str) -> Result<()> {
    target
        .execute(
            "DELETE FROM kuaka.snapshot_chunks WHERE job_id = $1 AND table_name = $2",
            &[&job_id, &table],
        )
        .await
        .ctx(|| format!("resetting the chunks of {table} on the target"))?;
    Ok(())
}

/// Copy one chunk: source COPY TO piped into target COPY FROM, committed on the target together
/// with its [`ChunkMarker`]. `before_commit` runs after the rows are sent and before COMMIT
/// (failpoints). The source's framed CopyData messages go to the target as they are (see
/// [`super::wire`]). After an error both connections are in an unknown state: drop them (the
/// servers roll back their transactions).
#[allow(clippy::too_many_arguments)]
pub async fn copy_chunk(
    source: &mut WireConnection,
    target: &mut WireConnection,
    snapshot_id: &str,
    table: &Table,
    format: CopyFormat,
    chunking: &Chunking,
    range: &ChunkRange,
    marker: &ChunkMarker,
    limiter: Option<&RateLimiter>,
    progress: &dyn CopyProgress,
    before_commit: &(dyn Fn() + Sync),
) -> Result<ChunkOutcome> {
    let name = &table.name;
    let label = name.display_name();
    let columns = column_list(table);
    let condition = chunk_condition(chunking, range);
    let mut begin = format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
        quote_literal(snapshot_id)
    );
    if let Chunking::Key { search_path, .. } = chunking
        && let Some(set) = set_search_path(search_path)
    {
        begin.push_str(&format!("; {}", set.replacen("SET", "SET LOCAL", 1)));
    }
    source
        .simple_query(&begin, &format!("importing the snapshot to read {label}"))
        .await
        .map_err(|e| {
            if e.sqlstate() == Some("22023") {
                Error::SnapshotLost {
                    table: label.clone(),
                }
            } else {
                e
            }
        })?;
    let copy_out = match &condition {
        None => format!("COPY {name} ({columns}) TO STDOUT {}", format.option()),
        Some(c) => format!(
            "COPY (SELECT {columns} FROM ONLY {name} WHERE {c}) TO STDOUT {}",
            format.option()
        ),
    };
    let reading = format!("reading {label}");
    let writing = format!("writing {label}");
    target
        .simple_query("BEGIN", &format!("starting the load of {label}"))
        .await?;
    source.copy_out(&copy_out, &reading).await?;
    target
        .copy_in(
            &format!("COPY {name} ({columns}) FROM STDIN {}", format.option()),
            &writing,
        )
        .await?;
    // Runs of whole CopyData messages (one per row, plus the binary header and trailer) go
    // from the source's read buffer to the target without being parsed. Reading and writing
    // overlap through a small bounded queue, so neither server waits for the other's socket.
    let (queue, mut received) =
        tokio::sync::mpsc::channel::<(bytes::BytesMut, u64)>(COPY_QUEUE_DEPTH);
    let reader = async {
        while let Some(item) = source.copy_out_next(&reading).await? {
            if queue.send(item).await.is_err() {
                break;
            }
        }
        drop(queue);
        Ok::<_, Error>(())
    };
    let writer = async {
        let mut bytes = 0u64;
        while let Some((framed, messages)) = received.recv().await {
            if let Some(l) = limiter {
                l.acquire(messages).await;
            }
            target.copy_in_raw(&framed, &writing).await?;
            bytes += framed.len() as u64;
            progress.add(messages, framed.len() as u64);
        }
        Ok::<_, Error>(bytes)
    };
    let ((), bytes) = tokio::try_join!(reader, writer)?;
    let rows = target
        .copy_in_finish(&format!("finishing the load of {label}"))
        .await?;
    target
        .simple_query(
            &format!(
                "INSERT INTO kuaka.snapshot_chunks (job_id, table_name, chunk_no, rows) VALUES ({}, {}, {}, {rows})",
                quote_literal(&marker.job_id),
                quote_literal(&marker.table),
                marker.chunk_no
            ),
            &format!("recording a chunk of {label} on the target"),
        )
        .await?;
    before_commit();
    target
        .simple_query("COMMIT", &format!("committing a chunk of {label}"))
        .await?;
    // The read transaction only ever read.
    source
        .simple_query("COMMIT", &format!("ending the read of {label}"))
        .await?;
    Ok(ChunkOutcome { rows, bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_conditions_cover_the_key_space_without_overlap() {
        let chunking = Chunking::Key {
            columns: vec!["a".into(), "B".into()],
            types: vec!["integer".into(), "text".into()],
            search_path: vec![],
        };
        let r = ranges(vec![
            vec!["1".into(), "x'y".into()],
            vec!["5".into(), "z".into()],
        ]);
        assert_eq!(r.len(), 3);
        assert_eq!(
            chunk_condition(&chunking, &r[0]).unwrap(),
            "(\"a\", \"B\") < ('1'::integer, 'x''y'::text)"
        );
        assert_eq!(
            chunk_condition(&chunking, &r[1]).unwrap(),
            "(\"a\", \"B\") >= ('1'::integer, 'x''y'::text) AND (\"a\", \"B\") < ('5'::integer, 'z'::text)"
        );
        assert_eq!(
            chunk_condition(&chunking, &r[2]).unwrap(),
            "(\"a\", \"B\") >= ('5'::integer, 'z'::text)"
        );
        let single = Chunking::Key {
            columns: vec!["id".into()],
            types: vec!["bigint".into()],
            search_path: vec![],
        };
        assert_eq!(
            chunk_condition(&single, &r[0]).unwrap(),
            "\"id\" < '1'::bigint"
        );
        assert_eq!(chunk_condition(&Chunking::Whole, &r[1]), None);
        assert_eq!(set_search_path(&[]), None);
        assert_eq!(
            set_search_path(&["public".into(), "ext s".into()]).unwrap(),
            "SET search_path = \"public\", \"ext s\""
        );
        let pages = ranges(vec![vec!["10".into()]]);
        assert_eq!(
            chunk_condition(&Chunking::Pages, &pages[1]).unwrap(),
            "ctid >= '(10,0)'::tid"
        );
    }
}
