//! The durable local change log: captured changes spooled to segment files in the state
//! directory, so the source can recycle its WAL as soon as a change is on kuaka's disk, however
//! long the snapshot or the apply takes.
//!
//! Layout: `DIR/changes/<16 hex digits>.log`, each segment named after the source position of
//! the last commit *before* it (the first after the capture's start position), so segment `i`
//! holds the commits in `(name_i, name_{i+1}]`. A segment starts with an 8-byte magic and then
//! records:
//!
//! ```text
//! len u32 | crc32c u32 (of kind, pos and payload) | kind u8 | pos u64 | payload (len bytes)
//! ```
//!
//! Contracts:
//! - Segments rotate only after a commit record, and each new segment first repeats every
//!   relation description (pgoutput `R` message) known at that moment, so a reader that starts
//!   at any segment knows every table it will meet.
//! - [`ChangeLog::open`] recovers from a crash at any instant: it cuts the newest segment after
//!   its last complete transaction (a torn record or a transaction without its commit is
//!   dropped; the source sends it again because it was never acknowledged).
//! - A reader never sees a record the writer has not finished: the writer publishes its end
//!   position only after a whole record reached the OS.
//! - [`ChangeLog::sync`] makes everything written durable (fdatasync); only then may the
//!   source be told the changes are safe.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use tokio::sync::watch;

const MAGIC: &[u8; 8] = b"KUAKALG1";
const HEADER: usize = 4 + 4 + 1 + 8;
/// A record larger than this is corruption, not data (pgoutput rows are at most 1 GB each).
const MAX_RECORD: u32 = 1 << 30;
/// Default segment size before rotation.
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// What a record holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// A pgoutput message as the server sent it; `pos` is its WAL start, or for a commit its
    /// commit position.
    PgOutput = 1,
    /// A kuaka instruction (JSON), e.g. a column to add on the target before the next changes.
    Kuaka = 2,
    /// A MySQL/MariaDB binlog event framed by kuaka (see `pipeline::binlog_spool`): a tag
    /// byte in the same roles as pgoutput's (`B` opens a transaction, `C` ends at a
    /// transaction boundary, `R` is context every segment repeats), then the event.
    Binlog = 3,
}

impl RecordKind {
    fn from_u8(b: u8) -> Option<RecordKind> {
        match b {
            1 => Some(RecordKind::PgOutput),
            2 => Some(RecordKind::Kuaka),
            3 => Some(RecordKind::Binlog),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub kind: RecordKind,
    pub pos: u64,
    pub payload: Bytes,
}

impl Record {
    fn tag(&self) -> Option<u8> {
        matches!(self.kind, RecordKind::PgOutput | RecordKind::Binlog)
            .then(|| self.payload.first().copied())
            .flatten()
    }
    pub fn is_begin(&self) -> bool {
        self.tag() == Some(b'B')
    }
    pub fn is_commit(&self) -> bool {
        self.tag() == Some(b'C')
    }
    fn relation_id(&self) -> Option<u32> {
        (self.tag() == Some(b'R') && self.payload.len() >= 5).then(|| {
            u32::from_be_bytes([
                self.payload[1],
                self.payload[2],
                self.payload[3],
                self.payload[4],
            ])
        })
    }
}

/// Where the writer has got to: `(segment name, byte offset)`, ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct LogEnd {
    pub segment: u64,
    pub offset: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("change log {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "change log {path} is corrupt at byte {offset} ({what}); it is not the newest segment, so this is not a torn write: restore the state directory or start the job again"
    )]
    Corrupt {
        path: PathBuf,
        offset: u64,
        what: &'static str,
    },
    #[error(
        "the change log in {dir} no longer holds the changes after source position {from:X} (its oldest segment starts after {oldest:X}); the target cannot be brought up to date from this state directory"
    )]
    Missing {
        dir: PathBuf,
        from: u64,
        oldest: u64,
    },
}

pub type Result<T, E = LogError> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_owned(),
        source,
    }
}

/// CRC-32C (Castagnoli), table-driven.
fn crc32c(parts: &[&[u8]]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for part in parts {
        for &b in *part {
            crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
        }
    }
    !crc
}

fn segment_path(dir: &Path, name: u64) -> PathBuf {
    dir.join(format!("{name:016x}.log"))
}

/// Segment names in `dir`, oldest first.
pub fn segments(dir: &Path) -> Result<Vec<u64>> {
    let mut names = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(names),
        Err(e) => return Err(io_err(dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        let file = entry.file_name();
        let Some(stem) = file.to_str().and_then(|f| f.strip_suffix(".log")) else {
            continue;
        };
        if let Ok(n) = u64::from_str_radix(stem, 16) {
            names.push(n);
        }
    }
    names.sort_unstable();
    Ok(names)
}

/// Read one record at the reader's position. `Ok(None)` at a clean end of file; `Err(what)`
/// for a torn or corrupt record.
fn read_record(r: &mut impl Read) -> io::Result<Result<Option<(Record, u64)>, &'static str>> {
    let mut header = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        let n = r.read(&mut header[got..])?;
        if n == 0 {
            return Ok(if got == 0 {
                Ok(None)
            } else {
                Err("truncated record header")
            });
        }
        got += n;
    }
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    if len > MAX_RECORD {
        return Ok(Err("record length out of range"));
    }
    let Some(kind) = RecordKind::from_u8(header[8]) else {
        return Ok(Err("unknown record kind"));
    };
    let pos = u64::from_be_bytes(header[9..17].try_into().unwrap_or_default());
    let mut payload = vec![0u8; len as usize];
    let mut got = 0;
    while got < payload.len() {
        let n = r.read(&mut payload[got..])?;
        if n == 0 {
            return Ok(Err("truncated record payload"));
        }
        got += n;
    }
    if crc32c(&[&header[8..], &payload]) != crc {
        return Ok(Err("checksum mismatch"));
    }
    Ok(Ok(Some((
        Record {
            kind,
            pos,
            payload: Bytes::from(payload),
        },
        (HEADER + len as usize) as u64,
    ))))
}

/// The writer. One per state directory (the state store's lock guarantees it).
pub struct ChangeLog {
    dir: PathBuf,
    segment: u64,
    file: BufWriter<File>,
    offset: u64,
    segment_bytes: u64,
    /// Commit position of the last complete transaction in the log.
    last_commit: u64,
    in_transaction: bool,
    relations: BTreeMap<u32, Record>,
    end: watch::Sender<LogEnd>,
    dirty: bool,
}

impl ChangeLog {
    /// Open (or create) the log in `dir`; a new log starts after source position `start`.
    pub fn open(dir: &Path, start: u64, segment_bytes: u64) -> Result<ChangeLog> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let names = segments(dir)?;
        let Some(&newest) = names.last() else {
            let (segment, file) = create_segment(dir, start)?;
            let (end, _) = watch::channel(LogEnd {
                segment,
                offset: MAGIC.len() as u64,
            });
            return Ok(ChangeLog {
                dir: dir.to_owned(),
                segment,
                file,
                offset: MAGIC.len() as u64,
                segment_bytes,
                last_commit: start,
                in_transaction: false,
                relations: BTreeMap::new(),
                end,
                dirty: false,
            });
        };
        // Recover the newest segment: keep everything up to the last transaction boundary.
        let path = segment_path(dir, newest);
        let mut reader = BufReader::new(File::open(&path).map_err(io_err(&path))?);
        let mut magic = [0u8; 8];
        let header_ok = reader.read_exact(&mut magic).is_ok() && &magic == MAGIC;
        let mut offset = MAGIC.len() as u64;
        let mut keep = offset;
        let mut last_commit = newest;
        let mut relations = BTreeMap::new();
        let mut pending_relations = Vec::new();
        let mut in_transaction = false;
        if header_ok {
            while let Ok(Ok(Some((record, len)))) = read_record(&mut reader) {
                offset += len;
                if record.is_begin() {
                    in_transaction = true;
                } else if record.is_commit() {
                    in_transaction = false;
                    last_commit = record.pos;
                }
                if let Some(id) = record.relation_id() {
                    pending_relations.push((id, record));
                }
                if !in_transaction {
                    keep = offset;
                    relations.extend(pending_relations.drain(..));
                }
            }
        }
        drop(reader);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        if !header_ok {
            file.set_len(0).map_err(io_err(&path))?;
            let mut w = &file;
            w.write_all(MAGIC).map_err(io_err(&path))?;
        } else {
            let len = file.metadata().map_err(io_err(&path))?.len();
            if len != keep {
                tracing::info!(
                    segment = %path.display(),
                    "change log: dropping {} bytes after the last complete transaction (left by an interrupted run; the source sends them again)",
                    len - keep
                );
                file.set_len(keep).map_err(io_err(&path))?;
            }
        }
        file.sync_all().map_err(io_err(&path))?;
        let mut file = BufWriter::with_capacity(1 << 20, file);
        file.seek(SeekFrom::Start(keep)).map_err(io_err(&path))?;
        let (end, _) = watch::channel(LogEnd {
            segment: newest,
            offset: keep,
        });
        Ok(ChangeLog {
            dir: dir.to_owned(),
            segment: newest,
            file,
            offset: keep,
            segment_bytes,
            last_commit,
            in_transaction: false,
            relations,
            end,
            dirty: false,
        })
    }

    /// Commit position of the last complete transaction written.
    pub fn last_commit(&self) -> u64 {
        self.last_commit
    }

    pub fn in_transaction(&self) -> bool {
        self.in_transaction
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn subscribe(&self) -> watch::Receiver<LogEnd> {
        self.end.subscribe()
    }

    /// Append a record (buffered). Readers see it after the next [`ChangeLog::publish`].
    pub fn append(&mut self, kind: RecordKind, pos: u64, payload: &[u8]) -> Result<()> {
        let record = Record {
            kind,
            pos,
            payload: Bytes::copy_from_slice(payload),
        };
        if record.is_begin() {
            self.in_transaction = true;
        }
        self.write_record(&record)?;
        if let Some(id) = record.relation_id() {
            self.relations.insert(id, record.clone());
        }
        if record.is_commit() {
            self.in_transaction = false;
            self.last_commit = pos;
            if self.offset >= self.segment_bytes {
                self.rotate()?;
            }
        }
        Ok(())
    }

    fn write_record(&mut self, record: &Record) -> Result<()> {
        let path = segment_path(&self.dir, self.segment);
        let kind = [record.kind as u8];
        let pos = record.pos.to_be_bytes();
        let crc = crc32c(&[&kind, &pos, &record.payload]);
        let w = &mut self.file;
        (|| {
            w.write_all(&(record.payload.len() as u32).to_be_bytes())?;
            w.write_all(&crc.to_be_bytes())?;
            w.write_all(&kind)?;
            w.write_all(&pos)?;
            w.write_all(&record.payload)
        })()
        .map_err(io_err(&path))?;
        self.offset += (HEADER + record.payload.len()) as u64;
        self.dirty = true;
        Ok(())
    }

    /// Hand everything appended so far to the OS and let readers see it.
    pub fn publish(&mut self) -> Result<()> {
        let path = segment_path(&self.dir, self.segment);
        self.file.flush().map_err(io_err(&path))?;
        self.end.send_replace(LogEnd {
            segment: self.segment,
            offset: self.offset,
        });
        Ok(())
    }

    /// Make everything appended durable (and visible to readers).
    pub fn sync(&mut self) -> Result<()> {
        self.publish()?;
        if self.dirty {
            let path = segment_path(&self.dir, self.segment);
            self.file.get_ref().sync_data().map_err(io_err(&path))?;
            self.dirty = false;
        }
        Ok(())
    }

    fn rotate(&mut self) -> Result<()> {
        self.sync()?;
        let (segment, file) = create_segment(&self.dir, self.last_commit)?;
        self.segment = segment;
        self.file = file;
        self.offset = MAGIC.len() as u64;
        let relations: Vec<Record> = self.relations.values().cloned().collect();
        for r in &relations {
            self.write_record(r)?;
        }
        self.sync()?;
        // The directory entry of the new segment must survive a crash too.
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Bytes held in the log's segments.
    pub fn disk_bytes(dir: &Path) -> u64 {
        segments(dir)
            .unwrap_or_default()
            .iter()
            .filter_map(|n| fs::metadata(segment_path(dir, *n)).ok())
            .map(|m| m.len())
            .sum()
    }
}

/// Delete segments whose every transaction is at or before `applied`; never the newest (the
/// writer's). Safe to call from another task than the writer's.
pub fn remove_applied(dir: &Path, applied: u64) -> Result<usize> {
    let names = segments(dir)?;
    let mut removed = 0;
    for pair in names.windows(2) {
        if pair[1] <= applied {
            let path = segment_path(dir, pair[0]);
            fs::remove_file(&path).map_err(io_err(&path))?;
            removed += 1;
        }
    }
    Ok(removed)
}

fn create_segment(dir: &Path, name: u64) -> Result<(u64, BufWriter<File>)> {
    let path = segment_path(dir, name);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .read(true)
        .open(&path)
        .map_err(io_err(&path))?;
    file.write_all(MAGIC).map_err(io_err(&path))?;
    file.sync_all().map_err(io_err(&path))?;
    Ok((name, BufWriter::with_capacity(1 << 20, file)))
}

/// A reader: from the segment holding the first transaction after a position, forward, waiting
/// for the writer when it reaches the published end.
pub struct LogReader {
    dir: PathBuf,
    segment: u64,
    file: BufReader<File>,
    offset: u64,
    end: watch::Receiver<LogEnd>,
}

impl LogReader {
    /// Start at the segment that holds the transactions after `from` (earlier ones in that
    /// segment are read too: the caller skips them by commit position).
    pub fn open(dir: &Path, from: u64, end: watch::Receiver<LogEnd>) -> Result<LogReader> {
        let names = segments(dir)?;
        let segment = match names.iter().rev().find(|n| **n <= from) {
            Some(n) => *n,
            None => {
                return Err(LogError::Missing {
                    dir: dir.to_owned(),
                    from,
                    oldest: names.first().copied().unwrap_or(0),
                });
            }
        };
        let (file, offset) = open_segment(dir, segment)?;
        Ok(LogReader {
            dir: dir.to_owned(),
            segment,
            file,
            offset,
            end,
        })
    }

    /// The next record if the writer has published one; `None` when caught up.
    pub fn try_next(&mut self) -> Result<Option<Record>> {
        loop {
            let end = *self.end.borrow_and_update();
            let here = LogEnd {
                segment: self.segment,
                offset: self.offset,
            };
            if here >= end {
                return Ok(None);
            }
            let path = segment_path(&self.dir, self.segment);
            match read_record(&mut self.file).map_err(io_err(&path))? {
                Ok(Some((record, len))) => {
                    self.offset += len;
                    return Ok(Some(record));
                }
                Ok(None) if end.segment > self.segment => {
                    // This segment is finished: move to the next one.
                    let names = segments(&self.dir)?;
                    let Some(next) = names.iter().find(|n| **n > self.segment).copied() else {
                        return Err(LogError::Corrupt {
                            path,
                            offset: self.offset,
                            what: "the next segment is missing",
                        });
                    };
                    let (file, offset) = open_segment(&self.dir, next)?;
                    self.segment = next;
                    self.file = file;
                    self.offset = offset;
                }
                Ok(None) => return Ok(None),
                Err(what) => {
                    return Err(LogError::Corrupt {
                        path,
                        offset: self.offset,
                        what,
                    });
                }
            }
        }
    }

    /// The next record, waiting for the writer; `None` once the writer is gone and everything
    /// it published has been read.
    pub async fn next(&mut self) -> Result<Option<Record>> {
        loop {
            if let Some(r) = self.try_next()? {
                return Ok(Some(r));
            }
            if self.end.changed().await.is_err() {
                return self.try_next();
            }
        }
    }

    /// Wait until the writer publishes something new (or is gone).
    pub async fn changed(&mut self) -> bool {
        self.end.changed().await.is_ok()
    }
}

fn open_segment(dir: &Path, name: u64) -> Result<(BufReader<File>, u64)> {
    let path = segment_path(dir, name);
    let mut file = BufReader::with_capacity(1 << 20, File::open(&path).map_err(io_err(&path))?);
    let mut magic = [0u8; 8];
    file.read_exact(&mut magic).map_err(io_err(&path))?;
    if &magic != MAGIC {
        return Err(LogError::Corrupt {
            path,
            offset: 0,
            what: "not a kuaka change log segment",
        });
    }
    Ok((file, MAGIC.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn begin(lsn: u64) -> Vec<u8> {
        let mut v = vec![b'B'];
        v.extend(lsn.to_be_bytes());
        v.extend(0i64.to_be_bytes());
        v.extend(7u32.to_be_bytes());
        v
    }

    fn txn(log: &mut ChangeLog, commit: u64, rows: usize) {
        log.append(RecordKind::PgOutput, commit - 10, &begin(commit))
            .unwrap();
        for i in 0..rows {
            log.append(RecordKind::PgOutput, commit - 5, format!("I{i}").as_bytes())
                .unwrap();
        }
        log.append(RecordKind::PgOutput, commit, b"C").unwrap();
    }

    fn read_all(dir: &Path, from: u64, log: &ChangeLog) -> Vec<Record> {
        let mut r = LogReader::open(dir, from, log.subscribe()).unwrap();
        let mut out = Vec::new();
        while let Some(rec) = r.try_next().unwrap() {
            out.push(rec);
        }
        out
    }

    #[test]
    fn crc32c_known_value() {
        assert_eq!(crc32c(&[b"123456789"]), 0xE306_9283);
        assert_eq!(crc32c(&[b"1234", b"56789"]), 0xE306_9283);
    }

    #[test]
    fn readers_see_only_published_records_across_rotations() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = ChangeLog::open(dir.path(), 100, 200).unwrap();
        log.append(RecordKind::PgOutput, 1, b"R\0\0\0\x05rel")
            .unwrap();
        assert!(read_all(dir.path(), 100, &log).is_empty(), "unpublished");
        for c in 1..=10 {
            txn(&mut log, 100 + c * 100, 3);
        }
        log.sync().unwrap();
        let all = read_all(dir.path(), 100, &log);
        let commits: Vec<u64> = all
            .iter()
            .filter(|r| r.is_commit())
            .map(|r| r.pos)
            .collect();
        assert_eq!(commits, (1..=10).map(|c| 100 + c * 100).collect::<Vec<_>>());
        assert!(segments(dir.path()).unwrap().len() > 3, "rotated");
        // Every segment repeats the relation, so a late reader still learns it.
        let late = read_all(dir.path(), 900, &log);
        assert!(late[0].relation_id() == Some(5), "{:?}", late[0]);
        assert!(late.iter().filter(|r| r.is_commit()).all(|r| r.pos >= 900));
        // Removing applied segments keeps what is needed after the applied position.
        remove_applied(dir.path(), 700).unwrap();
        let after = read_all(dir.path(), 700, &log);
        assert!(after.iter().any(|r| r.is_commit() && r.pos == 800));
        assert!(matches!(
            LogReader::open(dir.path(), 150, log.subscribe()),
            Err(LogError::Missing { .. })
        ));
    }

    #[test]
    fn reopening_cuts_torn_records_and_open_transactions() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = ChangeLog::open(dir.path(), 0, SEGMENT_BYTES).unwrap();
        txn(&mut log, 100, 2);
        txn(&mut log, 200, 2);
        // An unfinished transaction, then a torn record.
        log.append(RecordKind::PgOutput, 250, &begin(300)).unwrap();
        log.append(RecordKind::PgOutput, 260, b"I-lost").unwrap();
        log.sync().unwrap();
        let path = segment_path(dir.path(), 0);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[0, 0, 0, 9, 1, 2, 3]).unwrap();
        drop(f);
        drop(log);
        let mut log = ChangeLog::open(dir.path(), 0, SEGMENT_BYTES).unwrap();
        assert_eq!(log.last_commit(), 200);
        txn(&mut log, 300, 1);
        log.sync().unwrap();
        let all = read_all(dir.path(), 0, &log);
        assert!(!all.iter().any(|r| &r.payload[..] == b"I-lost"));
        let commits: Vec<u64> = all
            .iter()
            .filter(|r| r.is_commit())
            .map(|r| r.pos)
            .collect();
        assert_eq!(commits, vec![100, 200, 300]);
    }

    #[test]
    fn a_flipped_byte_is_caught_by_the_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = ChangeLog::open(dir.path(), 0, SEGMENT_BYTES).unwrap();
        txn(&mut log, 100, 2);
        txn(&mut log, 200, 2);
        log.sync().unwrap();
        let path = segment_path(dir.path(), 0);
        let mut bytes = fs::read(&path).unwrap();
        let at = bytes.len() - 3;
        bytes[at] ^= 0x40;
        fs::write(&path, &bytes).unwrap();
        drop(log);
        // The writer recovers to the last good transaction ...
        let log = ChangeLog::open(dir.path(), 0, SEGMENT_BYTES).unwrap();
        assert_eq!(log.last_commit(), 100);
    }
}
