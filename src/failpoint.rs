//! Crash-test failpoints: `KUAKA_FAILPOINT=name[:n]` makes the process SIGKILL itself the n-th
//! time (default: first) execution reaches [`hit`]`(name)`. Only tests set it; without the
//! variable a hit is one atomic load.
//!
//! Names: `snapshot.after_schema`, `snapshot.chunk.before_commit`, `snapshot.chunk.after_commit`,
//! `snapshot.before_post_data`, `snapshot.post_data.after_step`, `apply.before_commit` (an apply
//! transaction's changes and position are written, COMMIT not sent), `apply.after_commit`,
//! `capture.synced_in_transaction` (the change log, or a MySQL job's binlog spool, was synced
//! while a source transaction was only partly received), `verify.after_part` (a verification
//! part's result is in the checkpoint), `snapshot.planned` (the chunk plan is saved, no chunk
//! copied yet), `failover.position_moved` (a MariaDB job on a new source server: the target's
//! position is in the new server's coordinates, the state store not updated yet).
//!
//! `KUAKA_PAUSE=name=PATH` instead holds the process at the first hit of `name`: it creates
//! `PATH.reached` and waits until `PATH` exists, so a test can act on the databases at exactly
//! that point.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

struct Armed {
    name: String,
    nth: u64,
    hits: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var("KUAKA_FAILPOINT").ok()?;
            let (name, nth) = match spec.rsplit_once(':') {
                Some((n, k)) => (n.to_owned(), k.parse().unwrap_or(1)),
                None => (spec, 1),
            };
            Some(Armed {
                name,
                nth,
                hits: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// A test armed `name` (to kill the process there): the caller may set up the state the
/// failpoint is about (for example sync a log) before [`hit`].
pub fn armed_for(name: &str) -> bool {
    armed().is_some_and(|a| a.name == name)
}

/// Reached a named point: die or pause here if a test armed it.
pub fn hit(name: &str) {
    if let Some((pause, path)) = paused()
        && pause == name
    {
        wait_for_release(path);
    }
    if let Some(a) = armed()
        && a.name == name
        && a.hits.fetch_add(1, Ordering::SeqCst) + 1 == a.nth
    {
        eprintln!("kuaka: failpoint {name} reached, killing the process");
        kill_self();
    }
}

fn paused() -> Option<&'static (String, String)> {
    static PAUSE: OnceLock<Option<(String, String)>> = OnceLock::new();
    PAUSE
        .get_or_init(|| {
            let spec = std::env::var("KUAKA_PAUSE").ok()?;
            let (name, path) = spec.split_once('=')?;
            Some((name.to_owned(), path.to_owned()))
        })
        .as_ref()
}

/// Blocks the calling thread: only tests pause, and they release within seconds.
fn wait_for_release(path: &str) {
    static ONCE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if ONCE.swap(true, Ordering::SeqCst) {
        return;
    }
    if let Err(e) = std::fs::write(format!("{path}.reached"), b"") {
        eprintln!("kuaka: cannot mark the pause at {path}.reached: {e}");
        return;
    }
    while !std::path::Path::new(path).exists() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[allow(unsafe_code)]
fn kill_self() -> ! {
    // SAFETY: getpid and kill have no memory-safety preconditions.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    std::process::abort()
}
