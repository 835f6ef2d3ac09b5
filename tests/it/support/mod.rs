//! Test harness: private database servers, the `kuaka` binary, and independent checks.
//!
//! Servers (`postgres::pg()`, `mariadb::mariadb()`) start lazily, once per test process, on free
//! ports in a temp dir, and a detached watchdog stops them and removes the dir when the test
//! process goes away (normal exit, panic or SIGKILL). Every test makes its own databases.

#![allow(dead_code)]

pub mod job;
pub mod mariadb;
pub mod postgres;

use std::fs::File;
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

pub use postgres::{
    assert_same_data, assert_same_schema, pg, pg_table_checksums, psql, psql_file, query_one,
};

/// Told to the reader when the server binaries are missing.
pub const INSTALL_HINT: &str = "run ./scripts/test.sh (the test command in README.md), which \
     installs postgresql-15 and mariadb-server when they are missing";

/// How long one `kuaka` invocation may take before the test gives up on it.
pub const KUAKA_TIMEOUT: Duration = Duration::from_secs(180);

/// A `Command` for the `kuaka` binary built by cargo for this test run.
pub fn kuaka() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kuaka"));
    command
        .env_remove("KUAKA_FAILPOINT")
        .env_remove("KUAKA_PAUSE")
        .env_remove("PGPASSWORD")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    command
}

/// A port nobody listens on right now (bind to port 0, read it, let it go).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// True when the test process runs as root (then PostgreSQL runs as the `postgres` user).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// Quote a string for `sh -c`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Start a detached `sh` that waits for this test process to go away and then runs `cleanup`.
/// It sits in its own process group so a Ctrl-C on the test run does not kill it first.
// Never waited for on purpose: it must outlive this process.
#[allow(clippy::zombie_processes)]
pub fn spawn_watchdog(cleanup: &str) {
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {cleanup}",
        pid = std::process::id()
    );
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("spawn watchdog sh");
}

/// Rows in all user tables of a database (0 while nothing was copied yet).
pub fn total_rows(url: &str) -> i64 {
    pg_table_checksums(url)
        .values()
        .map(|(count, _)| count)
        .sum()
}

/// Start kuaka in the background and return once some rows have reached `target`; the run must
/// be slow enough (`--max-rows-per-sec`) to still be going, so the test can act mid-copy.
pub fn spawn_until_rows_arrive(command: Command, target: &str) -> Background {
    let mut background = Background::spawn(command);
    wait_until(
        "some rows to reach the target",
        Duration::from_secs(60),
        || {
            assert!(
                background.is_running(),
                "kuaka exited before the test could act:\n{}",
                background.stderr()
            );
            total_rows(target) > 0
        },
    );
    background
}

/// Poll `condition` until it holds; panic naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// A folder of the shared datasets that holds `probe`: `KUAKA_SHARED_DIR`, else `shared/`
/// beside the checkout (as CI lays it out), else this workplace's `/work/shared`.
pub fn dataset_dir(name: &str, probe: &str) -> PathBuf {
    let candidates = std::env::var_os("KUAKA_SHARED_DIR")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"),
            PathBuf::from("/work/shared"),
        ]);
    let mut tried = Vec::new();
    for shared in candidates {
        let dir = shared.join("datasets").join(name);
        if dir.join(probe).exists() {
            return dir;
        }
        tried.push(dir.display().to_string());
    }
    panic!(
        "{name} not found (tried {}); set KUAKA_SHARED_DIR to the shared/ folder",
        tried.join(", ")
    )
}

/// Path of a file under `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// What one finished `kuaka` invocation left behind.
#[derive(Debug)]
pub struct RunOutput {
    pub description: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl RunOutput {
    /// stdout and stderr together (log lines may go to either).
    pub fn all_output(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    pub fn assert_success(&self) -> &Self {
        assert!(
            self.status.success(),
            "{} failed with {}\n--- stderr:\n{}\n--- stdout:\n{}",
            self.description,
            self.status,
            truncate(&self.stderr),
            truncate(&self.stdout)
        );
        self
    }

    pub fn assert_exit_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.status.code(),
            Some(code),
            "{}: expected exit code {code}, got {}\n--- stderr:\n{}\n--- stdout:\n{}",
            self.description,
            self.status,
            truncate(&self.stderr),
            truncate(&self.stdout)
        );
        self
    }

    pub fn assert_killed_by_sigkill(&self) -> &Self {
        assert_eq!(
            self.status.signal(),
            Some(9),
            "{}: expected the process to SIGKILL itself, got {}\n--- stderr:\n{}\n--- stdout:\n{}",
            self.description,
            self.status,
            truncate(&self.stderr),
            truncate(&self.stdout)
        );
        self
    }
}

fn truncate(s: &str) -> &str {
    const MAX: usize = 20_000;
    if s.len() <= MAX {
        return s;
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn describe(command: &Command) -> String {
    let mut description = String::from("kuaka");
    for arg in command.get_args() {
        description.push(' ');
        description.push_str(&arg.to_string_lossy());
    }
    for (key, value) in command.get_envs() {
        if let (true, Some(value)) = (key == "KUAKA_FAILPOINT", value) {
            description.push_str(&format!(" [KUAKA_FAILPOINT={}]", value.to_string_lossy()));
        }
    }
    description
}

/// Run a prepared `kuaka` command to completion (killing it after `KUAKA_TIMEOUT`), echo its
/// output into the test log, and return it.
pub fn run(mut command: Command) -> RunOutput {
    let description = describe(&command);
    eprintln!("$ {description}");
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let started_at = Instant::now();
    let mut child = command.spawn().expect("spawn kuaka");
    let mut stdout = child.stdout.take().expect("stdout pipe");
    let mut stderr = child.stderr.take().expect("stderr pipe");
    let stdout_reader = thread::spawn(move || {
        let mut buffer = Vec::new();
        let _ = stdout.read_to_end(&mut buffer);
        String::from_utf8_lossy(&buffer).into_owned()
    });
    let stderr_reader = thread::spawn(move || {
        let mut buffer = Vec::new();
        let _ = stderr.read_to_end(&mut buffer);
        String::from_utf8_lossy(&buffer).into_owned()
    });
    let deadline = started_at + KUAKA_TIMEOUT;
    let (status, timed_out) = loop {
        if let Some(status) = child.try_wait().expect("wait for kuaka") {
            break (status, false);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break (child.wait().expect("wait for killed kuaka"), true);
        }
        thread::sleep(Duration::from_millis(20));
    };
    let output = RunOutput {
        description,
        status,
        stdout: stdout_reader.join().unwrap_or_default(),
        stderr: stderr_reader.join().unwrap_or_default(),
    };
    eprintln!(
        "--- {} after {:.1?}\n--- stdout:\n{}\n--- stderr:\n{}",
        output.status,
        started_at.elapsed(),
        truncate(&output.stdout),
        truncate(&output.stderr)
    );
    if timed_out {
        panic!(
            "{} did not finish within {KUAKA_TIMEOUT:?}; killed it",
            output.description
        );
    }
    output
}

/// A `kuaka` process running in the background, its output going to files. Killed on drop.
pub struct Background {
    pub description: String,
    child: Child,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Background {
    pub fn spawn(mut command: Command) -> Background {
        let description = describe(&command);
        eprintln!("$ {description} &");
        let dir = tempfile::Builder::new()
            .prefix("kuaka-it-bg-")
            .tempdir()
            .expect("temp dir");
        let stdout_path = dir.path().join("stdout");
        let stderr_path = dir.path().join("stderr");
        command
            .stdout(File::create(&stdout_path).expect("stdout file"))
            .stderr(File::create(&stderr_path).expect("stderr file"));
        let child = command.spawn().expect("spawn kuaka");
        Background {
            description,
            child,
            stdout_path,
            stderr_path,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Still running?
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// SIGKILL it (std's `Child::kill` sends SIGKILL) and collect what it printed.
    pub fn kill(mut self) -> RunOutput {
        let _ = self.child.kill();
        self.finish()
    }

    /// Wait for it to exit on its own, at most `timeout`.
    pub fn wait(mut self, timeout: Duration) -> RunOutput {
        let deadline = Instant::now() + timeout;
        while self.is_running() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let output = self.finish();
                panic!(
                    "{} did not finish within {timeout:?}; killed it",
                    output.description
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.finish()
    }

    fn finish(&mut self) -> RunOutput {
        let status = self.child.wait().expect("wait for kuaka");
        let output = RunOutput {
            description: self.description.clone(),
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
        };
        eprintln!(
            "--- (background) {} exited: {}\n--- stdout:\n{}\n--- stderr:\n{}",
            output.description,
            output.status,
            truncate(&output.stdout),
            truncate(&output.stderr)
        );
        output
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The phase of the job in `state`, as `kuaka status --json` reports it (empty if unknown).
pub fn job_phase(state: &Path) -> String {
    let output = kuaka()
        .args(["status", "--json", "--state"])
        .arg(state)
        .output()
        .expect("kuaka status");
    serde_json::from_slice::<serde_json::Value>(&output.stdout)
        .ok()
        .and_then(|v| v["phase"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Stop a streaming `kuaka run` with SIGTERM: it must exit 130 (interrupted, resumable).
pub fn sigterm(background: Background) {
    let status = Command::new("kill")
        .args(["-TERM", &background.pid().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(status.success());
    let stopped = background.wait(Duration::from_secs(60));
    assert_eq!(stopped.status.code(), Some(130), "{}", stopped.all_output());
}
