//! MySQL/MariaDB as a target: literals by column kind, multi-row upserts and deletes, and
//! kuaka's bookkeeping tables (in a `kuaka` database on the target).
//!
//! The target session runs with `FOREIGN_KEY_CHECKS = 0` (the source enforced them, and a
//! batch is not in the source's row order) and `sql_mode = ''` (zero dates and the like are
//! stored as the source had them; backslash escapes in literals are on). Target triggers
//! cannot be switched off for one session on MySQL, so kuaka does not create them while it
//! applies changes.

use super::catalog::Kind;
use super::quote_ident;
use crate::engine::postgres::rows::float_text;
use crate::model::DataType;
use crate::model::value::Value;

/// kuaka's tables on a MySQL/MariaDB target.
pub const BOOKKEEPING: &str = "CREATE DATABASE IF NOT EXISTS kuaka; \
    CREATE TABLE IF NOT EXISTS kuaka.apply_position (job_id varchar(64) NOT NULL, worker int NOT NULL, \
      position varchar(1024) NOT NULL, commit_time timestamp(6) NULL, \
      applied_at timestamp(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6), PRIMARY KEY (job_id, worker)) ENGINE=InnoDB; \
    CREATE TABLE IF NOT EXISTS kuaka.row_copied (job_id varchar(64) NOT NULL, table_name varchar(200) NOT NULL, \
      `rows` bigint NOT NULL, PRIMARY KEY (job_id, table_name)) ENGINE=InnoDB; \
    CREATE TABLE IF NOT EXISTS kuaka.added_column (job_id varchar(64) NOT NULL, table_schema varchar(64) NOT NULL, \
      table_name varchar(64) NOT NULL, column_name varchar(64) NOT NULL, data_type text NOT NULL, \
      PRIMARY KEY (job_id, table_schema, table_name, column_name)) ENGINE=InnoDB";

/// A MySQL string literal of arbitrary bytes that are text in the connection's character set.
pub fn quote_bytes(bytes: &[u8], out: &mut String) {
    out.push('\'');
    for &b in bytes {
        match b {
            b'\\' => out.push_str("\\\\"),
            b'\'' => out.push_str("\\'"),
            0 => out.push_str("\\0"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            0x1a => out.push_str("\\Z"),
            _ => out.push(b as char),
        }
    }
    out.push('\'');
}

fn quote_text(text: &str, out: &mut String) {
    out.push('\'');
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\0' => out.push_str("\\0"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\u{1a}' => out.push_str("\\Z"),
            c => out.push(c),
        }
    }
    out.push('\'');
}

fn hex(bytes: &[u8], out: &mut String) {
    if bytes.is_empty() {
        out.push_str("''");
        return;
    }
    out.push_str("X'");
    for b in bytes {
        out.push_str(&format!("{b:02X}"));
    }
    out.push('\'');
}

/// A value as the same-engine server sent it in the text protocol (`None` = NULL), as a
/// literal for a column of the same kind: binary kinds as hex, the rest as quoted text.
pub fn raw_literal(kind: Kind, raw: Option<&[u8]>, out: &mut String) {
    match raw {
        None => out.push_str("NULL"),
        Some(bytes) => match kind {
            Kind::Binary { .. } | Kind::Geometry | Kind::Bit { .. } => hex(bytes, out),
            Kind::Bool | Kind::Int { .. } | Kind::Decimal | Kind::Year
                if bytes
                    .iter()
                    .all(|b| b.is_ascii_digit() || *b == b'-' || *b == b'.') =>
            {
                out.push_str(&String::from_utf8_lossy(bytes))
            }
            _ => {
                // The text is UTF-8 (the session is utf8mb4): quote it as text.
                match std::str::from_utf8(bytes) {
                    Ok(t) => quote_text(t, out),
                    Err(_) => quote_bytes(bytes, out),
                }
            }
        },
    }
}

/// A model value (decoded from the binlog) as a literal for a column of `kind`.
pub fn literal(kind: Kind, value: &Value, out: &mut String) -> Result<(), String> {
    let bad = || format!("{value:?} does not fit a column of kind {kind:?}");
    match (kind, value) {
        (_, Value::Null) => out.push_str("NULL"),
        (_, Value::Int(i)) => out.push_str(&i.to_string()),
        (_, Value::UInt(u)) => out.push_str(&u.to_string()),
        (_, Value::Bool(b)) => out.push_str(if *b { "1" } else { "0" }),
        (_, Value::Decimal(d)) => out.push_str(d),
        (_, Value::Float(f)) if f.is_finite() => out.push_str(&float_text(*f)),
        (Kind::Bit { .. }, Value::Text(bits)) if bits.chars().all(|c| c == '0' || c == '1') => {
            out.push_str("b'");
            out.push_str(bits);
            out.push('\'');
        }
        (Kind::Timestamp, Value::Text(t)) => quote_text(t.strip_suffix("+00").unwrap_or(t), out),
        (_, Value::Text(t)) | (_, Value::Native(t)) => quote_text(t, out),
        (_, Value::Bytes(b)) => hex(b, out),
        _ => return Err(bad()),
    }
    Ok(())
}

/// `INSERT INTO `t` (...) VALUES ..., ... ON DUPLICATE KEY UPDATE c = VALUES(c), ...` for
/// tuples already rendered (`(1, 'a')`).
pub fn upsert(table: &str, columns: &[String], key: &[String], tuples: &[String]) -> String {
    let cols: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
    let mut updates: Vec<String> = columns
        .iter()
        .filter(|c| !key.contains(c))
        .map(|c| format!("{0} = VALUES({0})", quote_ident(c)))
        .collect();
    if updates.is_empty() {
        // Only key columns: a duplicate is the same row.
        let k = quote_ident(&columns[0]);
        updates.push(format!("{k} = {k}"));
    }
    format!(
        "INSERT INTO {} ({}) VALUES {} ON DUPLICATE KEY UPDATE {};\n",
        quote_ident(table),
        cols.join(", "),
        tuples.join(", "),
        updates.join(", ")
    )
}

/// [`upsert`] with the `--newer-wins` guard on `guard`: a duplicate whose row has a greater
/// `guard` value keeps every column (NULL on either side: replaced), and `counter` (a user
/// variable) counts such rows. The guard column is assigned last: MySQL evaluates the
/// assignments in order, and the others compare against its old value.
pub fn upsert_newer_wins(
    table: &str,
    columns: &[String],
    key: &[String],
    tuples: &[String],
    guard: &str,
    counter: &str,
) -> String {
    let cols: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
    let g = quote_ident(guard);
    let newer = format!("({g} IS NULL OR VALUES({g}) IS NULL OR {g} <= VALUES({g}))");
    let mut updates: Vec<String> = columns
        .iter()
        .filter(|c| !key.contains(c) && c.as_str() != guard)
        .map(|c| format!("{0} = IF({newer}, VALUES({0}), {0})", quote_ident(c)))
        .collect();
    updates.push(format!(
        "{g} = IF({newer}, VALUES({g}), IF(({counter} := COALESCE({counter}, 0) + 1) > 0, {g}, {g}))"
    ));
    format!(
        "INSERT INTO {} ({}) VALUES {} ON DUPLICATE KEY UPDATE {};\n",
        quote_ident(table),
        cols.join(", "),
        tuples.join(", "),
        updates.join(", ")
    )
}

/// `DELETE FROM `t` WHERE (k1, k2) IN ((...), (...))`.
pub fn delete(table: &str, key: &[String], tuples: &[String]) -> String {
    format!(
        "DELETE FROM {} WHERE ({}) IN ({});\n",
        quote_ident(table),
        key.iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", "),
        tuples.join(", ")
    )
}

/// `SHOW CREATE TABLE` split for loading: the table with its primary key only, the secondary
/// indexes (built once after the data, a sorted build instead of row-by-row maintenance), and
/// the foreign keys (added last). An index that leads with the `AUTO_INCREMENT` column stays:
/// MySQL requires that column to be indexed.
#[derive(Debug, Default, PartialEq)]
pub struct CreateParts {
    pub table: String,
    pub indexes: Vec<String>,
    pub foreign_keys: Vec<String>,
}

pub fn split_create_table(create: &str, auto_increment: Option<&str>) -> CreateParts {
    let mut parts = CreateParts::default();
    let mut kept: Vec<&str> = Vec::new();
    let auto_key = auto_increment.map(|c| format!("(`{}`", c.replace('`', "``")));
    for line in create.lines() {
        let trimmed = line.trim();
        let clause = trimmed.trim_end_matches(',').to_owned();
        if trimmed.starts_with("CONSTRAINT ") && trimmed.contains(" FOREIGN KEY ") {
            parts.foreign_keys.push(clause);
        } else if [
            "KEY ",
            "UNIQUE KEY ",
            "FULLTEXT KEY ",
            "SPATIAL KEY ",
            "INDEX ",
        ]
        .iter()
        .any(|p| trimmed.starts_with(p))
            && !auto_key
                .as_ref()
                .is_some_and(|k| trimmed.contains(k.as_str()))
        {
            parts.indexes.push(clause);
        } else {
            kept.push(line);
        }
    }
    // The line before the closing parenthesis must not end with a comma any more.
    let mut text = kept.join("\n");
    if let Some(close) = text.rfind("\n)") {
        let (body, tail) = text.split_at(close);
        text = format!("{}{tail}", body.trim_end().trim_end_matches(','));
    }
    parts.table = text;
    parts
}

/// Bytes of an InnoDB index key (DYNAMIC rows, MySQL 5.7+ and MariaDB 10.2+).
const INDEX_KEY_BYTES: u32 = 3072;

/// The MySQL column type for a column of another engine (SQLite or PostgreSQL).
///
/// `key_share` is set for a column inside a primary key, unique key or index, with the number
/// of string columns of the widest such index: unbounded text and blobs then become
/// `varchar`/`varbinary` sized so that the index fits InnoDB's 3072-byte key (text in
/// utf8mb4 counts 4 bytes per character). A longer value is refused by the target (the
/// session is strict) with the column named.
pub fn column_type(t: &DataType, key_share: Option<u32>) -> String {
    let text = |bound: Option<u32>| match key_share {
        Some(n) => format!(
            "varchar({})",
            bound
                .unwrap_or(u32::MAX)
                .min(INDEX_KEY_BYTES / 4 / n.max(1))
        ),
        None => match bound {
            Some(b) if b <= 16_383 => format!("varchar({b})"),
            _ => "longtext".into(),
        },
    };
    match t {
        DataType::Bool => "tinyint(1)".into(),
        DataType::Int16 => "smallint".into(),
        DataType::Int32 => "int".into(),
        DataType::Int64 => "bigint".into(),
        DataType::Float32 => "float".into(),
        DataType::Float64 => "double".into(),
        DataType::Numeric {
            precision: Some(p),
            scale,
        } if *p <= 65 && scale.unwrap_or(0) <= 30 => {
            format!("decimal({p},{})", scale.unwrap_or(0))
        }
        DataType::Numeric { .. } => "decimal(65,30)".into(),
        DataType::Money => "decimal(19,2)".into(),
        DataType::Char { length: Some(n) } if *n <= 255 => format!("char({n})"),
        DataType::Char { length } | DataType::Varchar { length } => text(*length),
        DataType::Bytes => match key_share {
            Some(n) => format!("varbinary({})", INDEX_KEY_BYTES / n.max(1)),
            None => "longblob".into(),
        },
        DataType::Date => "date".into(),
        DataType::Time => "time(6)".into(),
        DataType::Timestamp | DataType::TimestampTz => "datetime(6)".into(),
        DataType::Uuid => "char(36)".into(),
        DataType::Json | DataType::Jsonb if key_share.is_none() => "json".into(),
        _ => text(None),
    }
}

/// A value of another engine as a literal for a column made by [`column_type`], checked like
/// a PostgreSQL literal of the same model type (the error says what does not fit).
pub fn typed_literal(value: &Value, data_type: &DataType, out: &mut String) -> Result<(), String> {
    use crate::engine::postgres::rows::{Rendered, render};
    match render(value, data_type)? {
        Rendered::Null => out.push_str("NULL"),
        Rendered::Plain(p) => out.push_str(&p),
        Rendered::Text(t) => quote_text(&t, out),
        Rendered::Bytes(b) => hex(&b, out),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals() {
        let lit = |k: Kind, v: Value| {
            let mut s = String::new();
            literal(k, &v, &mut s).map(|()| s)
        };
        let text = Kind::Text;
        assert_eq!(
            lit(text, Value::Text("it's a \\ \n".into())).unwrap(),
            "'it\\'s a \\\\ \\n'"
        );
        assert_eq!(
            lit(Kind::Bit { bits: 4 }, Value::Text("0101".into())).unwrap(),
            "b'0101'"
        );
        assert_eq!(
            lit(
                Kind::Timestamp,
                Value::Text("2001-02-03 04:05:06.000000+00".into())
            )
            .unwrap(),
            "'2001-02-03 04:05:06.000000'"
        );
        assert_eq!(
            lit(Kind::Binary { pad_to: None }, Value::Bytes(vec![0, 0xff])).unwrap(),
            "X'00FF'"
        );
        assert_eq!(
            lit(Kind::Binary { pad_to: None }, Value::Bytes(vec![])).unwrap(),
            "''"
        );
        assert!(lit(Kind::Double, Value::Float(f64::NAN)).is_err());
        let mut s = String::new();
        raw_literal(Kind::Geometry, Some(&[1, 2]), &mut s);
        raw_literal(
            Kind::Int {
                bits: 32,
                unsigned: false,
            },
            Some(b"-5"),
            &mut s,
        );
        raw_literal(Kind::Text, None, &mut s);
        raw_literal(Kind::Date, Some(b"0000-00-00"), &mut s);
        assert_eq!(s, "X'0102'-5NULL'0000-00-00'");
    }

    #[test]
    fn indexes_and_foreign_keys_come_out_of_create_table() {
        let create = "CREATE TABLE `c` (\n  `id` int NOT NULL,\n  `p` int,\n  `n` int NOT NULL AUTO_INCREMENT,\n  PRIMARY KEY (`id`),\n  KEY `p` (`p`),\n  UNIQUE KEY `n` (`n`),\n  CONSTRAINT `fk` FOREIGN KEY (`p`) REFERENCES `parent` (`id`) ON DELETE CASCADE\n) ENGINE=InnoDB";
        let parts = split_create_table(create, Some("n"));
        assert_eq!(
            parts.foreign_keys,
            vec!["CONSTRAINT `fk` FOREIGN KEY (`p`) REFERENCES `parent` (`id`) ON DELETE CASCADE"]
        );
        assert_eq!(parts.indexes, vec!["KEY `p` (`p`)"]);
        assert!(
            parts
                .table
                .contains("PRIMARY KEY (`id`),\n  UNIQUE KEY `n` (`n`)\n) ENGINE=InnoDB"),
            "{}",
            parts.table
        );
    }

    #[test]
    fn types_from_other_engines() {
        use crate::model::DataType as T;
        assert_eq!(column_type(&T::Text, None), "longtext");
        // Two string columns in one key share InnoDB's 3072 bytes.
        assert_eq!(column_type(&T::Text, Some(2)), "varchar(384)");
        assert_eq!(column_type(&T::Bytes, Some(1)), "varbinary(3072)");
        assert_eq!(
            column_type(&T::Varchar { length: Some(20) }, Some(1)),
            "varchar(20)"
        );
        assert_eq!(
            column_type(
                &T::Numeric {
                    precision: Some(10),
                    scale: Some(2)
                },
                None
            ),
            "decimal(10,2)"
        );
        assert_eq!(
            column_type(
                &T::Numeric {
                    precision: None,
                    scale: None
                },
                None
            ),
            "decimal(65,30)"
        );
        let mut out = String::new();
        typed_literal(&Value::Text("it's \\ 😀".into()), &T::Text, &mut out).unwrap();
        typed_literal(&Value::Int(86_400), &T::Timestamp, &mut out).unwrap();
        typed_literal(&Value::Bytes(vec![0, 255]), &T::Bytes, &mut out).unwrap();
        assert_eq!(out, "'it\\'s \\\\ 😀''1970-01-02 00:00:00.000000'X'00FF'");
        assert!(typed_literal(&Value::Text("x".into()), &T::Int64, &mut out).is_err());
    }
}
