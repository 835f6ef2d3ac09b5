//! pgoutput (logical replication protocol, version 1) messages: bytes in, [`PgOutput`] out.
//!
//! Pure: no I/O, no state. The caller keeps the relation cache (Relation messages describe the
//! columns of the relation ids that later Insert/Update/Delete messages refer to).
//! <https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html>
//!
//! Unchanged TOASTed values in an update arrive as [`TupleValue::Unchanged`]: the target must
//! keep its value. An Update carries the old key (`K`) or the old full row (`O`) only when the
//! key changed or the table has `REPLICA IDENTITY FULL`.

use crate::model::PgLsn;

/// One column value in a tuple.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TupleValue {
    Null,
    /// A TOASTed value the update did not change; its bytes are not sent.
    Unchanged,
    /// The value in the type's text output format.
    Text(Vec<u8>),
    /// The value in the type's binary format (only with the `binary` option).
    Binary(Vec<u8>),
}

/// A column of a Relation message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity (the key).
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// A decoded pgoutput message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PgOutput {
    Begin {
        final_lsn: PgLsn,
        commit_time_us: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: PgLsn,
        end_lsn: PgLsn,
        commit_time_us: i64,
    },
    /// The transaction came from another node (replication origin) — e.g. kuaka's own writes.
    Origin {
        commit_lsn: PgLsn,
        name: String,
    },
    Relation {
        id: u32,
        namespace: String,
        name: String,
        /// `d` default, `n` nothing, `f` full, `i` index.
        replica_identity: u8,
        columns: Vec<RelationColumn>,
    },
    Type {
        id: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relation: u32,
        new: Vec<TupleValue>,
    },
    Update {
        relation: u32,
        old_key: Option<Vec<TupleValue>>,
        old_row: Option<Vec<TupleValue>>,
        new: Vec<TupleValue>,
    },
    Delete {
        relation: u32,
        old_key: Option<Vec<TupleValue>>,
        old_row: Option<Vec<TupleValue>>,
    },
    Truncate {
        cascade: bool,
        restart_identity: bool,
        relations: Vec<u32>,
    },
    Message {
        transactional: bool,
        lsn: PgLsn,
        prefix: String,
        content: Vec<u8>,
    },
}

/// A message that does not parse: what was expected, and where.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed pgoutput message {tag:?} at byte {offset}: {what}")]
pub struct DecodeError {
    pub tag: char,
    pub offset: usize,
    pub what: &'static str,
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
    tag: char,
}

impl<'a> Reader<'a> {
    fn fail(&self, what: &'static str) -> DecodeError {
        DecodeError {
            tag: self.tag,
            offset: self.at,
            what,
        }
    }
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() - self.at < n {
            return Err(self.fail(what));
        }
        let out = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }
    fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        let b = self.take(2, what)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(self.u32(what)? as i32)
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let b = self.take(8, what)?;
        Ok(u64::from_be_bytes([
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
        ]))
    }
    fn lsn(&mut self, what: &'static str) -> Result<PgLsn, DecodeError> {
        Ok(PgLsn(self.u64(what)?))
    }
    /// A NUL-terminated string.
    fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let rest = &self.buf[self.at..];
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.fail(what))?;
        let s = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.at += end + 1;
        Ok(s)
    }
    fn tuple(&mut self) -> Result<Vec<TupleValue>, DecodeError> {
        let n = self.i16("column count")?;
        if n < 0 {
            return Err(self.fail("negative column count"));
        }
        let mut values = Vec::with_capacity(n as usize);
        for _ in 0..n {
            values.push(match self.u8("column kind")? {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::Unchanged,
                kind @ (b't' | b'b') => {
                    let len = self.i32("value length")?;
                    if len < 0 {
                        return Err(self.fail("negative value length"));
                    }
                    let bytes = self.take(len as usize, "value bytes")?.to_vec();
                    if kind == b't' {
                        TupleValue::Text(bytes)
                    } else {
                        TupleValue::Binary(bytes)
                    }
                }
                _ => return Err(self.fail("unknown column kind")),
            });
        }
        Ok(values)
    }
    fn done(&self) -> Result<(), DecodeError> {
        if self.at == self.buf.len() {
            Ok(())
        } else {
            Err(self.fail("trailing bytes"))
        }
    }
}

/// Protocol version 2: the control messages of transactions streamed before they commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamControl {
    Start {
        xid: u32,
        first_segment: bool,
    },
    Stop,
    Commit {
        xid: u32,
        commit_lsn: PgLsn,
        end_lsn: PgLsn,
        commit_time_us: i64,
    },
    /// `subxid == xid` aborts the whole transaction, else one subtransaction.
    Abort {
        xid: u32,
        subxid: u32,
    },
}

/// A stream control message (`S`, `E`, `c`, `A`), or `None` for any other message.
pub fn decode_stream_control(buf: &[u8]) -> Option<Result<StreamControl, DecodeError>> {
    let tag = *buf.first()?;
    if !matches!(tag, b'S' | b'E' | b'c' | b'A') {
        return None;
    }
    let mut r = Reader {
        buf,
        at: 1,
        tag: tag as char,
    };
    let result = (|| {
        let message = match tag {
            b'S' => StreamControl::Start {
                xid: r.u32("xid")?,
                first_segment: r.u8("first segment")? == 1,
            },
            b'E' => StreamControl::Stop,
            b'c' => {
                let xid = r.u32("xid")?;
                r.u8("flags")?;
                StreamControl::Commit {
                    xid,
                    commit_lsn: r.lsn("commit lsn")?,
                    end_lsn: r.lsn("end lsn")?,
                    commit_time_us: r.u64("commit time")? as i64,
                }
            }
            _ => {
                let xid = r.u32("xid")?;
                let subxid = r.u32("subxid")?;
                // Later servers may append the abort's position and time.
                r.at = r.buf.len();
                StreamControl::Abort { xid, subxid }
            }
        };
        r.done()?;
        Ok(message)
    })();
    Some(result)
}

/// A change inside a streamed transaction carries the (sub)transaction id after its tag;
/// return it and the message in its version 1 form.
pub fn strip_stream_xid(buf: &[u8]) -> Result<(u32, Vec<u8>), DecodeError> {
    let tag = buf.first().copied().unwrap_or(b'?');
    if buf.len() < 5 {
        return Err(DecodeError {
            tag: tag as char,
            offset: buf.len(),
            what: "streamed message without xid",
        });
    }
    let xid = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    let mut v1 = Vec::with_capacity(buf.len() - 4);
    v1.push(tag);
    v1.extend_from_slice(&buf[5..]);
    Ok((xid, v1))
}

/// Encode a Begin message (for a streamed transaction written to the log at its commit).
pub fn encode_begin(final_lsn: PgLsn, commit_time_us: i64, xid: u32) -> Vec<u8> {
    let mut v = vec![b'B'];
    v.extend(final_lsn.0.to_be_bytes());
    v.extend(commit_time_us.to_be_bytes());
    v.extend(xid.to_be_bytes());
    v
}

/// Encode a Commit message.
pub fn encode_commit(commit_lsn: PgLsn, end_lsn: PgLsn, commit_time_us: i64) -> Vec<u8> {
    let mut v = vec![b'C', 0];
    v.extend(commit_lsn.0.to_be_bytes());
    v.extend(end_lsn.0.to_be_bytes());
    v.extend(commit_time_us.to_be_bytes());
    v
}

/// Decode one pgoutput message (the payload of one XLogData).
pub fn decode(buf: &[u8]) -> Result<PgOutput, DecodeError> {
    let tag = *buf.first().ok_or(DecodeError {
        tag: '?',
        offset: 0,
        what: "empty message",
    })?;
    let mut r = Reader {
        buf,
        at: 1,
        tag: tag as char,
    };
    let message = match tag {
        b'B' => PgOutput::Begin {
            final_lsn: r.lsn("final lsn")?,
            commit_time_us: r.u64("commit time")? as i64,
            xid: r.u32("xid")?,
        },
        b'C' => PgOutput::Commit {
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit lsn")?,
            end_lsn: r.lsn("end lsn")?,
            commit_time_us: r.u64("commit time")? as i64,
        },
        b'O' => PgOutput::Origin {
            commit_lsn: r.lsn("origin lsn")?,
            name: r.cstr("origin name")?,
        },
        b'R' => {
            let id = r.u32("relation id")?;
            let namespace = r.cstr("namespace")?;
            let name = r.cstr("relation name")?;
            let replica_identity = r.u8("replica identity")?;
            let n = r.i16("column count")?;
            if n < 0 {
                return Err(r.fail("negative column count"));
            }
            let mut columns = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let flags = r.u8("column flags")?;
                columns.push(RelationColumn {
                    is_key: flags & 1 == 1,
                    name: r.cstr("column name")?,
                    type_oid: r.u32("type oid")?,
                    type_modifier: r.i32("type modifier")?,
                });
            }
            PgOutput::Relation {
                id,
                namespace,
                name,
                replica_identity,
                columns,
            }
        }
        b'Y' => PgOutput::Type {
            id: r.u32("type id")?,
            namespace: r.cstr("namespace")?,
            name: r.cstr("type name")?,
        },
        b'I' => {
            let relation = r.u32("relation id")?;
            if r.u8("tuple marker")? != b'N' {
                return Err(r.fail("expected N"));
            }
            PgOutput::Insert {
                relation,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relation = r.u32("relation id")?;
            let (mut old_key, mut old_row) = (None, None);
            let new = loop {
                match r.u8("tuple marker")? {
                    b'K' => old_key = Some(r.tuple()?),
                    b'O' => old_row = Some(r.tuple()?),
                    b'N' => break r.tuple()?,
                    _ => return Err(r.fail("expected K, O or N")),
                }
            };
            PgOutput::Update {
                relation,
                old_key,
                old_row,
                new,
            }
        }
        b'D' => {
            let relation = r.u32("relation id")?;
            let (old_key, old_row) = match r.u8("tuple marker")? {
                b'K' => (Some(r.tuple()?), None),
                b'O' => (None, Some(r.tuple()?)),
                _ => return Err(r.fail("expected K or O")),
            };
            PgOutput::Delete {
                relation,
                old_key,
                old_row,
            }
        }
        b'T' => {
            let n = r.u32("relation count")?;
            let options = r.u8("options")?;
            let mut relations = Vec::new();
            for _ in 0..n {
                relations.push(r.u32("relation id")?);
            }
            PgOutput::Truncate {
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
                relations,
            }
        }
        b'M' => {
            let transactional = r.u8("flags")? & 1 == 1;
            let lsn = r.lsn("message lsn")?;
            let prefix = r.cstr("prefix")?;
            let len = r.u32("content length")? as usize;
            PgOutput::Message {
                transactional,
                lsn,
                prefix,
                content: r.take(len, "content")?.to_vec(),
            }
        }
        _ => return Err(r.fail("unknown message type")),
    };
    r.done()?;
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_begin_and_commit_decode_back() {
        assert_eq!(
            decode(&encode_begin(PgLsn(77), -5, 9)).unwrap(),
            PgOutput::Begin {
                final_lsn: PgLsn(77),
                commit_time_us: -5,
                xid: 9
            }
        );
        assert_eq!(
            decode(&encode_commit(PgLsn(77), PgLsn(88), 12)).unwrap(),
            PgOutput::Commit {
                flags: 0,
                commit_lsn: PgLsn(77),
                end_lsn: PgLsn(88),
                commit_time_us: 12
            }
        );
        let mut streamed = vec![b'I'];
        streamed.extend(42u32.to_be_bytes());
        streamed.extend(7u32.to_be_bytes());
        streamed.extend(b"N\0\0");
        let (xid, v1) = strip_stream_xid(&streamed).unwrap();
        assert_eq!(xid, 42);
        assert_eq!(
            decode(&v1).unwrap(),
            PgOutput::Insert {
                relation: 7,
                new: vec![]
            }
        );
        let mut abort = vec![b'A'];
        abort.extend(5u32.to_be_bytes());
        abort.extend(6u32.to_be_bytes());
        assert_eq!(
            decode_stream_control(&abort).unwrap().unwrap(),
            StreamControl::Abort { xid: 5, subxid: 6 }
        );
        assert!(decode_stream_control(b"I").is_none());
    }

    fn tuple(values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut b = (values.len() as i16).to_be_bytes().to_vec();
        for v in values {
            match v {
                None => b.push(b'n'),
                Some(bytes) => {
                    b.push(b't');
                    b.extend((bytes.len() as i32).to_be_bytes());
                    b.extend(*bytes);
                }
            }
        }
        b
    }

    #[test]
    fn begin_commit_and_origin() {
        let mut b = vec![b'B'];
        b.extend(0x16_B374_D848u64.to_be_bytes());
        b.extend(1_000_000i64.to_be_bytes());
        b.extend(42u32.to_be_bytes());
        assert_eq!(
            decode(&b).unwrap(),
            PgOutput::Begin {
                final_lsn: PgLsn(0x16_B374_D848),
                commit_time_us: 1_000_000,
                xid: 42
            }
        );
        let mut c = vec![b'C', 0];
        c.extend(5u64.to_be_bytes());
        c.extend(9u64.to_be_bytes());
        c.extend(7i64.to_be_bytes());
        assert_eq!(
            decode(&c).unwrap(),
            PgOutput::Commit {
                flags: 0,
                commit_lsn: PgLsn(5),
                end_lsn: PgLsn(9),
                commit_time_us: 7
            }
        );
        let mut o = vec![b'O'];
        o.extend(5u64.to_be_bytes());
        o.extend(b"kuaka_job\0");
        assert_eq!(
            decode(&o).unwrap(),
            PgOutput::Origin {
                commit_lsn: PgLsn(5),
                name: "kuaka_job".into()
            }
        );
    }

    #[test]
    fn relation_and_row_changes() {
        let mut r = vec![b'R'];
        r.extend(16384u32.to_be_bytes());
        r.extend(b"public\0Order\0d");
        r.extend(2i16.to_be_bytes());
        r.push(1);
        r.extend(b"id\0");
        r.extend(23u32.to_be_bytes());
        r.extend((-1i32).to_be_bytes());
        r.push(0);
        r.extend(b"note\0");
        r.extend(25u32.to_be_bytes());
        r.extend((-1i32).to_be_bytes());
        let PgOutput::Relation {
            id,
            namespace,
            name,
            replica_identity,
            columns,
        } = decode(&r).unwrap()
        else {
            panic!("not a relation");
        };
        assert_eq!(
            (id, namespace.as_str(), name.as_str(), replica_identity),
            (16384, "public", "Order", b'd')
        );
        assert!(columns[0].is_key && !columns[1].is_key);
        assert_eq!(columns[1].type_oid, 25);

        let mut i = vec![b'I'];
        i.extend(16384u32.to_be_bytes());
        i.push(b'N');
        i.extend(tuple(&[Some(b"1"), None]));
        assert_eq!(
            decode(&i).unwrap(),
            PgOutput::Insert {
                relation: 16384,
                new: vec![TupleValue::Text(b"1".to_vec()), TupleValue::Null]
            }
        );

        // A key change: the old key, then the new row with an unchanged TOAST value.
        let mut u = vec![b'U'];
        u.extend(16384u32.to_be_bytes());
        u.push(b'K');
        u.extend(tuple(&[Some(b"1"), None]));
        u.push(b'N');
        u.extend(2i16.to_be_bytes());
        u.extend([b't', 0, 0, 0, 1, b'2', b'u']);
        assert_eq!(
            decode(&u).unwrap(),
            PgOutput::Update {
                relation: 16384,
                old_key: Some(vec![TupleValue::Text(b"1".to_vec()), TupleValue::Null]),
                old_row: None,
                new: vec![TupleValue::Text(b"2".to_vec()), TupleValue::Unchanged],
            }
        );

        let mut d = vec![b'D'];
        d.extend(16384u32.to_be_bytes());
        d.push(b'K');
        d.extend(tuple(&[Some(b"2"), None]));
        assert!(matches!(
            decode(&d).unwrap(),
            PgOutput::Delete {
                old_key: Some(_),
                old_row: None,
                ..
            }
        ));

        let mut t = vec![b'T'];
        t.extend(2u32.to_be_bytes());
        t.push(3);
        t.extend(16384u32.to_be_bytes());
        t.extend(16390u32.to_be_bytes());
        assert_eq!(
            decode(&t).unwrap(),
            PgOutput::Truncate {
                cascade: true,
                restart_identity: true,
                relations: vec![16384, 16390]
            }
        );
    }

    #[test]
    fn malformed_input_is_an_error_never_a_panic() {
        assert!(decode(&[]).is_err());
        assert!(decode(b"Z").is_err());
        // Truncated at every length.
        let mut i = vec![b'I'];
        i.extend(16384u32.to_be_bytes());
        i.push(b'N');
        i.extend(tuple(&[Some(b"hello"), None]));
        for len in 1..i.len() {
            assert!(decode(&i[..len]).is_err(), "prefix of {len} bytes decoded");
        }
        let mut trailing = i.clone();
        trailing.push(0);
        assert_eq!(decode(&trailing).unwrap_err().what, "trailing bytes");
        // A length that points past the end, a negative length, an unknown kind.
        let mut bad = vec![b'I', 0, 0, 0, 1, b'N', 0, 1, b't'];
        bad.extend(i32::MAX.to_be_bytes());
        assert!(decode(&bad).is_err());
        let mut neg = vec![b'I', 0, 0, 0, 1, b'N', 0, 1, b't'];
        neg.extend((-5i32).to_be_bytes());
        assert!(decode(&neg).is_err());
        assert!(decode(&[b'I', 0, 0, 0, 1, b'N', 0, 1, b'x']).is_err());
    }

    /// Deterministic pseudo-random bytes (fixed seed) must never panic the decoder.
    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let tags = b"BCORYIUDTM";
        for round in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 64) as usize;
            let mut buf = vec![tags[round % tags.len()]];
            let mut s = state;
            for _ in 0..len {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                buf.push((s >> 56) as u8);
            }
            let _ = decode(&buf);
        }
    }
}
