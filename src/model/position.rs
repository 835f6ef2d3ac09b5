//! Source positions as one totally ordered (per source) typed enum.
//!
//! Offsets are `u64` everywhere: binlog files larger than 4 GiB exist, and a `u32` offset is a
//! classic silent-loss bug in CDC tools. Every position serialises losslessly to a string for
//! the state store (`Display` and `FromStr` round-trip).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A PostgreSQL write-ahead-log location (`pg_lsn`), printed as `X/Y` like the server does.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct PgLsn(pub u64);

impl fmt::Display for PgLsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl FromStr for PgLsn {
    type Err = PositionParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hi, lo) = s
            .split_once('/')
            .ok_or_else(|| PositionParseError(s.to_owned()))?;
        let hi = u64::from_str_radix(hi, 16).map_err(|_| PositionParseError(s.to_owned()))?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| PositionParseError(s.to_owned()))?;
        if hi > u64::from(u32::MAX) || lo > u64::from(u32::MAX) {
            return Err(PositionParseError(s.to_owned()));
        }
        Ok(PgLsn((hi << 32) | lo))
    }
}

/// A position in some source's change stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Position {
    /// PostgreSQL: a WAL location.
    PgLsn { lsn: PgLsn },
    /// MySQL/MariaDB without GTIDs: binlog file name and byte offset in it.
    BinlogFile { file: String, offset: u64 },
    /// MySQL GTID set (`uuid:1-5,uuid2:1-9`).
    MysqlGtid { set: String },
    /// MariaDB GTID list (`domain-server-seq,...`).
    MariadbGtid { list: String },
    /// SQLite: sequence number in kuaka's change table.
    SqliteSeq { seq: u64 },
    /// An offset in kuaka's own change log.
    ChangeLog { offset: u64 },
}

impl Position {
    /// Compare two positions of the same kind; `None` when the kinds differ or the kind has no
    /// total order without the source's help (GTID sets).
    pub fn partial_cmp_same_source(&self, other: &Position) -> Option<std::cmp::Ordering> {
        use Position::*;
        match (self, other) {
            (PgLsn { lsn: a }, PgLsn { lsn: b }) => Some(a.cmp(b)),
            (
                BinlogFile {
                    file: fa,
                    offset: oa,
                },
                BinlogFile {
                    file: fb,
                    offset: ob,
                },
            ) => Some(
                binlog_sequence(fa)
                    .cmp(&binlog_sequence(fb))
                    .then(fa.cmp(fb))
                    .then(oa.cmp(ob)),
            ),
            (SqliteSeq { seq: a }, SqliteSeq { seq: b }) => Some(a.cmp(b)),
            (ChangeLog { offset: a }, ChangeLog { offset: b }) => Some(a.cmp(b)),
            _ => None,
        }
    }
}

/// `mysql-bin.000123` -> 123: binlog files are ordered by their numeric suffix.
fn binlog_sequence(file: &str) -> u64 {
    file.rsplit('.')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::PgLsn { lsn } => write!(f, "pg:{lsn}"),
            Position::BinlogFile { file, offset } => write!(f, "binlog:{file}:{offset}"),
            Position::MysqlGtid { set } => write!(f, "mysql-gtid:{set}"),
            Position::MariadbGtid { list } => write!(f, "mariadb-gtid:{list}"),
            Position::SqliteSeq { seq } => write!(f, "sqlite:{seq}"),
            Position::ChangeLog { offset } => write!(f, "changelog:{offset}"),
        }
    }
}

/// A position string that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid position {0:?}")]
pub struct PositionParseError(pub String);

impl FromStr for Position {
    type Err = PositionParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || PositionParseError(s.to_owned());
        let (kind, rest) = s.split_once(':').ok_or_else(err)?;
        Ok(match kind {
            "pg" => Position::PgLsn { lsn: rest.parse()? },
            "binlog" => {
                let (file, offset) = rest.rsplit_once(':').ok_or_else(err)?;
                Position::BinlogFile {
                    file: file.to_owned(),
                    offset: offset.parse().map_err(|_| err())?,
                }
            }
            "mysql-gtid" => Position::MysqlGtid {
                set: rest.to_owned(),
            },
            "mariadb-gtid" => Position::MariadbGtid {
                list: rest.to_owned(),
            },
            "sqlite" => Position::SqliteSeq {
                seq: rest.parse().map_err(|_| err())?,
            },
            "changelog" => Position::ChangeLog {
                offset: rest.parse().map_err(|_| err())?,
            },
            _ => return Err(err()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_like_the_server_prints_it() {
        let lsn: PgLsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert!("1/".parse::<PgLsn>().is_err());
        assert!("100000000/0".parse::<PgLsn>().is_err());
    }

    #[test]
    fn positions_round_trip_through_strings() {
        let all = [
            Position::PgLsn {
                lsn: PgLsn(u64::MAX),
            },
            Position::BinlogFile {
                file: "mysql-bin.000007".into(),
                offset: 5_000_000_000,
            },
            Position::MysqlGtid {
                set: "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5".into(),
            },
            Position::MariadbGtid {
                list: "0-1-100,1-2-7".into(),
            },
            Position::SqliteSeq { seq: 42 },
            Position::ChangeLog { offset: 9 },
        ];
        for p in all {
            assert_eq!(p.to_string().parse::<Position>().unwrap(), p);
        }
    }

    #[test]
    fn binlog_offsets_over_4gb_order_correctly() {
        let a = Position::BinlogFile {
            file: "b.000009".into(),
            offset: 4_294_967_296,
        };
        let b = Position::BinlogFile {
            file: "b.000010".into(),
            offset: 4,
        };
        let c = Position::BinlogFile {
            file: "b.000009".into(),
            offset: 4_294_967_295,
        };
        assert_eq!(
            a.partial_cmp_same_source(&b),
            Some(std::cmp::Ordering::Less)
        );
        assert_eq!(
            c.partial_cmp_same_source(&a),
            Some(std::cmp::Ordering::Less)
        );
    }
}
