//! Progress display on stderr: one bar per table being copied when stderr is a terminal, plain
//! periodic log lines otherwise. Logging goes through [`LogWriter`] so lines and bars do not
//! garble each other.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::engine::postgres::snapshot::CopyProgress;

/// Shared handle to the terminal display (or its absence).
#[derive(Clone)]
pub struct Ui {
    multi: Option<MultiProgress>,
}

impl Ui {
    /// Bars only when stderr is a terminal and the user did not turn them off.
    pub fn new(bars: bool) -> Ui {
        let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let multi = (bars && tty)
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(8)));
        Ui { multi }
    }

    pub fn has_bars(&self) -> bool {
        self.multi.is_some()
    }

    /// Progress of one table's copy.
    pub fn table(
        &self,
        name: &str,
        rows_total: u64,
        rows_done: u64,
        bytes_done: u64,
    ) -> Arc<TableProgress> {
        let bar = self.multi.as_ref().map(|m| {
            let bar = m.add(ProgressBar::new(rows_total.max(rows_done).max(1)));
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>28.bold} [{bar:30}] {human_pos:>11}/{human_len:<11} rows {msg:>10} {rate:>14} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .with_key("rate", |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.0} rows/s", state.per_sec());
                })
                .progress_chars("=> "),
            );
            bar.set_prefix(truncate(name, 28));
            bar.set_position(rows_done);
            bar.set_message(human_bytes(bytes_done));
            bar
        });
        Arc::new(TableProgress {
            bar,
            rows: AtomicU64::new(rows_done),
            bytes: AtomicU64::new(bytes_done),
            started: Instant::now(),
        })
    }

    /// A bar (or nothing) for a phase counted in steps.
    pub fn steps(&self, label: &str, total: u64) -> Option<ProgressBar> {
        self.multi.as_ref().map(|m| {
            let bar = m.add(ProgressBar::new(total));
            bar.set_style(
                ProgressStyle::with_template("{prefix:>28.bold} [{bar:30}] {pos}/{len} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.set_prefix(label.to_owned());
            bar
        })
    }

    fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match &self.multi {
            Some(m) => m.suspend(f),
            None => f(),
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let tail: String = s
            .chars()
            .rev()
            .take(max - 1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("…{tail}")
    }
}

/// `1.5 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < units.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

pub struct TableProgress {
    bar: Option<ProgressBar>,
    pub rows: AtomicU64,
    pub bytes: AtomicU64,
    started: Instant,
}

impl CopyProgress for TableProgress {
    fn add(&self, rows: u64, bytes: u64) {
        let r = self.rows.fetch_add(rows, Ordering::Relaxed) + rows;
        let b = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if let Some(bar) = &self.bar {
            if r > bar.length().unwrap_or(0) {
                bar.set_length(r);
            }
            bar.set_position(r);
            bar.set_message(human_bytes(b));
        }
    }
}

impl TableProgress {
    /// Replace the live estimate with the exact count of a finished chunk.
    pub fn correct(&self, estimated_rows: u64, exact_rows: u64) {
        if exact_rows != estimated_rows {
            let r = if exact_rows > estimated_rows {
                self.rows
                    .fetch_add(exact_rows - estimated_rows, Ordering::Relaxed)
                    + exact_rows
                    - estimated_rows
            } else {
                self.rows
                    .fetch_sub(estimated_rows - exact_rows, Ordering::Relaxed)
                    - (estimated_rows - exact_rows)
            };
            if let Some(bar) = &self.bar {
                bar.set_position(r);
            }
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.set_length(self.rows.load(Ordering::Relaxed).max(1));
            bar.finish_and_clear();
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// A `tracing` writer that prints above the progress bars.
#[derive(Clone)]
pub struct LogWriter {
    ui: Arc<std::sync::Mutex<Option<Ui>>>,
}

impl LogWriter {
    pub fn new() -> LogWriter {
        LogWriter {
            ui: Arc::new(std::sync::Mutex::new(None)),
        }
    }

    /// Route subsequent log lines around this display's bars.
    pub fn attach(&self, ui: &Ui) {
        *self.ui.lock().unwrap_or_else(|e| e.into_inner()) = Some(ui.clone());
    }
}

impl Default for LogWriter {
    fn default() -> Self {
        Self::new()
    }
}

pub struct LineWriter {
    ui: Option<Ui>,
    buf: Vec<u8>,
}

impl Write for LineWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let write = || {
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(&buf);
            let _ = err.flush();
        };
        match &self.ui {
            Some(ui) => ui.suspend(write),
            None => write(),
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LineWriter;
    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            ui: self.ui.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            buf: Vec::new(),
        }
    }
}
