//! Endpoint URLs: `postgres://user[:password]@host[:port]/db[?param=value]`.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// A password or other secret. Never printed, never serialised.
#[derive(Clone, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    Postgres,
    Mysql,
    Sqlite,
}

/// A database endpoint. `Display` prints it without the password.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Endpoint {
    pub engine: EngineKind,
    pub user: String,
    #[serde(skip)]
    pub password: Option<Secret>,
    pub host: String,
    pub port: u16,
    pub database: String,
    /// Extra connection parameters (`sslmode`, `application_name`, ...), in URL order.
    pub params: Vec<(String, String)>,
}

impl Endpoint {
    /// Parse an endpoint URL. `field` names the option for error messages.
    pub fn parse(field: &str, url: &str) -> Result<Endpoint, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            field: field.to_owned(),
            message,
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| invalid("expected a URL like postgres://user@host:5432/db".into()))?;
        let engine = match scheme {
            "postgres" | "postgresql" => EngineKind::Postgres,
            "mysql" | "mariadb" => EngineKind::Mysql,
            "sqlite" => EngineKind::Sqlite,
            other => {
                return Err(invalid(format!(
                    "unknown scheme {other:?}; use postgres://, mysql:// or sqlite://"
                )));
            }
        };
        if engine == EngineKind::Sqlite {
            return Endpoint::sqlite(rest).map_err(invalid);
        }
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        // The password may contain '@' or '/', so split on the last '@' before the path.
        let (authority, path) = match rest.rfind('@') {
            Some(at) => {
                let slash = rest[at..].find('/').map(|i| i + at);
                match slash {
                    Some(s) => (&rest[..s], &rest[s + 1..]),
                    None => (rest, ""),
                }
            }
            None => match rest.split_once('/') {
                Some((a, p)) => (a, p),
                None => (rest, ""),
            },
        };
        let (userinfo, hostport) = match authority.rfind('@') {
            Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            Some(info) => match info.split_once(':') {
                Some((u, p)) => (percent_decode(u), Some(Secret::new(percent_decode(p)))),
                None => (percent_decode(info), None),
            },
            None if engine == EngineKind::Mysql => ("root".to_owned(), None),
            None => (
                std::env::var("PGUSER").unwrap_or_else(|_| "postgres".to_owned()),
                None,
            ),
        };
        let (host, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
            let (h, p) = bracketed
                .split_once(']')
                .ok_or_else(|| invalid("unclosed '['".into()))?;
            (h.to_owned(), p.strip_prefix(':').unwrap_or(""))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), p),
                None => (hostport.to_owned(), ""),
            }
        };
        let host = if host.is_empty() {
            "localhost".to_owned()
        } else {
            percent_decode(&host)
        };
        let port = if port.is_empty() {
            if engine == EngineKind::Mysql {
                3306
            } else {
                5432
            }
        } else {
            port.parse()
                .map_err(|_| invalid(format!("port {port:?} is not a number")))?
        };
        let database = percent_decode(path.trim_end_matches('/'));
        if database.is_empty() {
            return Err(invalid(
                "the URL names no database (postgres://user@host:5432/DB)".into(),
            ));
        }
        let mut params = Vec::new();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "password" => {
                    return Err(invalid(
                        "put the password in the URL's user part or in an environment variable, not in ?password="
                            .into(),
                    ));
                }
                "sslmode"
                    if !matches!(
                        v,
                        "disable" | "allow" | "prefer" | "require" | "verify-ca" | "verify-full"
                    ) =>
                {
                    return Err(invalid(format!(
                        "sslmode={v:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                    )));
                }
                "sslmode" | "sslrootcert" | "connect_timeout" => {}
                "application_name" | "options" if engine == EngineKind::Postgres => {}
                _ => return Err(invalid(format!("unknown connection parameter {k:?}"))),
            }
            params.push((k.to_owned(), percent_decode(v)));
        }
        Ok(Endpoint {
            engine,
            user,
            password,
            host,
            port,
            database,
            params,
        })
    }

    /// `sqlite:///absolute/path.db` or `sqlite://relative/path.db` (made absolute here, so a
    /// rerun from another directory still names the same file).
    fn sqlite(path: &str) -> Result<Endpoint, String> {
        let path = percent_decode(path.split('?').next().unwrap_or(""));
        if path.is_empty() {
            return Err(
                "the URL names no file (sqlite:///absolute/path.db or sqlite://relative/path.db)"
                    .into(),
            );
        }
        let absolute = std::path::absolute(&path)
            .map_err(|e| format!("cannot resolve the path {path:?}: {e}"))?;
        let database = absolute
            .to_str()
            .ok_or_else(|| format!("the path {path:?} is not UTF-8"))?
            .to_owned();
        Ok(Endpoint {
            engine: EngineKind::Sqlite,
            user: String::new(),
            password: None,
            host: String::new(),
            port: 0,
            database,
            params: Vec::new(),
        })
    }

    /// Where it is, without credentials: `postgres://user@host:port/db`.
    pub fn redacted(&self) -> String {
        if self.engine == EngineKind::Sqlite {
            return format!("sqlite://{}", self.database);
        }
        format!(
            "{}://{}@{}:{}/{}",
            if self.engine == EngineKind::Mysql {
                "mysql"
            } else {
                "postgres"
            },
            self.user,
            self.host_for_url(),
            self.port,
            self.database
        )
    }

    /// What identifies the endpoint for job identity (no password).
    pub fn identity(&self) -> String {
        format!("{}:{}/{}", self.host, self.port, self.database)
    }

    pub fn host_port(&self) -> String {
        format!("{}:{}", self.host_for_url(), self.port)
    }

    fn host_for_url(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }

    /// `connect_timeout` in seconds, 15 when not given.
    pub fn connect_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(
            self.param("connect_timeout")
                .and_then(|v| v.parse().ok())
                .unwrap_or(15),
        )
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_url_and_hides_the_password() {
        let e = Endpoint::parse(
            "--source",
            "postgres://app:p%40ss@w0rd@db.example:6543/shop?application_name=x",
        )
        .unwrap();
        assert_eq!(e.user, "app");
        assert_eq!(e.password.as_ref().unwrap().expose(), "p@ss@w0rd");
        assert_eq!(e.host, "db.example");
        assert_eq!(e.port, 6543);
        assert_eq!(e.database, "shop");
        assert_eq!(e.to_string(), "postgres://app@db.example:6543/shop");
        assert!(!format!("{e:?}").contains("w0rd"));
    }

    #[test]
    fn defaults_and_errors() {
        let e = Endpoint::parse("--target", "postgresql://u@127.0.0.1/db").unwrap();
        assert_eq!(e.port, 5432);
        assert!(e.password.is_none());
        let err = Endpoint::parse("--source", "postgres://u@h:5432")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--source") && err.contains("database"),
            "{err}"
        );
        let err = Endpoint::parse("--source", "oracle://u@h/db")
            .unwrap_err()
            .to_string();
        assert!(err.contains("oracle"), "{err}");
        let err = Endpoint::parse("--source", "postgres://u@h:x/db")
            .unwrap_err()
            .to_string();
        assert!(err.contains("port"), "{err}");
        let err = Endpoint::parse("--source", "postgres://u@h/db?sslmode=on").unwrap_err();
        assert!(err.to_string().contains("sslmode"));
        let e = Endpoint::parse(
            "--source",
            "postgres://u@h/db?sslmode=verify-full&sslrootcert=/ca.pem",
        )
        .unwrap();
        assert_eq!(e.param("sslrootcert"), Some("/ca.pem"));
    }

    #[test]
    fn sqlite_paths() {
        let e = Endpoint::parse("--source", "sqlite:///var/data/app.db").unwrap();
        assert_eq!(e.engine, EngineKind::Sqlite);
        assert_eq!(e.database, "/var/data/app.db");
        assert_eq!(e.to_string(), "sqlite:///var/data/app.db");
        let e = Endpoint::parse("--source", "sqlite://data/app.db").unwrap();
        assert!(e.database.starts_with('/') && e.database.ends_with("/data/app.db"));
        assert!(Endpoint::parse("--source", "sqlite://").is_err());
    }

    #[test]
    fn mysql_urls() {
        let e = Endpoint::parse("--source", "mysql://app:pw@db:3307/shop?sslmode=require").unwrap();
        assert_eq!(e.engine, EngineKind::Mysql);
        assert_eq!((e.user.as_str(), e.port), ("app", 3307));
        assert_eq!(e.to_string(), "mysql://app@db:3307/shop");
        let e = Endpoint::parse("--source", "mariadb://h/shop").unwrap();
        assert_eq!((e.user.as_str(), e.port), ("root", 3306));
        assert!(Endpoint::parse("--source", "mysql://h/shop?application_name=x").is_err());
    }

    #[test]
    fn ipv6_hosts() {
        let e = Endpoint::parse("--source", "postgres://u@[::1]:5433/db").unwrap();
        assert_eq!(e.host, "::1");
        assert_eq!(e.port, 5433);
        assert_eq!(e.redacted(), "postgres://u@[::1]:5433/db");
    }
}
