//! A private MariaDB (10.11) for the test process, started only when a test asks for it, with
//! the binlog settings change capture needs (ROW format, FULL row image and metadata).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use super::{INSTALL_HINT, free_port, is_root, shell_quote, spawn_watchdog, wait_until};

const MARIADBD: &str = "/usr/sbin/mariadbd";
const INSTALL_DB: &str = "/usr/bin/mariadb-install-db";
const CLIENT: &str = "/usr/bin/mariadb";

pub struct MariaDbServer {
    pub port: u16,
    pub dir: PathBuf,
    pub socket: PathBuf,
    server_id: u32,
    /// More `mariadbd` options (a replica's).
    extra: Vec<String>,
}

static MARIADB: OnceLock<MariaDbServer> = OnceLock::new();

/// The test process's MariaDB server, started on first use.
pub fn mariadb() -> &'static MariaDbServer {
    MARIADB.get_or_init(|| MariaDbServer::start(1, Vec::new()))
}

impl MariaDbServer {
    fn start(server_id: u32, extra: Vec<String>) -> MariaDbServer {
        for tool in [MARIADBD, INSTALL_DB, CLIENT] {
            if !Path::new(tool).exists() {
                panic!("{tool} is missing: {INSTALL_HINT}");
            }
        }
        let dir = tempfile::Builder::new()
            .prefix("kuaka-it-mariadb-")
            .tempdir()
            .expect("temp dir for mariadb")
            .keep();
        let data = dir.join("data");
        let socket = dir.join("sock");
        let pid_file = dir.join("kuaka-it.pid");
        let port = free_port();

        // Watchdog first: it stops the server (if one was started) and removes the dir.
        spawn_watchdog(&format!(
            "if [ -f {pid_file} ]; then p=$(cat {pid_file}); kill -TERM $p 2>/dev/null; i=0; \
             while kill -0 $p 2>/dev/null && [ $i -lt 30 ]; do sleep 1; i=$((i+1)); done; \
             kill -KILL $p 2>/dev/null; fi; rm -rf {dir}",
            pid_file = shell_quote(&pid_file.to_string_lossy()),
            dir = shell_quote(&dir.to_string_lossy()),
        ));

        let user_arg = if is_root() {
            vec!["--user=root"]
        } else {
            vec![]
        };
        let install = Command::new(INSTALL_DB)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args(&user_arg)
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"])
            .stdin(Stdio::null())
            .output()
            .expect("run mariadb-install-db");
        if !install.status.success() {
            panic!(
                "mariadb-install-db failed with {}\n{}\n{}",
                install.status,
                String::from_utf8_lossy(&install.stdout),
                String::from_utf8_lossy(&install.stderr)
            );
        }

        let server = MariaDbServer {
            port,
            dir: dir.clone(),
            socket,
            server_id,
            extra,
        };
        server.spawn_mariadbd();
        // Tests connect over TCP as root from 127.0.0.1 (name resolution is off).
        server.exec(
            "CREATE USER IF NOT EXISTS 'root'@'127.0.0.1'; \
             GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;",
        );
        eprintln!("mariadb for tests: port {port}, dir {}", dir.display());
        server
    }

    /// A server of the test's own (for tests that restart it), stopped when the process ends.
    pub fn start_private() -> MariaDbServer {
        MariaDbServer::start(1, Vec::new())
    }

    /// A server of the test's own replicating `primary` by GTID (server_id 2, writing what it
    /// replicates to its own binlog, as a failover candidate does).
    pub fn start_replica_of(primary: &MariaDbServer) -> MariaDbServer {
        let replica = MariaDbServer::start(2, vec!["--log-slave-updates".into()]);
        replica.exec(&format!(
            "CHANGE MASTER TO MASTER_HOST = '127.0.0.1', MASTER_PORT = {}, MASTER_USER = 'root', \
             MASTER_USE_GTID = slave_pos; START SLAVE;",
            primary.port
        ));
        replica
    }

    /// Wait until this replica has applied everything `primary` has logged.
    pub fn catch_up_with(&self, primary: &MariaDbServer) {
        let pos = primary.exec("SELECT @@gtid_binlog_pos");
        let waited = self.exec(&format!("SELECT MASTER_GTID_WAIT('{}', 60)", pos.trim()));
        assert_eq!(
            waited.trim(),
            "0",
            "the replica did not catch up with {pos}"
        );
    }

    /// Stop the server (SIGTERM, a clean shutdown) and wait until it is gone.
    pub fn stop(&self) {
        let pid: i32 = std::fs::read_to_string(self.dir.join("kuaka-it.pid"))
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid");
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill");
        wait_until("mariadbd to stop", Duration::from_secs(60), || {
            // The child is not ours to wait for any more: poll /proc (a zombie counts as gone).
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true)
        });
    }

    /// Stop the server and start it again listening on `port` (taking over a stopped
    /// server's address, as a failover behind one DNS name or VIP does).
    pub fn move_to_port(self, port: u16) -> MariaDbServer {
        self.stop();
        let moved = MariaDbServer { port, ..self };
        moved.spawn_mariadbd();
        moved
    }

    /// Start `mariadbd` on this server's directory and wait until it answers.
    fn spawn_mariadbd(&self) {
        let dir = &self.dir;
        let user_arg = if is_root() {
            vec!["--user=root"]
        } else {
            vec![]
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("mariadbd.log"))
            .expect("mariadbd log");
        // Temporary tables in the server's own dir: in the shared /tmp another server's (or
        // a cleaner's) activity once removed one mid-query ("Error on delete of
        // '/tmp/#sql-temptable-…'").
        std::fs::create_dir_all(dir.join("tmp")).expect("mariadbd tmpdir");
        let mut child = Command::new(MARIADBD)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.join("data").display()))
            .arg(format!("--tmpdir={}", dir.join("tmp").display()))
            .args(&user_arg)
            .arg(format!("--socket={}", self.socket.display()))
            .arg(format!("--port={}", self.port))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--server-id={}", self.server_id))
            .args(&self.extra)
            .arg(format!("--log-bin={}", dir.join("binlog").display()))
            .arg(format!("--log-error={}", dir.join("error.log").display()))
            .arg(format!("--pid-file={}", dir.join("mariadbd.pid").display()))
            .args([
                "--binlog-format=ROW",
                "--binlog-row-image=FULL",
                "--binlog-row-metadata=FULL",
                "--skip-name-resolve",
                "--innodb-buffer-pool-size=64M",
                "--innodb-flush-log-at-trx-commit=2",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("spawn mariadbd");
        std::fs::write(dir.join("kuaka-it.pid"), child.id().to_string()).expect("write pid file");
        wait_until(
            "mariadbd to accept connections",
            Duration::from_secs(60),
            || {
                if let Some(status) = child.try_wait().expect("try_wait mariadbd") {
                    panic!(
                        "mariadbd exited early with {status}; see {}",
                        dir.join("error.log").display()
                    );
                }
                self.socket_client()
                    .args(["-e", "SELECT 1"])
                    .output()
                    .is_ok_and(|o| o.status.success())
            },
        );
        // Reaped by whoever waits for it; a stopped server is waited for in `restart`.
        std::mem::forget(child);
    }

    /// Stop the server (SIGTERM, a clean shutdown) and start it again on the same port.
    pub fn restart(&self) {
        self.stop();
        self.spawn_mariadbd();
    }

    /// The `mariadb` client on the unix socket as root, batch mode without column names.
    pub fn socket_client(&self) -> Command {
        let mut command = Command::new(CLIENT);
        command
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.socket.display()))
            .args(["-uroot", "-N", "-B"])
            .stdin(Stdio::null());
        command
    }

    /// `mysql://root@127.0.0.1:<port>/<db>`
    pub fn url(&self, db: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{db}", self.port)
    }

    /// Run SQL through the CLI; panic on error; return the output (tab-separated, no header).
    pub fn exec(&self, sql: &str) -> String {
        let output = self
            .socket_client()
            .arg("--default-character-set=utf8mb4")
            .args(["-e", sql])
            .output()
            .expect("run mariadb client");
        if !output.status.success() {
            panic!(
                "mariadb failed on {sql:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Run an SQL script (fed on standard input) in `db`; panic on error.
    pub fn exec_script(&self, db: &str, script: &str) {
        use std::io::Write;
        let mut child = self
            .socket_client()
            .arg("--default-character-set=utf8mb4")
            .arg(db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run mariadb client");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(script.as_bytes())
            .expect("feed script");
        let output = child.wait_with_output().expect("mariadb client");
        if !output.status.success() {
            panic!(
                "mariadb script failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }

    /// Rows of a query in `db` (UTF-8, UTC session), fields split on tabs.
    pub fn rows(&self, db: &str, sql: &str) -> Vec<Vec<String>> {
        let output = self
            .socket_client()
            .arg("--default-character-set=utf8mb4")
            .arg(db)
            .args(["-e", &format!("SET time_zone = '+00:00'; {sql}")])
            .output()
            .expect("run mariadb client");
        if !output.status.success() {
            panic!(
                "mariadb failed on {sql:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|l| l.split('\t').map(unescape_batch).collect())
            .collect()
    }

    /// (Re)create an empty database and return its URL.
    pub fn create_db(&self, name: &str) -> String {
        self.exec(&format!(
            "DROP DATABASE IF EXISTS `{name}`; CREATE DATABASE `{name}` CHARACTER SET utf8mb4;"
        ));
        self.url(name)
    }
}

#[test]
fn mariadb_test_server_starts() {
    let server = mariadb();
    assert_eq!(server.exec("SELECT 1").trim(), "1");
    assert_eq!(server.exec("SELECT @@binlog_format").trim(), "ROW");
    // TCP on the private port works too.
    let tcp = Command::new(CLIENT)
        .args(["--no-defaults", "-h", "127.0.0.1", "-uroot", "-N", "-B"])
        .arg(format!("--port={}", server.port))
        .args(["-e", "SELECT @@port"])
        .output()
        .expect("mariadb over tcp");
    assert!(tcp.status.success(), "{tcp:?}");
    assert_eq!(
        String::from_utf8_lossy(&tcp.stdout).trim(),
        server.port.to_string()
    );
}

/// A field of the client's batch output as the stored text: batch mode writes backslash,
/// tab, newline and NUL as `\\`, `\t`, `\n` and `\0`.
fn unescape_batch(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('0') => out.push('\0'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}
