//! Binary `COPY` into PostgreSQL for MySQL/MariaDB snapshot chunks whose columns are all of
//! plain kinds (integers, booleans, character data, dates, datetimes).
//!
//! PostgreSQL parses binary rows with less work than text rows (about 30 % less server CPU
//! for a sysbench table on this machine's PostgreSQL 15), and on a box shared by both servers
//! the target's CPU is what a MySQL → PostgreSQL copy waits for. Values are read from the
//! MySQL text protocol; anything the fast parsers do not take as it is (zero dates, text that
//! is not plain UTF-8, out-of-range numbers) goes through the same decoding and rendering as
//! the text copy, so policies and error messages stay the same.

use crate::engine::mysql::catalog::{Kind, MyColumn};
use crate::engine::mysql::decode;
use crate::engine::postgres::rows::{self as pgrows, Rendered};
use crate::model::DataType;

/// Start of every binary COPY stream: signature, flags, header extension length.
pub const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// End of a binary COPY stream.
pub const TRAILER: &[u8] = &[0xff, 0xff];

/// Days from 1970-01-01 to PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH_DAYS: i64 = 10_957;

/// How one column is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinKind {
    Int2,
    Int4,
    Int8,
    Bool,
    Text,
    Date,
    Timestamp,
}

/// The binary form of each copied column, or `None` when some column needs the text copy.
pub fn kinds(columns: &[&MyColumn], types: &[DataType]) -> Option<Vec<BinKind>> {
    columns
        .iter()
        .zip(types)
        .map(|(c, t)| match (c.kind, t) {
            (Kind::Int { bits, unsigned }, _) if bits == 64 && unsigned => None,
            (Kind::Int { .. } | Kind::Year, DataType::Int16) => Some(BinKind::Int2),
            (Kind::Int { .. }, DataType::Int32) => Some(BinKind::Int4),
            (Kind::Int { .. }, DataType::Int64) => Some(BinKind::Int8),
            (Kind::Bool, DataType::Bool) => Some(BinKind::Bool),
            (
                Kind::Text | Kind::Enum | Kind::Set,
                DataType::Text | DataType::Varchar { .. } | DataType::Char { .. },
            ) => Some(BinKind::Text),
            (Kind::Date, DataType::Date) => Some(BinKind::Date),
            (Kind::Datetime, DataType::Timestamp) => Some(BinKind::Timestamp),
            _ => None,
        })
        .collect()
}

/// Append one field (length word and bytes) for the MySQL text-protocol value `raw`.
pub fn field(
    kind: BinKind,
    column: &MyColumn,
    data_type: &DataType,
    raw: Option<&[u8]>,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    let Some(bytes) = raw else {
        out.extend_from_slice(&(-1i32).to_be_bytes());
        return Ok(());
    };
    if fast(kind, bytes, out) {
        return Ok(());
    }
    // The text copy's way: decode (zero-date policy, charsets), render, then parse that.
    let value = decode::from_text(column, Some(bytes))?;
    let text = match pgrows::render(&value, data_type)? {
        Rendered::Null => {
            out.extend_from_slice(&(-1i32).to_be_bytes());
            return Ok(());
        }
        Rendered::Plain(t) | Rendered::Text(t) => t,
        Rendered::Bytes(_) => return Err(format!("{value:?} is not {}", name(kind))),
    };
    if kind == BinKind::Bool {
        let b = match text.as_str() {
            "true" => b"1",
            "false" => b"0",
            _ => return Err(format!("{text:?} does not fit boolean")),
        };
        if fast(kind, b, out) {
            return Ok(());
        }
    }
    if kind == BinKind::Text && !text.contains('\0') {
        put(out, text.as_bytes());
        return Ok(());
    }
    if fast(kind, text.as_bytes(), out) {
        return Ok(());
    }
    Err(format!("{text:?} does not fit {}", name(kind)))
}

fn name(kind: BinKind) -> &'static str {
    match kind {
        BinKind::Int2 => "smallint",
        BinKind::Int4 => "integer",
        BinKind::Int8 => "bigint",
        BinKind::Bool => "boolean",
        BinKind::Text => "text",
        BinKind::Date => "date",
        BinKind::Timestamp => "timestamp",
    }
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// The value as it is, when it is plainly valid for the kind; false leaves `out` unchanged.
fn fast(kind: BinKind, bytes: &[u8], out: &mut Vec<u8>) -> bool {
    let int = || std::str::from_utf8(bytes).ok()?.parse::<i64>().ok();
    match kind {
        BinKind::Int2 => match int().and_then(|i| i16::try_from(i).ok()) {
            Some(i) => put(out, &i.to_be_bytes()),
            None => return false,
        },
        BinKind::Int4 => match int().and_then(|i| i32::try_from(i).ok()) {
            Some(i) => put(out, &i.to_be_bytes()),
            None => return false,
        },
        BinKind::Int8 => match int() {
            Some(i) => put(out, &i.to_be_bytes()),
            None => return false,
        },
        BinKind::Bool => match bytes {
            b"0" => put(out, &[0]),
            b"1" => put(out, &[1]),
            _ => return false,
        },
        BinKind::Text => {
            if bytes.contains(&0) || std::str::from_utf8(bytes).is_err() {
                return false;
            }
            put(out, bytes);
        }
        BinKind::Date => match date_days(bytes) {
            Some(days) => put(out, &((days - PG_EPOCH_DAYS) as i32).to_be_bytes()),
            None => return false,
        },
        BinKind::Timestamp => match timestamp_micros(bytes) {
            Some(us) => put(out, &us.to_be_bytes()),
            None => return false,
        },
    }
    true
}

fn digits(bytes: &[u8]) -> Option<i64> {
    if bytes.is_empty() || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(bytes.iter().fold(0i64, |n, b| n * 10 + i64::from(b - b'0')))
}

/// Days since 1970-01-01 of a valid `YYYY-MM-DD` (year 1 or later), else `None`.
fn date_days(bytes: &[u8]) -> Option<i64> {
    if bytes.len() != 10 || bytes[4] != b'-' || bytes[7] != b'-' {
        return None;
    }
    let (y, m, d) = (
        digits(&bytes[..4])?,
        digits(&bytes[5..7])?,
        digits(&bytes[8..])?,
    );
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if y < 1 || d < 1 || d > month_days {
        return None;
    }
    // Days from civil (proleptic Gregorian), counting years from March.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

/// Microseconds since 2000-01-01 00:00:00 of `YYYY-MM-DD HH:MM:SS[.f…]`, else `None`.
fn timestamp_micros(bytes: &[u8]) -> Option<i64> {
    if bytes.len() < 19 || bytes[10] != b' ' || bytes[13] != b':' || bytes[16] != b':' {
        return None;
    }
    let days = date_days(&bytes[..10])? - PG_EPOCH_DAYS;
    let (h, mi, s) = (
        digits(&bytes[11..13])?,
        digits(&bytes[14..16])?,
        digits(&bytes[17..19])?,
    );
    if h > 23 || mi > 59 || s > 59 {
        return None;
    }
    let micros = match &bytes[19..] {
        [] => 0,
        [b'.', fraction @ ..] if (1..=6).contains(&fraction.len()) => {
            digits(fraction)? * 10i64.pow(6 - fraction.len() as u32)
        }
        _ => return None,
    };
    Some(((days * 24 + h) * 60 + mi) * 60_000_000 + s * 1_000_000 + micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(kind: BinKind, text: &str) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        fast(kind, text.as_bytes(), &mut out).then(|| out[4..].to_vec())
    }

    #[test]
    fn dates_and_timestamps_count_from_2000() {
        assert_eq!(
            one(BinKind::Date, "2000-01-01"),
            Some(0i32.to_be_bytes().to_vec())
        );
        assert_eq!(
            one(BinKind::Date, "1999-12-31"),
            Some((-1i32).to_be_bytes().to_vec())
        );
        assert_eq!(
            one(BinKind::Date, "2024-02-29"),
            Some(8825i32.to_be_bytes().to_vec())
        );
        assert_eq!(
            one(BinKind::Date, "0001-01-01"),
            Some((-730_119i32).to_be_bytes().to_vec())
        );
        assert_eq!(
            one(BinKind::Date, "9999-12-31"),
            Some(2_921_939i32.to_be_bytes().to_vec())
        );
        for bad in [
            "2023-02-29",
            "1900-02-29",
            "2024-13-01",
            "0000-00-00",
            "2024-04-31",
        ] {
            assert_eq!(one(BinKind::Date, bad), None, "{bad}");
        }
        assert_eq!(
            one(BinKind::Timestamp, "2000-01-01 00:00:01.5"),
            Some(1_500_000i64.to_be_bytes().to_vec())
        );
        assert_eq!(
            one(BinKind::Timestamp, "1999-12-31 23:59:59.999999"),
            Some((-1i64).to_be_bytes().to_vec())
        );
        assert_eq!(one(BinKind::Timestamp, "2000-01-01 24:00:00"), None);
    }

    #[test]
    fn integers_are_range_checked_and_text_must_be_clean() {
        assert_eq!(
            one(BinKind::Int2, "-32768"),
            Some((-32768i16).to_be_bytes().to_vec())
        );
        assert_eq!(one(BinKind::Int2, "32768"), None);
        assert_eq!(one(BinKind::Int4, "4294967295"), None);
        assert_eq!(
            one(BinKind::Int8, "4294967295"),
            Some(4_294_967_295i64.to_be_bytes().to_vec())
        );
        assert_eq!(one(BinKind::Bool, "2"), None);
        assert_eq!(one(BinKind::Text, "a\0b"), None);
        assert_eq!(
            one(BinKind::Text, "é\t\\"),
            Some("é\t\\".as_bytes().to_vec())
        );
    }
}
