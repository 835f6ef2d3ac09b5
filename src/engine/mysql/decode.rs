//! Pure decoding: MySQL values (text protocol and binlog) → model values, the binlog position
//! tracker, and MariaDB's GTID events.
//!
//! Binlog value forms (as `mysql_common` hands them over, MySQL's `log_event.cc` and
//! <https://dev.mysql.com/doc/dev/mysql-server/latest/page_protocol_replication_binlog_event.html>):
//! integers come signed unless the table map's optional metadata says otherwise (the catalog's
//! signedness decides here), `TIMESTAMP` as UTC seconds (`"sec[.usec]"`), `DATETIME`/`DATE`
//! as broken-down dates, `TIME` as sign + days + h:m:s.us, `YEAR` as 1900 + the stored byte,
//! `ENUM` as the 1-based label number, `SET` as a little-endian bit mask, `BIT` as big-endian
//! bytes, `DECIMAL` as its text, MySQL `JSON` in its binary form, strings as the column's
//! character set bytes, `BINARY(n)` without its trailing zero bytes.

use mysql_async::Value as MyValue;
use mysql_async::binlog::value::BinlogValue;

use super::catalog::{Kind, MyColumn};
use crate::engine::postgres::rows::civil_from_days;
use crate::model::value::Value;

/// Why a value cannot be converted (the caller names table, column and key).
pub type ValueError = String;

/// What zero dates become: NULL (PostgreSQL cannot hold them; an error in a NOT NULL column),
/// or kept as they are (a MySQL target).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroDates {
    Null,
    Keep,
}

/// A zero or partly zero date (`0000-00-00`, `2020-00-10`): NULL, or an error for a NOT NULL
/// column.
fn zero_date(column: &MyColumn, shown: &str, zero: ZeroDates) -> Result<Value, ValueError> {
    if zero == ZeroDates::Keep {
        return Ok(Value::Text(shown.to_owned()));
    }
    if column.nullable {
        Ok(Value::Null)
    } else {
        Err(format!(
            "the zero date {shown:?} has no PostgreSQL equivalent and the column is NOT NULL; fix the source row or make the column nullable"
        ))
    }
}

fn is_zero_date(text: &str) -> bool {
    let date = text.get(..10).unwrap_or(text);
    let mut parts = date.split('-');
    let (y, m, d) = (parts.next(), parts.next(), parts.next());
    y.is_some_and(|y| y.trim_start_matches('0').is_empty())
        || m.is_some_and(|m| m == "00")
        || d.is_some_and(|d| d == "00")
}

fn decode_text(column: &MyColumn, bytes: &[u8]) -> Result<String, ValueError> {
    let charset = column.charset.as_deref().unwrap_or("utf8mb4");
    if charset == "latin1" {
        // MySQL's latin1 is Windows-1252; bytes 0x80-0x9F that map to other code points are
        // rare in practice and are kept as the same-numbered Unicode code points.
        return Ok(bytes.iter().map(|&b| char::from(b)).collect());
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| {
        format!("the text is not valid in its character set {charset} (kuaka reads utf8mb4, utf8mb3, ascii and latin1 from the binlog)")
    })
}

fn bit_string(bytes: &[u8], bits: u32) -> String {
    let mut all = String::with_capacity(bytes.len() * 8);
    for b in bytes {
        all.push_str(&format!("{b:08b}"));
    }
    let bits = bits as usize;
    if all.len() >= bits {
        all[all.len() - bits..].to_owned()
    } else {
        format!("{}{all}", "0".repeat(bits - all.len()))
    }
}

fn float_from_f32(f: f32) -> Value {
    // The shortest text of the f32, read as f64: 1.1f32 stays 1.1, not 1.100000023841858.
    Value::Float(format!("{f}").parse().unwrap_or(f64::from(f)))
}

/// An integer as the catalog says the column holds it: the binlog's signedness comes from
/// optional metadata that may be missing, so the width and sign are applied here.
fn int_value(column: &MyColumn, i: i64) -> Value {
    match column.kind {
        Kind::Int {
            bits,
            unsigned: true,
        } if i < 0 => {
            if bits >= 64 {
                Value::UInt(i as u64)
            } else {
                Value::Int(i + (1i64 << bits))
            }
        }
        Kind::Int {
            bits,
            unsigned: false,
        } if bits < 64 && i >= 1i64 << (bits - 1) => Value::Int(i - (1i64 << bits)),
        _ => Value::Int(i),
    }
}

fn timestamp_text(seconds: i64, micros: u32) -> String {
    let (y, m, d) = civil_from_days(seconds.div_euclid(86_400));
    let s = seconds.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{micros:06}+00",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// A value read through the text protocol (the snapshot), `None` for SQL NULL.
pub fn from_text(column: &MyColumn, value: Option<&[u8]>) -> Result<Value, ValueError> {
    let Some(bytes) = value else {
        return Ok(Value::Null);
    };
    let ascii = || String::from_utf8_lossy(bytes).into_owned();
    Ok(match column.kind {
        Kind::Bool => Value::Int(
            ascii()
                .parse()
                .map_err(|_| format!("{:?} is not an integer", ascii()))?,
        ),
        Kind::Int { .. } | Kind::Year => {
            let t = ascii();
            match t.parse::<i64>() {
                Ok(i) => Value::Int(i),
                Err(_) => Value::UInt(t.parse().map_err(|_| format!("{t:?} is not an integer"))?),
            }
        }
        Kind::Decimal => Value::Decimal(ascii()),
        Kind::Float | Kind::Double => {
            let t = ascii();
            Value::Float(t.parse().map_err(|_| format!("{t:?} is not a number"))?)
        }
        Kind::Bit { bits } => Value::Text(bit_string(bytes, bits)),
        Kind::Date | Kind::Datetime | Kind::Timestamp => {
            let t = ascii();
            if is_zero_date(&t) {
                return zero_date(column, &t, ZeroDates::Null);
            }
            if column.kind == Kind::Timestamp {
                Value::Text(format!("{t}+00"))
            } else {
                Value::Text(t)
            }
        }
        Kind::Time => Value::Text(ascii()),
        Kind::Text | Kind::Enum | Kind::Set => Value::Text(
            String::from_utf8(bytes.to_vec())
                .map_err(|_| "the server sent text that is not UTF-8".to_owned())?,
        ),
        Kind::Json => {
            let t = String::from_utf8(bytes.to_vec())
                .map_err(|_| "the server sent JSON that is not UTF-8".to_owned())?;
            check_json(&t)?;
            Value::Text(t)
        }
        Kind::Binary { .. } | Kind::Geometry => Value::Bytes(bytes.to_vec()),
    })
}

fn check_json(text: &str) -> Result<(), ValueError> {
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map(|_| ())
        .map_err(|e| format!("the value is not valid JSON ({e})"))
}

/// A value from a binlog row image, zero dates as NULL.
pub fn from_binlog(
    column: &MyColumn,
    value: Option<&BinlogValue<'_>>,
) -> Result<Value, ValueError> {
    from_binlog_as(column, value, ZeroDates::Null)
}

/// A value from a binlog row image.
pub fn from_binlog_as(
    column: &MyColumn,
    value: Option<&BinlogValue<'_>>,
    zero: ZeroDates,
) -> Result<Value, ValueError> {
    let value = match value {
        None | Some(BinlogValue::Value(MyValue::NULL)) => return Ok(Value::Null),
        Some(BinlogValue::Jsonb(j)) => {
            let json: serde_json::Value = j
                .clone()
                .try_into()
                .map_err(|e| format!("cannot read the binary JSON value: {e:?}"))?;
            return Ok(Value::Text(json.to_string()));
        }
        Some(BinlogValue::JsonDiff(_)) => {
            return Err("a partial JSON update (binlog_row_value_options = PARTIAL_JSON) cannot be applied; set binlog_row_value_options = '' on the source".into());
        }
        Some(BinlogValue::Value(v)) => v,
    };
    let unexpected = || {
        format!(
            "unexpected binlog value {value:?} for a {} column",
            column.column_type
        )
    };
    Ok(match (column.kind, value) {
        (Kind::Bool | Kind::Int { .. }, MyValue::Int(i)) => int_value(column, *i),
        (Kind::Bool | Kind::Int { .. }, MyValue::UInt(u)) => match i64::try_from(*u) {
            Ok(i) => Value::Int(i),
            Err(_) => Value::UInt(*u),
        },
        (Kind::Float, MyValue::Float(f)) => float_from_f32(*f),
        (Kind::Float | Kind::Double, MyValue::Double(d)) => Value::Float(*d),
        (Kind::Double, MyValue::Float(f)) => float_from_f32(*f),
        (Kind::Decimal, MyValue::Bytes(b)) => {
            Value::Decimal(String::from_utf8_lossy(b).into_owned())
        }
        (Kind::Bit { bits }, MyValue::Bytes(b)) => Value::Text(bit_string(b, bits)),
        (Kind::Bit { bits }, MyValue::Int(i)) => Value::Text(bit_string(&i.to_be_bytes(), bits)),
        (Kind::Year, MyValue::Bytes(b)) => {
            let y: i64 = String::from_utf8_lossy(b)
                .parse()
                .map_err(|_| unexpected())?;
            // The stored byte 0 means the year 0000 (and reads back as 1900 + 0).
            Value::Int(if y == 1900 { 0 } else { y })
        }
        (Kind::Year, MyValue::Int(y)) => Value::Int(*y),
        (Kind::Timestamp, MyValue::Bytes(b)) => {
            let t = String::from_utf8_lossy(b);
            let (secs, frac) = t.split_once('.').unwrap_or((&t, "0"));
            let secs: i64 = secs.parse().map_err(|_| unexpected())?;
            let micros: u32 = format!("{frac:0<6}")[..6]
                .parse()
                .map_err(|_| unexpected())?;
            if secs == 0 && micros == 0 {
                return zero_date(column, "0000-00-00 00:00:00", zero);
            }
            Value::Text(timestamp_text(secs, micros))
        }
        (Kind::Timestamp, MyValue::Int(secs)) => {
            if *secs == 0 {
                return zero_date(column, "0000-00-00 00:00:00", zero);
            }
            Value::Text(timestamp_text(*secs, 0))
        }
        (Kind::Date | Kind::Datetime | Kind::Timestamp, MyValue::Date(y, m, d, h, mi, s, us)) => {
            let date = format!("{y:04}-{m:02}-{d:02}");
            let text = if column.kind == Kind::Date {
                date
            } else {
                format!("{date} {h:02}:{mi:02}:{s:02}.{us:06}")
            };
            if *y == 0 || *m == 0 || *d == 0 {
                return zero_date(column, &text, zero);
            }
            Value::Text(text)
        }
        (Kind::Time, MyValue::Time(negative, days, h, m, s, us)) => Value::Text(format!(
            "{}{}:{m:02}:{s:02}.{us:06}",
            if *negative { "-" } else { "" },
            u64::from(*days) * 24 + u64::from(*h)
        )),
        (Kind::Enum, MyValue::Int(i)) => Value::Text(if *i == 0 {
            String::new()
        } else {
            column.labels.get(*i as usize - 1).cloned().ok_or_else(|| {
                format!(
                    "ENUM value number {i} is not one of the column's {} labels",
                    column.labels.len()
                )
            })?
        }),
        (Kind::Set, MyValue::Bytes(mask)) => {
            let mut chosen = Vec::new();
            for (i, label) in column.labels.iter().enumerate() {
                if mask
                    .get(i / 8)
                    .is_some_and(|byte| byte & (1 << (i % 8)) != 0)
                {
                    chosen.push(label.as_str());
                }
            }
            Value::Text(chosen.join(","))
        }
        (Kind::Text, MyValue::Bytes(b)) => Value::Text(decode_text(column, b)?),
        (Kind::Json, MyValue::Bytes(b)) => {
            let t = decode_text(column, b)?;
            check_json(&t)?;
            Value::Text(t)
        }
        (Kind::Binary { pad_to }, MyValue::Bytes(b)) => {
            let mut b = b.clone();
            if let Some(n) = pad_to {
                b.resize((n as usize).max(b.len()), 0);
            }
            Value::Bytes(b)
        }
        (Kind::Geometry, MyValue::Bytes(b)) => Value::Bytes(b.clone()),
        _ => return Err(unexpected()),
    })
}

/// Where the stream is: binlog file and byte offset, as u64. The event header's `log_pos` is
/// only 32 bits (the end of the event in its file); a binlog file can grow past 4 GiB with one
/// large transaction, so the high bits are carried here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BinlogCursor {
    pub file: String,
    pub offset: u64,
}

/// `LOG_EVENT_ARTIFICIAL_F`: made up by the server for this stream, not in the file.
pub const ARTIFICIAL: u16 = 0x20;
const ROTATE_EVENT: u8 = 4;
pub const HEARTBEAT_EVENT: u8 = 27;

impl BinlogCursor {
    /// Move past one event. Events made up for the stream (artificial, heartbeats, `log_pos`
    /// 0) do not move the cursor; a rotation switches files.
    pub fn advance(
        &mut self,
        event_type: u8,
        flags: u16,
        log_pos: u32,
        rotate: Option<(&str, u64)>,
    ) {
        if let Some((file, position)) = rotate.filter(|_| event_type == ROTATE_EVENT) {
            self.file = file.to_owned();
            self.offset = position;
            return;
        }
        if log_pos == 0 || flags & ARTIFICIAL != 0 || event_type == HEARTBEAT_EVENT {
            return;
        }
        let mut next = (self.offset & !0xffff_ffff) | u64::from(log_pos);
        if next < self.offset {
            // `log_pos` wrapped past 4 GiB.
            next += 1 << 32;
        }
        self.offset = next;
    }
}

/// A MariaDB GTID event (type 162): `domain-server-sequence`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MariadbGtid {
    pub domain: u32,
    pub server: u32,
    pub sequence: u64,
    /// The transaction is standalone (DDL, no BEGIN/COMMIT around it).
    pub standalone: bool,
}

impl std::fmt::Display for MariadbGtid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}-{}", self.domain, self.server, self.sequence)
    }
}

/// Parse a MariaDB GTID event body (after the 19-byte header): `seq_no u64, domain_id u32,
/// flags u8` (then optional commit id / XID parts). The server id comes from the header.
pub fn mariadb_gtid(server_id: u32, body: &[u8]) -> Option<MariadbGtid> {
    let sequence = u64::from_le_bytes(body.get(0..8)?.try_into().ok()?);
    let domain = u32::from_le_bytes(body.get(8..12)?.try_into().ok()?);
    let flags = *body.get(12)?;
    Some(MariadbGtid {
        domain,
        server: server_id,
        sequence,
        standalone: flags & 1 != 0,
    })
}

/// A MariaDB replication position as GTIDs: the last transaction of each replication domain,
/// `domain-server-sequence` joined by commas (the form of `@@gtid_binlog_pos` and
/// `@slave_connect_state`). It names the same point on every server of a replication
/// topology, where file names and offsets differ.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GtidState(std::collections::BTreeMap<u32, (u32, u64)>);

impl GtidState {
    /// `d-s-n,d-s-n,...` (empty: no transaction yet). `None` when malformed.
    pub fn parse(text: &str) -> Option<GtidState> {
        let mut state = GtidState::default();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (domain, server, sequence) = parse_gtid(part)?;
            state.0.insert(domain, (server, sequence));
        }
        Some(state)
    }

    /// How many replication domains the state names.
    pub fn domains(&self) -> usize {
        self.0.len()
    }

    /// Move past a transaction's GTID (`d-s-n`); MySQL's `uuid:n` GTIDs are not tracked here.
    pub fn advance(&mut self, gtid: &str) {
        if let Some((domain, server, sequence)) = parse_gtid(gtid) {
            self.0.insert(domain, (server, sequence));
        }
    }
}

fn parse_gtid(text: &str) -> Option<(u32, u32, u64)> {
    let mut it = text.splitn(3, '-');
    Some((
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
    ))
}

impl std::fmt::Display for GtidState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (domain, (server, sequence))) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{domain}-{server}-{sequence}")?;
        }
        Ok(())
    }
}

/// Parse a MariaDB GTID_LIST event body (type 163): `count u32` (low 28 bits), then `count ×
/// (domain u32, server u32, sequence u64)`.
pub fn mariadb_gtid_list(body: &[u8]) -> Option<Vec<MariadbGtid>> {
    let count = u32::from_le_bytes(body.get(0..4)?.try_into().ok()?) & 0x0fff_ffff;
    let mut list = Vec::new();
    for i in 0..count as usize {
        let at = 4 + i * 16;
        let entry = body.get(at..at + 16)?;
        list.push(MariadbGtid {
            domain: u32::from_le_bytes(entry[0..4].try_into().ok()?),
            server: u32::from_le_bytes(entry[4..8].try_into().ok()?),
            sequence: u64::from_le_bytes(entry[8..16].try_into().ok()?),
            standalone: false,
        });
    }
    Some(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gtid_state_follows_transactions_per_domain() {
        let mut s = GtidState::parse("0-1-100, 1-2-5").unwrap();
        s.advance("0-3-101");
        s.advance("2-1-1");
        s.advance("3e11fa47-71ca-11e1-9e33-c80aa9429562:23");
        assert_eq!(s.to_string(), "0-3-101,1-2-5,2-1-1");
        assert_eq!(GtidState::parse("").unwrap().to_string(), "");
        assert!(GtidState::parse("0-1").is_none());
        assert!(GtidState::parse("0-1-x").is_none());
    }
    use crate::engine::mysql::catalog::map_type;

    fn column(dt: &str, ct: &str, nullable: bool) -> MyColumn {
        let (kind, _, pg_type) = map_type(dt, ct, Some(4), Some(10), Some(2), Some(6), false);
        MyColumn {
            name: "c".into(),
            kind,
            column_type: ct.into(),
            charset: Some("utf8mb4".into()),
            labels: crate::engine::mysql::catalog::parse_labels(ct),
            nullable,
            generated: false,
            auto_increment: false,
            default: None,
            on_update_now: false,
            pg_type,
        }
    }

    fn bv(v: MyValue) -> BinlogValue<'static> {
        BinlogValue::Value(v)
    }

    #[test]
    fn cursor_carries_offsets_past_4_gib() {
        let mut c = BinlogCursor {
            file: "binlog.000009".into(),
            offset: 4_294_967_000,
        };
        // An event of 500 bytes ending past 2^32: its header's log_pos wrapped to 204.
        c.advance(30, 0, 204, None);
        assert_eq!(c.offset, 4_294_967_500);
        c.advance(16, 0, 1_204, None);
        assert_eq!(c.offset, 4_294_968_500);
        // Artificial and heartbeat events do not move it.
        c.advance(15, ARTIFICIAL, 120, None);
        c.advance(HEARTBEAT_EVENT, 0, 99, None);
        assert_eq!(c.offset, 4_294_968_500);
        c.advance(ROTATE_EVENT, 0, 1_300, Some(("binlog.000010", 4)));
        assert_eq!((c.file.as_str(), c.offset), ("binlog.000010", 4));
        // Over 8 GiB still works: the high bits are carried.
        let mut c = BinlogCursor {
            file: "b.1".into(),
            offset: (2 << 32) + 10,
        };
        c.advance(30, 0, 5, None);
        assert_eq!(c.offset, (3 << 32) + 5);
    }

    #[test]
    fn mariadb_gtid_events_from_bytes() {
        // seq 7, domain 2, flags 0x09 (standalone | group commit id) + commit id.
        let mut body = Vec::new();
        body.extend_from_slice(&7u64.to_le_bytes());
        body.extend_from_slice(&2u32.to_le_bytes());
        body.push(0x09);
        body.extend_from_slice(&99u64.to_le_bytes());
        let g = mariadb_gtid(5, &body).unwrap();
        assert_eq!(g.to_string(), "2-5-7");
        assert!(g.standalone);
        assert!(mariadb_gtid(5, &body[..10]).is_none());

        let mut list = Vec::new();
        list.extend_from_slice(&(2u32 | 0x1000_0000).to_le_bytes());
        for (d, s, q) in [(0u32, 1u32, 100u64), (1, 2, 5_000_000_000)] {
            list.extend_from_slice(&d.to_le_bytes());
            list.extend_from_slice(&s.to_le_bytes());
            list.extend_from_slice(&q.to_le_bytes());
        }
        let l = mariadb_gtid_list(&list).unwrap();
        assert_eq!(
            l.iter().map(ToString::to_string).collect::<Vec<_>>(),
            vec!["0-1-100", "1-2-5000000000"]
        );
        assert!(mariadb_gtid_list(&list[..20]).is_none());
    }

    #[test]
    fn binlog_values() {
        let i24 = column("mediumint", "mediumint(9)", true);
        assert_eq!(
            from_binlog(&i24, Some(&bv(MyValue::Int(8_388_608)))).unwrap(),
            Value::Int(-8_388_608)
        );
        let u8c = column("tinyint", "tinyint(3) unsigned", true);
        assert_eq!(
            from_binlog(&u8c, Some(&bv(MyValue::Int(-1)))).unwrap(),
            Value::Int(255)
        );
        let u64c = column("bigint", "bigint(20) unsigned", true);
        assert_eq!(
            from_binlog(&u64c, Some(&bv(MyValue::Int(-1)))).unwrap(),
            Value::UInt(u64::MAX)
        );
        let f = column("float", "float", true);
        assert_eq!(
            from_binlog(&f, Some(&bv(MyValue::Float(1.1)))).unwrap(),
            Value::Float(1.1)
        );
        let e = column("enum", "enum('a','b')", true);
        assert_eq!(
            from_binlog(&e, Some(&bv(MyValue::Int(2)))).unwrap(),
            Value::Text("b".into())
        );
        assert_eq!(
            from_binlog(&e, Some(&bv(MyValue::Int(0)))).unwrap(),
            Value::Text("".into())
        );
        assert!(from_binlog(&e, Some(&bv(MyValue::Int(3)))).is_err());
        let s = column("set", "set('x','y','z')", true);
        assert_eq!(
            from_binlog(&s, Some(&bv(MyValue::Bytes(vec![0b101])))).unwrap(),
            Value::Text("x,z".into())
        );
        let b = column("bit", "bit(10)", true);
        assert_eq!(
            from_binlog(&b, Some(&bv(MyValue::Bytes(vec![0x02, 0x01])))).unwrap(),
            Value::Text("1000000001".into())
        );
        let ts = column("timestamp", "timestamp(6)", true);
        assert_eq!(
            from_binlog(&ts, Some(&bv(MyValue::Bytes(b"1234567890.5".to_vec())))).unwrap(),
            Value::Text("2009-02-13 23:31:30.500000+00".into())
        );
        let dt = column("datetime", "datetime", false);
        assert!(from_binlog(&dt, Some(&bv(MyValue::Date(0, 0, 0, 0, 0, 0, 0)))).is_err());
        let dn = column("date", "date", true);
        assert_eq!(
            from_binlog(&dn, Some(&bv(MyValue::Date(2020, 0, 1, 0, 0, 0, 0)))).unwrap(),
            Value::Null
        );
        let t = column("time", "time(6)", true);
        assert_eq!(
            from_binlog(&t, Some(&bv(MyValue::Time(true, 34, 22, 59, 59, 5)))).unwrap(),
            Value::Text("-838:59:59.000005".into())
        );
        let y = column("year", "year(4)", true);
        assert_eq!(
            from_binlog(&y, Some(&bv(MyValue::Bytes(b"1900".to_vec())))).unwrap(),
            Value::Int(0)
        );
        let bin = column("binary", "binary(4)", true);
        assert_eq!(
            from_binlog(&bin, Some(&bv(MyValue::Bytes(vec![1])))).unwrap(),
            Value::Bytes(vec![1, 0, 0, 0])
        );
        let mut latin = column("varchar", "varchar(4)", true);
        latin.charset = Some("latin1".into());
        assert_eq!(
            from_binlog(
                &latin,
                Some(&bv(MyValue::Bytes(vec![0x63, 0x61, 0x66, 0xe9])))
            )
            .unwrap(),
            Value::Text("café".into())
        );
        let utf = column("varchar", "varchar(4)", true);
        assert!(from_binlog(&utf, Some(&bv(MyValue::Bytes(vec![0xff])))).is_err());
        let j = column("json", "json", true);
        assert!(from_binlog(&j, Some(&bv(MyValue::Bytes(b"{bad".to_vec())))).is_err());
    }

    #[test]
    fn text_protocol_zero_dates() {
        let d = column("date", "date", true);
        assert_eq!(from_text(&d, Some(b"0000-00-00")).unwrap(), Value::Null);
        assert_eq!(from_text(&d, Some(b"2021-00-05")).unwrap(), Value::Null);
        assert_eq!(
            from_text(&d, Some(b"2021-03-05")).unwrap(),
            Value::Text("2021-03-05".into())
        );
        let d = column("datetime", "datetime", false);
        let err = from_text(&d, Some(b"0000-00-00 00:00:00")).unwrap_err();
        assert!(err.contains("NOT NULL"), "{err}");
        let ts = column("timestamp", "timestamp", true);
        assert_eq!(
            from_text(&ts, Some(b"2001-02-03 04:05:06")).unwrap(),
            Value::Text("2001-02-03 04:05:06+00".into())
        );
    }
}
