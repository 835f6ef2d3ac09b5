//! The canonical, engine-independent encoding of a value as the target column's type holds
//! it. Both sides of a comparison are encoded by the *target* column's model type, so a
//! source value and the value kuaka wrote for it encode to the same bytes exactly when they
//! mean the same: `1.10` and `1.1` in a decimal column, `2020-01-01 00:00:00.5` and
//! `2020-01-01 00:00:00.500000` in a timestamp, `{"b":1,"a":2}` and `{"a": 2, "b": 1}` in
//! JSON, MySQL's `1` and PostgreSQL's `t` in a boolean. Anything else differs, including
//! `NULL` vs `''`, a trailing space in a `varchar`, one microsecond, `1.10` vs `1.11`.
//!
//! A value that cannot be read as the column's type (text `abc` in an integer column) is
//! encoded by its storage class and bytes, so it still compares, and differs from every
//! value that does fit.

use crate::engine::postgres::rows::{civil_from_days, float_text, value_text as text_of};
use crate::model::DataType;
use crate::model::value::Value;

/// How a column's values are compared.
#[derive(Clone, Debug, PartialEq)]
pub enum Canon {
    /// By the meaning of the model type.
    Typed(DataType),
    /// Exactly: storage class and bytes (SQLite to SQLite, where a column may hold any class).
    Exact,
}

const NULL: u8 = 0;
const BOOL: u8 = 1;
const INT: u8 = 2;
const DECIMAL: u8 = 3;
const FLOAT: u8 = 4;
const TEMPORAL: u8 = 5;
const TEXT: u8 = 6;
const BYTES: u8 = 7;
const JSON: u8 = 8;
const RAW: u8 = 9;

fn push(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Append the encoding of `value` in a column compared by `canon`.
pub fn encode(value: &Value, canon: &Canon, out: &mut Vec<u8>) {
    if *value == Value::Null {
        out.push(NULL);
        return;
    }
    // The common cases, written without an intermediate copy (same bytes as `typed`).
    if let Canon::Typed(t) = canon {
        match (t, value) {
            (DataType::Int16 | DataType::Int32 | DataType::Int64, Value::Int(i)) => {
                push(out, INT, &(*i as i128).to_be_bytes());
                return;
            }
            (DataType::Text | DataType::Varchar { .. }, Value::Text(s)) => {
                push(out, TEXT, s.as_bytes());
                return;
            }
            (DataType::Char { .. }, Value::Text(s)) => {
                push(out, TEXT, s.trim_end_matches(' ').as_bytes());
                return;
            }
            (DataType::Bytes, Value::Bytes(b)) => {
                push(out, BYTES, b);
                return;
            }
            _ => {}
        }
    }
    let typed = match canon {
        Canon::Exact => None,
        Canon::Typed(t) => typed(value, t),
    };
    match typed {
        Some((tag, bytes)) => push(out, tag, &bytes),
        None => raw(value, out),
    }
}

/// Append the encoding of a text value: the same bytes as `encode(&Value::Text(s.into()))`,
/// without the copy for the common column types.
pub fn encode_str(s: &str, canon: &Canon, out: &mut Vec<u8>) {
    if let Canon::Typed(t) = canon {
        match t {
            DataType::Text | DataType::Varchar { .. } => return push(out, TEXT, s.as_bytes()),
            DataType::Char { .. } => return push(out, TEXT, s.trim_end_matches(' ').as_bytes()),
            DataType::Int16 | DataType::Int32 | DataType::Int64 => {
                if let Ok(i) = s.trim().parse::<i128>() {
                    return push(out, INT, &i.to_be_bytes());
                }
            }
            _ => {}
        }
    }
    encode(&Value::Text(s.to_owned()), canon, out)
}

/// Append the encoding of a binary value: the same bytes as `encode(&Value::Bytes(b.into()))`.
pub fn encode_bytes(b: &[u8], canon: &Canon, out: &mut Vec<u8>) {
    if *canon == Canon::Typed(DataType::Bytes) {
        return push(out, BYTES, b);
    }
    encode(&Value::Bytes(b.to_vec()), canon, out)
}

/// A row's encoding, built cell by cell: its digest and its key's bytes come from one
/// buffer, so rows read as values and rows read as raw cells give the same bytes.
#[derive(Default)]
pub struct RowEncoder {
    buf: Vec<u8>,
    /// Where each cell's encoding ends.
    ends: Vec<usize>,
}

impl RowEncoder {
    /// Start a row.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.ends.clear();
    }

    /// The buffer the next cell is encoded into; call [`RowEncoder::end_cell`] after it.
    pub fn cell(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    pub fn end_cell(&mut self) {
        self.ends.push(self.buf.len());
    }

    /// Encode one value as the next cell.
    pub fn value(&mut self, value: &Value, canon: &Canon) {
        encode(value, canon, &mut self.buf);
        self.end_cell();
    }

    /// Append the key's bytes: the encodings of the cells at `key_at`, in that order.
    pub fn key_into(&self, key_at: &[usize], out: &mut Vec<u8>) {
        for &k in key_at {
            let start = if k == 0 { 0 } else { self.ends[k - 1] };
            out.extend_from_slice(&self.buf[start..self.ends[k]]);
        }
    }

    /// The digest of the whole row.
    pub fn digest(&self) -> u128 {
        digest(&self.buf)
    }
}

/// Storage class and bytes.
fn raw(value: &Value, out: &mut Vec<u8>) {
    let (class, bytes): (u8, Vec<u8>) = match value {
        Value::Null => (0, Vec::new()),
        Value::Int(i) => (1, i.to_string().into_bytes()),
        Value::UInt(u) => (1, u.to_string().into_bytes()),
        Value::Float(f) => (2, f.to_bits().to_le_bytes().to_vec()),
        Value::Decimal(d) => (3, d.as_bytes().to_vec()),
        Value::Text(t) | Value::Native(t) => (4, t.as_bytes().to_vec()),
        Value::Bool(b) => (5, vec![u8::from(*b)]),
        Value::Bytes(b) => (6, b.clone()),
    };
    let mut tagged = vec![class];
    tagged.extend_from_slice(&bytes);
    push(out, RAW, &tagged);
}

fn typed(value: &Value, t: &DataType) -> Option<(u8, Vec<u8>)> {
    match t {
        DataType::Bool => {
            let b = match value {
                Value::Bool(b) => *b,
                Value::Int(0) | Value::UInt(0) => false,
                Value::Int(1) | Value::UInt(1) => true,
                Value::Text(t) => match t.trim().to_ascii_lowercase().as_str() {
                    "t" | "true" | "1" | "yes" | "y" | "on" => true,
                    "f" | "false" | "0" | "no" | "n" | "off" => false,
                    _ => return None,
                },
                _ => return None,
            };
            Some((BOOL, vec![u8::from(b)]))
        }
        DataType::Int16 | DataType::Int32 | DataType::Int64 => {
            let i: i128 = match value {
                Value::Int(i) => *i as i128,
                Value::UInt(u) => *u as i128,
                Value::Bool(b) => i128::from(*b),
                Value::Float(f) if f.fract() == 0.0 && f.abs() < 1.7e38 => *f as i128,
                Value::Text(t) | Value::Decimal(t) => t.trim().parse().ok()?,
                _ => return None,
            };
            Some((INT, i.to_be_bytes().to_vec()))
        }
        DataType::Numeric { .. } | DataType::Money => {
            let text = match value {
                Value::Float(f) if f.is_finite() => float_text(*f),
                Value::Bool(_) | Value::Bytes(_) => return None,
                other => text_of(other)?,
            };
            decimal(&text).map(|d| (DECIMAL, d.into_bytes()))
        }
        DataType::Float32 | DataType::Float64 => {
            let f: f64 = match value {
                Value::Float(f) => *f,
                Value::Int(i) => *i as f64,
                Value::UInt(u) => *u as f64,
                Value::Text(t) | Value::Decimal(t) => match t.trim() {
                    "NaN" => f64::NAN,
                    "Infinity" | "inf" => f64::INFINITY,
                    "-Infinity" | "-inf" => f64::NEG_INFINITY,
                    s => s.parse().ok()?,
                },
                _ => return None,
            };
            let f = if *t == DataType::Float32 {
                f as f32 as f64
            } else {
                f
            };
            // One zero and one NaN.
            let f = if f == 0.0 {
                0.0
            } else if f.is_nan() {
                f64::NAN
            } else {
                f
            };
            Some((FLOAT, f.to_bits().to_le_bytes().to_vec()))
        }
        DataType::Date | DataType::Timestamp | DataType::TimestampTz | DataType::Time => {
            temporal(value, t).map(|s| (TEMPORAL, s.into_bytes()))
        }
        DataType::Char { .. } => {
            // Fixed width: trailing spaces are padding on every engine.
            let s = text_of(value)?;
            Some((TEXT, s.trim_end_matches(' ').as_bytes().to_vec()))
        }
        DataType::Bytes => match value {
            Value::Bytes(b) => Some((BYTES, b.clone())),
            other => text_of(other).map(|s| (BYTES, s.into_bytes())),
        },
        DataType::Json | DataType::Jsonb => {
            let s = text_of(value)?;
            let parsed: serde_json::Value = serde_json::from_str(&s).ok()?;
            let mut out = String::new();
            canonical_json(&parsed, &mut out);
            Some((JSON, out.into_bytes()))
        }
        // MySQL TIME → interval: `26:00:00` and `26:00:00.000000` are one duration.
        DataType::Interval => {
            let s = text_of(value)?;
            Some(match time_of_day(s.trim()) {
                Some(us) => (TEMPORAL, format_time(us).into_bytes()),
                None => (TEXT, s.into_bytes()),
            })
        }
        DataType::Uuid => {
            text_of(value).map(|s| (TEXT, s.trim().to_ascii_lowercase().into_bytes()))
        }
        _ => text_of(value).map(|s| (TEXT, s.into_bytes())),
    }
}

/// A decimal number's text without sign of zero, leading zeros or trailing fractional zeros
/// (`-0012.3400` → `-12.34`, `1e3` → `1000`); `None` when it is not a number.
pub fn decimal(text: &str) -> Option<String> {
    let t = text.trim();
    if matches!(t, "NaN" | "Infinity" | "-Infinity") {
        return Some(t.to_owned());
    }
    let (negative, t) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let (mantissa, exponent) = match t.find(['e', 'E']) {
        Some(i) => (&t[..i], t[i + 1..].parse::<i32>().ok()?),
        None => (t, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty() && frac.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    // value = 0.<significant digits> × 10^exp10
    let all = format!("{int}{frac}");
    let Some(first) = all.find(|c: char| c != '0') else {
        return Some("0".into());
    };
    let exp10 = int.len() as i64 + exponent as i64 - first as i64;
    let digits = all[first..].trim_end_matches('0');
    let body = if exp10 <= 0 {
        format!("0.{}{digits}", "0".repeat((-exp10) as usize))
    } else if exp10 as usize >= digits.len() {
        format!("{digits}{}", "0".repeat(exp10 as usize - digits.len()))
    } else {
        format!(
            "{}.{}",
            &digits[..exp10 as usize],
            &digits[exp10 as usize..]
        )
    };
    Some(if negative { format!("-{body}") } else { body })
}

/// A date, time or timestamp as fixed-width text (`YYYY-MM-DD`, `HH:MM:SS.ffffff` with hours
/// beyond 24 and a sign kept, `YYYY-MM-DD HH:MM:SS.ffffff` in UTC for `timestamptz`): integers
/// are Unix seconds and reals Julian days (SQLite's conventions, as the copy reads them).
fn temporal(value: &Value, t: &DataType) -> Option<String> {
    let text = match value {
        Value::Int(secs) => return Some(from_unix_micros(*secs as i128 * 1_000_000, t)),
        Value::Float(jd) if jd.is_finite() => {
            let micros = ((jd - 2_440_587.5) * 86_400.0 * 1e6).round() as i128;
            return Some(from_unix_micros(micros, t));
        }
        Value::Text(s) => s.trim().to_owned(),
        _ => return None,
    };
    if *t == DataType::Time {
        return time_of_day(&text).map(format_time);
    }
    let (date, rest) = text.split_at(text.find([' ', 'T']).unwrap_or(text.len()));
    let days = days_from_civil_text(date)?;
    if *t == DataType::Date {
        // A date column keeps only the date of a timestamp-looking text.
        let (y, m, d) = civil_from_days(days);
        return Some(format!("{y:04}-{m:02}-{d:02}"));
    }
    let rest = rest.trim_start_matches([' ', 'T']);
    // Split an offset (`+02`, `-05:30`, `Z`) from the time.
    let (clock, offset_secs) = match rest.rfind(['+', '-']) {
        Some(i) if i > 0 => (&rest[..i], offset(&rest[i..])?),
        _ => match rest.strip_suffix('Z') {
            Some(c) => (c, 0),
            None => (rest, 0),
        },
    };
    let in_day = if clock.is_empty() {
        0
    } else {
        time_of_day(clock)?
    };
    let mut micros = days as i128 * 86_400_000_000 + in_day as i128;
    if *t == DataType::TimestampTz {
        micros -= offset_secs as i128 * 1_000_000;
    }
    Some(from_unix_micros(micros, t))
}

fn offset(s: &str) -> Option<i64> {
    let sign = if s.starts_with('-') { -1 } else { 1 };
    let body = &s[1..];
    let mut parts = body.split(':');
    let h: i64 = parts.next()?.parse().ok()?;
    let m: i64 = parts.next().map(|m| m.parse().ok()).unwrap_or(Some(0))?;
    let sec: i64 = parts.next().map(|m| m.parse().ok()).unwrap_or(Some(0))?;
    Some(sign * (h * 3600 + m * 60 + sec))
}

/// `[-]H+:MM[:SS[.f]]` → microseconds.
fn time_of_day(s: &str) -> Option<i64> {
    let (negative, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let mut parts = s.split(':');
    let h: i64 = parts.next()?.parse().ok()?;
    let m: i64 = parts.next()?.parse().ok()?;
    let (sec, frac) = match parts.next() {
        Some(sec) => sec.split_once('.').unwrap_or((sec, "")),
        None => ("0", ""),
    };
    if parts.next().is_some() || frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let s: i64 = sec.parse().ok()?;
    let us: i64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<6}").parse().ok()?
    };
    let total = ((h * 60 + m) * 60 + s) * 1_000_000 + us;
    Some(if negative { -total } else { total })
}

fn format_time(us: i64) -> String {
    let sign = if us < 0 { "-" } else { "" };
    let us = us.unsigned_abs();
    format!(
        "{sign}{:02}:{:02}:{:02}.{:06}",
        us / 3_600_000_000,
        us / 60_000_000 % 60,
        us / 1_000_000 % 60,
        us % 1_000_000
    )
}

fn days_from_civil_text(date: &str) -> Option<i64> {
    let mut parts = date.splitn(3, '-');
    let y: i64 = parts.next()?.parse().ok()?;
    let m: i64 = parts.next()?.parse().ok()?;
    let d: i64 = parts.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    // Days from civil (proleptic Gregorian), the inverse of `civil_from_days`.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

fn from_unix_micros(micros: i128, t: &DataType) -> String {
    if *t == DataType::Time {
        return format_time(micros.rem_euclid(86_400_000_000) as i64);
    }
    let days = micros.div_euclid(86_400_000_000) as i64;
    let in_day = micros.rem_euclid(86_400_000_000) as i64;
    let (y, m, d) = civil_from_days(days);
    if *t == DataType::Date {
        return format!("{y:04}-{m:02}-{d:02}");
    }
    format!("{y:04}-{m:02}-{d:02} {}", format_time(in_day))
}

/// JSON with object keys sorted, no insignificant whitespace, numbers in their shortest form
/// (`1.0` and `1` stay different only if the engines keep them different; both are read as
/// the same f64 here when they are not integers).
fn canonical_json(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push(':');
                canonical_json(&map[k], out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(item, out);
            }
            out.push(']');
        }
        serde_json::Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => {
                out.push_str(&decimal(&float_text(f)).unwrap_or(n.to_string()))
            }
            _ => out.push_str(&n.to_string()),
        },
        other => out.push_str(&other.to_string()),
    }
}

/// The 128-bit digest of an encoded row.
pub fn digest(encoded: &[u8]) -> u128 {
    twox_hash::XxHash3_128::oneshot(encoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(v: Value, t: DataType) -> Vec<u8> {
        let mut out = Vec::new();
        encode(&v, &Canon::Typed(t), &mut out);
        out
    }

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    #[test]
    fn decimals_compare_by_value() {
        assert_eq!(decimal("-0012.3400").as_deref(), Some("-12.34"));
        assert_eq!(decimal("1.10"), decimal("1.1"));
        assert_ne!(decimal("1.10"), decimal("1.11"));
        assert_eq!(decimal("1e3").as_deref(), Some("1000"));
        assert_eq!(decimal("0.000").as_deref(), Some("0"));
        assert_eq!(decimal("-0").as_deref(), Some("0"));
        assert_eq!(decimal("0.05").as_deref(), Some("0.05"));
        assert_eq!(decimal("12.5e-3").as_deref(), Some("0.0125"));
        assert_eq!(decimal("100").as_deref(), Some("100"));
        assert_eq!(decimal("abc"), None);
    }

    #[test]
    fn same_meaning_same_bytes_and_real_differences_differ() {
        let num = DataType::Numeric {
            precision: Some(10),
            scale: Some(2),
        };
        assert_eq!(
            enc(Value::Decimal("1.10".into()), num.clone()),
            enc(text("1.1"), num.clone())
        );
        assert_ne!(enc(text("1.10"), num.clone()), enc(text("1.11"), num));
        assert_eq!(
            enc(Value::Int(1), DataType::Bool),
            enc(text("t"), DataType::Bool)
        );
        let ts = DataType::Timestamp;
        assert_eq!(
            enc(text("2020-01-01 00:00:00.5"), ts.clone()),
            enc(text("2020-01-01T00:00:00.500000"), ts.clone())
        );
        assert_ne!(
            enc(text("2020-01-01 00:00:00"), ts.clone()),
            enc(text("2020-01-01 00:00:00.000001"), ts.clone())
        );
        assert_eq!(
            enc(Value::Int(86_400), ts.clone()),
            enc(text("1970-01-02 00:00:00"), ts)
        );
        let tz = DataType::TimestampTz;
        assert_eq!(
            enc(text("2020-01-01 02:00:00+02"), tz.clone()),
            enc(text("2020-01-01 00:00:00+00"), tz.clone())
        );
        assert_eq!(
            enc(text("2020-01-01 00:00:00"), tz.clone()),
            enc(text("2020-01-01 00:00:00Z"), tz)
        );
        assert_eq!(
            enc(text("26:00:00"), DataType::Time),
            enc(text("26:00:00.000000"), DataType::Time)
        );
        let j = DataType::Jsonb;
        assert_eq!(
            enc(text(r#"{"b":1,"a":[2, 3.5]}"#), j.clone()),
            enc(text(r#"{"a": [2, 3.50], "b": 1}"#), j)
        );
        // NULL vs '', trailing space in varchar, padding in char.
        let vc = DataType::Varchar { length: Some(5) };
        assert_ne!(enc(Value::Null, vc.clone()), enc(text(""), vc.clone()));
        assert_ne!(enc(text("a "), vc.clone()), enc(text("a"), vc));
        let ch = DataType::Char { length: Some(3) };
        assert_eq!(enc(text("a  "), ch.clone()), enc(text("a"), ch));
        // Floats: real widened, zero signs and NaNs folded.
        assert_eq!(
            enc(Value::Float(0.1), DataType::Float32),
            enc(text("0.1"), DataType::Float32)
        );
        assert_eq!(
            enc(Value::Float(-0.0), DataType::Float64),
            enc(Value::Float(0.0), DataType::Float64)
        );
        // Not readable as the type: still compared, never equal to a readable value.
        assert_ne!(
            enc(text("abc"), DataType::Int64),
            enc(Value::Int(0), DataType::Int64)
        );
        // Exact: storage classes differ.
        let mut a = Vec::new();
        let mut b = Vec::new();
        encode(&Value::Int(1), &Canon::Exact, &mut a);
        encode(&text("1"), &Canon::Exact, &mut b);
        assert_ne!(a, b);
    }

    /// The copy-free encoders give the bytes of the value encoder, for every column type.
    #[test]
    fn encode_str_and_bytes_match_encode() {
        let types = [
            DataType::Bool,
            DataType::Int16,
            DataType::Int32,
            DataType::Int64,
            DataType::Float64,
            DataType::Numeric {
                precision: Some(10),
                scale: Some(2),
            },
            DataType::Char { length: Some(4) },
            DataType::Varchar { length: Some(4) },
            DataType::Text,
            DataType::Bytes,
            DataType::Date,
            DataType::Timestamp,
            DataType::TimestampTz,
            DataType::Uuid,
            DataType::Jsonb,
        ];
        let samples = [
            "",
            " ",
            "t",
            "true",
            "0",
            " 42 ",
            "-7",
            "170141183460469231731687303715884105727",
            "1.10",
            "abc ",
            "é😀\t",
            "2020-01-01 00:00:00.5",
            "2020-01-01 02:00:00+02",
            "{\"b\":1,\"a\":2}",
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "\\x00ff",
        ];
        let mut canons: Vec<Canon> = types.into_iter().map(Canon::Typed).collect();
        canons.push(Canon::Exact);
        for canon in &canons {
            for s in samples {
                let (mut a, mut b) = (Vec::new(), Vec::new());
                encode(&text(s), canon, &mut a);
                encode_str(s, canon, &mut b);
                assert_eq!(a, b, "{s:?} as {canon:?}");
                let (mut a, mut b) = (Vec::new(), Vec::new());
                encode(&Value::Bytes(s.as_bytes().to_vec()), canon, &mut a);
                encode_bytes(s.as_bytes(), canon, &mut b);
                assert_eq!(a, b, "bytes {s:?} as {canon:?}");
            }
        }
    }
}
