//! A minimal PostgreSQL frontend/backend protocol client for the snapshot's data path.
//!
//! tokio-postgres hands a `COPY ... TO STDOUT` to its caller one row at a time (one message, one
//! reference-counted buffer each); at millions of rows that per-row work was about 40% of
//! kuaka's CPU. The backend's `CopyData` messages are framed exactly like the `CopyData`
//! messages a frontend sends for `COPY ... FROM STDIN` (`'d'`, int32 length, bytes), so this
//! client reads the source's bytes into one buffer, walks only the 5-byte message headers, and
//! writes whole runs of `CopyData` messages to the target untouched.
//!
//! It speaks the simple query protocol only, with TLS (libpq `sslmode`, see [`super::tls`])
//! and trust, cleartext, MD5 and SCRAM-SHA-256 authentication.
//! <https://www.postgresql.org/docs/15/protocol-flow.html#PROTOCOL-COPY>

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::backend::{ErrorFields, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::tls::{self, SslMode};
use super::{Error, Side, classify_sqlstate};
use crate::config::Endpoint;
use crate::engine::ErrorClass;

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Read at least this much from the socket at a time.
const READ_CHUNK: usize = 256 * 1024;

/// One connection, used by one task at a time.
pub struct WireConnection {
    stream: Pin<Box<dyn Stream>>,
    read: BytesMut,
    write: BytesMut,
    /// `postgres://user@host:port/db (source)`, for messages.
    endpoint: String,
}

/// An error the server sent, with its SQLSTATE.
fn server_error(context: &str, fields: &mut ErrorFields<'_>) -> Error {
    use fallible_iterator::FallibleIterator;
    let (mut code, mut message, mut detail, mut hint) = (String::new(), String::new(), None, None);
    while let Ok(Some(field)) = fields.next() {
        let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
        match field.type_() {
            b'C' => code = value,
            b'M' => message = value,
            b'D' => detail = Some(value),
            b'H' => hint = Some(value),
            _ => {}
        }
    }
    let mut text = format!("{message} ({code})");
    if let Some(d) = detail {
        text.push_str(&format!("; detail: {d}"));
    }
    if let Some(h) = hint {
        text.push_str(&format!("; hint: {h}"));
    }
    Error::Query {
        context: context.to_owned(),
        message: text,
        class: classify_sqlstate(&code),
        sqlstate: Some(code),
    }
}

fn io_error(context: &str, e: io::Error) -> Error {
    Error::Query {
        context: context.to_owned(),
        message: e.to_string(),
        class: ErrorClass::Transient,
        sqlstate: None,
    }
}

fn protocol_error(context: &str, what: &str) -> Error {
    Error::Query {
        context: context.to_owned(),
        message: format!("unexpected message from the server: {what}"),
        class: ErrorClass::Transient,
        sqlstate: None,
    }
}

impl WireConnection {
    /// Connect, negotiate TLS per `sslmode`, authenticate and wait until the server is ready.
    pub async fn connect(
        endpoint: &Endpoint,
        side: Side,
        role: &str,
    ) -> Result<WireConnection, Error> {
        Self::connect_with(endpoint, side, role, &[]).await
    }

    /// [`connect`](Self::connect) with extra startup parameters (`replication=database`).
    pub async fn connect_with(
        endpoint: &Endpoint,
        side: Side,
        role: &str,
        extra: &[(&str, &str)],
    ) -> Result<WireConnection, Error> {
        let where_ = format!("{} ({})", endpoint.redacted(), side.name());
        let connect_error = |message: String, class| Error::Connect {
            endpoint: where_.clone(),
            message,
            class,
        };
        let timeout = endpoint.connect_timeout();
        let mode = tls::mode_of(endpoint)?;
        let tls = tls::client_config(
            mode,
            endpoint.param("sslrootcert").map(std::path::Path::new),
        )
        .map_err(|e| connect_error(e.to_string(), ErrorClass::Definite))?;
        let stream: Pin<Box<dyn Stream>> = if endpoint.host.starts_with('/') {
            let path = format!("{}/.s.PGSQL.{}", endpoint.host, endpoint.port);
            let unix = tokio::time::timeout(timeout, tokio::net::UnixStream::connect(&path))
                .await
                .map_err(|_| connect_error("timed out".into(), ErrorClass::Transient))?
                .map_err(|e| connect_error(e.to_string(), ErrorClass::Transient))?;
            Box::pin(unix)
        } else {
            let tcp = tokio::time::timeout(
                timeout,
                TcpStream::connect((endpoint.host.as_str(), endpoint.port)),
            )
            .await
            .map_err(|_| connect_error("timed out".into(), ErrorClass::Transient))?
            .map_err(|e| connect_error(e.to_string(), ErrorClass::Transient))?;
            tcp.set_nodelay(true).ok();
            let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(30));
            socket2::SockRef::from(&tcp)
                .set_tcp_keepalive(&keepalive)
                .ok();
            match tls {
                None => Box::pin(tcp),
                Some(config) => negotiate_tls(tcp, config, mode, &endpoint.host)
                    .await
                    .map_err(|(message, class)| connect_error(message, class))?,
            }
        };
        let mut conn = WireConnection {
            stream,
            read: BytesMut::with_capacity(READ_CHUNK),
            write: BytesMut::new(),
            endpoint: where_.clone(),
        };
        let application_name = format!("kuaka {role}");
        let mut params: Vec<(&str, &str)> = vec![
            ("user", endpoint.user.as_str()),
            ("database", endpoint.database.as_str()),
            ("application_name", application_name.as_str()),
            ("client_encoding", "UTF8"),
        ];
        // As in `postgres::connect`: kuaka writes through a cutover's fence.
        let options = match endpoint.param("options") {
            Some(o) => format!("{o} -c default_transaction_read_only=off"),
            None => "-c default_transaction_read_only=off".to_owned(),
        };
        params.push(("options", options.as_str()));
        params.extend_from_slice(extra);
        frontend::startup_message(params.iter().copied(), &mut conn.write)
            .map_err(|e| connect_error(e.to_string(), ErrorClass::Definite))?;
        conn.flush().await?;
        conn.authenticate(endpoint, side).await?;
        Ok(conn)
    }

    async fn authenticate(&mut self, endpoint: &Endpoint, side: Side) -> Result<(), Error> {
        let context = "authenticating";
        let where_ = self.endpoint.clone();
        let password = || {
            endpoint.password.as_ref().map(|p| p.expose().as_bytes().to_vec()).ok_or_else(|| Error::Connect {
                endpoint: where_.clone(),
                message: format!(
                    "the server asks for a password and none was given; put it in the URL or use --{}-password-env",
                    side.name()
                ),
                class: ErrorClass::Definite,
            })
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            match self.read_message(context).await? {
                Message::AuthenticationOk => {}
                Message::AuthenticationCleartextPassword => {
                    let pw = password()?;
                    frontend::password_message(&pw, &mut self.write)
                        .map_err(|e| io_error(context, e))?;
                    self.flush().await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let pw = password()?;
                    let hash = postgres_protocol::authentication::md5_hash(
                        endpoint.user.as_bytes(),
                        &pw,
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.write)
                        .map_err(|e| io_error(context, e))?;
                    self.flush().await?;
                }
                Message::AuthenticationSasl(body) => {
                    use fallible_iterator::FallibleIterator;
                    let mut mechanisms = body.mechanisms();
                    let mut offered = false;
                    while let Ok(Some(m)) = mechanisms.next() {
                        offered |= m == SCRAM_SHA_256;
                    }
                    if !offered {
                        return Err(Error::Connect {
                            endpoint: self.endpoint.clone(),
                            message:
                                "the server offers no SASL mechanism kuaka supports (SCRAM-SHA-256)"
                                    .into(),
                            class: ErrorClass::Definite,
                        });
                    }
                    let s = ScramSha256::new(&password()?, ChannelBinding::unsupported());
                    frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut self.write)
                        .map_err(|e| io_error(context, e))?;
                    self.flush().await?;
                    scram = Some(s);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| protocol_error(context, "SASL continue"))?;
                    s.update(body.data()).map_err(|e| io_error(context, e))?;
                    frontend::sasl_response(s.message(), &mut self.write)
                        .map_err(|e| io_error(context, e))?;
                    self.flush().await?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| protocol_error(context, "SASL final"))?;
                    s.finish(body.data()).map_err(|e| io_error(context, e))?;
                }
                Message::ParameterStatus(_)
                | Message::BackendKeyData(_)
                | Message::NoticeResponse(_) => {}
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ErrorResponse(body) => {
                    let e = server_error(context, &mut body.fields());
                    let code = e.sqlstate().unwrap_or_default().to_owned();
                    return Err(match code.as_str() {
                        "28P01" => Error::Auth {
                            endpoint: endpoint.host_port(),
                            user: endpoint.user.clone(),
                            side: side.name().to_owned(),
                        },
                        _ => Error::Connect {
                            endpoint: self.endpoint.clone(),
                            message: match e {
                                Error::Query { message, .. } => message,
                                other => other.to_string(),
                            },
                            class: classify_sqlstate(&code),
                        },
                    });
                }
                _ => return Err(protocol_error(context, "during authentication")),
            }
        }
    }

    async fn flush(&mut self) -> Result<(), Error> {
        let context = self.endpoint.clone();
        self.stream
            .write_all(&self.write)
            .await
            .map_err(|e| io_error(&context, e))?;
        self.stream
            .flush()
            .await
            .map_err(|e| io_error(&context, e))?;
        self.write.clear();
        Ok(())
    }

    /// Read more bytes into the buffer; an end of stream is an error (the server went away).
    async fn fill(&mut self, context: &str) -> Result<(), Error> {
        self.read.reserve(READ_CHUNK);
        let n = self
            .stream
            .read_buf(&mut self.read)
            .await
            .map_err(|e| io_error(context, e))?;
        if n == 0 {
            return Err(io_error(
                context,
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                ),
            ));
        }
        Ok(())
    }

    async fn read_message(&mut self, context: &str) -> Result<Message, Error> {
        loop {
            if let Some(m) = Message::parse(&mut self.read).map_err(|e| io_error(context, e))? {
                return Ok(m);
            }
            self.fill(context).await?;
        }
    }

    /// Run statements (simple query protocol); rows of the last result set, as text.
    pub async fn simple_query(
        &mut self,
        sql: &str,
        context: &str,
    ) -> Result<Vec<Vec<Option<String>>>, Error> {
        frontend::query(sql, &mut self.write).map_err(|e| io_error(context, e))?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.read_message(context).await? {
                Message::RowDescription(_) => rows.clear(),
                Message::DataRow(body) => {
                    use fallible_iterator::FallibleIterator;
                    let buffer = body.buffer();
                    let mut ranges = body.ranges();
                    let mut row = Vec::new();
                    while let Ok(Some(range)) = ranges.next() {
                        row.push(range.map(|r| String::from_utf8_lossy(&buffer[r]).into_owned()));
                    }
                    rows.push(row);
                }
                Message::ErrorResponse(body) => {
                    error = Some(server_error(context, &mut body.fields()))
                }
                Message::ReadyForQuery(_) => {
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    };
                }
                Message::CopyInResponse(_) => {
                    frontend::copy_fail("unexpected COPY", &mut self.write)
                        .map_err(|e| io_error(context, e))?;
                    self.flush().await?;
                }
                _ => {}
            }
        }
    }

    /// Start `COPY ... TO STDOUT`.
    pub async fn copy_out(&mut self, sql: &str, context: &str) -> Result<(), Error> {
        self.start_copy(sql, context, false).await
    }

    /// Send a COPY statement and wait for the server's CopyOutResponse (`to_server` false) or
    /// CopyInResponse (`to_server` true).
    async fn start_copy(&mut self, sql: &str, context: &str, to_server: bool) -> Result<(), Error> {
        frontend::query(sql, &mut self.write).map_err(|e| io_error(context, e))?;
        self.flush().await?;
        loop {
            match self.read_message(context).await? {
                Message::CopyOutResponse(_) if !to_server => return Ok(()),
                Message::CopyInResponse(_) if to_server => return Ok(()),
                Message::ErrorResponse(body) => {
                    let e = server_error(context, &mut body.fields());
                    self.until_ready(context).await?;
                    return Err(e);
                }
                Message::NoticeResponse(_) | Message::ParameterStatus(_) => {}
                _ => return Err(protocol_error(context, "instead of the COPY response")),
            }
        }
    }

    /// The next run of whole `CopyData` messages, framing included, and how many messages it
    /// holds; `None` once the COPY is complete (its CommandComplete and ReadyForQuery read).
    pub async fn copy_out_next(&mut self, context: &str) -> Result<Option<(BytesMut, u64)>, Error> {
        loop {
            let (end, messages) = scan_copy_data(&self.read);
            if end > 0 {
                return Ok(Some((self.read.split_to(end), messages)));
            }
            // Not a CopyData at the front: either incomplete, or another message.
            if self.read.len() >= 5 {
                let len =
                    u32::from_be_bytes([self.read[1], self.read[2], self.read[3], self.read[4]])
                        as usize;
                if self.read.len() > len {
                    match self.read_message(context).await? {
                        Message::CopyDone => {
                            let mut error = None;
                            loop {
                                match self.read_message(context).await? {
                                    Message::ReadyForQuery(_) => break,
                                    Message::ErrorResponse(body) => {
                                        error = Some(server_error(context, &mut body.fields()))
                                    }
                                    _ => {}
                                }
                            }
                            return match error {
                                Some(e) => Err(e),
                                None => Ok(None),
                            };
                        }
                        Message::ErrorResponse(body) => {
                            let e = server_error(context, &mut body.fields());
                            self.until_ready(context).await?;
                            return Err(e);
                        }
                        // Asynchronous messages may arrive at any time.
                        Message::NoticeResponse(_)
                        | Message::ParameterStatus(_)
                        | Message::NotificationResponse(_) => {
                            continue;
                        }
                        _ => return Err(protocol_error(context, "during COPY TO")),
                    }
                }
            }
            self.fill(context).await?;
        }
    }

    /// Start a command answered with CopyBothResponse (`START_REPLICATION`).
    pub async fn copy_both(&mut self, sql: &str, context: &str) -> Result<(), Error> {
        frontend::query(sql, &mut self.write).map_err(|e| io_error(context, e))?;
        self.flush().await?;
        loop {
            // postgres-protocol has no CopyBothResponse ('W'): recognise and skip it here.
            while self.read.len() < 5 {
                self.fill(context).await?;
            }
            if self.read[0] == b'W' {
                let len =
                    u32::from_be_bytes([self.read[1], self.read[2], self.read[3], self.read[4]])
                        as usize;
                while self.read.len() < 1 + len {
                    self.fill(context).await?;
                }
                self.read.advance(1 + len);
                return Ok(());
            }
            match self.read_message(context).await? {
                Message::ErrorResponse(body) => {
                    let e = server_error(context, &mut body.fields());
                    self.until_ready(context).await?;
                    return Err(e);
                }
                Message::NoticeResponse(_) | Message::ParameterStatus(_) => {}
                _ => return Err(protocol_error(context, "instead of CopyBothResponse")),
            }
        }
    }

    /// The next CopyData payload of a COPY BOTH stream; `None` when the server ends it.
    pub async fn copy_both_next(&mut self, context: &str) -> Result<Option<bytes::Bytes>, Error> {
        loop {
            match self.read_message(context).await? {
                Message::CopyData(body) => return Ok(Some(body.into_bytes())),
                Message::CopyDone => return Ok(None),
                Message::ErrorResponse(body) => {
                    return Err(server_error(context, &mut body.fields()));
                }
                Message::NoticeResponse(_) | Message::ParameterStatus(_) => {}
                _ => return Err(protocol_error(context, "during COPY BOTH")),
            }
        }
    }

    /// Send one CopyData message carrying `payload`.
    pub async fn send_copy_data(&mut self, payload: &[u8], context: &str) -> Result<(), Error> {
        self.write.extend_from_slice(b"d");
        self.write
            .extend_from_slice(&((payload.len() + 4) as u32).to_be_bytes());
        self.write.extend_from_slice(payload);
        self.flush().await.map_err(|e| match e {
            Error::Query {
                message,
                class,
                sqlstate,
                ..
            } => Error::Query {
                context: context.to_owned(),
                message,
                class,
                sqlstate,
            },
            other => other,
        })
    }

    /// Start `COPY ... FROM STDIN`.
    pub async fn copy_in(&mut self, sql: &str, context: &str) -> Result<(), Error> {
        self.start_copy(sql, context, true).await
    }

    /// Send complete, framed `CopyData` messages as they are.
    pub async fn copy_in_raw(&mut self, framed: &[u8], context: &str) -> Result<(), Error> {
        self.stream
            .write_all(framed)
            .await
            .map_err(|e| io_error(context, e))
    }

    /// End `COPY ... FROM STDIN`; the number of rows the server loaded.
    pub async fn copy_in_finish(&mut self, context: &str) -> Result<u64, Error> {
        frontend::copy_done(&mut self.write);
        self.flush().await?;
        let mut rows = None;
        let mut error = None;
        loop {
            match self.read_message(context).await? {
                Message::CommandComplete(body) => {
                    let tag = body.tag().map_err(|e| io_error(context, e))?;
                    rows = tag.rsplit(' ').next().and_then(|n| n.parse().ok());
                }
                Message::ErrorResponse(body) => {
                    error = Some(server_error(context, &mut body.fields()))
                }
                Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        match (error, rows) {
            (Some(e), _) => Err(e),
            (None, Some(n)) => Ok(n),
            (None, None) => Err(protocol_error(context, "COPY ended without a row count")),
        }
    }

    async fn until_ready(&mut self, context: &str) -> Result<(), Error> {
        loop {
            if let Message::ReadyForQuery(_) = self.read_message(context).await? {
                return Ok(());
            }
        }
    }

    /// Say goodbye politely (best effort).
    pub async fn close(mut self) {
        frontend::terminate(&mut self.write);
        let _ = self.flush().await;
    }
}

/// How many leading bytes of `buf` are whole `CopyData` messages, and how many messages.
pub fn scan_copy_data(buf: &[u8]) -> (usize, u64) {
    let mut at = 0;
    let mut messages = 0;
    while buf.len() >= at + 5 && buf[at] == b'd' {
        let len = u32::from_be_bytes([buf[at + 1], buf[at + 2], buf[at + 3], buf[at + 4]]) as usize;
        if len < 4 || buf.len() < at + 1 + len {
            break;
        }
        at += 1 + len;
        messages += 1;
    }
    (at, messages)
}

async fn negotiate_tls(
    mut tcp: TcpStream,
    config: rustls::ClientConfig,
    mode: SslMode,
    host: &str,
) -> Result<Pin<Box<dyn Stream>>, (String, ErrorClass)> {
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    tcp.write_all(&request)
        .await
        .map_err(|e| (e.to_string(), ErrorClass::Transient))?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer)
        .await
        .map_err(|e| (e.to_string(), ErrorClass::Transient))?;
    match answer[0] {
        b'S' => {
            let name = rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|e| {
                (
                    format!("invalid host name for TLS: {e}"),
                    ErrorClass::Definite,
                )
            })?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .map_err(|e| {
                    (
                        tls::with_trust_hint(format!("error performing TLS handshake: {e}")),
                        ErrorClass::Definite,
                    )
                })?;
            Ok(Box::pin(tls))
        }
        b'N' if mode == SslMode::Prefer => Ok(Box::pin(tcp)),
        b'N' => Err((
            format!("the server does not accept TLS, but sslmode={mode:?} requires it")
                .to_lowercase(),
            ErrorClass::Definite,
        )),
        other => Err((
            format!("unexpected answer {other:#x} to the TLS request"),
            ErrorClass::Definite,
        )),
    }
}

impl Drop for WireConnection {
    fn drop(&mut self) {
        // Dropping the socket ends the session; the server rolls back an open transaction.
        self.read.advance(self.read.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy_data(payload: &[u8]) -> Vec<u8> {
        let mut m = vec![b'd'];
        m.extend_from_slice(&((payload.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(payload);
        m
    }

    #[test]
    fn scanning_stops_at_partial_and_foreign_messages() {
        let mut buf = copy_data(b"row 1\n");
        buf.extend(copy_data(b"row 2\n"));
        let whole = buf.len();
        assert_eq!(scan_copy_data(&buf), (whole, 2));
        let mut partial = buf.clone();
        partial.extend(&copy_data(b"row 3\n")[..4]);
        assert_eq!(scan_copy_data(&partial), (whole, 2));
        let mut with_done = buf.clone();
        with_done.extend([b'c', 0, 0, 0, 4]);
        with_done.extend(copy_data(b"after"));
        assert_eq!(scan_copy_data(&with_done), (whole, 2));
        assert_eq!(scan_copy_data(&[b'd', 0, 0]), (0, 0));
        assert_eq!(
            scan_copy_data(&[b'd', 0, 0, 0, 2]),
            (0, 0),
            "a length below 4 is invalid"
        );
        assert_eq!(scan_copy_data(&[b'c', 0, 0, 0, 4]), (0, 0));
    }
}
