//! `kuaka verify`: prove that the target holds what the source holds, across engines.
//!
//! Each table is compared chunk by chunk in key order: a page of the source (`--chunk-rows`
//! keys), then the target's rows in the same key range. Rows are encoded canonically by the
//! target column's type ([`canon`]) and digested (XXH3-128); equal digests are equal rows.
//! Pages are first read as key bytes and digests only ([`read::DigestPage`], no row values
//! built); a page where the two sides differ is read again as rows, and a differing row is
//! named with its key and the columns that differ. Both sides are streamed and hashed here,
//! so the same code decides for every engine pair (server-side digests, where they apply,
//! are calibrated against it).
//!
//! While a job keeps the target in sync, a row can differ for a moment (the change is on
//! its way). Differences are therefore re-read on both sides a few times with backoff
//! (`--rechecks`, default 3 with `--state`), and only those that persist are reported.

pub mod canon;
pub mod read;
pub mod repair;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use self::canon::Canon;
use self::read::{PortableRow, Reader, SideTable};
use crate::config::{Endpoint, EngineKind, Selection};
use crate::model::DataType;
use crate::model::value::{Row, Value};
use crate::pipeline::{Error, Result};

/// What to compare and how.
#[derive(Clone, Debug)]
pub struct Options {
    pub source: Endpoint,
    pub target: Endpoint,
    pub selection: Selection,
    /// Counts and smallest/largest keys only.
    pub quick: bool,
    /// Put differing values in the report (they may be sensitive).
    pub show_values: bool,
    /// Across engines too, chunks digested by the servers ([`portable_rows`]).
    pub server_digests: bool,
    /// Re-reads of differing rows before they are reported.
    pub rechecks: u32,
    /// Re-copy differing keys from the source, then read them again.
    pub repair: bool,
    pub chunk_rows: usize,
    pub jobs: usize,
    /// The job's state directory: re-reads first wait until the job has applied what the
    /// source held when the difference was seen.
    pub state: Option<std::path::PathBuf>,
    /// Cleared once the job fails to reach a position in time: no worker waits for it again.
    pub follow_job: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Options {
    /// One comparison outside any job (no state, no re-reads, no repair): the demo's and a
    /// cutover's.
    pub fn once(source: Endpoint, target: Endpoint, selection: Selection, quick: bool) -> Options {
        Options {
            source,
            target,
            selection,
            quick,
            show_values: false,
            server_digests: false,
            rechecks: 0,
            repair: false,
            chunk_rows: 10_000,
            jobs: 2,
            state: None,
            follow_job: Default::default(),
        }
    }
}

/// The outcome of a verification.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub equal: bool,
    pub tables: Vec<TableReport>,
    pub rows: u64,
    pub seconds: f64,
}

#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct TableReport {
    pub source: String,
    pub target: String,
    pub source_rows: u64,
    pub target_rows: u64,
    pub chunks: u64,
    /// A difference of the table as a whole (missing on the target, missing columns, no
    /// key, counts in quick mode).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub differences: Vec<Difference>,
    /// Differences seen once and gone on a re-read (the change was on its way).
    pub transient: u64,
    /// Differences `--repair` fixed (the ones left are in `differences`).
    pub repaired: u64,
    /// `streamed` (rows digested by kuaka), `server digests` (chunks digested by each
    /// server, differing chunks streamed) or `counts` (quick mode, keyless tables).
    pub method: String,
    /// Streamed pages whose rows were not all the same, read again row by row to name the
    /// differences.
    pub narrowed: u64,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Difference {
    pub key: Vec<String>,
    /// `missing in target`, `extra in target` or `differs`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Vec<String>>,
}

impl TableReport {
    pub fn equal(&self) -> bool {
        self.problems.is_empty() && self.differences.is_empty()
    }
}

/// One table of the source and its counterpart on the target.
struct Pair {
    source: SideTable,
    target: SideTable,
    /// Compared columns: (source name, target name).
    columns: Vec<(String, String)>,
    canon: Vec<Canon>,
    /// Places of the key columns in `columns`.
    key_at: Vec<usize>,
    /// Chunk digests computed by the servers (see [`pushdown_eligible`]).
    pushdown: bool,
    /// Across engines: the row text each side digests alike (see [`portable_rows`]).
    portable: Option<(PortableRow, PortableRow)>,
    /// The key has a text column, compared in binary order, which an index in another
    /// collation does not give: every page of the table would sort it again, so the table
    /// is read by one sorted query per side instead ([`stream_whole`]). PostgreSQL and
    /// MySQL/MariaDB only.
    sorts_to_page: bool,
}

impl Pair {
    /// The compared columns' names on the source and on the target, in the same order.
    fn column_names(&self) -> (Vec<String>, Vec<String>) {
        self.columns.iter().cloned().unzip()
    }

    /// The key values of a row read with these columns.
    fn key_of(&self, row: &Row) -> Row {
        self.key_at.iter().map(|&i| row[i].clone()).collect()
    }
}

/// Same-engine pairs (MySQL → MySQL, PostgreSQL → PostgreSQL) whose compared columns have the
/// same declared type (and, on MySQL, character set) on both sides print equal values as
/// equal text, so each server can digest its own chunk and only the digests travel. The first chunk of every table is compared both ways
/// (calibration); a table where they disagree is compared by streaming.
fn pushdown_eligible(
    options: &Options,
    source: &SideTable,
    target: &SideTable,
    columns: &[(String, String)],
) -> bool {
    let engines = (options.source.engine, options.target.engine);
    if !matches!(
        engines,
        (EngineKind::Mysql, EngineKind::Mysql) | (EngineKind::Postgres, EngineKind::Postgres)
    ) {
        return false;
    }
    if source.integer_key().is_none() {
        return false;
    }
    columns.iter().all(|(s, t)| {
        if engines.0 == EngineKind::Postgres {
            // The same type prints the same text on both servers (calibrated per table).
            return matches!(
                (source.column(s), target.column(t)),
                (Some(a), Some(b)) if a.native_type == b.native_type
            );
        }
        let a = source.my_column(s);
        let b = target.my_column(t);
        matches!((a, b), (Some(a), Some(b)) if a.column_type == b.column_type && a.charset == b.charset)
    })
}

/// With `--server-digests`: MySQL/MariaDB ⇄ PostgreSQL pairs with a single integer key (a
/// key on the target too) whose compared columns all print alike on both engines
/// ([`read::Portable`]: numbers of the same scale, text, dates, datetimes, booleans): each
/// server digests the same row text, and the first chunk of every part is calibrated against
/// the streamed comparison as for same-engine pairs.
fn portable_rows(
    options: &Options,
    source: &SideTable,
    target: &SideTable,
    target_key: &[String],
    columns: &[(String, String)],
) -> Option<(PortableRow, PortableRow)> {
    let k = source.integer_key()?;
    let mapped = columns.iter().find(|(s, _)| s == k).map(|(_, t)| t)?;
    if target_key != std::slice::from_ref(mapped) {
        return None;
    }
    let (mut a, mut b) = (PortableRow::default(), PortableRow::default());
    for (s, t) in columns {
        let ps = source.portable(options.source.engine, s)?;
        let pt = target.portable(options.target.engine, t)?;
        if ps != pt {
            return None;
        }
        a.columns.push((s.clone(), ps));
        b.columns.push((t.clone(), pt));
        if source.column(s)?.nullable || target.column(t)?.nullable {
            a.flagged.push(s.clone());
            b.flagged.push(t.clone());
        }
    }
    Some((a, b))
}

/// Run a verification.
pub async fn run(options: &Options) -> Result<Report> {
    let started = Instant::now();
    let mut source =
        Reader::connect(&options.source, read::PgSide::Source, "verify source").await?;
    let mut target =
        Reader::connect(&options.target, read::PgSide::Target, "verify target").await?;
    let source_tables = source.tables(&options.selection).await?;
    let target_tables = target.tables(&Selection::default()).await?;
    let both_pg = options.source.engine == EngineKind::Postgres
        && options.target.engine == EngineKind::Postgres;
    let exact =
        options.source.engine == EngineKind::Sqlite && options.target.engine == EngineKind::Sqlite;
    let cross = matches!(
        (options.source.engine, options.target.engine),
        (EngineKind::Mysql, EngineKind::Postgres) | (EngineKind::Postgres, EngineKind::Mysql)
    );
    let portable_ok = options.server_digests
        && cross
        && source.portable_digests().await?
        && target.portable_digests().await?;
    let mut report = Report::default();
    let mut pairs: Vec<Pair> = Vec::new();
    for st in source_tables {
        let found = target_tables
            .iter()
            .find(|t| t.name.name == st.name.name && (!both_pg || t.name.schema == st.name.schema))
            .or_else(|| {
                target_tables
                    .iter()
                    .find(|t| t.name.name.eq_ignore_ascii_case(&st.name.name))
            });
        let mut table = TableReport {
            source: st.name.display_name(),
            ..TableReport::default()
        };
        let Some(tt) = found else {
            table.problems.push("missing on the target".into());
            report.tables.push(table);
            continue;
        };
        table.target = tt.name.display_name();
        let mut columns = Vec::new();
        let mut canon = Vec::new();
        for c in &st.columns {
            match tt.columns.iter().find(|t| t.name == c.name).or_else(|| {
                tt.columns
                    .iter()
                    .find(|t| t.name.eq_ignore_ascii_case(&c.name))
            }) {
                Some(tc) => {
                    columns.push((c.name.clone(), tc.name.clone()));
                    canon.push(if exact {
                        Canon::Exact
                    } else {
                        Canon::Typed(tc.data_type.clone())
                    });
                }
                None => table
                    .problems
                    .push(format!("column {} is missing on the target", c.name)),
            }
        }
        let key_at: Vec<usize> = st
            .key
            .iter()
            .filter_map(|k| columns.iter().position(|(s, _)| s == k))
            .collect();
        report.tables.push(table);
        let target = SideTable {
            key: key_at.iter().map(|&i| columns[i].1.clone()).collect(),
            ..tt.clone()
        };
        let portable = if portable_ok && key_at.len() == 1 {
            portable_rows(options, &st, &target, &tt.key, &columns)
        } else {
            None
        };
        let pushdown = portable.is_some()
            || (!exact
                && key_at.len() == 1
                && st.key.len() == 1
                && pushdown_eligible(options, &st, &target, &columns));
        let text_key = |t: &SideTable| {
            t.key.iter().any(|k| {
                t.column(k).is_some_and(|c| {
                    matches!(
                        c.data_type,
                        DataType::Text | DataType::Varchar { .. } | DataType::Char { .. }
                    )
                })
            })
        };
        let sorts_to_page = (text_key(&st) || text_key(&target))
            && options.source.engine != EngineKind::Sqlite
            && options.target.engine != EngineKind::Sqlite;
        pairs.push(Pair {
            sorts_to_page,
            target,
            source: st,
            columns,
            canon,
            key_at,
            pushdown,
            portable,
        });
    }
    drop(target);

    // Work: tables, and big tables with a single integer key cut into key ranges, so one
    // table also keeps every job busy. With --state, an interrupted run of the same
    // comparison is resumed: its parts and the results of the ones done are in the
    // checkpoint.
    let plan = plan_id(options, &pairs);
    let resumed: Option<Checkpoint> = options
        .state
        .as_ref()
        .filter(|_| !options.quick)
        .and_then(|dir| std::fs::read_to_string(dir.join(SUMMARY_FILE)).ok())
        .and_then(|text| serde_json::from_str::<Checkpoint>(&text).ok())
        .filter(|c| c.running && c.plan == plan);
    let tasks: Vec<Task> = match &resumed {
        Some(c) => c.tasks.clone(),
        None => {
            let mut tasks = Vec::new();
            for (index, pair) in pairs.iter().enumerate() {
                let segments = (pair.source.estimated_rows / options.chunk_rows.max(1) as i64)
                    .clamp(1, 4 * options.jobs.max(1) as i64);
                let keyed = !pair.key_at.is_empty() && pair.key_at.len() == pair.source.key.len();
                let bounds = if options.quick || !keyed || segments < 2 {
                    None
                } else {
                    source.integer_key_bounds(&pair.source).await?
                };
                match bounds {
                    Some((lo, hi)) if hi > lo => {
                        let span = (hi as i128 - lo as i128 + 1) as f64 / segments as f64;
                        let mut after: Option<Row> = None;
                        for n in 1..segments {
                            let cut = lo as i128 - 1 + (span * n as f64) as i128;
                            let upto = Some(vec![Value::Int(cut as i64)]);
                            tasks.push((index, after, upto.clone()));
                            after = upto;
                        }
                        tasks.push((index, after, None));
                    }
                    _ => tasks.push((index, None, None)),
                }
            }
            tasks
        }
    };
    drop(source);
    let checkpoint = Checkpoint {
        running: true,
        plan,
        started_at: resumed
            .as_ref()
            .map(|c| c.started_at.clone())
            .unwrap_or_else(now_utc),
        parts: tasks.len(),
        parts_done: 0,
        rows: 0,
        tasks: tasks.clone(),
        done: resumed.map(|c| c.done).unwrap_or_default(),
    };
    if !checkpoint.done.is_empty() {
        eprintln!(
            "kuaka: resuming the verification started {}: {} of {} parts already compared",
            checkpoint.started_at,
            checkpoint.done.len(),
            checkpoint.parts
        );
    }
    let finished: std::collections::HashSet<usize> =
        checkpoint.done.iter().map(|(n, _)| *n).collect();
    let checkpoint = std::sync::Arc::new(std::sync::Mutex::new(checkpoint));
    save_checkpoint(options, &checkpoint);
    let pairs = std::sync::Arc::new(pairs);
    let tasks_index = tasks.clone();
    let todo: Vec<(usize, Task)> = tasks
        .into_iter()
        .enumerate()
        .filter(|(n, _)| !finished.contains(n))
        .collect();
    let queue = std::sync::Arc::new(tokio::sync::Mutex::new(todo.into_iter()));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..options.jobs.max(1) {
        let queue = queue.clone();
        let pairs = pairs.clone();
        let options = options.clone();
        let checkpoint = checkpoint.clone();
        workers.spawn(async move {
            let mut done: Vec<(usize, TableReport)> = Vec::new();
            let mut readers: Option<(Reader, Reader)> = None;
            loop {
                let Some((number, (index, after, upto))) = queue.lock().await.next() else {
                    break;
                };
                if readers.is_none() {
                    readers = Some((
                        Reader::connect(&options.source, read::PgSide::Source, "verify source")
                            .await?,
                        Reader::connect(&options.target, read::PgSide::Target, "verify target")
                            .await?,
                    ));
                }
                let (s, t) = readers.as_mut().expect("connected");
                let part = compare_range(&pairs[index], s, t, &options, after, upto).await?;
                // The checkpoint keeps the keys of differences, never their values.
                let mut kept = part.clone();
                for d in &mut kept.differences {
                    d.source = None;
                    d.target = None;
                }
                if let Ok(mut c) = checkpoint.lock() {
                    c.done.push((number, kept));
                }
                save_checkpoint(&options, &checkpoint);
                done.push((number, part));
                crate::failpoint::hit("verify.after_part");
            }
            Ok::<_, Error>(done)
        });
    }
    // Parts compared by an earlier, interrupted run (their values were not kept), then
    // this run's.
    let mut results: Vec<(usize, TableReport)> = checkpoint
        .lock()
        .map(|c| {
            c.done
                .iter()
                .filter(|(n, _)| finished.contains(n))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let mut failure = None;
    while let Some(result) = workers.join_next().await {
        match result.map_err(|e| Error::Definite(format!("a verify worker failed: {e}"))) {
            Ok(Ok(done)) => results.extend(done),
            Ok(Err(e)) | Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let mut parts: Vec<Vec<TableReport>> = (0..pairs.len()).map(|_| Vec::new()).collect();
    for (number, part) in results {
        if let Some((index, _, _)) = tasks_index.get(number) {
            parts[*index].push(part);
        }
    }
    for (pair, parts) in pairs.iter().zip(parts) {
        let name = pair.source.name.display_name();
        let Some(slot) = report.tables.iter_mut().find(|t| t.source == name) else {
            continue;
        };
        for part in parts {
            slot.source_rows += part.source_rows;
            slot.target_rows += part.target_rows;
            slot.chunks += part.chunks;
            slot.transient += part.transient;
            slot.repaired += part.repaired;
            slot.narrowed += part.narrowed;
            if slot.method.is_empty() || part.method != "server digests" {
                slot.method = part.method.clone();
            }
            slot.problems.extend(part.problems);
            slot.differences.extend(part.differences);
        }
        slot.differences.sort_by(|a, b| a.key.cmp(&b.key));
    }
    report.rows = report.tables.iter().map(|t| t.source_rows).sum();
    report.equal = report.tables.iter().all(TableReport::equal);
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Compare `(lower, upper]` by streaming both sides' rows and digesting them here: page by
/// page, each side's rows reduced to key bytes and digests as they arrive; a page whose
/// rows are not all the same is read again as rows to name the differences.
#[allow(clippy::too_many_arguments)]
async fn stream_range(
    pair: &Pair,
    source: &mut Reader,
    target: &mut Reader,
    options: &Options,
    lower: Option<Row>,
    upper: Option<Row>,
    report: &mut TableReport,
    found: &mut Vec<(Difference, Row)>,
) -> Result<()> {
    if pair.sorts_to_page
        && lower.is_none()
        && upper.is_none()
        && stream_whole(pair, source, target, options, report, found).await?
    {
        return Ok(());
    }
    let (source_columns, target_columns) = pair.column_names();
    let chunk = options.chunk_rows;
    // The first source page; after that, each source page is read while the target reads
    // the previous page's key range.
    let mut after = lower;
    let mut page = source
        .range_digests(
            &pair.source,
            &source_columns,
            &pair.canon,
            &pair.key_at,
            after.as_ref(),
            upper.as_ref(),
            chunk,
        )
        .await?;
    loop {
        let last = page.len() < chunk;
        let upto = if last {
            upper.clone()
        } else {
            page.last_key.clone()
        };
        let target_read = async {
            let mut whole = read::DigestPage::default();
            let mut target_after = after.clone();
            loop {
                let next = target
                    .range_digests(
                        &pair.target,
                        &target_columns,
                        &pair.canon,
                        &pair.key_at,
                        target_after.as_ref(),
                        upto.as_ref(),
                        chunk,
                    )
                    .await?;
                let full = next.len() == chunk;
                target_after = next.last_key.clone();
                whole.extend(next);
                if !full {
                    return Ok::<_, Error>(whole);
                }
            }
        };
        let source_read = async {
            if last {
                Ok(read::DigestPage::default())
            } else {
                source
                    .range_digests(
                        &pair.source,
                        &source_columns,
                        &pair.canon,
                        &pair.key_at,
                        upto.as_ref(),
                        upper.as_ref(),
                        chunk,
                    )
                    .await
            }
        };
        let (target_page, next) = tokio::try_join!(target_read, source_read)?;
        report.chunks += 1;
        if page.same_rows(&target_page) {
            report.source_rows += page.len() as u64;
            report.target_rows += target_page.len() as u64;
        } else {
            // Name the differences: the same key range again, as rows.
            report.narrowed += 1;
            let mut part = TableReport::default();
            stream_rows(
                pair,
                source,
                target,
                options,
                after.clone(),
                upto.clone(),
                &mut part,
                found,
            )
            .await?;
            report.source_rows += part.source_rows;
            report.target_rows += part.target_rows;
        }
        if last {
            break;
        }
        after = upto;
        page = next;
    }
    Ok(())
}

/// Pages' worth of rows [`stream_whole`] may hold waiting for their match (both sides
/// together, with the differing ones) before it gives the table up to paging: a target far
/// from its source would otherwise be held in memory and read again key by key.
const WAITING_PAGES: usize = 10;

/// Compare a whole table by one query per side in key order, matching rows by key as the
/// two streams arrive (see [`Pair::sorts_to_page`]): each server sorts the table once, where
/// pages would each sort it again. Both streams come in the same order, so the rows waiting
/// for their match stay few. Rows without a match, or with another digest, are read again
/// by key to name the differences. `false` (nothing recorded) when more than
/// [`WAITING_PAGES`] pages' worth of rows wait: the caller compares the table by pages.
async fn stream_whole(
    pair: &Pair,
    source: &mut Reader,
    target: &mut Reader,
    options: &Options,
    report: &mut TableReport,
    found: &mut Vec<(Difference, Row)>,
) -> Result<bool> {
    let (source_columns, target_columns) = pair.column_names();
    let mut part = TableReport::default();
    // Rows waiting for their match: the source's, then the target's.
    let mut waiting: [Waiting; 2] = Default::default();
    // Keys to read again: key bytes, key, and the kind of difference the streams saw.
    let mut suspects: Vec<(Vec<u8>, Row, &'static str)> = Vec::new();
    // Two keys of one side encoded alike (`'a'` and `'a '` into a `char(n)` target).
    let mut collided = false;
    {
        let mut s = source
            .ordered_rows(&pair.source, &source_columns, "", None)
            .await?;
        let mut t = target
            .ordered_rows(&pair.target, &target_columns, "", None)
            .await?;
        let (mut source_more, mut target_more) = (true, true);
        while source_more || target_more {
            let (mut a, mut b) = (read::DigestPage::default(), read::DigestPage::default());
            let (mut a_keys, mut b_keys) = (Vec::new(), Vec::new());
            let (more_a, more_b) = tokio::try_join!(
                async {
                    if !source_more {
                        return Ok(false);
                    }
                    s.next_batch(
                        &pair.canon,
                        &pair.key_at,
                        options.chunk_rows,
                        &mut a,
                        Some(&mut a_keys),
                    )
                    .await
                },
                async {
                    if !target_more {
                        return Ok(false);
                    }
                    t.next_batch(
                        &pair.canon,
                        &pair.key_at,
                        options.chunk_rows,
                        &mut b,
                        Some(&mut b_keys),
                    )
                    .await
                }
            )?;
            (source_more, target_more) = (more_a, more_b);
            part.chunks += 1;
            part.source_rows += a.len() as u64;
            part.target_rows += b.len() as u64;
            collided |= match_batch(&a, a_keys, Side::Source, &mut waiting, &mut suspects);
            collided |= match_batch(&b, b_keys, Side::Target, &mut waiting, &mut suspects);
            let limit = WAITING_PAGES * options.chunk_rows;
            if waiting[0].len() + waiting[1].len() + suspects.len() > limit {
                tracing::warn!(
                    "table {}: more than {limit} rows differ or wait for their match; comparing it page by page",
                    pair.source.name.display_name()
                );
                return Ok(false);
            }
        }
    }
    let [waiting_source, waiting_target] = waiting;
    for (bytes, (_, key)) in waiting_source {
        suspects.push((bytes, key, Side::Source.unmatched()));
    }
    for (bytes, (_, key)) in waiting_target {
        suspects.push((bytes, key, Side::Target.unmatched()));
    }
    let named_from = found.len();
    if !suspects.is_empty() {
        part.narrowed += 1;
        let keys: Vec<Row> = suspects.iter().map(|(_, key, _)| key.clone()).collect();
        let (source_rows, target_rows) = tokio::try_join!(
            source.by_keys(&pair.source, &source_columns, &keys),
            target.by_keys(&pair.target, &target_columns, &keys)
        )?;
        found.extend(diff(pair, &source_rows, &target_rows, options.show_values));
        // A key neither side gives back (its literal does not find the row) is still
        // reported, as the streams saw it.
        let mut enc = canon::RowEncoder::default();
        let read_back: std::collections::HashSet<Vec<u8>> = source_rows
            .iter()
            .chain(&target_rows)
            .map(|r| encode_row(r, pair, &mut enc).0)
            .collect();
        for (bytes, key, kind) in suspects {
            if !read_back.contains(&bytes) {
                found.push((
                    Difference {
                        key: key.iter().map(show).collect(),
                        kind: kind.into(),
                        columns: Vec::new(),
                        source: None,
                        target: None,
                    },
                    key,
                ));
            }
        }
    }
    // Keys that collided are read back as one; the row counts still tell.
    let named = |kind: &str| {
        found[named_from..]
            .iter()
            .filter(|(d, _)| d.kind == kind)
            .count()
    };
    let surplus = part.source_rows as i64 - part.target_rows as i64;
    if collided
        && surplus
            != named(Side::Source.unmatched()) as i64 - named(Side::Target.unmatched()) as i64
    {
        report.problems.push(format!(
            "{} rows on the source, {} on the target, more than the differences named account for: \
             some keys are equal once in the target's column types",
            part.source_rows, part.target_rows
        ));
    }
    report.chunks += part.chunks;
    report.source_rows += part.source_rows;
    report.target_rows += part.target_rows;
    report.narrowed += part.narrowed;
    Ok(true)
}

/// Rows of one side waiting for their match in [`stream_whole`], by key bytes: digest and key.
type Waiting = HashMap<Vec<u8>, (u128, Row)>;

#[derive(Clone, Copy)]
enum Side {
    Source,
    Target,
}

impl Side {
    /// The difference a row of this side without a match is.
    fn unmatched(self) -> &'static str {
        match self {
            Side::Source => "missing in target",
            Side::Target => "extra in target",
        }
    }
}

/// Match one side's batch against the other side's waiting rows ([`stream_whole`]): a match
/// with another digest is a suspect (by the source's key), a row without one waits. `true`
/// when two rows of this side have one key encoding (`'a'` and `'a '` into a `char(n)`
/// target); the one already waiting is then a suspect too.
fn match_batch(
    page: &read::DigestPage,
    keys: Vec<Row>,
    side: Side,
    waiting: &mut [Waiting; 2],
    suspects: &mut Vec<(Vec<u8>, Row, &'static str)>,
) -> bool {
    let (source, target) = waiting.split_at_mut(1);
    let (own, other) = match side {
        Side::Source => (&mut source[0], &mut target[0]),
        Side::Target => (&mut target[0], &mut source[0]),
    };
    let mut collided = false;
    for (i, key) in keys.into_iter().enumerate() {
        let (bytes, digest) = page.row(i);
        match other.remove(bytes) {
            Some((d, other_key)) if d != digest => {
                let source_key = match side {
                    Side::Source => key,
                    Side::Target => other_key,
                };
                suspects.push((bytes.to_vec(), source_key, "differs"));
            }
            Some(_) => {}
            None => {
                if let Some((_, earlier)) = own.insert(bytes.to_vec(), (digest, key)) {
                    collided = true;
                    suspects.push((bytes.to_vec(), earlier, side.unmatched()));
                }
            }
        }
    }
    collided
}

/// Compare `(lower, upper]` by reading both sides' rows and diffing them page by page.
#[allow(clippy::too_many_arguments)]
async fn stream_rows(
    pair: &Pair,
    source: &mut Reader,
    target: &mut Reader,
    options: &Options,
    lower: Option<Row>,
    upper: Option<Row>,
    report: &mut TableReport,
    found: &mut Vec<(Difference, Row)>,
) -> Result<()> {
    let (source_columns, target_columns) = pair.column_names();
    let chunk = options.chunk_rows;
    let mut after = lower;
    loop {
        let rows = source
            .range(
                &pair.source,
                &source_columns,
                after.as_ref(),
                upper.as_ref(),
                chunk,
            )
            .await?;
        let last = rows.len() < chunk;
        let upto = if last {
            upper.clone()
        } else {
            rows.last().map(|r| pair.key_of(r))
        };
        let mut target_rows: Vec<Row> = Vec::new();
        let mut target_after = after.clone();
        loop {
            let page = target
                .range(
                    &pair.target,
                    &target_columns,
                    target_after.as_ref(),
                    upto.as_ref(),
                    chunk,
                )
                .await?;
            let full = page.len() == chunk;
            target_after = page.last().map(|r| pair.key_of(r));
            target_rows.extend(page);
            if !full {
                break;
            }
        }
        report.chunks += 1;
        report.source_rows += rows.len() as u64;
        report.target_rows += target_rows.len() as u64;
        found.extend(diff(pair, &rows, &target_rows, options.show_values));
        if last {
            return Ok(());
        }
        after = upto;
    }
}

/// Compare `(lower, upper]` of a single-integer-key table by chunk digests computed on each
/// server; a chunk whose digests differ is streamed to name its rows. Tables not eligible
/// ([`pushdown_eligible`]) are streamed whole.
#[allow(clippy::too_many_arguments)]
async fn pushdown_range(
    pair: &Pair,
    source: &mut Reader,
    target: &mut Reader,
    options: &Options,
    lower: Option<Row>,
    upper: Option<Row>,
    report: &mut TableReport,
    found: &mut Vec<(Difference, Row)>,
) -> Result<()> {
    if !pair.pushdown {
        return stream_range(pair, source, target, options, lower, upper, report, found).await;
    }
    let int = |r: &Option<Row>| match r.as_ref().and_then(|r| r.first()) {
        Some(Value::Int(i)) => Some(*i),
        _ => None,
    };
    let Some((min, max)) = source.integer_key_bounds(&pair.source).await? else {
        // Empty source: whatever the target has is extra.
        return stream_range(pair, source, target, options, lower, upper, report, found).await;
    };
    let target_bounds = target.integer_key_bounds(&pair.target).await?;
    let (min, max) = match target_bounds {
        Some((a, b)) => (min.min(a), max.max(b)),
        None => (min, max),
    };
    // Key width of a chunk, from the row estimate over the key span.
    let span = (max as i128 - min as i128 + 1).max(1);
    let rows = pair.source.estimated_rows.max(1) as i128;
    let width = (span * options.chunk_rows as i128 / rows).clamp(1, i64::MAX as i128) as i64;
    let mut lo = int(&lower)
        .unwrap_or(min.saturating_sub(1))
        .max(min.saturating_sub(1));
    let end = int(&upper).unwrap_or(max).min(max);
    let (source_columns, target_columns) = pair.column_names();
    let mut calibrated = false;
    while lo < end {
        let hi = lo.saturating_add(width).min(end);
        let (source_row, target_row) = match &pair.portable {
            Some((a, b)) => (Some(a), Some(b)),
            None => (None, None),
        };
        let (a, b) = tokio::try_join!(
            source.chunk_digest(&pair.source, &source_columns, source_row, lo, hi),
            target.chunk_digest(&pair.target, &target_columns, target_row, lo, hi)
        )?;
        report.chunks += 1;
        let bounds = (Some(vec![Value::Int(lo)]), Some(vec![Value::Int(hi)]));
        if a != b || !calibrated {
            // Name the rows (and, on the first chunk, check the servers' digests agree with
            // the streamed comparison).
            let mut part = TableReport::default();
            let before = found.len();
            stream_range(
                pair, source, target, options, bounds.0, bounds.1, &mut part, found,
            )
            .await?;
            let streamed_equal = found.len() == before;
            if !calibrated && streamed_equal != (a == b) {
                tracing::warn!(
                    "table {}: the servers' chunk digests disagree with the row comparison; comparing it by streaming",
                    pair.source.name.display_name()
                );
                report.method = "streamed (server digests disagreed)".into();
                let rest = (Some(vec![Value::Int(hi)]), upper.clone());
                report.source_rows += part.source_rows;
                report.target_rows += part.target_rows;
                return stream_range(pair, source, target, options, rest.0, rest.1, report, found)
                    .await;
            }
            calibrated = true;
            report.source_rows += part.source_rows;
            report.target_rows += part.target_rows;
        } else {
            report.source_rows += a.0 as u64;
            report.target_rows += b.0 as u64;
        }
        lo = hi;
    }
    // Keys beyond the bounds read at the start (rows inserted since, on either side).
    if lower.is_none() {
        let below = Some(vec![Value::Int(min.saturating_sub(1))]);
        stream_range(pair, source, target, options, None, below, report, found).await?;
    }
    if upper.is_none() {
        stream_range(
            pair,
            source,
            target,
            options,
            Some(vec![Value::Int(end)]),
            None,
            report,
            found,
        )
        .await?;
    }
    Ok(())
}

/// A row's canonical key bytes and the digest of its whole encoding (as
/// [`read::DigestPage`] has them). `enc` is reused between rows.
fn encode_row(row: &Row, pair: &Pair, enc: &mut canon::RowEncoder) -> (Vec<u8>, u128) {
    enc.clear();
    for (v, c) in row.iter().zip(&pair.canon) {
        enc.value(v, c);
    }
    let mut key = Vec::new();
    enc.key_into(&pair.key_at, &mut key);
    (key, enc.digest())
}

/// The columns whose encodings differ between two rows.
fn differing_columns(pair: &Pair, a: &Row, b: &Row) -> Vec<String> {
    let mut out = Vec::new();
    for (i, c) in pair.canon.iter().enumerate() {
        let (mut x, mut y) = (Vec::new(), Vec::new());
        canon::encode(&a[i], c, &mut x);
        canon::encode(&b[i], c, &mut y);
        if x != y {
            out.push(pair.columns[i].0.clone());
        }
    }
    out
}

fn show(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::Int(i) => i.to_string(),
        Value::UInt(u) => u.to_string(),
        Value::Float(f) => format!("{f:?}"),
        Value::Decimal(d) => d.clone(),
        Value::Text(t) | Value::Native(t) => t.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Bytes(b) => {
            let mut s = String::from("\\x");
            for byte in b {
                s.push_str(&format!("{byte:02x}"));
            }
            s
        }
    }
}

/// Differences between source and target rows of the same key range, with the key of each
/// (as the side that has the row holds it, to re-read it).
fn diff(pair: &Pair, source: &[Row], target: &[Row], show_values: bool) -> Vec<(Difference, Row)> {
    let mut scratch = canon::RowEncoder::default();
    // Both sides come in the same (binary) key order: walk them together while the keys
    // match, which is every row when the copy is equal; from the first mismatch on, match
    // the rest by key.
    let mut same = 0;
    let mut differing: Vec<usize> = Vec::new();
    while same < source.len() && same < target.len() {
        let (ks, ds) = encode_row(&source[same], pair, &mut scratch);
        let (kt, dt) = encode_row(&target[same], pair, &mut scratch);
        if ks != kt {
            break;
        }
        if ds != dt {
            differing.push(same);
        }
        same += 1;
    }
    let (source_rest, target_rest) = (&source[same..], &target[same..]);
    let mut target_by_key: HashMap<Vec<u8>, (u128, usize)> =
        HashMap::with_capacity(target_rest.len());
    for (i, r) in target_rest.iter().enumerate() {
        let (key, digest) = encode_row(r, pair, &mut scratch);
        target_by_key.insert(key, (digest, same + i));
    }
    let values = |r: &Row| show_values.then(|| r.iter().map(show).collect::<Vec<_>>());
    let mut out = Vec::new();
    for i in differing {
        let key = pair.key_of(&source[i]);
        out.push((
            Difference {
                key: key.iter().map(show).collect(),
                kind: "differs".into(),
                columns: differing_columns(pair, &source[i], &target[i]),
                source: values(&source[i]),
                target: values(&target[i]),
            },
            key,
        ));
    }
    for r in source_rest {
        let (key_bytes, digest) = encode_row(r, pair, &mut scratch);
        match target_by_key.remove(&key_bytes) {
            None => {
                let key = pair.key_of(r);
                out.push((
                    Difference {
                        key: key.iter().map(show).collect(),
                        kind: "missing in target".into(),
                        columns: Vec::new(),
                        source: values(r),
                        target: None,
                    },
                    key,
                ))
            }
            Some((d, i)) if d != digest => {
                let key = pair.key_of(r);
                out.push((
                    Difference {
                        key: key.iter().map(show).collect(),
                        kind: "differs".into(),
                        columns: differing_columns(pair, r, &target[i]),
                        source: values(r),
                        target: values(&target[i]),
                    },
                    key,
                ));
            }
            Some(_) => {}
        }
    }
    let mut extra: Vec<(Difference, Row)> = target_by_key
        .into_values()
        .map(|(_, i)| {
            let key = pair.key_of(&target[i]);
            (
                Difference {
                    key: key.iter().map(show).collect(),
                    kind: "extra in target".into(),
                    columns: Vec::new(),
                    source: None,
                    target: values(&target[i]),
                },
                key,
            )
        })
        .collect();
    extra.sort_by(|a, b| a.0.key.cmp(&b.0.key));
    out.extend(extra);
    out
}

/// Compare the keys in `(lower, upper]` of one table (open ends when `None`).
async fn compare_range(
    pair: &Pair,
    source: &mut Reader,
    target: &mut Reader,
    options: &Options,
    lower: Option<Row>,
    upper: Option<Row>,
) -> Result<TableReport> {
    let mut report = TableReport::default();
    let keyless = pair.key_at.len() != pair.source.key.len() || pair.key_at.is_empty();
    if keyless && !options.quick {
        multiset(pair, source, target, options, &mut report).await?;
        return Ok(report);
    }
    if options.quick {
        report.method = "counts".into();
        // Both sides at once: this runs inside a cutover's write-unavailability window.
        let (s, t) = tokio::join!(source.quick(&pair.source), target.quick(&pair.target));
        let ((sc, smin, smax), (tc, tmin, tmax)) = (s?, t?);
        report.source_rows = sc as u64;
        report.target_rows = tc as u64;
        if sc != tc {
            report
                .problems
                .push(format!("{sc} rows on the source, {tc} on the target"));
        }
        // Smallest and largest keys, compared by meaning (text forms differ across engines).
        let same = |a: &Option<String>, b: &Option<String>| match (&pair.key_at[..], a, b) {
            ([k], Some(a), Some(b)) => {
                let (mut x, mut y) = (Vec::new(), Vec::new());
                canon::encode(&Value::Text(a.clone()), &pair.canon[*k], &mut x);
                canon::encode(&Value::Text(b.clone()), &pair.canon[*k], &mut y);
                x == y
            }
            _ => a == b,
        };
        if !same(&smin, &tmin) || !same(&smax, &tmax) {
            report.problems.push(format!(
                "keys range from {} to {} on the source, from {} to {} on the target",
                smin.unwrap_or_default(),
                smax.unwrap_or_default(),
                tmin.unwrap_or_default(),
                tmax.unwrap_or_default()
            ));
        }
        return Ok(report);
    }
    let (source_columns, target_columns) = pair.column_names();
    let mut found: Vec<(Difference, Row)> = Vec::new();
    report.method = if pair.pushdown {
        "server digests"
    } else {
        "streamed"
    }
    .into();
    pushdown_range(
        pair,
        source,
        target,
        options,
        lower,
        upper,
        &mut report,
        &mut found,
    )
    .await?;
    // Re-read what differs: a change may have been on its way.
    let mut delay = Duration::from_millis(500);
    for _ in 0..options.rechecks {
        if found.is_empty() {
            break;
        }
        let follow = &options.follow_job;
        if options.state.is_some() && follow.load(std::sync::atomic::Ordering::Relaxed) {
            // Wait for the job to apply what the source holds now; a job that is not
            // running (or never gets there) falls back to waiting by time, for every worker.
            if !wait_for_apply(options, source).await? {
                follow.store(false, std::sync::atomic::Ordering::Relaxed);
            }
        }
        tokio::time::sleep(delay).await;
        delay *= 2;
        let keys: Vec<Row> = found.iter().map(|(_, k)| k.clone()).collect();
        let s = source.by_keys(&pair.source, &source_columns, &keys).await?;
        let t = target.by_keys(&pair.target, &target_columns, &keys).await?;
        let before = found.len();
        found = diff(pair, &s, &t, options.show_values);
        report.transient += before.saturating_sub(found.len()) as u64;
    }
    if options.repair && !found.is_empty() {
        let keys: Vec<Row> = found.iter().map(|(_, k)| k.clone()).collect();
        let source_rows = source.by_keys(&pair.source, &source_columns, &keys).await?;
        let present: std::collections::HashSet<Vec<u8>> = source_rows
            .iter()
            .map(|r| encode_row(r, pair, &mut canon::RowEncoder::default()).0)
            .collect();
        let gone: Vec<Row> = keys
            .iter()
            .filter(|k| !present.contains(&key_bytes(pair, k)))
            .cloned()
            .collect();
        let types: Vec<crate::model::DataType> = target_columns
            .iter()
            .map(|c| {
                pair.target
                    .column(c)
                    .map(|c| c.data_type.clone())
                    .unwrap_or(crate::model::DataType::Text)
            })
            .collect();
        let same_engine_mysql = (options.source.engine == EngineKind::Mysql
            && options.target.engine == EngineKind::Mysql)
            .then_some(pair.source.my_columns.as_slice());
        let plan = repair::Plan {
            table: &pair.target,
            columns: &target_columns,
            types: &types,
            key_at: &pair.key_at,
            same_engine_mysql,
        };
        let mut writer = repair::Writer::connect(&options.target).await?;
        writer.write(&plan, &source_rows, &gone).await?;
        let s = source.by_keys(&pair.source, &source_columns, &keys).await?;
        let t = target.by_keys(&pair.target, &target_columns, &keys).await?;
        let before = found.len();
        found = diff(pair, &s, &t, options.show_values);
        report.repaired = before.saturating_sub(found.len()) as u64;
    }
    report.differences = found.into_iter().map(|(d, _)| d).collect();
    Ok(report)
}

/// Wait (up to 30 s) until the job in `options.state` has applied the source's current
/// position; false when it did not get there (then later re-reads only wait by time).
async fn wait_for_apply(options: &Options, source: &mut Reader) -> Result<bool> {
    use crate::model::Position;
    let Some(dir) = &options.state else {
        return Ok(false);
    };
    let target = match source.current_position().await {
        Ok(Some(p)) => p,
        Ok(None) => return Ok(false),
        Err(e) => {
            tracing::warn!("{e}; re-reads wait by time instead of by position");
            return Ok(false);
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let applied: Option<Position> = tokio::task::block_in_place(|| {
            let store = crate::state::StateStore::open_for_reading(dir).ok()??;
            let positions = store.positions().ok()?;
            // PostgreSQL jobs confirm WAL they have applied (or that held nothing to apply)
            // past their last applied commit.
            positions
                .iter()
                .filter(|(name, _, _)| name == "applied" || name == "confirmed")
                .filter_map(|(_, value, _)| value.parse::<Position>().ok())
                .max_by(|a, b| {
                    a.partial_cmp_same_source(b)
                        .unwrap_or(std::cmp::Ordering::Equal)
                })
        });
        let Some(applied) = applied else {
            // The job never recorded an applied position (a snapshot-only job): nothing to
            // wait for.
            return Ok(false);
        };
        if applied
            .partial_cmp_same_source(&target)
            .is_some_and(|o| o != std::cmp::Ordering::Less)
        {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                "the job did not reach source position {target} within 30 s; re-reading anyway"
            );
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A table without a key (or whose key columns are missing on the target) as two multisets
/// of rows: every row of both sides is digested, and each distinct row must appear as many
/// times on the target as on the source. Holds one digest per distinct row in memory.
async fn multiset(
    pair: &Pair,
    source: &mut Reader,
    target: &mut Reader,
    options: &Options,
    report: &mut TableReport,
) -> Result<()> {
    report.method = "multiset (no key)".into();
    let (source_columns, target_columns) = pair.column_names();
    let (source_rows, target_rows) = tokio::try_join!(
        source.all_rows(&pair.source, &source_columns),
        target.all_rows(&pair.target, &target_columns)
    )?;
    report.chunks = 1;
    report.source_rows = source_rows.len() as u64;
    report.target_rows = target_rows.len() as u64;
    // digest -> (copies on the source, copies on the target, one such row)
    let mut counts: HashMap<u128, (u64, u64, Row)> = HashMap::new();
    let mut scratch = canon::RowEncoder::default();
    for (rows, side) in [(source_rows, 0), (target_rows, 1)] {
        for row in rows {
            let digest = encode_row(&row, pair, &mut scratch).1;
            let entry = counts.entry(digest).or_insert((0, 0, row));
            if side == 0 {
                entry.0 += 1;
            } else {
                entry.1 += 1;
            }
        }
    }
    let mut differences: Vec<Difference> = counts
        .into_iter()
        .filter(|(_, (a, b, _))| a != b)
        .map(|(digest, (a, b, row))| {
            let values = options
                .show_values
                .then(|| row.iter().map(show).collect::<Vec<_>>());
            Difference {
                key: vec![
                    format!("row {:016x}", (digest >> 64) as u64),
                    format!("{} on the source, {} on the target", a, b),
                ],
                kind: if a > b {
                    "missing in target"
                } else {
                    "extra in target"
                }
                .into(),
                columns: Vec::new(),
                source: if a > b { values.clone() } else { None },
                target: if a > b { None } else { values },
            }
        })
        .collect();
    differences.sort_by(|a, b| a.key.cmp(&b.key));
    if options.repair && !differences.is_empty() {
        report
            .problems
            .push("rows of a table without a key are not repaired".into());
    }
    report.differences = differences;
    Ok(())
}

/// The canonical bytes of a key given as its values alone.
fn key_bytes(pair: &Pair, key: &Row) -> Vec<u8> {
    let mut out = Vec::new();
    for (v, &i) in key.iter().zip(&pair.key_at) {
        canon::encode(v, &pair.canon[i], &mut out);
    }
    out
}

/// The report as text, for people.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    for t in &report.tables {
        let status = if t.equal() { "equal" } else { "DIFFERENT" };
        out.push_str(&format!(
            "{:<40} {status:<9} {} source rows, {} target rows{}",
            t.source,
            t.source_rows,
            t.target_rows,
            if t.method.is_empty() {
                String::new()
            } else {
                format!(" ({})", t.method)
            }
        ));
        if t.repaired > 0 {
            out.push_str(&format!(" ({} differences repaired)", t.repaired));
        }
        if t.transient > 0 {
            out.push_str(&format!(" ({} differences gone on a re-read)", t.transient));
        }
        out.push('\n');
        for p in &t.problems {
            out.push_str(&format!("    {p}\n"));
        }
        for d in t.differences.iter().take(100) {
            out.push_str(&format!("    key ({}): {}", d.key.join(", "), d.kind));
            if !d.columns.is_empty() {
                out.push_str(&format!(" in {}", d.columns.join(", ")));
            }
            if let Some(s) = &d.source {
                out.push_str(&format!("; source ({})", s.join(", ")));
            }
            if let Some(s) = &d.target {
                out.push_str(&format!("; target ({})", s.join(", ")));
            }
            out.push('\n');
        }
        if t.differences.len() > 100 {
            out.push_str(&format!(
                "    ... and {} more (--json lists all)\n",
                t.differences.len() - 100
            ));
        }
    }
    let different = report.tables.iter().filter(|t| !t.equal()).count();
    let rate = report.rows as f64 / report.seconds.max(1e-3);
    out.push_str(&format!(
        "{} tables, {} rows compared in {:.1}s ({:.0} rows/s): {}\n",
        report.tables.len(),
        report.rows,
        report.seconds,
        rate,
        if report.equal {
            "source and target are equal".to_owned()
        } else {
            format!(
                "{different} table(s) differ, {} row difference(s)",
                report
                    .tables
                    .iter()
                    .map(|t| t.differences.len())
                    .sum::<usize>()
            )
        }
    ));
    out
}

/// A part of the work: a table (index into the pairs) and a key range.
type Task = (usize, Option<Row>, Option<Row>);

/// What `verify.json` holds while a verification runs: enough to show progress and to
/// resume the same comparison after an interruption.
#[derive(Debug, Serialize, serde::Deserialize)]
struct Checkpoint {
    running: bool,
    /// Identifies the comparison (endpoints, tables, options): only the same one resumes.
    plan: String,
    started_at: String,
    parts: usize,
    parts_done: usize,
    rows: u64,
    tasks: Vec<Task>,
    /// Finished parts by task number, with their results.
    done: Vec<(usize, TableReport)>,
}

fn plan_id(options: &Options, pairs: &[Pair]) -> String {
    let text = format!(
        "{}|{}|{:?}|{}|{}|{}",
        options.source.redacted(),
        options.target.redacted(),
        pairs
            .iter()
            .map(|p| (p.source.name.display_name(), &p.columns))
            .collect::<Vec<_>>(),
        options.chunk_rows,
        options.jobs,
        options.repair
    );
    format!("{:032x}", canon::digest(text.as_bytes()))
}

/// Write the checkpoint (with --state); a failure to write is a warning, not an error.
fn save_checkpoint(options: &Options, checkpoint: &std::sync::Mutex<Checkpoint>) {
    let Some(dir) = &options.state else {
        return;
    };
    let Ok(mut c) = checkpoint.lock() else {
        return;
    };
    c.parts_done = c.done.len();
    c.rows = c.done.iter().map(|(_, p)| p.source_rows).sum();
    let text = match serde_json::to_string(&*c) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!("writing the verification checkpoint: {e}");
            return;
        }
    };
    // Written aside and renamed, so a crash never leaves half a file.
    let tmp = dir.join(format!("{SUMMARY_FILE}.tmp"));
    if let Err(e) =
        std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, dir.join(SUMMARY_FILE)))
    {
        tracing::warn!(
            "writing the verification checkpoint in {}: {e}",
            dir.display()
        );
    }
}

/// The current time as `YYYY-MM-DD HH:MM:SS UTC`.
fn now_utc() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (y, m, d) = crate::engine::postgres::rows::civil_from_days(now.div_euclid(86_400));
    let secs = now.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Where a verification run with `--state` leaves its progress and then its summary, for
/// `kuaka status`.
pub const SUMMARY_FILE: &str = "verify.json";

/// The summary of a report that `kuaka status` shows (no keys or values: the state dir may be
/// shared more widely than the report).
pub fn summary(report: &Report, quick: bool) -> serde_json::Value {
    serde_json::json!({
        "finished_at": now_utc(),
        "mode": if quick { "quick" } else { "full" },
        "equal": report.equal,
        "tables": report.tables.len(),
        "tables_different": report.tables.iter().filter(|t| !t.equal()).count(),
        "rows": report.rows,
        "differences": report.tables.iter().map(|t| t.differences.len()).sum::<usize>(),
        "transient": report.tables.iter().map(|t| t.transient).sum::<u64>(),
        "repaired": report.tables.iter().map(|t| t.repaired).sum::<u64>(),
        "seconds": report.seconds,
    })
}
