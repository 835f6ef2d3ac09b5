//! PostgreSQL as the target of another engine: tables rendered from the model, rows written as
//! typed literals in multi-row upserts, the applied position in `kuaka.row_position` in the
//! same transaction.
//!
//! Type map (source model type → PostgreSQL), documented in the README:
//! integer → `bigint`, boolean → `boolean`, real → `double precision`, decimal(p,s) →
//! `numeric(p,s)`, text of any declared length → `text` (SQLite does not enforce lengths), blob →
//! `bytea`, no declared type → `text`, DATE → `date`, DATETIME/TIMESTAMP → `timestamp`, TIME →
//! `time`.

use crate::model::schema::{DataType, quote_ident, quote_literal};
use crate::model::value::Value;

/// kuaka's bookkeeping on a PostgreSQL target of another engine.
pub const BOOKKEEPING: &str = "CREATE SCHEMA IF NOT EXISTS kuaka;
CREATE TABLE IF NOT EXISTS kuaka.row_position (job_id text PRIMARY KEY, position bigint NOT NULL, applied_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS kuaka.row_copied (job_id text NOT NULL, table_name text NOT NULL, rows bigint NOT NULL, PRIMARY KEY (job_id, table_name));";

/// The PostgreSQL type for a model type of another engine.
pub fn pg_type(data_type: &DataType) -> String {
    match data_type {
        DataType::Bool => "boolean".into(),
        DataType::Int16 => "smallint".into(),
        DataType::Int32 => "integer".into(),
        DataType::Int64 => "bigint".into(),
        DataType::Float32 => "real".into(),
        DataType::Float64 => "double precision".into(),
        DataType::Numeric {
            precision: Some(p),
            scale,
        } => format!("numeric({p},{})", scale.unwrap_or(0)),
        DataType::Numeric { .. } => "numeric".into(),
        DataType::Bytes => "bytea".into(),
        DataType::Date => "date".into(),
        DataType::Time => "time".into(),
        DataType::Timestamp => "timestamp".into(),
        DataType::TimestampTz => "timestamptz".into(),
        DataType::Uuid => "uuid".into(),
        DataType::Json => "json".into(),
        DataType::Jsonb => "jsonb".into(),
        _ => "text".into(),
    }
}

/// A value checked against its column's type, before it is written as an SQL literal or a
/// COPY field.
pub(crate) enum Rendered {
    Null,
    /// Digits or a boolean keyword: valid SQL as they are.
    Plain(String),
    /// Text the column's type parses.
    Text(String),
    Bytes(Vec<u8>),
}

/// A value as a PostgreSQL literal for a column of `data_type`. Values that do not fit the
/// column's type (a word in an integer column of a SQLite table, say) are an error that says
/// what the value is; the caller names the table, column and key.
pub fn literal(value: &Value, data_type: &DataType) -> Result<String, String> {
    Ok(match render(value, data_type)? {
        Rendered::Null => "NULL".into(),
        Rendered::Plain(p) => p,
        Rendered::Text(t) => quote_literal(&t),
        Rendered::Bytes(b) => bytea(&b),
    })
}

/// Text as a field of `COPY ... FROM STDIN` text format: backslash, tab, newline and carriage
/// return escaped.
pub fn copy_escape(text: &str, out: &mut String) {
    // Copy runs between the special bytes whole (they are ASCII, so every cut is at a char
    // boundary); most values have none.
    let bytes = text.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped = match b {
            b'\\' => "\\\\",
            b'\t' => "\\t",
            b'\n' => "\\n",
            b'\r' => "\\r",
            _ => continue,
        };
        out.push_str(&text[start..i]);
        out.push_str(escaped);
        start = i + 1;
    }
    out.push_str(&text[start..]);
}

/// A value as one field of `COPY ... FROM STDIN` text format (`\N` for NULL, backslash,
/// tab, newline and carriage return escaped), checked like [`literal`].
pub fn copy_field(value: &Value, data_type: &DataType, out: &mut String) -> Result<(), String> {
    let escape = copy_escape;
    match render(value, data_type)? {
        Rendered::Null => out.push_str("\\N"),
        Rendered::Plain(p) => out.push_str(&p),
        Rendered::Text(t) => escape(&t, out),
        Rendered::Bytes(b) => {
            // bytea's hex input `\x…`, its backslash escaped for COPY.
            out.push_str("\\\\x");
            for byte in b {
                out.push_str(&format!("{byte:02x}"));
            }
        }
    }
    Ok(())
}

/// A value as text: numbers in their shortest form, blobs only when they are UTF-8, NULL none.
pub fn value_text(v: &Value) -> Option<String> {
    match v {
        Value::Int(i) => Some(i.to_string()),
        Value::UInt(u) => Some(u.to_string()),
        Value::Float(f) => Some(float_text(*f)),
        Value::Decimal(d) => Some(d.clone()),
        Value::Text(t) | Value::Native(t) => Some(t.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Bytes(b) => String::from_utf8(b.clone()).ok(),
        Value::Null => None,
    }
}

pub(crate) fn render(value: &Value, data_type: &DataType) -> Result<Rendered, String> {
    let text_of = value_text;
    let describe = |v: &Value| match v {
        Value::Text(t) => format!("text {t:?}"),
        Value::Bytes(b) => format!("a {}-byte blob", b.len()),
        other => format!("{other:?}"),
    };
    if *value == Value::Null {
        return Ok(Rendered::Null);
    }
    let bad = || {
        Err(format!(
            "{} does not fit {}",
            describe(value),
            pg_type(data_type)
        ))
    };
    match data_type {
        DataType::Int16 | DataType::Int32 | DataType::Int64 => match value {
            Value::Int(i) => Ok(Rendered::Plain(i.to_string())),
            Value::UInt(u) => Ok(Rendered::Plain(u.to_string())),
            Value::Float(f) if f.fract() == 0.0 && f.abs() < 9.2e18 => {
                Ok(Rendered::Plain((*f as i64).to_string()))
            }
            Value::Text(t) if t.trim().parse::<i64>().is_ok() => {
                Ok(Rendered::Plain(t.trim().to_owned()))
            }
            _ => bad(),
        },
        DataType::Bool => match value {
            Value::Bool(b) => Ok(Rendered::Plain(b.to_string())),
            Value::Int(0) => Ok(Rendered::Plain("false".into())),
            Value::Int(1) => Ok(Rendered::Plain("true".into())),
            Value::Text(t) => match t.to_ascii_lowercase().as_str() {
                "true" | "t" | "1" | "yes" => Ok(Rendered::Plain("true".into())),
                "false" | "f" | "0" | "no" => Ok(Rendered::Plain("false".into())),
                _ => bad(),
            },
            _ => bad(),
        },
        DataType::Float32 | DataType::Float64 | DataType::Numeric { .. } => match value {
            Value::Int(i) => Ok(Rendered::Plain(i.to_string())),
            Value::UInt(u) => Ok(Rendered::Plain(u.to_string())),
            Value::Float(f) if f.is_finite() => Ok(Rendered::Plain(float_text(*f))),
            Value::Float(f) if matches!(data_type, DataType::Numeric { .. }) && f.is_nan() => {
                Ok(Rendered::Text("NaN".into()))
            }
            Value::Float(f) => Ok(Rendered::Text(float_text(*f))),
            Value::Decimal(d) => Ok(Rendered::Plain(d.clone())),
            Value::Text(t) if t.trim().parse::<f64>().is_ok() => {
                Ok(Rendered::Text(t.trim().to_owned()))
            }
            _ => bad(),
        },
        DataType::Bytes => match value {
            Value::Bytes(b) => Ok(Rendered::Bytes(b.clone())),
            other => match text_of(other) {
                Some(t) => Ok(Rendered::Bytes(t.into_bytes())),
                None => bad(),
            },
        },
        DataType::Date | DataType::Timestamp | DataType::Time => match value {
            Value::Int(secs) => Ok(Rendered::Text(temporal(*secs as f64, data_type))),
            // A real in a date column is a Julian day number (SQLite's julianday()).
            Value::Float(jd) if jd.is_finite() => Ok(Rendered::Text(temporal(
                (jd - 2_440_587.5) * 86_400.0,
                data_type,
            ))),
            Value::Text(t) => Ok(Rendered::Text(t.clone())),
            _ => bad(),
        },
        _ => match value {
            Value::Bytes(b) => match std::str::from_utf8(b) {
                Ok(t) if !t.contains('\0') => Ok(Rendered::Text(t.to_owned())),
                _ => bad(),
            },
            other => match text_of(other) {
                Some(t) if !t.contains('\0') => Ok(Rendered::Text(t)),
                _ => bad(),
            },
        },
    }
}

fn bytea(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2 + 12);
    s.push_str("'\\x");
    for byte in b {
        s.push_str(&format!("{byte:02x}"));
    }
    s.push_str("'::bytea");
    s
}

/// Shortest text that reads back as the same `f64`.
pub fn float_text(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else {
        format!("{f:?}")
    }
}

/// Unix seconds (UTC) as ISO-8601 text of a date, time or timestamp.
fn temporal(unix: f64, data_type: &DataType) -> String {
    let micros = (unix * 1e6).round() as i64;
    let days = micros.div_euclid(86_400_000_000);
    let in_day = micros.rem_euclid(86_400_000_000);
    let (y, m, d) = civil_from_days(days);
    let (h, min, s, us) = (
        in_day / 3_600_000_000,
        in_day / 60_000_000 % 60,
        in_day / 1_000_000 % 60,
        in_day % 1_000_000,
    );
    let date = format!("{y:04}-{m:02}-{d:02}");
    let time = format!("{h:02}:{min:02}:{s:02}.{us:06}");
    match data_type {
        DataType::Date => date,
        DataType::Time => time,
        _ => format!("{date} {time}"),
    }
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `INSERT … VALUES (…), (…) ON CONFLICT (key) DO UPDATE` for rows already rendered as literal
/// tuples.
pub fn upsert(table: &str, columns: &[String], key: &[String], tuples: &[String]) -> String {
    upsert_into(
        &format!("public.{}", quote_ident(table)),
        columns,
        key,
        tuples,
    )
}

/// [`upsert`] into a table named by its quoted, qualified name.
pub fn upsert_into(table: &str, columns: &[String], key: &[String], tuples: &[String]) -> String {
    let cols = columns.iter().map(|c| quote_ident(c)).collect::<Vec<_>>();
    let updates: Vec<String> = columns
        .iter()
        .filter(|c| !key.contains(c))
        .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(c)))
        .collect();
    if key.is_empty() {
        return format!(
            "INSERT INTO {table} ({}) VALUES {};\n",
            cols.join(", "),
            tuples.join(", ")
        );
    }
    format!(
        "INSERT INTO {table} ({}) VALUES {} ON CONFLICT ({}) DO {};\n",
        cols.join(", "),
        tuples.join(", "),
        key.iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", "),
        if updates.is_empty() {
            "NOTHING".to_owned()
        } else {
            format!("UPDATE SET {}", updates.join(", "))
        }
    )
}

/// `DELETE … WHERE (key) IN ((…), (…))`.
pub fn delete(table: &str, key: &[String], tuples: &[String]) -> String {
    delete_from(&format!("public.{}", quote_ident(table)), key, tuples)
}

/// [`delete`] from a table named by its quoted, qualified name.
pub fn delete_from(table: &str, key: &[String], tuples: &[String]) -> String {
    format!(
        "DELETE FROM {table} WHERE ({}) IN ({});\n",
        key.iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", "),
        tuples.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_by_type() {
        assert_eq!(literal(&Value::Int(5), &DataType::Int64).unwrap(), "5");
        assert_eq!(
            literal(&Value::Text(" 7".into()), &DataType::Int64).unwrap(),
            "7"
        );
        let err = literal(&Value::Text("seven".into()), &DataType::Int64).unwrap_err();
        assert!(err.contains("seven") && err.contains("bigint"), "{err}");
        assert_eq!(literal(&Value::Int(1), &DataType::Bool).unwrap(), "true");
        assert_eq!(
            literal(&Value::Float(0.1), &DataType::Float64).unwrap(),
            "0.1"
        );
        assert_eq!(
            literal(&Value::Bytes(vec![0, 255]), &DataType::Bytes).unwrap(),
            "'\\x00ff'::bytea"
        );
        assert_eq!(
            literal(&Value::Text("it's".into()), &DataType::Text).unwrap(),
            "'it''s'"
        );
        assert_eq!(literal(&Value::Int(3), &DataType::Text).unwrap(), "'3'");
        assert!(literal(&Value::Bytes(vec![0xff]), &DataType::Text).is_err());
        assert_eq!(literal(&Value::Null, &DataType::Int64).unwrap(), "NULL");
    }

    #[test]
    fn copy_fields_are_escaped() {
        let field = |v: Value, t: DataType| {
            let mut out = String::new();
            copy_field(&v, &t, &mut out).map(|()| out)
        };
        assert_eq!(field(Value::Null, DataType::Text).unwrap(), "\\N");
        assert_eq!(
            field(Value::Text("a\tb\nc\\d\re".into()), DataType::Text).unwrap(),
            "a\\tb\\nc\\\\d\\re"
        );
        assert_eq!(
            field(Value::Bytes(vec![0, 255]), DataType::Bytes).unwrap(),
            "\\\\x00ff"
        );
        assert_eq!(field(Value::Int(1), DataType::Bool).unwrap(), "true");
        assert!(field(Value::Int(2), DataType::Bool).is_err());
        assert_eq!(
            field(
                Value::Decimal("1.10".into()),
                DataType::Numeric {
                    precision: None,
                    scale: None
                }
            )
            .unwrap(),
            "1.10"
        );
    }

    #[test]
    fn dates_from_numbers() {
        // 2009-02-13 23:31:30 UTC
        assert_eq!(
            literal(&Value::Int(1_234_567_890), &DataType::Timestamp).unwrap(),
            "'2009-02-13 23:31:30.000000'"
        );
        // julianday('2000-01-01 12:00:00') = 2451545.0
        assert_eq!(
            literal(&Value::Float(2_451_545.0), &DataType::Date).unwrap(),
            "'2000-01-01'"
        );
        assert_eq!(
            literal(&Value::Int(-86_400), &DataType::Date).unwrap(),
            "'1969-12-31'"
        );
    }
}
