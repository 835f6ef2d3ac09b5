//! `kuaka verify`: prove that the target holds what the source holds, across engines.
//!
//! Each table is compared chunk by chunk in key order: a page of the source (`--chunk-rows`
//! keys), then the target's rows in the same key range. Rows are encoded canonically by the
//! target column's type ([`canon`]) and digested (XXH3-128); equal digests are equal rows,
//! and a differing row is named with its key and the columns that differ. Both sides are
//! streamed and hashed here, never in SQL, so the same code decides for every engine pair.
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
use self::read::{Reader, SideTable};
use crate::config::{Endpoint, EngineKind, Selection};
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
    /// Re-reads of differing rows before they are reported.
    pub rechecks: u32,
    /// Re-copy differing keys from the source, then read them again.
    pub repair: bool,
    pub chunk_rows: usize,
    pub jobs: usize,
}

/// The outcome of a verification.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub equal: bool,
    pub tables: Vec<TableReport>,
    pub rows: u64,
    pub seconds: f64,
}

#[derive(Debug, Default, Serialize)]
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
}

#[derive(Clone, Debug, Serialize)]
pub struct Difference {
    pub key: Vec<String>,
    /// `missing in target`, `extra in target` or `differs`.
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
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
}

/// Run a verification.
pub async fn run(options: &Options) -> Result<Report> {
    let started = Instant::now();
    let mut source = Reader::connect(&options.source, "verify source").await?;
    let mut target = Reader::connect(&options.target, "verify target").await?;
    let source_tables = source.tables(&options.selection).await?;
    let target_tables = target.tables(&Selection::default()).await?;
    let both_pg = options.source.engine == EngineKind::Postgres
        && options.target.engine == EngineKind::Postgres;
    let exact =
        options.source.engine == EngineKind::Sqlite && options.target.engine == EngineKind::Sqlite;
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
        if st.key.is_empty() || key_at.len() != st.key.len() {
            table.problems.push(
                "no primary key (or its columns are missing on the target): only the row counts are compared"
                    .into(),
            );
        }
        report.tables.push(table);
        pairs.push(Pair {
            target: SideTable {
                key: key_at.iter().map(|&i| columns[i].1.clone()).collect(),
                ..tt.clone()
            },
            source: st,
            columns,
            canon,
            key_at,
        });
    }
    drop((source, target));

    // Tables in parallel, each worker with its own connections.
    let queue = std::sync::Arc::new(tokio::sync::Mutex::new(pairs.into_iter()));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..options.jobs.max(1) {
        let queue = queue.clone();
        let options = options.clone();
        workers.spawn(async move {
            let mut done: Vec<(String, TableReport)> = Vec::new();
            let mut readers: Option<(Reader, Reader)> = None;
            loop {
                let Some(pair) = queue.lock().await.next() else {
                    break;
                };
                if readers.is_none() {
                    readers = Some((
                        Reader::connect(&options.source, "verify source").await?,
                        Reader::connect(&options.target, "verify target").await?,
                    ));
                }
                let (s, t) = readers.as_mut().expect("connected");
                let table = compare_table(&pair, s, t, &options).await?;
                done.push((pair.source.name.display_name(), table));
            }
            Ok::<_, Error>(done)
        });
    }
    while let Some(result) = workers.join_next().await {
        let done =
            result.map_err(|e| Error::Definite(format!("a verify worker failed: {e}")))??;
        for (name, table) in done {
            if let Some(slot) = report.tables.iter_mut().find(|t| t.source == name) {
                let problems = std::mem::take(&mut slot.problems);
                *slot = table;
                slot.problems.splice(0..0, problems);
            }
        }
    }
    report.rows = report.tables.iter().map(|t| t.source_rows).sum();
    report.equal = report.tables.iter().all(TableReport::equal);
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// A row encoded: canonical key bytes, digest, and per-column encodings for naming what
/// differs.
struct Encoded {
    key: Vec<u8>,
    digest: u128,
    cells: Vec<Vec<u8>>,
}

fn encode_row(row: &Row, pair: &Pair) -> Encoded {
    let mut cells = Vec::with_capacity(row.len());
    let mut all = Vec::new();
    for (v, c) in row.iter().zip(&pair.canon) {
        let mut cell = Vec::new();
        canon::encode(v, c, &mut cell);
        all.extend_from_slice(&cell);
        cells.push(cell);
    }
    let mut key = Vec::new();
    for &i in &pair.key_at {
        key.extend_from_slice(&cells[i]);
    }
    Encoded {
        key,
        digest: canon::digest(&all),
        cells,
    }
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
    let mut target_by_key: HashMap<Vec<u8>, (Encoded, &Row)> = target
        .iter()
        .map(|r| {
            let e = encode_row(r, pair);
            (e.key.clone(), (e, r))
        })
        .collect();
    let key_of = |r: &Row| -> Row { pair.key_at.iter().map(|&i| r[i].clone()).collect() };
    let values = |r: &Row| show_values.then(|| r.iter().map(show).collect::<Vec<_>>());
    let mut out = Vec::new();
    for r in source {
        let e = encode_row(r, pair);
        let key = key_of(r);
        match target_by_key.remove(&e.key) {
            None => out.push((
                Difference {
                    key: key.iter().map(show).collect(),
                    kind: "missing in target",
                    columns: Vec::new(),
                    source: values(r),
                    target: None,
                },
                key,
            )),
            Some((t, tr)) if t.digest != e.digest => {
                let columns = e
                    .cells
                    .iter()
                    .zip(&t.cells)
                    .zip(&pair.columns)
                    .filter(|((a, b), _)| a != b)
                    .map(|(_, (name, _))| name.clone())
                    .collect();
                out.push((
                    Difference {
                        key: key.iter().map(show).collect(),
                        kind: "differs",
                        columns,
                        source: values(r),
                        target: values(tr),
                    },
                    key,
                ));
            }
            Some(_) => {}
        }
    }
    let mut extra: Vec<(Difference, Row)> = target_by_key
        .into_values()
        .map(|(_, tr)| {
            let key = key_of(tr);
            (
                Difference {
                    key: key.iter().map(show).collect(),
                    kind: "extra in target",
                    columns: Vec::new(),
                    source: None,
                    target: values(tr),
                },
                key,
            )
        })
        .collect();
    extra.sort_by(|a, b| a.0.key.cmp(&b.0.key));
    out.extend(extra);
    out
}

async fn compare_table(
    pair: &Pair,
    source: &mut Reader,
    target: &mut Reader,
    options: &Options,
) -> Result<TableReport> {
    let mut report = TableReport {
        source: pair.source.name.display_name(),
        target: pair.target.name.display_name(),
        ..TableReport::default()
    };
    if options.quick || pair.key_at.len() != pair.source.key.len() || pair.key_at.is_empty() {
        let (sc, smin, smax) = source.quick(&pair.source).await?;
        let (tc, tmin, tmax) = target.quick(&pair.target).await?;
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
    let source_columns: Vec<String> = pair.columns.iter().map(|(s, _)| s.clone()).collect();
    let target_columns: Vec<String> = pair.columns.iter().map(|(_, t)| t.clone()).collect();
    let key_of = |r: &Row| -> Row { pair.key_at.iter().map(|&i| r[i].clone()).collect() };
    let mut after: Option<Row> = None;
    let mut found: Vec<(Difference, Row)> = Vec::new();
    loop {
        let rows = source
            .range(
                &pair.source,
                &source_columns,
                after.as_ref(),
                None,
                options.chunk_rows,
            )
            .await?;
        let last = rows.len() < options.chunk_rows;
        let upto = if last { None } else { rows.last().map(key_of) };
        let mut target_rows: Vec<Row> = Vec::new();
        let mut target_after = after.clone();
        loop {
            let page = target
                .range(
                    &pair.target,
                    &target_columns,
                    target_after.as_ref(),
                    upto.as_ref(),
                    options.chunk_rows,
                )
                .await?;
            let full = page.len() == options.chunk_rows;
            target_after = page.last().map(key_of);
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
            break;
        }
        after = upto;
    }
    // Re-read what differs: a change may have been on its way.
    let mut delay = Duration::from_millis(500);
    for _ in 0..options.rechecks {
        if found.is_empty() {
            break;
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
            .map(|r| encode_row(r, pair).key)
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
            "{:<40} {status:<9} {} source rows, {} target rows",
            t.source, t.source_rows, t.target_rows
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
