//! Reading one side of a comparison: tables with their keys, and rows by key ranges or by
//! keys, as model values, from PostgreSQL, MySQL/MariaDB or SQLite.
//!
//! Key order is binary on every engine (PostgreSQL `COLLATE "C"`, MySQL `BINARY`, SQLite's
//! default), so a key range holds the same rows on both sides whatever the columns'
//! collations are. For text keys this ordering cannot use a non-binary index: correct, but
//! slower on large tables.

use mysql_async::prelude::Queryable;
use rusqlite::Connection;
use tokio_postgres::Client;

use super::canon::{self, Canon, RowEncoder};
use crate::config::{Endpoint, EngineKind, Selection};
use crate::engine::mysql::catalog::{Kind, MyColumn};
use crate::engine::mysql::{self, apply as myapply, decode};
use crate::engine::postgres;
pub use crate::engine::postgres::Side as PgSide;
use crate::engine::sqlite;
use crate::model::schema::{QualifiedName, quote_ident as pg_ident, quote_literal};
use crate::model::value::{Row, Value};
use crate::model::{Column, DataType};
use crate::pipeline::{Error, Result};

/// A table as one side holds it.
#[derive(Clone, Debug)]
pub struct SideTable {
    pub name: QualifiedName,
    /// Copied (not generated) columns.
    pub columns: Vec<Column>,
    /// Key columns (primary key, or a NOT NULL unique key on MySQL); empty: no key.
    pub key: Vec<String>,
    /// MySQL/MariaDB: the columns as the decoder needs them.
    pub my_columns: Vec<MyColumn>,
    /// The catalog's row estimate (0 when unknown).
    pub estimated_rows: i64,
}

impl SideTable {
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// MySQL/MariaDB: the named column as the decoder needs it.
    pub fn my_column(&self, name: &str) -> Option<&MyColumn> {
        self.my_columns.iter().find(|c| c.name == name)
    }

    /// MySQL/MariaDB: `columns` as the decoder needs them; `what` names the read in the
    /// error for a column the table lacks.
    fn my_columns_of(&self, columns: &[String], what: &str) -> Result<Vec<&MyColumn>> {
        columns
            .iter()
            .map(|c| {
                self.my_column(c)
                    .ok_or_else(|| Error::Definite(format!("{what}: no column {c}")))
            })
            .collect()
    }

    /// The key column when the key is a single integer column.
    pub fn integer_key(&self) -> Option<&str> {
        let [k] = self.key.as_slice() else {
            return None;
        };
        self.column(k)
            .is_some_and(|c| {
                matches!(
                    c.data_type,
                    DataType::Int16 | DataType::Int32 | DataType::Int64
                )
            })
            .then_some(k.as_str())
    }
}

/// How a column's value prints alike on PostgreSQL and MySQL/MariaDB, so that each server
/// can digest the same row text (cross-engine pushdown). Columns of other types are not
/// printed alike and leave their table to streaming.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Portable {
    /// Integers and decimals of this scale: plain decimal digits.
    Number(u32),
    /// Character data (and enum labels), as UTF-8.
    Text,
    /// `YYYY-MM-DD`.
    Date,
    /// `YYYY-MM-DD HH:MM:SS.ffffff` (no time zone).
    DateTime,
    /// `1`/`0` (MySQL: the stored integer, so a 2 is not taken for true).
    Bool,
}

/// One side's part of a cross-engine digest: its compared columns with how each prints, and
/// the columns whose NULL flag is part of the row text (nullable on either side).
#[derive(Clone, Debug, Default)]
pub struct PortableRow {
    pub columns: Vec<(String, Portable)>,
    pub flagged: Vec<String>,
}

impl SideTable {
    /// How the column prints alike on both engines (see [`Portable`]); `None` when it does not.
    pub fn portable(&self, engine: EngineKind, name: &str) -> Option<Portable> {
        let column = self.column(name)?;
        let scale = || match column.data_type {
            DataType::Numeric { scale: Some(s), .. } => Some(Portable::Number(s)),
            _ => None,
        };
        match engine {
            EngineKind::Mysql => {
                let my = self.my_column(name)?;
                match my.kind {
                    Kind::Int { .. } => Some(Portable::Number(0)),
                    Kind::Decimal => scale(),
                    Kind::Text | Kind::Enum => Some(Portable::Text),
                    Kind::Date => Some(Portable::Date),
                    Kind::Datetime => Some(Portable::DateTime),
                    Kind::Bool => Some(Portable::Bool),
                    _ => None,
                }
            }
            EngineKind::Postgres => match &column.data_type {
                DataType::Int16 | DataType::Int32 | DataType::Int64 => Some(Portable::Number(0)),
                DataType::Numeric { .. } => scale(),
                DataType::Text
                | DataType::Varchar { .. }
                | DataType::Char { .. }
                | DataType::Enum { .. } => Some(Portable::Text),
                DataType::Date => Some(Portable::Date),
                DataType::Timestamp => Some(Portable::DateTime),
                DataType::Bool => Some(Portable::Bool),
                _ => None,
            },
            EngineKind::Sqlite => None,
        }
    }
}

/// A connection to one side.
pub enum Reader {
    Postgres(Client),
    Mysql(mysql_async::Conn, String),
    Sqlite(Connection),
}

fn block<R>(f: impl FnOnce() -> R) -> R {
    tokio::task::block_in_place(f)
}

fn is_text(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Text | DataType::Varchar { .. } | DataType::Char { .. }
    )
}

impl Reader {
    /// Connect to one side (`side` names it in messages: which URL and password flag).
    pub async fn connect(endpoint: &Endpoint, side: PgSide, role: &str) -> Result<Reader> {
        match endpoint.engine {
            EngineKind::Postgres => {
                let client = postgres::connect(endpoint, side, role).await?;
                // Text output in one fixed form: UTC offsets, shortest exact floats, hex bytea.
                client
                    .batch_execute(
                        "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET extra_float_digits = 3; \
                         SET bytea_output = 'hex'; SET IntervalStyle = 'postgres'; SET statement_timeout = 0",
                    )
                    .await
                    .map_err(|e| postgres::Error::query(format!("setting up {role}"), e))?;
                Ok(Reader::Postgres(client))
            }
            EngineKind::Mysql => {
                let mut conn = mysql::connect(endpoint, role).await?;
                // A table read in one sorted pass is read in step with the other side: the
                // server may wait on a full socket while the other server sorts.
                conn.query_drop("SET SESSION net_write_timeout = 86400")
                    .await
                    .map_err(|e| mysql::error(format!("setting up {role}"), e))?;
                Ok(Reader::Mysql(conn, endpoint.database.clone()))
            }
            EngineKind::Sqlite => {
                let path = endpoint.database.clone();
                let conn = block(|| sqlite::open(&path, false))?;
                Ok(Reader::Sqlite(conn))
            }
        }
    }

    /// The side's tables (selected ones), with their copied columns and keys.
    pub async fn tables(&mut self, selection: &Selection) -> Result<Vec<SideTable>> {
        match self {
            Reader::Postgres(client) => {
                let schema = postgres::catalog::read_schema(client, selection).await?;
                Ok(schema
                    .tables
                    .into_iter()
                    .filter(|t| t.holds_rows())
                    .map(|t| SideTable {
                        key: t
                            .primary_key
                            .as_ref()
                            .map(|k| k.columns.clone())
                            .unwrap_or_default(),
                        columns: t.copied_columns().cloned().collect(),
                        estimated_rows: t.estimated_rows.unwrap_or(0),
                        name: t.name,
                        my_columns: Vec::new(),
                    })
                    .collect())
            }
            Reader::Mysql(conn, database) => {
                let catalog = mysql::catalog::read(conn, database).await?;
                Ok(catalog
                    .tables
                    .into_iter()
                    .filter(|t| selection.selects(&t.table.name) && !t.name().is_empty())
                    .map(|t| {
                        let keep: Vec<usize> = t.copied();
                        SideTable {
                            name: t.table.name.clone(),
                            columns: t
                                .table
                                .columns
                                .iter()
                                .filter(|c| c.generated.is_none())
                                .cloned()
                                .collect(),
                            key: t.key.clone(),
                            my_columns: keep.iter().map(|&i| t.columns[i].clone()).collect(),
                            estimated_rows: t.table.estimated_rows.unwrap_or(0),
                        }
                    })
                    .collect())
            }
            Reader::Sqlite(conn) => {
                let catalog = block(|| sqlite::read_catalog(conn))?;
                Ok(catalog
                    .tables
                    .into_iter()
                    .filter(|t| selection.selects(&t.table.name))
                    .map(|t| SideTable {
                        name: t.table.name.clone(),
                        columns: t
                            .columns
                            .iter()
                            .filter_map(|c| t.table.column(c).cloned())
                            .collect(),
                        key: t.key.clone(),
                        my_columns: Vec::new(),
                        estimated_rows: t.table.estimated_rows.unwrap_or(0),
                    })
                    .collect())
            }
        }
    }

    /// The source's current change position, as the job records its own (`pg:LSN`,
    /// `binlog:file:offset`, `sqlite:N`).
    pub async fn current_position(&mut self) -> Result<Option<crate::model::Position>> {
        let text = match self {
            Reader::Postgres(c) => {
                let row = c
                    .query_one("SELECT pg_current_wal_lsn()::text", &[])
                    .await
                    .map_err(|e| postgres::Error::query("reading the source's WAL position", e))?;
                format!("pg:{}", row.get::<_, String>(0))
            }
            Reader::Mysql(c, _) => {
                let cursor = mysql::binlog::current_position(c).await?;
                format!("binlog:{}:{}", cursor.file, cursor.offset)
            }
            Reader::Sqlite(c) => format!("sqlite:{}", block(|| sqlite::current_position(c))?),
        };
        Ok(text.parse().ok())
    }

    /// Whether this side can compute cross-engine digests: MySQL/MariaDB always; PostgreSQL
    /// from version 14 (`bit_xor`) with a UTF-8 database (`md5` hashes the stored bytes).
    pub async fn portable_digests(&mut self) -> Result<bool> {
        match self {
            Reader::Postgres(client) => {
                let row = client
                    .query_one(
                        "SELECT current_setting('server_encoding') = 'UTF8' \
                         AND current_setting('server_version_num')::int >= 140000",
                        &[],
                    )
                    .await
                    .map_err(|e| postgres::Error::query("reading the server encoding", e))?;
                Ok(row.get(0))
            }
            Reader::Mysql(..) => Ok(true),
            Reader::Sqlite(_) => Ok(false),
        }
    }

    /// Row count and a digest of the rows with a single integer key in `(lo, hi]`, computed
    /// by the server: MySQL/MariaDB two exact CRC32 sums (64 bits), PostgreSQL two exact
    /// sums of 64-bit `hashtextextended` (128 bits). With `portable`, the digest both engines
    /// compute alike instead: the XOR of the first 64 bits of the MD5 of each row's text
    /// (values printed per [`Portable`], joined by U+001F, then the NULL flags).
    pub async fn chunk_digest(
        &mut self,
        t: &SideTable,
        columns: &[String],
        portable: Option<&PortableRow>,
        lo: i64,
        hi: i64,
    ) -> Result<(i64, String, String)> {
        if let Some(row) = portable {
            return self.portable_digest(t, row, lo, hi).await;
        }
        if let Reader::Postgres(client) = self {
            // The row's composite text (NULL unquoted and empty, '' quoted: distinct), hashed
            // twice with different seeds; sums of bigints are exact numerics.
            let row = columns
                .iter()
                .map(|c| pg_ident(c))
                .collect::<Vec<_>>()
                .join(", ");
            let key = pg_ident(&t.key[0]);
            let sql = format!(
                "SELECT count(*), coalesce(sum(hashtextextended(r, 0)), 0)::text, coalesce(sum(hashtextextended(r, 1)), 0)::text \
                 FROM (SELECT ROW({row})::text AS r FROM {} WHERE {key} > {lo} AND {key} <= {hi}) x",
                t.name
            );
            let what = format!("digesting rows of {}", t.name.display_name());
            let r = client
                .query_one(&sql, &[])
                .await
                .map_err(|e| postgres::Error::query(what, e))?;
            return Ok((r.get(0), r.get(1), r.get(2)));
        }
        let Reader::Mysql(conn, _) = self else {
            return Err(Error::Definite(
                "server-side chunk digests are computed on PostgreSQL and MySQL/MariaDB only"
                    .into(),
            ));
        };
        // Values joined by the unit separator, then one flag per nullable column (as
        // pt-table-checksum does): CONCAT_WS skips NULLs, the flags tell where they were.
        let mut parts: Vec<String> = columns.iter().map(|c| mysql::quote_ident(c)).collect();
        let flags: Vec<String> = columns
            .iter()
            .filter(|c| t.my_column(c).is_none_or(|m| m.nullable))
            .map(|c| format!("ISNULL({})", mysql::quote_ident(c)))
            .collect();
        if !flags.is_empty() {
            parts.push(format!("CONCAT({})", flags.join(", ")));
        }
        let row = parts.join(", ");
        let key = mysql::quote_ident(&t.key[0]);
        let sql = format!(
            "SELECT COUNT(*), CAST(IFNULL(SUM(CRC32(r)), 0) AS CHAR), CAST(IFNULL(SUM(CRC32(CONCAT(r, '~'))), 0) AS CHAR) \
             FROM (SELECT CONCAT_WS(CHAR(31), {row}) AS r FROM {} WHERE {key} > {lo} AND {key} <= {hi}) x",
            mysql::quote_ident(&t.name.name)
        );
        let what = format!("digesting rows of {}", t.name.display_name());
        let row: Option<(i64, String, String)> = conn
            .query_first(sql)
            .await
            .map_err(|e| mysql::error(what, e))?;
        Ok(row.unwrap_or((0, "0".into(), "0".into())))
    }

    async fn portable_digest(
        &mut self,
        t: &SideTable,
        row: &PortableRow,
        lo: i64,
        hi: i64,
    ) -> Result<(i64, String, String)> {
        let what = format!("digesting rows of {}", t.name.display_name());
        match self {
            Reader::Postgres(client) => {
                let mut parts: Vec<String> = row
                    .columns
                    .iter()
                    .map(|(c, p)| {
                        let c = pg_ident(c);
                        match p {
                            Portable::Number(_) | Portable::Text | Portable::Date => {
                                format!("{c}::text")
                            }
                            Portable::DateTime => {
                                format!("to_char({c}, 'YYYY-MM-DD HH24:MI:SS.US')")
                            }
                            Portable::Bool => {
                                format!("CASE WHEN {c} THEN '1' WHEN NOT {c} THEN '0' END")
                            }
                        }
                    })
                    .collect();
                if !row.flagged.is_empty() {
                    let flags: Vec<String> = row
                        .flagged
                        .iter()
                        .map(|c| format!("({} IS NULL)::int", pg_ident(c)))
                        .collect();
                    parts.push(format!("concat({})", flags.join(", ")));
                }
                let key = pg_ident(&t.key[0]);
                let sql = format!(
                    "SELECT count(*), coalesce(bit_xor(('x' || left(md5(concat_ws(chr(31), {})), 16))::bit(64)::bigint), 0) \
                     FROM {} WHERE {key} > {lo} AND {key} <= {hi}",
                    parts.join(", "),
                    t.name
                );
                let r = client
                    .query_one(&sql, &[])
                    .await
                    .map_err(|e| postgres::Error::query(what, e))?;
                // MySQL prints the 64 bits unsigned.
                Ok((
                    r.get(0),
                    (r.get::<_, i64>(1) as u64).to_string(),
                    String::new(),
                ))
            }
            Reader::Mysql(conn, _) => {
                let mut parts: Vec<String> = row
                    .columns
                    .iter()
                    .map(|(c, p)| {
                        let q = mysql::quote_ident(c);
                        match p {
                            Portable::Text => {
                                let utf8 = t
                                    .my_column(c)
                                    .and_then(|m| m.charset.as_deref())
                                    .is_some_and(utf8_charset);
                                if utf8 {
                                    q
                                } else {
                                    format!("CONVERT({q} USING utf8mb4)")
                                }
                            }
                            Portable::DateTime => {
                                format!("DATE_FORMAT({q}, '%Y-%m-%d %H:%i:%s.%f')")
                            }
                            Portable::Number(_) | Portable::Date | Portable::Bool => q,
                        }
                    })
                    .collect();
                if !row.flagged.is_empty() {
                    let flags: Vec<String> = row
                        .flagged
                        .iter()
                        .map(|c| format!("ISNULL({})", mysql::quote_ident(c)))
                        .collect();
                    parts.push(format!("CONCAT({})", flags.join(", ")));
                }
                let key = mysql::quote_ident(&t.key[0]);
                let sql = format!(
                    "SELECT COUNT(*), CAST(BIT_XOR(CAST(CONV(LEFT(MD5(CONCAT_WS(CHAR(31), {})), 16), 16, 10) AS UNSIGNED)) AS CHAR) \
                     FROM {} WHERE {key} > {lo} AND {key} <= {hi}",
                    parts.join(", "),
                    mysql::quote_ident(&t.name.name)
                );
                let r: Option<(i64, String)> = conn
                    .query_first(sql)
                    .await
                    .map_err(|e| mysql::error(what, e))?;
                let (n, digest) = r.unwrap_or((0, "0".into()));
                Ok((n, digest, String::new()))
            }
            Reader::Sqlite(_) => Err(Error::Definite(
                "cross-engine chunk digests are computed on PostgreSQL and MySQL/MariaDB only"
                    .into(),
            )),
        }
    }

    /// The smallest and largest value of a single integer key (index lookups), `None` for
    /// an empty table or another kind of key.
    pub async fn integer_key_bounds(&mut self, t: &SideTable) -> Result<Option<(i64, i64)>> {
        let Some(k) = t.integer_key() else {
            return Ok(None);
        };
        let sql = format!(
            "SELECT CAST(min({0}) AS {2}), CAST(max({0}) AS {2}) FROM {1}",
            self.key_expr(t, k),
            self.table_name(t),
            match self {
                Reader::Postgres(_) => "bigint",
                Reader::Mysql(..) => "SIGNED",
                Reader::Sqlite(_) => "INTEGER",
            }
        );
        let what = format!("reading the key range of {}", t.name.display_name());
        let bounds: Option<(Option<i64>, Option<i64>)> = match self {
            Reader::Postgres(c) => {
                let row = c
                    .query_one(&sql, &[])
                    .await
                    .map_err(|e| postgres::Error::query(what, e))?;
                Some((row.get(0), row.get(1)))
            }
            Reader::Mysql(c, _) => c
                .query_first(sql)
                .await
                .map_err(|e| mysql::error(what, e))?,
            Reader::Sqlite(c) => Some(block(|| {
                c.query_row(&sql, [], |r| Ok((r.get(0)?, r.get(1)?)))
                    .map_err(|e| Error::Definite(format!("{what}: {e}")))
            })?),
        };
        Ok(match bounds {
            Some((Some(lo), Some(hi))) => Some((lo, hi)),
            _ => None,
        })
    }

    /// Rows of `columns` (names) with key in `(after, upto]` (open ends when `None`), in
    /// binary key order, at most `limit`. `key_at` are the key columns' places in `columns`.
    pub async fn range(
        &mut self,
        t: &SideTable,
        columns: &[String],
        after: Option<&Row>,
        upto: Option<&Row>,
        limit: usize,
    ) -> Result<Vec<Row>> {
        let sql = format!(
            "SELECT {} FROM {}{} ORDER BY {} LIMIT {limit}",
            self.select_list(columns),
            self.table_name(t),
            self.range_filter(t, after, upto)?,
            self.key_list(t)
        );
        self.query(t, columns, &sql).await
    }

    /// ` WHERE` the key is in `(after, upto]` (either end open when `None`).
    fn range_filter(
        &self,
        t: &SideTable,
        after: Option<&Row>,
        upto: Option<&Row>,
    ) -> Result<String> {
        let mut conditions = Vec::new();
        if let Some(a) = after {
            conditions.push(self.key_compare(t, ">", a)?);
        }
        if let Some(u) = upto {
            conditions.push(self.key_compare(t, "<=", u)?);
        }
        Ok(if conditions.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conditions.join(" AND "))
        })
    }

    /// What [`Reader::range`] reads, reduced to each row's key bytes and digest as
    /// [`RowEncoder`] makes them from the rows `range` returns (the same bytes), without
    /// building the rows: PostgreSQL's rows come as `COPY` text, MySQL's cells are encoded
    /// from the driver's bytes.
    #[allow(clippy::too_many_arguments)]
    pub async fn range_digests(
        &mut self,
        t: &SideTable,
        columns: &[String],
        canon: &[Canon],
        key_at: &[usize],
        after: Option<&Row>,
        upto: Option<&Row>,
        limit: usize,
    ) -> Result<DigestPage> {
        let filter = self.range_filter(t, after, upto)?;
        let mut page = DigestPage::default();
        if let Reader::Sqlite(_) = self {
            let rows = self.range(t, columns, after, upto, limit).await?;
            let mut enc = RowEncoder::default();
            for r in &rows {
                enc.clear();
                for (v, c) in r.iter().zip(canon) {
                    enc.value(v, c);
                }
                page.push(&enc, key_at);
            }
            page.last_key = rows
                .last()
                .map(|r| key_at.iter().map(|&k| r[k].clone()).collect());
            return Ok(page);
        }
        let mut rows = self.ordered_rows(t, columns, &filter, Some(limit)).await?;
        let more = rows
            .next_batch(canon, key_at, usize::MAX, &mut page, None)
            .await?;
        debug_assert!(!more, "a batch of any size reads to the end");
        Ok(page)
    }

    /// `columns` of the rows of `t` that pass `filter` (a ` WHERE` clause or nothing), in
    /// key order, at most `limit`, as one query read batch by batch (see [`RowStream`]).
    pub async fn ordered_rows(
        &mut self,
        t: &SideTable,
        columns: &[String],
        filter: &str,
        limit: Option<usize>,
    ) -> Result<RowStream<'_>> {
        let limit = limit.map(|n| format!(" LIMIT {n}")).unwrap_or_default();
        let tail = format!("{filter} ORDER BY {}{limit}", self.key_list(t));
        let table = self.table_name(t);
        let name = t.name.display_name();
        let what = || format!("reading table {name}");
        match self {
            Reader::Postgres(client) => {
                let outs: Vec<PgOut> = columns.iter().map(|c| pg_out(t, c)).collect();
                let list = columns
                    .iter()
                    .zip(&outs)
                    .enumerate()
                    .map(|(i, (c, out))| match out {
                        PgOut::Cast => format!("{}::text AS _kuaka_c{i}", pg_ident(c)),
                        _ => format!("{} AS _kuaka_c{i}", pg_ident(c)),
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                let sql = format!("COPY (SELECT {list} FROM {table}{tail}) TO STDOUT");
                let rows = client
                    .copy_out(&sql)
                    .await
                    .map_err(|e| postgres::Error::query(what(), e))?;
                Ok(RowStream::Postgres {
                    rows: Box::pin(rows),
                    copy: CopyText::default(),
                    outs,
                    columns: columns.to_vec(),
                    name,
                })
            }
            Reader::Mysql(conn, _) => {
                let cols: Vec<MyColumn> = t
                    .my_columns_of(columns, &what())?
                    .into_iter()
                    .cloned()
                    .collect();
                let list = columns
                    .iter()
                    .map(|c| mysql::quote_ident(c))
                    .collect::<Vec<_>>()
                    .join(", ");
                let sql = format!("SELECT {list} FROM {table}{tail}");
                let rows = conn
                    .query_stream::<mysql_async::Row, _>(sql)
                    .await
                    .map_err(|e| mysql::error(what(), e))?;
                Ok(RowStream::Mysql { rows, cols, name })
            }
            Reader::Sqlite(_) => Err(Error::Definite(format!(
                "{}: SQLite tables are read by pages",
                what()
            ))),
        }
    }

    /// Every row of `columns`, in no particular order (tables without a key).
    pub async fn all_rows(&mut self, t: &SideTable, columns: &[String]) -> Result<Vec<Row>> {
        let sql = format!(
            "SELECT {} FROM {}",
            self.select_list(columns),
            self.table_name(t)
        );
        self.query(t, columns, &sql).await
    }

    /// Rows of `columns` whose key is one of `keys`.
    pub async fn by_keys(
        &mut self,
        t: &SideTable,
        columns: &[String],
        keys: &[Row],
    ) -> Result<Vec<Row>> {
        let mut rows = Vec::new();
        for chunk in keys.chunks(500) {
            let tuples = chunk
                .iter()
                .map(|k| self.key_tuple(t, k))
                .collect::<Result<Vec<_>>>()?;
            let lhs = t
                .key
                .iter()
                .map(|k| self.key_expr(t, k))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "SELECT {} FROM {} WHERE ({lhs}) IN ({})",
                self.select_list(columns),
                self.table_name(t),
                tuples.join(", ")
            );
            rows.extend(self.query(t, columns, &sql).await?);
        }
        Ok(rows)
    }

    /// Row count, and the smallest and largest key as text (single-column keys).
    pub async fn quick(&mut self, t: &SideTable) -> Result<(i64, Option<String>, Option<String>)> {
        let (min, max) = match t.key.as_slice() {
            [k] => (
                format!("min({})", self.key_expr(t, k)),
                format!("max({})", self.key_expr(t, k)),
            ),
            _ => ("NULL".to_owned(), "NULL".to_owned()),
        };
        let table = self.table_name(t);
        let what = format!("counting the rows of {}", t.name.display_name());
        match self {
            Reader::Postgres(c) => {
                let sql = format!("SELECT count(*), ({min})::text, ({max})::text FROM {table}");
                let row = c
                    .query_one(&sql, &[])
                    .await
                    .map_err(|e| postgres::Error::query(what, e))?;
                Ok((row.get(0), row.get(1), row.get(2)))
            }
            Reader::Mysql(c, _) => {
                let sql = format!(
                    "SELECT COUNT(*), CAST({min} AS CHAR), CAST({max} AS CHAR) FROM {table}"
                );
                let row: Option<(i64, Option<String>, Option<String>)> =
                    c.query_first(sql)
                        .await
                        .map_err(|e| mysql::error(what, e))?;
                Ok(row.unwrap_or((0, None, None)))
            }
            Reader::Sqlite(c) => block(|| {
                c.query_row(
                    &format!(
                        "SELECT count(*), CAST({min} AS TEXT), CAST({max} AS TEXT) FROM {table}"
                    ),
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .map_err(|e| Error::Definite(format!("{what}: {e}")))
            }),
        }
    }

    fn table_name(&self, t: &SideTable) -> String {
        match self {
            Reader::Postgres(_) => t.name.to_string(),
            Reader::Mysql(..) => mysql::quote_ident(&t.name.name),
            Reader::Sqlite(_) => sqlite::quote_ident(&t.name.name),
        }
    }

    fn select_list(&self, columns: &[String]) -> String {
        columns
            .iter()
            .enumerate()
            .map(|(i, c)| match self {
                // Everything as PostgreSQL's text output; the encoder reads it by type. The
                // alias matters: `ORDER BY "id"` would otherwise sort the text output column
                // named "id" ("10" before "9"), not the key.
                Reader::Postgres(_) => format!("{}::text AS _kuaka_c{i}", pg_ident(c)),
                Reader::Mysql(..) => mysql::quote_ident(c),
                Reader::Sqlite(_) => sqlite::quote_ident(c),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The key columns as compared and ordered, comma-separated.
    fn key_list(&self, t: &SideTable) -> String {
        t.key
            .iter()
            .map(|k| self.key_expr(t, k))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// A key column as compared and ordered: binary for text.
    fn key_expr(&self, t: &SideTable, k: &str) -> String {
        let text = t.column(k).is_some_and(|c| is_text(&c.data_type));
        match self {
            Reader::Postgres(_) if text => format!("{} COLLATE \"C\"", pg_ident(k)),
            Reader::Postgres(_) => pg_ident(k),
            Reader::Mysql(..) if text => format!("BINARY {}", mysql::quote_ident(k)),
            Reader::Mysql(..) => mysql::quote_ident(k),
            Reader::Sqlite(_) => sqlite::quote_ident(k),
        }
    }

    fn key_compare(&self, t: &SideTable, op: &str, key: &Row) -> Result<String> {
        let lhs = self.key_list(t);
        Ok(format!("({lhs}) {op} {}", self.key_tuple(t, key)?))
    }

    /// A key as a literal tuple of this engine.
    fn key_tuple(&self, t: &SideTable, key: &Row) -> Result<String> {
        let mut parts = Vec::with_capacity(key.len());
        for (name, v) in t.key.iter().zip(key) {
            let column = t
                .column(name)
                .ok_or_else(|| Error::Definite(format!("key column {name} is not in the table")))?;
            parts.push(match self {
                Reader::Postgres(_) => match v {
                    Value::Null => "NULL".to_owned(),
                    Value::Bytes(_) => postgres::rows::literal(v, &DataType::Bytes)
                        .map_err(|e| Error::Definite(format!("key column {name}: {e}")))?,
                    other => {
                        let text = match other {
                            Value::Text(t) | Value::Native(t) | Value::Decimal(t) => t.clone(),
                            Value::Int(i) => i.to_string(),
                            Value::UInt(u) => u.to_string(),
                            Value::Bool(b) => b.to_string(),
                            Value::Float(f) => format!("{f:?}"),
                            _ => String::new(),
                        };
                        let collate = if is_text(&column.data_type) {
                            " COLLATE \"C\""
                        } else {
                            ""
                        };
                        format!("{}::{}{collate}", quote_literal(&text), column.native_type)
                    }
                },
                Reader::Mysql(..) => {
                    let my = t.my_column(name);
                    let kind = my.map(|c| c.kind).unwrap_or(Kind::Text);
                    let mut s = String::new();
                    myapply::literal(kind, v, &mut s).map_err(|e| {
                        Error::Definite(format!("key column {name} of {}: {e}", t.name.name))
                    })?;
                    // The literal's bytes in the column's character set: `BINARY col`
                    // compares the stored bytes, and the session's literals are utf8mb4.
                    let charset = my.and_then(|c| c.charset.as_deref()).filter(|cs| {
                        !utf8_charset(cs)
                            && *cs != "binary"
                            && cs.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                    });
                    match charset {
                        Some(cs) if is_text(&column.data_type) => {
                            format!("BINARY CONVERT({s} USING {cs})")
                        }
                        _ if is_text(&column.data_type) => format!("BINARY {s}"),
                        _ => s,
                    }
                }
                Reader::Sqlite(_) => sqlite_literal(v),
            });
        }
        Ok(format!("({})", parts.join(", ")))
    }

    async fn query(&mut self, t: &SideTable, columns: &[String], sql: &str) -> Result<Vec<Row>> {
        let what = || format!("reading table {}", t.name.display_name());
        match self {
            Reader::Postgres(client) => {
                let bytea: Vec<bool> = columns
                    .iter()
                    .map(|c| t.column(c).is_some_and(|c| c.data_type == DataType::Bytes))
                    .collect();
                let rows = client
                    .simple_query(sql)
                    .await
                    .map_err(|e| postgres::Error::query(what(), e))?;
                let mut out = Vec::new();
                for message in rows {
                    if let tokio_postgres::SimpleQueryMessage::Row(r) = message {
                        let mut row = Vec::with_capacity(columns.len());
                        for (i, &is_bytea) in bytea.iter().enumerate() {
                            row.push(match r.get(i) {
                                None => Value::Null,
                                Some(s) if is_bytea => Value::Bytes(unhex(s).ok_or_else(|| {
                                    Error::Definite(format!("{}: bytea {s:?} is not hex", what()))
                                })?),
                                Some(s) => Value::Text(s.to_owned()),
                            });
                        }
                        out.push(row);
                    }
                }
                Ok(out)
            }
            Reader::Mysql(conn, _) => {
                let cols = t.my_columns_of(columns, &what())?;
                let rows: Vec<mysql_async::Row> =
                    conn.query(sql).await.map_err(|e| mysql::error(what(), e))?;
                rows.into_iter()
                    .map(|mut r| {
                        cols.iter()
                            .enumerate()
                            .map(|(i, c)| {
                                let raw = match r.take::<mysql_async::Value, _>(i) {
                                    Some(mysql_async::Value::Bytes(b)) => Some(b),
                                    _ => None,
                                };
                                fast_value(c, raw).map_err(|e| {
                                    Error::Definite(format!("{}, column {}: {e}", what(), c.name))
                                })
                            })
                            .collect()
                    })
                    .collect()
            }
            Reader::Sqlite(conn) => block(|| {
                let mut stmt = conn
                    .prepare_cached(sql)
                    .map_err(|e| Error::Definite(format!("{}: {e}", what())))?;
                let n = columns.len();
                stmt.query_map([], |r| {
                    (0..n)
                        .map(|i| r.get_ref(i).map(sqlite::to_value))
                        .collect::<rusqlite::Result<Row>>()
                })
                .and_then(|rows| rows.collect())
                .map_err(|e| Error::Definite(format!("{}: {e}", what())))
            }),
        }
    }
}

/// One side's rows in key order from one query, taken batch by batch: PostgreSQL's as
/// `COPY` text, MySQL's from the driver's stream.
pub enum RowStream<'a> {
    Postgres {
        rows: std::pin::Pin<Box<tokio_postgres::CopyOutStream>>,
        copy: CopyText,
        outs: Vec<PgOut>,
        columns: Vec<String>,
        name: String,
    },
    Mysql {
        rows: mysql_async::ResultSetStream<
            'a,
            'a,
            'static,
            mysql_async::Row,
            mysql_async::TextProtocol,
        >,
        cols: Vec<MyColumn>,
        name: String,
    },
}

impl RowStream<'_> {
    /// Add at least `want` rows (fewer at the end) to `page`: key bytes and digests, and with
    /// `keys` each row's key values too. `false` once the rows have ended.
    pub async fn next_batch(
        &mut self,
        canon: &[Canon],
        key_at: &[usize],
        want: usize,
        page: &mut DigestPage,
        mut keys: Option<&mut Vec<Row>>,
    ) -> Result<bool> {
        let mut enc = RowEncoder::default();
        let mut key: Row = vec![Value::Null; key_at.len()];
        let start = page.len();
        let taken = |page: &DigestPage| page.len() - start;
        match self {
            RowStream::Postgres {
                rows,
                copy,
                outs,
                columns,
                name,
            } => {
                let what = || format!("reading table {name}");
                let failed = |e: String| Error::Definite(format!("{}, {e}", what()));
                // Without `keys`, only the last row's key is needed (to page on): its line is
                // kept and read again at the end.
                let mut last_line: Vec<u8> = Vec::new();
                let mut more = true;
                while taken(page) < want {
                    let next = futures_util::TryStreamExt::try_next(rows)
                        .await
                        .map_err(|e| postgres::Error::query(what(), e))?;
                    let Some(chunk) = next else {
                        copy.finish().map_err(failed)?;
                        more = false;
                        break;
                    };
                    copy.feed(&chunk, &mut |line, copy| {
                        let row_key = keys.is_some().then_some(&mut key);
                        pg_line(copy, line, outs, columns, canon, &mut enc, key_at, row_key)
                            .map_err(failed)?;
                        page.push(&enc, key_at);
                        match keys.as_mut() {
                            Some(keys) => keys.push(key.clone()),
                            None => {
                                last_line.clear();
                                last_line.extend_from_slice(line);
                            }
                        }
                        Ok(())
                    })?;
                }
                if taken(page) > 0 {
                    if keys.is_none() {
                        let line = &last_line;
                        pg_line(
                            copy,
                            line,
                            outs,
                            columns,
                            canon,
                            &mut enc,
                            key_at,
                            Some(&mut key),
                        )
                        .map_err(failed)?;
                    }
                    page.last_key = Some(key);
                }
                Ok(more)
            }
            RowStream::Mysql { rows, cols, name } => {
                let what = || format!("reading table {name}");
                let mut last: Option<mysql_async::Row> = None;
                let more = loop {
                    if taken(page) >= want {
                        break true;
                    }
                    let next = futures_util::TryStreamExt::try_next(rows)
                        .await
                        .map_err(|e| mysql::error(what(), e))?;
                    let Some(r) = next else {
                        break false;
                    };
                    enc.clear();
                    for (i, c) in cols.iter().enumerate() {
                        let raw = match r.as_ref(i) {
                            Some(mysql_async::Value::Bytes(b)) => Some(b.as_slice()),
                            _ => None,
                        };
                        my_cell(c, raw, &canon[i], enc.cell()).map_err(|e| {
                            Error::Definite(format!("{}, column {}: {e}", what(), c.name))
                        })?;
                        enc.end_cell();
                    }
                    page.push(&enc, key_at);
                    if let Some(keys) = keys.as_mut() {
                        keys.push(
                            my_key(cols, &r, key_at)
                                .map_err(|e| Error::Definite(format!("{}, {e}", what())))?,
                        );
                    }
                    last = Some(r);
                };
                if let Some(r) = last {
                    page.last_key = Some(
                        my_key(cols, &r, key_at)
                            .map_err(|e| Error::Definite(format!("{}, {e}", what())))?,
                    );
                }
                Ok(more)
            }
        }
    }
}

/// Encode one `COPY` text row into `enc`, and with `key` its key cells (in key order).
#[allow(clippy::too_many_arguments)]
fn pg_line(
    copy: &mut CopyText,
    line: &[u8],
    outs: &[PgOut],
    columns: &[String],
    canon: &[Canon],
    enc: &mut RowEncoder,
    key_at: &[usize],
    mut key: Option<&mut Row>,
) -> std::result::Result<(), String> {
    enc.clear();
    copy.cells(line, outs.len(), |i, cell| {
        let out = enc.cell();
        let cell = cell
            .map(|text| pg_cell(text, outs[i]))
            .transpose()
            .map_err(|e| format!("column {}: {e}", columns[i]))?;
        match &cell {
            None => canon::encode(&Value::Null, &canon[i], out),
            Some(PgCell::Text(s)) => canon::encode_str(s, &canon[i], out),
            Some(PgCell::Bytes(b)) => canon::encode_bytes(b, &canon[i], out),
        }
        enc.end_cell();
        if let (Some(key), Some(k)) = (key.as_mut(), key_at.iter().position(|&k| k == i)) {
            key[k] = match cell {
                None => Value::Null,
                Some(PgCell::Text(s)) => Value::Text(s.to_owned()),
                Some(PgCell::Bytes(b)) => Value::Bytes(b),
            };
        }
        Ok(())
    })
}

/// A MySQL/MariaDB row's key values (in key order), as [`fast_value`] reads them.
fn my_key(
    cols: &[MyColumn],
    r: &mysql_async::Row,
    key_at: &[usize],
) -> std::result::Result<Row, String> {
    key_at
        .iter()
        .map(|&k| {
            let raw = match r.as_ref(k) {
                Some(mysql_async::Value::Bytes(b)) => Some(b.clone()),
                _ => None,
            };
            fast_value(&cols[k], raw).map_err(|e| format!("column {}: {e}", cols[k].name))
        })
        .collect()
}

/// Rows of a key range as the comparison needs them when they are equal: each row's key
/// bytes and digest (see [`RowEncoder`]), and the last row's key to read on from.
#[derive(Debug, Default)]
pub struct DigestPage {
    keys: Vec<u8>,
    key_ends: Vec<usize>,
    digests: Vec<u128>,
    pub last_key: Option<Row>,
}

impl DigestPage {
    pub fn len(&self) -> usize {
        self.digests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    fn push(&mut self, enc: &RowEncoder, key_at: &[usize]) {
        enc.key_into(key_at, &mut self.keys);
        self.key_ends.push(self.keys.len());
        self.digests.push(enc.digest());
    }

    /// Row `i`'s key bytes and digest.
    pub fn row(&self, i: usize) -> (&[u8], u128) {
        let start = if i == 0 { 0 } else { self.key_ends[i - 1] };
        (&self.keys[start..self.key_ends[i]], self.digests[i])
    }

    /// Append the rows of the next page.
    pub fn extend(&mut self, next: DigestPage) {
        let offset = self.keys.len();
        self.keys.extend_from_slice(&next.keys);
        self.key_ends
            .extend(next.key_ends.iter().map(|e| e + offset));
        self.digests.extend_from_slice(&next.digests);
        if next.last_key.is_some() {
            self.last_key = next.last_key;
        }
    }

    /// The same keys in the same order, each with the same digest.
    pub fn same_rows(&self, other: &DigestPage) -> bool {
        self.digests == other.digests && self.key_ends == other.key_ends && self.keys == other.keys
    }
}

/// How a PostgreSQL column is read from `COPY` text so that it gives the text `::text` gives
/// (what [`Reader::range`] selects): most types print the same both ways; booleans print
/// `t`/`f` instead of `true`/`false`, and `char(n)` keeps its padding, which the cast trims.
/// Other types are cast in the query.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PgOut {
    Plain,
    Bool,
    Char,
    Bytea,
    Cast,
}

fn pg_out(t: &SideTable, column: &str) -> PgOut {
    match t.column(column).map(|c| &c.data_type) {
        Some(DataType::Bool) => PgOut::Bool,
        Some(DataType::Char { .. }) => PgOut::Char,
        Some(DataType::Bytes) => PgOut::Bytea,
        Some(
            DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::Float32
            | DataType::Float64
            | DataType::Numeric { .. }
            | DataType::Text
            | DataType::Varchar { .. }
            | DataType::Date
            | DataType::Timestamp
            | DataType::TimestampTz
            | DataType::Uuid
            | DataType::Json
            | DataType::Jsonb,
        ) => PgOut::Plain,
        _ => PgOut::Cast,
    }
}

/// A PostgreSQL cell as [`Reader::query`] reads it: the text `::text` gives, or the bytes of
/// a `bytea` (hex).
enum PgCell<'a> {
    Text(&'a str),
    Bytes(Vec<u8>),
}

fn pg_cell(text: &str, out: PgOut) -> std::result::Result<PgCell<'_>, String> {
    Ok(match out {
        PgOut::Bool => PgCell::Text(match text {
            "t" => "true",
            "f" => "false",
            other => other,
        }),
        PgOut::Char => PgCell::Text(text.trim_end_matches(' ')),
        PgOut::Bytea => {
            PgCell::Bytes(unhex(text).ok_or_else(|| format!("bytea {text:?} is not hex"))?)
        }
        PgOut::Plain | PgOut::Cast => PgCell::Text(text),
    })
}

/// A reader of `COPY ... TO STDOUT` text output: rows end with a newline, cells are
/// tab-separated, `\N` is NULL, and backslash escapes the rest.
#[derive(Default)]
pub struct CopyText {
    /// A row cut by the end of a message, waiting for the rest.
    partial: Vec<u8>,
    /// One cell's unescaped text.
    unescaped: String,
}

impl CopyText {
    /// Call `row` for every whole row of `data` (after what an earlier call left).
    fn feed<F>(&mut self, data: &[u8], row: &mut F) -> Result<()>
    where
        F: FnMut(&[u8], &mut CopyText) -> Result<()>,
    {
        let mut partial = std::mem::take(&mut self.partial);
        let result = if partial.is_empty() {
            let used = self.rows(data, row)?;
            partial.extend_from_slice(&data[used..]);
            Ok(())
        } else {
            partial.extend_from_slice(data);
            let used = self.rows(&partial, row)?;
            partial.drain(..used);
            Ok(())
        };
        self.partial = partial;
        result
    }

    fn rows<F>(&mut self, data: &[u8], row: &mut F) -> Result<usize>
    where
        F: FnMut(&[u8], &mut CopyText) -> Result<()>,
    {
        let mut used = 0;
        for end in memchr::memchr_iter(b'\n', data) {
            row(&data[used..end], self)?;
            used = end + 1;
        }
        Ok(used)
    }

    fn finish(&self) -> std::result::Result<(), String> {
        if self.partial.is_empty() {
            Ok(())
        } else {
            Err("the COPY output ended in the middle of a row".into())
        }
    }

    /// Call `cell` with each cell of `line` (`None` for NULL), checking there are `count`.
    fn cells(
        &mut self,
        line: &[u8],
        count: usize,
        mut cell: impl FnMut(usize, Option<&str>) -> std::result::Result<(), String>,
    ) -> std::result::Result<(), String> {
        let line = std::str::from_utf8(line)
            .map_err(|_| "the server sent text that is not UTF-8".to_owned())?;
        let bytes = line.as_bytes();
        let (mut n, mut start) = (0, 0);
        loop {
            // The cell's end: the next tab that no backslash escapes.
            let (mut at, mut escaped) = (start, false);
            let end = loop {
                match memchr::memchr2(b'\t', b'\\', &bytes[at..]) {
                    None => break bytes.len(),
                    Some(i) if bytes[at + i] == b'\t' => break at + i,
                    Some(i) => {
                        escaped = true;
                        at += i + 2;
                        if at > bytes.len() {
                            return Err("a COPY cell ends in a backslash".into());
                        }
                    }
                }
            };
            if n == count {
                return Err(format!("a COPY row has more than {count} cells"));
            }
            let field = &line[start..end];
            if field == "\\N" {
                cell(n, None)?;
            } else if !escaped {
                cell(n, Some(field))?;
            } else {
                self.unescaped.clear();
                let mut chars = field.chars();
                while let Some(c) = chars.next() {
                    if c != '\\' {
                        self.unescaped.push(c);
                        continue;
                    }
                    self.unescaped.push(match chars.next() {
                        Some('b') => '\u{8}',
                        Some('f') => '\u{c}',
                        Some('n') => '\n',
                        Some('r') => '\r',
                        Some('t') => '\t',
                        Some('v') => '\u{b}',
                        Some(other) => other,
                        None => return Err("a COPY cell ends in a backslash".into()),
                    });
                }
                cell(n, Some(&self.unescaped))?;
            }
            n += 1;
            if end == bytes.len() {
                break;
            }
            start = end + 1;
        }
        if n == count {
            Ok(())
        } else {
            Err(format!("a COPY row has {n} cells, not {count}"))
        }
    }
}

/// Encode a MySQL/MariaDB text-protocol cell as [`fast_value`] reads it, without the copy
/// for integers, text and binary.
fn my_cell(
    column: &MyColumn,
    raw: Option<&[u8]>,
    canon: &Canon,
    out: &mut Vec<u8>,
) -> std::result::Result<(), String> {
    let Some(bytes) = raw else {
        canon::encode(&Value::Null, canon, out);
        return Ok(());
    };
    match column.kind {
        Kind::Int { .. } => {
            if let Some(i) = std::str::from_utf8(bytes)
                .ok()
                .and_then(|t| t.parse::<i64>().ok())
            {
                canon::encode(&Value::Int(i), canon, out);
                return Ok(());
            }
        }
        Kind::Text | Kind::Enum | Kind::Set => {
            let s = std::str::from_utf8(bytes)
                .map_err(|_| "the server sent text that is not UTF-8".to_owned())?;
            canon::encode_str(s, canon, out);
            return Ok(());
        }
        Kind::Binary { .. } | Kind::Geometry => {
            canon::encode_bytes(bytes, canon, out);
            return Ok(());
        }
        _ => {}
    }
    canon::encode(&fast_value(column, Some(bytes.to_vec()))?, canon, out);
    Ok(())
}

/// A value of the text protocol: integers, text and binary without copies (the decoder's
/// rules otherwise).
fn fast_value(column: &MyColumn, raw: Option<Vec<u8>>) -> std::result::Result<Value, String> {
    let Some(bytes) = raw else {
        return Ok(Value::Null);
    };
    match column.kind {
        Kind::Int { .. } => {
            if let Some(i) = std::str::from_utf8(&bytes)
                .ok()
                .and_then(|t| t.parse::<i64>().ok())
            {
                return Ok(Value::Int(i));
            }
        }
        Kind::Text | Kind::Enum | Kind::Set => {
            return String::from_utf8(bytes)
                .map(Value::Text)
                .map_err(|_| "the server sent text that is not UTF-8".to_owned());
        }
        Kind::Binary { .. } | Kind::Geometry => return Ok(Value::Bytes(bytes)),
        _ => {}
    }
    decode::from_text(column, Some(&bytes))
}

/// A MySQL character set whose bytes are UTF-8 (what the session's literals and PostgreSQL
/// hold).
fn utf8_charset(charset: &str) -> bool {
    matches!(charset, "utf8mb4" | "utf8mb3" | "utf8" | "ascii")
}

fn sqlite_literal(v: &Value) -> String {
    let mut s = String::new();
    sqlite::literal(v, &mut s);
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let hex = s.strip_prefix("\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows as [`CopyText`] reads them from `chunks`: cells as text, NULL as `None`.
    fn read(
        chunks: &[&[u8]],
        count: usize,
    ) -> std::result::Result<Vec<Vec<Option<String>>>, String> {
        let mut copy = CopyText::default();
        let mut rows = Vec::new();
        let mut row = |line: &[u8], copy: &mut CopyText| -> Result<()> {
            let mut cells = Vec::new();
            copy.cells(line, count, |_, c| {
                cells.push(c.map(str::to_owned));
                Ok(())
            })
            .map_err(Error::Definite)?;
            rows.push(cells);
            Ok(())
        };
        for chunk in chunks {
            copy.feed(chunk, &mut row).map_err(|e| e.to_string())?;
        }
        copy.finish()?;
        Ok(rows)
    }

    #[test]
    fn copy_text_cells_escapes_nulls_and_rows_across_messages() {
        let rows = read(
            &[
                b"1\ta\\tb\\\\c\\nd\t\\N\n2\t",
                b"\xc3\xa9\\\\N\t\n3\t\\b\\f\\r\\v\t x \n",
            ],
            3,
        )
        .expect("read");
        let text = |s: &str| Some(s.to_owned());
        assert_eq!(
            rows,
            vec![
                vec![text("1"), text("a\tb\\c\nd"), None],
                vec![text("2"), text("é\\N"), text("")],
                vec![text("3"), text("\u{8}\u{c}\r\u{b}"), text(" x ")],
            ]
        );
        assert!(
            read(&[b"1\t2\n"], 3)
                .unwrap_err()
                .contains("2 cells, not 3")
        );
        assert!(
            read(&[b"1\t2\t3\t4\n"], 3)
                .unwrap_err()
                .contains("more than 3")
        );
        assert!(
            read(&[b"1\t2\t3"], 3)
                .unwrap_err()
                .contains("middle of a row")
        );
        assert!(read(&[b"1\t2\t3\\\n"], 3).is_err());
        assert!(read(&[b"1\t\xff\t3\n"], 3).unwrap_err().contains("UTF-8"));
    }

    #[test]
    fn postgres_cells_read_as_the_text_cast() {
        let text = |s, out| match pg_cell(s, out) {
            Ok(PgCell::Text(t)) => t.to_owned(),
            _ => panic!("{s:?} is not text"),
        };
        assert_eq!(text("t", PgOut::Bool), "true");
        assert_eq!(text("f", PgOut::Bool), "false");
        assert_eq!(text("ab  ", PgOut::Char), "ab");
        assert_eq!(text(" ab\t", PgOut::Char), " ab\t");
        assert_eq!(text("ab  ", PgOut::Plain), "ab  ");
        assert!(matches!(pg_cell("\\x00ff", PgOut::Bytea), Ok(PgCell::Bytes(b)) if b == [0, 255]));
        assert!(pg_cell("zz", PgOut::Bytea).is_err());
    }
}
