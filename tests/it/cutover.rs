//! Cutover and fallback, PostgreSQL → PostgreSQL, under a writer that behaves like an
//! application: it writes to the database that accepts writes and moves to the other one when
//! it is refused. Afterwards every acknowledged write is in both databases exactly once, the
//! fenced side refuses writes, sequences are ahead, and the streams run the right way.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::support::job::Job;
use crate::support::{
    Background, assert_same_data, kuaka, psql, query_one, run, sigterm, wait_until,
};

const SCHEMA: &str = "
CREATE TABLE account (id serial PRIMARY KEY, owner text NOT NULL, balance numeric(12,2) NOT NULL);
INSERT INTO account (owner, balance) SELECT 'owner ' || g, g * 1.5 FROM generate_series(1, 500) g;
CREATE TABLE ledger (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  account integer NOT NULL REFERENCES account, amount integer NOT NULL, tag text UNIQUE NOT NULL);
INSERT INTO ledger (account, amount, tag) SELECT 1 + g % 500, g, 'seed ' || g FROM generate_series(1, 2000) g;
";

/// Where the application believes it should write.
const PREFER_SOURCE: u8 = 0;
const PREFER_TARGET: u8 = 1;

struct Writer {
    stop: Arc<AtomicBool>,
    prefer: Arc<AtomicU8>,
    /// Acknowledged writes: (tag, database written to: 0 source, 1 target).
    acked: Arc<Mutex<Vec<(String, u8)>>>,
    handle: Option<thread::JoinHandle<Vec<String>>>,
}

enum Attempt {
    Ok,
    ReadOnly,
    Retry,
    Failed(String),
}

type AttemptFn = Box<dyn Fn(&str) -> Attempt + Send + 'static>;

fn pg_attempt(url: &str) -> AttemptFn {
    let url = url.to_owned();
    Box::new(move |sql| attempt(&url, sql))
}

/// A write as an application user of a MariaDB server (root would pass `read_only`).
fn mariadb_attempt(port: u16, db: &str) -> AttemptFn {
    let db = db.to_owned();
    Box::new(move |sql| {
        let out = Command::new("mariadb")
            .args(["--no-defaults", "-h127.0.0.1", "-uapp", "-papp", "-N", "-B"])
            .arg(format!("-P{port}"))
            .args([db.as_str(), "-e", sql])
            .output()
            .expect("mariadb");
        if out.status.success() {
            return Attempt::Ok;
        }
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        if err.contains("read-only") || err.contains("read_only") {
            Attempt::ReadOnly
        } else if err.contains("Lost connection")
            || err.contains("gone away")
            || err.contains("killed")
        {
            Attempt::Retry
        } else {
            Attempt::Failed(err)
        }
    })
}

fn attempt(url: &str, sql: &str) -> Attempt {
    let out = Command::new("psql")
        .args([
            "-X",
            "-q",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            sql,
        ])
        .env_remove("PGPASSWORD")
        .output()
        .expect("psql");
    if out.status.success() {
        return Attempt::Ok;
    }
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    if err.contains("read-only transaction") {
        Attempt::ReadOnly
    } else if err.contains("terminat")
        || err.contains("closed the connection")
        || err.contains("too many clients")
    {
        // The fence ended this session; the write was not acknowledged.
        Attempt::Retry
    } else {
        Attempt::Failed(err)
    }
}

impl Writer {
    /// Insert a ledger row (the target's identity sequence must be ahead after a cutover, or
    /// this fails with a duplicate key) and update an account, in one transaction, over and
    /// over; move to the other database when the current one refuses writes.
    fn start(source: &str, target: &str) -> Writer {
        Writer::start_with([pg_attempt(source), pg_attempt(target)])
    }

    fn start_with(dbs: [AttemptFn; 2]) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let prefer = Arc::new(AtomicU8::new(PREFER_SOURCE));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (s, p, a) = (stop.clone(), prefer.clone(), acked.clone());
        let handle = thread::spawn(move || {
            let mut failures = Vec::new();
            let mut current = 0u8;
            let mut i = 0u64;
            while !s.load(Ordering::Relaxed) {
                i += 1;
                let tag = format!("w{i}");
                let sql = format!(
                    "BEGIN; INSERT INTO ledger (account, amount, tag) VALUES ({}, {i}, '{tag}'); \
                     UPDATE account SET balance = balance + 1 WHERE id = {}; COMMIT;",
                    1 + i % 500,
                    1 + i % 500
                );
                // A session ended by a fence may have committed before the client heard: the
                // outcome is in doubt until a retry either succeeds or finds its own tag.
                let mut in_doubt = false;
                loop {
                    match dbs[current as usize](&sql) {
                        Attempt::Ok => {
                            a.lock().unwrap().push((tag.clone(), current));
                            break;
                        }
                        Attempt::Retry => {
                            in_doubt = true;
                            thread::sleep(Duration::from_millis(5));
                        }
                        Attempt::Failed(e)
                            if in_doubt
                                && (e.contains(&format!("Duplicate entry '{tag}'"))
                                    || e.contains(&format!("(tag)=({tag})"))) =>
                        {
                            // The ended session's commit landed: that was the write.
                            a.lock().unwrap().push((tag.clone(), current));
                            break;
                        }
                        Attempt::ReadOnly => {
                            // Refused: the application moves to where it is told to go, or
                            // waits there until it is writable.
                            let want = p.load(Ordering::Relaxed);
                            if current != want {
                                current = want;
                            } else {
                                thread::sleep(Duration::from_millis(5));
                            }
                        }
                        Attempt::Failed(e) => {
                            failures.push(format!("{tag} on {current}: {e}"));
                            break;
                        }
                    }
                    if s.load(Ordering::Relaxed) {
                        break;
                    }
                }
            }
            failures
        });
        Writer {
            stop,
            prefer,
            acked,
            handle: Some(handle),
        }
    }

    fn count_on(&self, db: u8) -> usize {
        self.acked
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, d)| *d == db)
            .count()
    }

    fn finish(mut self) -> Vec<(String, u8)> {
        self.stop.store(true, Ordering::Relaxed);
        let failures = self.handle.take().unwrap().join().expect("writer");
        assert!(failures.is_empty(), "the writer failed: {failures:#?}");
        std::mem::take(&mut *self.acked.lock().unwrap())
    }
}

fn switch(job: &Job, action: &str, extra: &[&str]) -> crate::support::RunOutput {
    let mut c = kuaka();
    c.args([action, "--state", job.state_dir(), "--max-lag", "30"])
        .args(extra);
    run(c)
}

/// Whether the application is refused as read-only (`false` when its write goes through);
/// a connection that fails otherwise (a busy server under the parallel suite) is retried.
fn refuses_writes(url: &str) -> bool {
    let mut last = String::new();
    for _ in 0..50 {
        match attempt(url, "UPDATE account SET balance = balance WHERE id = 1") {
            Attempt::ReadOnly => return true,
            Attempt::Ok => return false,
            Attempt::Retry => last = "session ended".into(),
            Attempt::Failed(e) => last = e,
        }
        thread::sleep(Duration::from_millis(100));
    }
    panic!("could not tell whether {url} takes writes: {last}");
}

/// Every acknowledged tag is in `url`'s ledger exactly once.
fn assert_all_acked_in(url: &str, acked: &[(String, u8)], what: &str) {
    let rows = query_one(
        url,
        "SELECT count(*) || ' ' || count(DISTINCT tag) FROM ledger WHERE tag LIKE 'w%'",
    );
    let tags: std::collections::HashSet<String> = query_one(
        url,
        "SELECT string_agg(tag, ',') FROM ledger WHERE tag LIKE 'w%'",
    )
    .split(',')
    .map(str::to_owned)
    .collect();
    let missing: Vec<&String> = acked
        .iter()
        .map(|(t, _)| t)
        .filter(|t| !tags.contains(*t))
        .take(10)
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged writes missing in the {what}: {missing:?}"
    );
    let (n, distinct) = rows.split_once(' ').expect("two counts");
    assert_eq!(n, distinct, "a write is in the {what} twice");
}

fn wait_for_tags(url: &str, acked: &[(String, u8)], what: &str) {
    let last = acked.iter().map(|(t, _)| t.clone()).collect::<Vec<_>>();
    wait_until(
        &format!("every acknowledged write to reach the {what}"),
        Duration::from_secs(60),
        || {
            let n: usize = query_one(url, "SELECT count(*) FROM ledger WHERE tag LIKE 'w%'")
                .parse()
                .unwrap_or(0);
            n >= last.len()
        },
    );
    assert_all_acked_in(url, acked, what);
}

/// Source and target become equal (the last changes may still be on their way).
fn assert_converge(job: &Job) {
    wait_until(
        "source and target to be equal",
        Duration::from_secs(60),
        || {
            crate::support::postgres::pg_table_checksums(&job.source)
                == crate::support::postgres::pg_table_checksums(&job.target)
        },
    );
    assert_same_data(&job.source, &job.target);
}

#[test]
fn cutover_and_fallback_under_writes() {
    let job = Job::new("cutover_pg", |url| {
        psql(url, SCHEMA);
        // Big transactions reach capture in parts before they commit (protocol 2 streaming):
        // the reverse-applied one below must still be recognised by its origin.
        psql(
            url,
            "ALTER DATABASE cutover_pg_src SET logical_decoding_work_mem = '64kB';",
        );
    });
    let mut streaming = job.stream_in_background(&[]);
    let writer = Writer::start(&job.source, &job.target);
    wait_until("writes on the source", Duration::from_secs(30), || {
        writer.count_on(0) >= 30
    });

    // Cutover: the writer is refused by the source and moves to the target. A session on
    // another database of the same server is not the application's: it must survive.
    let bystander_db = crate::support::pg().create_db("cutover_bystander");
    let bystander = thread::spawn(move || {
        Command::new("psql")
            .args(["-X", "-q", "-d", &bystander_db, "-c", "SELECT pg_sleep(4)"])
            .output()
            .expect("psql")
    });
    thread::sleep(Duration::from_millis(300));
    writer.prefer.store(PREFER_TARGET, Ordering::Relaxed);
    let out = switch(&job, "cutover", &[]);
    out.assert_success();
    let bystander = bystander.join().expect("bystander");
    assert!(
        bystander.status.success(),
        "the fence ended a session of another database: {}",
        String::from_utf8_lossy(&bystander.stderr)
    );
    let text = out.all_output();
    for step in [
        "check lag",
        "fence",
        "drain",
        "verify",
        "sequences",
        "reverse replication",
        "unfence target",
    ] {
        assert!(text.contains(step), "no step {step:?} in:\n{text}");
    }
    assert!(text.contains("could not write for"), "{text}");
    wait_until("writes on the target", Duration::from_secs(30), || {
        writer.count_on(1) >= 30
    });
    assert!(
        refuses_writes(&job.source),
        "the source accepts writes after the cutover"
    );
    // The identity sequence moved ahead: the writer's inserts on the target did not collide
    // (it fails on any error but read-only), and the target's sequence is past every source id.
    let source_max: i64 = query_one(&job.source, "SELECT max(id) FROM ledger")
        .parse()
        .unwrap();
    let target_seq: i64 = query_one(
        &job.target,
        "SELECT last_value FROM pg_sequences WHERE sequencename = 'ledger_id_seq'",
    )
    .parse()
    .unwrap();
    assert!(
        target_seq >= source_max,
        "target sequence {target_seq} behind source id {source_max}"
    );
    let status = job.status_json();
    assert_eq!(status["direction"], "reverse", "{status:#}");
    assert_eq!(status["last_switch"]["state"], "done", "{status:#}");
    // Rerunning is a no-op.
    switch(&job, "cutover", &[]).assert_success();

    // The target's writes stream back to the source.
    let acked_now = writer.acked.lock().unwrap().clone();
    wait_for_tags(
        &job.source,
        &acked_now,
        "source (through reverse replication)",
    );

    // A big transaction and then a small update of one of its rows on the target: both go
    // back to the source; after the fallback the forward stream must bring neither to the
    // target again (replaying the streamed insert would undo the update there).
    psql(
        &job.target,
        "INSERT INTO ledger (account, amount, tag) SELECT 1 + g % 500, g, 'big ' || g FROM generate_series(1, 3000) g;",
    );
    // (Apply batches transactions together: the update must come in a later batch.)
    wait_until(
        "the big transaction to reach the source",
        Duration::from_secs(60),
        || {
            query_one(
                &job.source,
                "SELECT count(*) FROM ledger WHERE tag LIKE 'big %'",
            ) == "3000"
        },
    );
    psql(
        &job.target,
        "UPDATE ledger SET amount = -1 WHERE tag = 'big 7';",
    );

    // Fallback: the writer is refused by the target and returns to the source.
    writer.prefer.store(PREFER_SOURCE, Ordering::Relaxed);
    let before = writer.count_on(0);
    let out = switch(&job, "fallback", &[]);
    out.assert_success();
    assert!(
        out.all_output().contains("could not write for"),
        "{}",
        out.all_output()
    );
    wait_until(
        "writes on the source again",
        Duration::from_secs(30),
        || writer.count_on(0) >= before + 30,
    );
    assert!(
        refuses_writes(&job.target),
        "the target accepts writes after the fallback"
    );
    let acked = writer.finish();
    assert!(acked.iter().any(|(_, d)| *d == 1));
    // Forward again: everything reaches the target, and nothing kuaka applied to the source
    // came back (each tag once).
    wait_for_tags(&job.target, &acked, "target (forward again)");
    assert_all_acked_in(&job.source, &acked, "source");
    assert_converge(&job);
    assert!(streaming.is_running(), "{}", streaming.stderr());
    sigterm(streaming);
    let status = job.status_json();
    assert_eq!(status["direction"], "forward", "{status:#}");
    job.clean();
    assert_eq!(
        query_one(
            &job.target,
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database() AND slot_name LIKE 'kuaka%'"
        ),
        "0",
        "a reverse slot is left on the target"
    );
}

/// A cutover refused after the fence (verification finds a difference planted on the
/// target) gives the application its source back, and leaves a target that was read-only
/// before (protected by its owner) read-only: the fence restores what it found.
#[test]
fn failed_cutover_restores_what_the_fence_found() {
    let job = Job::new("cutover_protect", |url| {
        psql(url, SCHEMA);
    });
    let mut streaming = job.stream_in_background(&[]);
    psql(
        &job.target,
        "ALTER DATABASE cutover_protect_dst SET default_transaction_read_only = on;",
    );
    psql(
        &job.target,
        "SET default_transaction_read_only = off; DELETE FROM ledger WHERE id = (SELECT min(id) FROM ledger);",
    );
    assert!(refuses_writes(&job.target), "the target is protected");
    let out = switch(&job, "cutover", &[]);
    assert_ne!(out.status.code(), Some(0), "{}", out.all_output());
    let text = out.all_output();
    assert!(text.contains("verification found differences"), "{text}");
    assert!(text.contains("it was read-only before"), "{text}");
    assert!(
        !refuses_writes(&job.source),
        "the source stays fenced after a failed cutover"
    );
    assert!(
        refuses_writes(&job.target),
        "the failed cutover made the protected target writable"
    );
    assert!(
        !job.state.path().join("fences.json").exists(),
        "fences.json left after the fences were lifted"
    );
    assert_eq!(job.status_json()["direction"], "forward");
    assert!(streaming.is_running(), "{}", streaming.stderr());
    sigterm(streaming);
}

#[test]
fn cutover_killed_at_steps_then_rerun() {
    let job = Job::new("cutover_kill", |url| {
        psql(url, SCHEMA);
    });
    let with_failpoint = |fp: &str| {
        let mut c = job.stream_command(&[]);
        c.env("KUAKA_FAILPOINT", fp);
        let mut b = Background::spawn(c);
        // This run holds the state directory (the phase alone is an earlier run's).
        let lock = job.state.path().join("lock");
        wait_until(
            "the run to take the state directory",
            Duration::from_secs(120),
            || {
                assert!(b.is_running(), "kuaka exited early:\n{}", b.stderr());
                job.phase() == "streaming"
                    && std::fs::read_to_string(&lock).is_ok_and(|p| p.trim() == b.pid().to_string())
            },
        );
        b
    };
    let writer = Writer::start(&job.source, &job.target);
    wait_until("writes on the source", Duration::from_secs(30), || {
        writer.count_on(0) >= 20
    });
    writer.prefer.store(PREFER_TARGET, Ordering::Relaxed);

    // Killed after each step before the switch (1 check lag … 5 sequences): nothing switched;
    // from the fence on, both databases refuse the application.
    for step in 1..=5 {
        let killed = with_failpoint(&format!("cutover.after_step:{step}"));
        switch(&job, "cutover", &[]).assert_exit_code(2);
        killed
            .wait(Duration::from_secs(30))
            .assert_killed_by_sigkill();
        assert_eq!(job_direction(&job), "forward", "after step {step}");
        if step >= 2 {
            assert!(
                refuses_writes(&job.source),
                "source writable after step {step}"
            );
            assert!(
                refuses_writes(&job.target),
                "target writable after step {step}"
            );
        }
    }

    // Killed after the reverse slot is made and the direction recorded: the restart finishes
    // the switch (unfences the target) before streaming back; killed once more in that
    // finishing step (its first), and the next start finishes it again.
    let killed = with_failpoint("cutover.after_step:6");
    switch(&job, "cutover", &[]).assert_exit_code(2);
    killed
        .wait(Duration::from_secs(30))
        .assert_killed_by_sigkill();
    assert_eq!(job_direction(&job), "reverse");
    assert!(
        refuses_writes(&job.target),
        "unfenced before the switch finished"
    );
    let mut c = job.stream_command(&[]);
    c.env("KUAKA_FAILPOINT", "cutover.after_step:1");
    Background::spawn(c)
        .wait(Duration::from_secs(60))
        .assert_killed_by_sigkill();
    let mut third = Background::spawn(job.stream_command(&[]));
    wait_until(
        "the target to accept writes",
        Duration::from_secs(60),
        || {
            assert!(third.is_running(), "kuaka exited:\n{}", third.stderr());
            !refuses_writes(&job.target)
        },
    );
    let out = switch(&job, "cutover", &[]);
    out.assert_success();
    assert!(
        out.all_output().contains("already cut over"),
        "{}",
        out.all_output()
    );
    wait_until("writes on the target", Duration::from_secs(30), || {
        writer.count_on(1) >= 20
    });
    assert!(refuses_writes(&job.source));
    sigterm(third);

    // Fallback killed after each step before its switch (1 check lag … 5 sequences), then
    // after it (6: the direction is forward again): the restart drops the reverse slot and
    // unfences the source.
    writer.prefer.store(PREFER_SOURCE, Ordering::Relaxed);
    for step in 1..=6 {
        let killed = with_failpoint(&format!("fallback.after_step:{step}"));
        switch(&job, "fallback", &[]).assert_exit_code(2);
        killed
            .wait(Duration::from_secs(30))
            .assert_killed_by_sigkill();
        let expected = if step == 6 { "forward" } else { "reverse" };
        assert_eq!(job_direction(&job), expected, "after fallback step {step}");
    }
    let mut fourth = Background::spawn(job.stream_command(&[]));
    wait_until(
        "the source to accept writes",
        Duration::from_secs(60),
        || {
            assert!(fourth.is_running(), "kuaka exited:\n{}", fourth.stderr());
            !refuses_writes(&job.source)
        },
    );
    let before = writer.count_on(0);
    wait_until(
        "writes on the source again",
        Duration::from_secs(30),
        || writer.count_on(0) >= before + 20,
    );
    assert!(refuses_writes(&job.target));
    let acked = writer.finish();
    assert!(
        acked.iter().any(|(_, d)| *d == 1),
        "no write reached the target"
    );
    wait_for_tags(&job.target, &acked, "target (forward again)");
    assert_all_acked_in(&job.source, &acked, "source");
    assert_converge(&job);
    sigterm(fourth);
    job.clean();
    assert_eq!(
        query_one(
            &job.target,
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database() AND slot_name LIKE 'kuaka%'"
        ),
        "0",
        "a reverse slot is left on the target"
    );
}

fn job_direction(job: &Job) -> String {
    job.status_json()["direction"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// MariaDB → PostgreSQL: cutover without reverse replication. The source server becomes
/// `read_only` (the application user's sessions ended), the target's identity sequences move
/// past the source's AUTO_INCREMENT, the application moves to the target, the job ends.
/// MariaDB → PostgreSQL: cutover with reverse replication (PostgreSQL → MariaDB), the
/// application's target writes reaching the source, then fallback and forward again.
#[test]
fn mariadb_to_postgres_cutover_and_fallback() {
    mariadb_cutover_case(false, true);
}

/// MariaDB → MariaDB on another server, `--no-reverse`: the target server fenced by
/// `read_only` until the switch and its AUTO_INCREMENT counters moved; the job ends.
#[test]
fn mariadb_to_mariadb_cutover_without_reverse() {
    mariadb_cutover_case(true, false);
}

/// MariaDB → MariaDB with reverse replication (the target's binlog applied to the source),
/// fallback, and forward again.
#[test]
fn mariadb_to_mariadb_cutover_and_fallback() {
    mariadb_cutover_case(true, true);
}

const MARIADB_SCHEMA: &str = "
CREATE TABLE account (id int AUTO_INCREMENT PRIMARY KEY, owner varchar(40) NOT NULL,
  balance decimal(12,2) NOT NULL) ENGINE=InnoDB;
INSERT INTO account (owner, balance) SELECT CONCAT('owner ', seq), seq * 1.5 FROM seq_1_to_500;
CREATE TABLE ledger (id bigint AUTO_INCREMENT PRIMARY KEY, account int NOT NULL,
  amount int NOT NULL, tag varchar(40) NOT NULL UNIQUE) ENGINE=InnoDB;
INSERT INTO ledger (account, amount, tag) SELECT 1 + seq % 500, seq, CONCAT('seed ', seq) FROM seq_1_to_2000;
CREATE TABLE ledger_audit (id char(36) PRIMARY KEY, tag varchar(40) NOT NULL) ENGINE=InnoDB;
CREATE TRIGGER ledger_audit_ins AFTER INSERT ON ledger FOR EACH ROW
  INSERT INTO ledger_audit (id, tag) VALUES (UUID(), NEW.tag);
CREATE VIEW ledger_totals AS SELECT account, SUM(amount) AS total FROM ledger GROUP BY account;
";

/// The writer's tags in MariaDB's `ledger_audit` (written by the `ledger_audit_ins` trigger).
fn mariadb_audit_tags(server: &crate::support::mariadb::MariaDbServer, db: &str) -> Vec<String> {
    server
        .rows(db, "SELECT tag FROM ledger_audit WHERE tag LIKE 'w%'")
        .into_iter()
        .map(|r| r[0].clone())
        .collect()
}

/// The audit trigger fired once per acknowledged insert, on whichever side took it, and never
/// on changes kuaka applied: on a MariaDB target (which gets the trigger at cutover) every
/// tag is audited once in both databases; with a PostgreSQL target (MySQL triggers are not
/// translated) only the source's own writes are, and the target's writes streamed back to the
/// source did not fire the source's trigger.
fn assert_audited_once(
    server: &crate::support::mariadb::MariaDbServer,
    db: &str,
    target: &TargetSide<'_>,
    acked: &[(String, u8)],
) {
    match target {
        TargetSide::Mariadb(t, tdb) => {
            assert_each_once(&mariadb_audit_tags(t, tdb), acked, "target's audit");
            assert_each_once(&mariadb_audit_tags(server, db), acked, "source's audit");
        }
        TargetSide::Postgres(url) => {
            let on_source: Vec<(String, u8)> =
                acked.iter().filter(|(_, d)| *d == 0).cloned().collect();
            let audited = mariadb_audit_tags(server, db);
            assert_each_once(&audited, &on_source, "source's audit");
            let fired: Vec<&String> = acked
                .iter()
                .filter(|(t, d)| *d == 1 && audited.contains(t))
                .map(|(t, _)| t)
                .take(5)
                .collect();
            assert!(
                fired.is_empty(),
                "the source's trigger fired on changes streamed back from the target: {fired:?}"
            );
            let on_target: Vec<String> = query_one(
                url,
                "SELECT coalesce(string_agg(tag, ','), '') FROM ledger_audit WHERE tag LIKE 'w%'",
            )
            .split(',')
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect();
            assert_each_once(&on_target, &on_source, "target's audit");
        }
    }
}

fn mariadb_cutover_case(mariadb_target: bool, reverse: bool) {
    use crate::support::mariadb::MariaDbServer;
    // Servers of this test's own: read_only holds off every application on a server.
    let server = MariaDbServer::start_private();
    let db = "co_my_src";
    let source = server.create_db(db);
    server.exec_script(db, MARIADB_SCHEMA);
    server.exec("CREATE USER app@'%' IDENTIFIED BY 'app'; GRANT ALL ON co_my_src.* TO app@'%';");
    let target_server = mariadb_target.then(MariaDbServer::start_private);
    let (target, target_writes): (String, AttemptFn) = match &target_server {
        Some(t) => {
            let url = t.create_db("co_my_dst");
            t.exec("CREATE USER app@'%' IDENTIFIED BY 'app'; GRANT ALL ON co_my_dst.* TO app@'%';");
            (url, mariadb_attempt(t.port, "co_my_dst"))
        }
        None => {
            let url = crate::support::pg().create_db("co_my_dst");
            let writes = pg_attempt(&url);
            (url, writes)
        }
    };
    let state = tempfile::Builder::new()
        .prefix("kuaka-it-state-")
        .tempdir()
        .expect("state");
    let state_dir = state.path().to_str().expect("utf-8").to_owned();
    let run_command = || {
        let mut c = kuaka();
        c.args([
            "run", "--source", &source, "--target", &target, "--state", &state_dir,
        ]);
        c
    };
    let mut streaming = Background::spawn(run_command());
    wait_until("streaming", Duration::from_secs(120), || {
        assert!(
            streaming.is_running(),
            "kuaka exited early:\n{}",
            streaming.stderr()
        );
        crate::support::job_phase(state.path()) == "streaming"
    });
    let writer = Writer::start_with([mariadb_attempt(server.port, db), target_writes]);
    wait_until("writes on the source", Duration::from_secs(30), || {
        writer.count_on(0) >= 30
    });
    let cutover = |extra: &[&str]| {
        let mut c = kuaka();
        c.args(["cutover", "--state", &state_dir, "--max-lag", "30"])
            .args(extra);
        run(c)
    };
    writer.prefer.store(PREFER_TARGET, Ordering::Relaxed);
    let out = cutover(if reverse { &[] } else { &["--no-reverse"] });
    out.assert_success();
    let text = out.all_output();
    for step in [
        "check lag",
        "fence",
        "drain",
        "verify",
        "sequences",
        "reverse replication",
        "triggers",
        "unfence target",
    ] {
        assert!(text.contains(step), "no step {step:?} in:\n{text}");
    }
    assert!(text.contains("read_only = ON"), "{text}");
    if reverse {
        let target_side = match &target_server {
            Some(t) => TargetSide::Mariadb(t, "co_my_dst"),
            None => TargetSide::Postgres(&target),
        };
        mariadb_reverse_and_fallback(&server, db, target_side, &state_dir, writer, streaming);
        return;
    }
    // The job ends by itself.
    let ended = streaming.wait(Duration::from_secs(30));
    ended.assert_success();
    assert!(
        ended.all_output().contains("cut over"),
        "{}",
        ended.all_output()
    );
    wait_until("writes on the target", Duration::from_secs(30), || {
        writer.count_on(1) >= 30
    });
    let acked = writer.finish();
    assert!(
        matches!(
            mariadb_attempt(server.port, db)("UPDATE account SET balance = balance WHERE id = 1"),
            Attempt::ReadOnly
        ),
        "the source accepts the application's writes after the cutover"
    );
    // Everything acknowledged on either side is in the target once (the writer failed on
    // any error but read-only, so no insert on the target hit a used AUTO_INCREMENT value).
    let tags: Vec<String> = match &target_server {
        Some(t) => t
            .rows("co_my_dst", "SELECT tag FROM ledger WHERE tag LIKE 'w%'")
            .into_iter()
            .map(|r| r[0].clone())
            .collect(),
        None => query_one(
            &target,
            "SELECT string_agg(tag, ',') FROM ledger WHERE tag LIKE 'w%'",
        )
        .split(',')
        .map(str::to_owned)
        .collect(),
    };
    let set: std::collections::HashSet<&String> = tags.iter().collect();
    assert_eq!(set.len(), tags.len(), "a write is in the target twice");
    let missing: Vec<&String> = acked
        .iter()
        .map(|(t, _)| t)
        .filter(|t| !set.contains(t))
        .take(10)
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged writes missing in the target: {missing:?}"
    );
    if let Some(t) = &target_server {
        // The trigger was created on the target at the cutover (not before: it would have
        // fired on applied rows) and audited each write once; the source kept its own.
        assert_each_once(
            &mariadb_audit_tags(t, "co_my_dst"),
            &acked,
            "target's audit",
        );
        assert_eq!(
            server.rows(
                db,
                "SELECT COUNT(*) FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = DATABASE()"
            )[0][0],
            "1"
        );
    }
    // A rerun has nothing to do.
    let again = run(run_command());
    again.assert_success();
    assert!(
        again.all_output().contains("cut over"),
        "{}",
        again.all_output()
    );
}

/// Whether the MariaDB source refuses the application's writes (read_only).
fn mariadb_refuses_writes(port: u16, db: &str) -> bool {
    let write = mariadb_attempt(port, db);
    let mut last = String::new();
    for _ in 0..50 {
        match write("UPDATE account SET balance = balance WHERE id = 1") {
            Attempt::ReadOnly => return true,
            Attempt::Ok => return false,
            Attempt::Retry => last = "session ended".into(),
            Attempt::Failed(e) => last = e,
        }
        thread::sleep(Duration::from_millis(100));
    }
    panic!("could not tell whether the MariaDB source takes writes: {last}");
}

/// MariaDB → PostgreSQL with reverse replication, kuaka killed after each cutover step and
/// each fallback step: every rerun ends consistent, and after all of it every acknowledged
/// write is in both databases exactly once.
#[test]
fn mariadb_cutover_killed_at_steps_then_rerun() {
    mariadb_killed_at_steps(false);
}

/// The same for MariaDB → MariaDB, whose reverse leg is the target's binlog and whose
/// fallback runs in the binlog loop.
#[test]
fn mariadb_to_mariadb_cutover_killed_at_steps_then_rerun() {
    mariadb_killed_at_steps(true);
}

fn mariadb_killed_at_steps(mariadb_target: bool) {
    use crate::support::mariadb::MariaDbServer;
    let server = MariaDbServer::start_private();
    let db = "co_kill_src";
    let source = server.create_db(db);
    server.exec_script(db, MARIADB_SCHEMA);
    server.exec("CREATE USER app@'%' IDENTIFIED BY 'app'; GRANT ALL ON co_kill_src.* TO app@'%';");
    let target_server = mariadb_target.then(MariaDbServer::start_private);
    let target = match &target_server {
        Some(t) => {
            let url = t.create_db("co_kill_dst");
            t.exec(
                "CREATE USER app@'%' IDENTIFIED BY 'app'; GRANT ALL ON co_kill_dst.* TO app@'%';",
            );
            url
        }
        None => crate::support::pg().create_db("co_kill_dst"),
    };
    let (target_side, target_writes) = match &target_server {
        Some(t) => (
            TargetSide::Mariadb(t, "co_kill_dst"),
            mariadb_attempt(t.port, "co_kill_dst"),
        ),
        None => (TargetSide::Postgres(&target), pg_attempt(&target)),
    };
    let refuses_writes = |_: &String| target_side.refuses_writes();
    let job = Job::between(db, source, "co_kill_dst", target.clone());
    let with_failpoint = |fp: &str| {
        let mut c = job.stream_command(&[]);
        c.env("KUAKA_FAILPOINT", fp);
        let mut b = Background::spawn(c);
        let lock = job.state.path().join("lock");
        wait_until(
            "the run to take the state directory",
            Duration::from_secs(120),
            || {
                assert!(b.is_running(), "kuaka exited early:\n{}", b.stderr());
                job.phase() == "streaming"
                    && std::fs::read_to_string(&lock).is_ok_and(|p| p.trim() == b.pid().to_string())
            },
        );
        b
    };
    let start = |what: &str, writable: &dyn Fn() -> bool| {
        let mut b = Background::spawn(job.stream_command(&[]));
        wait_until(what, Duration::from_secs(60), || {
            assert!(b.is_running(), "kuaka exited:\n{}", b.stderr());
            writable()
        });
        b
    };
    let first = start("the first run", &|| job.phase() == "streaming");
    let writer = Writer::start_with([mariadb_attempt(server.port, db), target_writes]);
    wait_until("writes on the source", Duration::from_secs(30), || {
        writer.count_on(0) >= 20
    });
    sigterm(first);
    writer.prefer.store(PREFER_TARGET, Ordering::Relaxed);

    // Before the switch (1 check lag … 5 sequences): still forward; fenced from step 2 on.
    // After step 6 (reverse slot made, direction recorded): the restart finishes the cutover
    // and unfences the target.
    for step in 1..=6 {
        let killed = with_failpoint(&format!("cutover.after_step:{step}"));
        switch(&job, "cutover", &[]).assert_exit_code(2);
        killed
            .wait(Duration::from_secs(30))
            .assert_killed_by_sigkill();
        let expected = if step == 6 { "reverse" } else { "forward" };
        assert_eq!(job_direction(&job), expected, "after cutover step {step}");
        if (2..6).contains(&step) {
            assert!(
                mariadb_refuses_writes(server.port, db),
                "source writable after step {step}"
            );
            assert!(refuses_writes(&target), "target writable after step {step}");
        }
    }
    // Killed again while a restart finishes it, after the trigger moved (created on a MariaDB
    // target, taken off the source): still fenced, done by the next start.
    let mut c = job.stream_command(&[]);
    c.env("KUAKA_FAILPOINT", "cutover.after_step:1");
    Background::spawn(c)
        .wait(Duration::from_secs(60))
        .assert_killed_by_sigkill();
    assert!(
        refuses_writes(&target),
        "target unfenced before the last step"
    );
    let reverse = start("the target to accept writes", &|| !refuses_writes(&target));
    assert!(mariadb_refuses_writes(server.port, db));
    wait_until("writes on the target", Duration::from_secs(30), || {
        writer.count_on(1) >= 20
    });
    sigterm(reverse);

    // Fallback: 1–5 before its switch, 6 the switch (forward again).
    writer.prefer.store(PREFER_SOURCE, Ordering::Relaxed);
    for step in 1..=6 {
        let killed = with_failpoint(&format!("fallback.after_step:{step}"));
        switch(&job, "fallback", &[]).assert_exit_code(2);
        killed
            .wait(Duration::from_secs(30))
            .assert_killed_by_sigkill();
        let expected = if step == 6 { "forward" } else { "reverse" };
        assert_eq!(job_direction(&job), expected, "after fallback step {step}");
    }
    // Killed again while a restart finishes the fallback: after dropping the reverse slot
    // (a PostgreSQL target has one), after putting the trigger back on the source, then
    // after moving the forward position past kuaka's writes to the source. The source stays
    // fenced until the last step.
    let finishing = if mariadb_target { 2 } else { 3 };
    for step in 1..=finishing {
        let mut c = job.stream_command(&[]);
        c.env("KUAKA_FAILPOINT", format!("fallback.after_step:{step}"));
        Background::spawn(c)
            .wait(Duration::from_secs(60))
            .assert_killed_by_sigkill();
        assert_eq!(job_direction(&job), "forward");
        assert!(
            mariadb_refuses_writes(server.port, db),
            "unfenced at finishing step {step}"
        );
    }
    let last = start("the source to accept writes", &|| {
        !mariadb_refuses_writes(server.port, db)
    });
    let before = writer.count_on(0);
    wait_until(
        "writes on the source again",
        Duration::from_secs(30),
        || writer.count_on(0) >= before + 20,
    );
    assert!(refuses_writes(&target));
    let acked = writer.finish();
    assert!(
        acked.iter().any(|(_, d)| *d == 1),
        "no write reached the target"
    );
    wait_until(
        "every write to reach the target",
        Duration::from_secs(60),
        || target_side.tags().len() >= acked.len(),
    );
    assert_each_once(&target_side.tags(), &acked, "target");
    assert_each_once(&mariadb_tags(&server, db), &acked, "source");
    assert_audited_once(&server, db, &target_side, &acked);
    sigterm(last);
}

/// The tags in MariaDB's ledger (`w…` ones: the writer's).
fn mariadb_tags(server: &crate::support::mariadb::MariaDbServer, db: &str) -> Vec<String> {
    server
        .rows(db, "SELECT tag FROM ledger WHERE tag LIKE 'w%'")
        .into_iter()
        .map(|r| r[0].clone())
        .collect()
}

fn assert_each_once(tags: &[String], acked: &[(String, u8)], what: &str) {
    let set: std::collections::HashSet<&String> = tags.iter().collect();
    assert_eq!(set.len(), tags.len(), "a write is in the {what} twice");
    let missing: Vec<&String> = acked
        .iter()
        .map(|(t, _)| t)
        .filter(|t| !set.contains(t))
        .take(10)
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged writes missing in the {what}: {missing:?}"
    );
}

/// The target of a MariaDB job, as the fallback checks read it.
enum TargetSide<'a> {
    Postgres(&'a str),
    Mariadb(&'a crate::support::mariadb::MariaDbServer, &'a str),
}

impl TargetSide<'_> {
    fn tags(&self) -> Vec<String> {
        match self {
            TargetSide::Postgres(url) => query_one(
                url,
                "SELECT coalesce(string_agg(tag, ','), '') FROM ledger WHERE tag LIKE 'w%'",
            )
            .split(',')
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect(),
            TargetSide::Mariadb(server, db) => mariadb_tags(server, db),
        }
    }

    fn balance(&self) -> String {
        match self {
            TargetSide::Postgres(url) => query_one(url, "SELECT sum(balance)::text FROM account"),
            TargetSide::Mariadb(server, db) => {
                server.rows(db, "SELECT CAST(SUM(balance) AS CHAR) FROM account")[0][0].clone()
            }
        }
    }

    fn refuses_writes(&self) -> bool {
        match self {
            TargetSide::Postgres(url) => refuses_writes(url),
            TargetSide::Mariadb(server, db) => mariadb_refuses_writes(server.port, db),
        }
    }
}

/// After a MariaDB → PostgreSQL or MariaDB cutover with reverse replication: the target's
/// writes reach the source; fallback; the source's writes reach the target again, and nothing
/// kuaka wrote to the source comes back (each tag once on both sides).
fn mariadb_reverse_and_fallback(
    server: &crate::support::mariadb::MariaDbServer,
    db: &str,
    target: TargetSide<'_>,
    state_dir: &str,
    writer: Writer,
    streaming: Background,
) {
    wait_until("writes on the target", Duration::from_secs(30), || {
        writer.count_on(1) >= 30
    });
    assert!(
        matches!(
            mariadb_attempt(server.port, db)("UPDATE account SET balance = balance WHERE id = 1"),
            Attempt::ReadOnly
        ),
        "the source accepts the application's writes after the cutover"
    );
    let acked_now = writer.acked.lock().unwrap().clone();
    wait_until(
        "the target's writes to reach the source",
        Duration::from_secs(60),
        || mariadb_tags(server, db).len() >= acked_now.len(),
    );
    assert_each_once(&mariadb_tags(server, db), &acked_now, "source (reverse)");
    let mut status = kuaka();
    status.args(["status", "--json", "--state", state_dir]);
    let status: serde_json::Value = serde_json::from_str(&run(status).stdout).expect("status json");
    assert_eq!(status["direction"], "reverse", "{status:#}");

    writer.prefer.store(PREFER_SOURCE, Ordering::Relaxed);
    let before = writer.count_on(0);
    let mut fallback = kuaka();
    fallback.args(["fallback", "--state", state_dir, "--max-lag", "30"]);
    let out = run(fallback);
    out.assert_success();
    assert!(
        out.all_output().contains("forward position"),
        "{}",
        out.all_output()
    );
    wait_until(
        "writes on the source again",
        Duration::from_secs(30),
        || writer.count_on(0) >= before + 30,
    );
    assert!(
        target.refuses_writes(),
        "the target accepts writes after the fallback"
    );
    let acked = writer.finish();
    // Forward again: every write is in both databases, once.
    wait_until(
        "every write to reach the target (forward again)",
        Duration::from_secs(60),
        || target.tags().len() >= acked.len(),
    );
    assert_each_once(&target.tags(), &acked, "target");
    assert_each_once(&mariadb_tags(server, db), &acked, "source");
    assert_audited_once(server, db, &target, &acked);
    if let TargetSide::Mariadb(t, tdb) = &target {
        // The view came with the data; after the fallback the trigger is the source's again.
        assert_eq!(
            t.rows(tdb, "SELECT COUNT(*) > 0 FROM ledger_totals")[0][0],
            "1"
        );
        assert_eq!(
            t.rows(
                tdb,
                "SELECT COUNT(*) FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = DATABASE()"
            )[0][0],
            "0",
            "the trigger stayed on the target after the fallback"
        );
    }
    assert_eq!(
        server.rows(
            db,
            "SELECT COUNT(*) FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = DATABASE()"
        )[0][0],
        "1",
        "the source's trigger is not back after the fallback"
    );
    let sums = || {
        (
            target.balance(),
            server.rows(db, "SELECT CAST(SUM(balance) AS CHAR) FROM account")[0][0].clone(),
        )
    };
    wait_until("balances to converge", Duration::from_secs(30), || {
        let (a, b) = sums();
        a == b
    });
    let mut streaming = streaming;
    assert!(streaming.is_running(), "{}", streaming.stderr());
    sigterm(streaming);
    let mut clean = kuaka();
    clean.args(["clean", "--state", state_dir]);
    run(clean).assert_success();
    if let TargetSide::Postgres(url) = target {
        assert_eq!(
            query_one(
                url,
                "SELECT count(*) FROM pg_replication_slots WHERE database = current_database() AND slot_name LIKE 'kuaka%'"
            ),
            "0",
            "a reverse slot is left on the target"
        );
    }
}

/// `--newer-wins gmt_modified` during a dual-write period: a change from the source never
/// replaces a target row with a greater gmt_modified; newer ones are applied; what was kept
/// back is counted in `kuaka status`.
#[test]
fn newer_wins_keeps_the_newer_row() {
    let job = Job::new("newer_wins", |url| {
        psql(
            url,
            "CREATE TABLE item (id integer PRIMARY KEY, v text NOT NULL, gmt_modified timestamptz);
             INSERT INTO item SELECT g, 'seed', '2026-01-01' FROM generate_series(1, 10) g;",
        );
    });
    let streaming = job.stream_in_background(&["--newer-wins", "gmt_modified"]);
    // The application writes to the target too.
    psql(
        &job.target,
        "UPDATE item SET v = 'target', gmt_modified = '2026-06-01' WHERE id IN (1, 3);",
    );
    psql(
        &job.source,
        "UPDATE item SET v = 'older source', gmt_modified = '2026-03-01' WHERE id = 1;
         UPDATE item SET v = 'newer source', gmt_modified = '2026-09-01' WHERE id = 2;
         UPDATE item SET v = 'newest source', gmt_modified = '2026-12-01' WHERE id = 3;
         UPDATE item SET v = 'no version', gmt_modified = NULL WHERE id = 4;
         INSERT INTO item VALUES (11, 'inserted', '2026-02-01');",
    );
    wait_until(
        "the source's changes to arrive",
        Duration::from_secs(60),
        || query_one(&job.target, "SELECT count(*) FROM item WHERE id = 11") == "1",
    );
    let rows = |id: i32| query_one(&job.target, &format!("SELECT v FROM item WHERE id = {id}"));
    assert_eq!(rows(1), "target", "an older change replaced a newer row");
    assert_eq!(rows(2), "newer source");
    assert_eq!(rows(3), "newest source");
    assert_eq!(rows(4), "no version");
    // A later, newer change to the kept row is applied.
    psql(
        &job.source,
        "UPDATE item SET v = 'newer again', gmt_modified = '2026-07-01' WHERE id = 1;",
    );
    wait_until(
        "the newer change to arrive",
        Duration::from_secs(60),
        || rows(1) == "newer again",
    );
    wait_until(
        "status to count the kept-back change",
        Duration::from_secs(30),
        || job.status_json()["newer_wins_kept_back"]["public.item"] == 1,
    );
    sigterm(streaming);
    job.clean();
}

/// A write to a SQLite file, as an application would make it.
fn sqlite_attempt(path: std::path::PathBuf) -> AttemptFn {
    Box::new(move |sql| {
        let conn = match rusqlite::Connection::open(&path) {
            Ok(c) => c,
            Err(e) => return Attempt::Failed(e.to_string()),
        };
        let _ = conn.busy_timeout(Duration::from_secs(5));
        match conn.execute_batch(sql) {
            Ok(()) => Attempt::Ok,
            Err(e) => {
                let text = e.to_string();
                if text.contains("read-only") {
                    Attempt::ReadOnly
                } else if text.contains("locked") || text.contains("busy") {
                    Attempt::Retry
                } else {
                    Attempt::Failed(text)
                }
            }
        }
    })
}

fn sqlite_refuses_writes(path: &std::path::Path) -> bool {
    match sqlite_attempt(path.to_path_buf())("UPDATE account SET balance = balance WHERE id = 1") {
        Attempt::ReadOnly => true,
        Attempt::Ok => false,
        Attempt::Retry => panic!("{} stayed locked", path.display()),
        Attempt::Failed(e) => panic!("writing {}: {e}", path.display()),
    }
}

fn sqlite_tags(path: &std::path::Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(path).expect("open");
    let mut s = conn
        .prepare("SELECT tag FROM ledger WHERE tag LIKE 'w%'")
        .expect("select");
    s.query_map([], |r| r.get(0))
        .expect("tags")
        .collect::<rusqlite::Result<Vec<String>>>()
        .expect("tags")
}

/// SQLite → SQLite: cutover with reverse replication and fallback under an application-like
/// writer, kuaka killed after each step of both (and again while a restart finishes the
/// fallback). The fence is triggers in the file; afterwards every acknowledged write is in
/// both files exactly once and `kuaka verify` finds them equal.
#[test]
fn sqlite_cutover_and_fallback_killed_at_steps() {
    let dir = tempfile::tempdir().expect("dir");
    let source_path = dir.path().join("app.db");
    let target_path = dir.path().join("app-new.db");
    rusqlite::Connection::open(&source_path)
        .expect("open")
        .execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE account (id INTEGER PRIMARY KEY, owner TEXT NOT NULL, balance NUMERIC NOT NULL);
             CREATE TABLE ledger (id INTEGER PRIMARY KEY AUTOINCREMENT, account INTEGER NOT NULL REFERENCES account,
               amount INTEGER NOT NULL, tag TEXT UNIQUE NOT NULL);
             WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 500)
             INSERT INTO account SELECT n, 'owner ' || n, n * 1.5 FROM g;
             WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 2000)
             INSERT INTO ledger (account, amount, tag) SELECT 1 + n % 500, n, 'seed ' || n FROM g;
             CREATE TABLE ledger_audit (id TEXT PRIMARY KEY, tag TEXT NOT NULL);
             CREATE TRIGGER ledger_audit_ins AFTER INSERT ON ledger BEGIN
               INSERT INTO ledger_audit VALUES (lower(hex(randomblob(16))), NEW.tag); END;",
        )
        .expect("schema");
    let source = format!("sqlite://{}", source_path.display());
    let target = format!("sqlite://{}", target_path.display());
    let job = Job::between("app", source.clone(), "app-new", target.clone());
    let with_failpoint = |fp: &str| {
        let mut c = job.stream_command(&[]);
        c.env("KUAKA_FAILPOINT", fp);
        let mut b = Background::spawn(c);
        let lock = job.state.path().join("lock");
        wait_until(
            "the run to take the state directory",
            Duration::from_secs(120),
            || {
                assert!(b.is_running(), "kuaka exited early:\n{}", b.stderr());
                job.phase() == "streaming"
                    && std::fs::read_to_string(&lock).is_ok_and(|p| p.trim() == b.pid().to_string())
            },
        );
        b
    };
    let mut first = Background::spawn(job.stream_command(&[]));
    wait_until("streaming", Duration::from_secs(60), || {
        assert!(
            first.is_running(),
            "kuaka exited early:\n{}",
            first.stderr()
        );
        job.phase() == "streaming"
    });
    let writer = Writer::start_with([
        sqlite_attempt(source_path.clone()),
        sqlite_attempt(target_path.clone()),
    ]);
    wait_until("writes on the source", Duration::from_secs(30), || {
        writer.count_on(0) >= 20
    });
    sigterm(first);
    writer.prefer.store(PREFER_TARGET, Ordering::Relaxed);

    for step in 1..=6 {
        let killed = with_failpoint(&format!("cutover.after_step:{step}"));
        switch(&job, "cutover", &[]).assert_exit_code(2);
        killed
            .wait(Duration::from_secs(30))
            .assert_killed_by_sigkill();
        let expected = if step == 6 { "reverse" } else { "forward" };
        assert_eq!(job_direction(&job), expected, "after cutover step {step}");
        if (2..6).contains(&step) {
            assert!(
                sqlite_refuses_writes(&source_path),
                "source writable after step {step}"
            );
            assert!(
                sqlite_refuses_writes(&target_path),
                "target writable after step {step}"
            );
        }
    }
    // Killed while a restart finishes the cutover, after the trigger moved.
    let mut c = job.stream_command(&[]);
    c.env("KUAKA_FAILPOINT", "cutover.after_step:1");
    Background::spawn(c)
        .wait(Duration::from_secs(60))
        .assert_killed_by_sigkill();
    assert!(sqlite_refuses_writes(&target_path));
    let mut reverse = Background::spawn(job.stream_command(&[]));
    wait_until(
        "the target to accept writes",
        Duration::from_secs(60),
        || {
            assert!(reverse.is_running(), "kuaka exited:\n{}", reverse.stderr());
            !sqlite_refuses_writes(&target_path)
        },
    );
    assert!(sqlite_refuses_writes(&source_path));
    wait_until("writes on the target", Duration::from_secs(30), || {
        writer.count_on(1) >= 20
    });
    let on_target = writer.acked.lock().unwrap().clone();
    wait_until(
        "the target's writes on the source",
        Duration::from_secs(60),
        || sqlite_tags(&source_path).len() >= on_target.len(),
    );
    sigterm(reverse);

    writer.prefer.store(PREFER_SOURCE, Ordering::Relaxed);
    for step in 1..=6 {
        let killed = with_failpoint(&format!("fallback.after_step:{step}"));
        switch(&job, "fallback", &[]).assert_exit_code(2);
        killed
            .wait(Duration::from_secs(30))
            .assert_killed_by_sigkill();
        let expected = if step == 6 { "forward" } else { "reverse" };
        assert_eq!(job_direction(&job), expected, "after fallback step {step}");
    }
    // Finishing: capture dropped, trigger back on the source, forward position.
    for step in 1..=3 {
        let mut c = job.stream_command(&[]);
        c.env("KUAKA_FAILPOINT", format!("fallback.after_step:{step}"));
        Background::spawn(c)
            .wait(Duration::from_secs(60))
            .assert_killed_by_sigkill();
        assert!(
            sqlite_refuses_writes(&source_path),
            "unfenced at finishing step {step}"
        );
    }
    let mut last = Background::spawn(job.stream_command(&[]));
    wait_until(
        "the source to accept writes",
        Duration::from_secs(60),
        || {
            assert!(last.is_running(), "kuaka exited:\n{}", last.stderr());
            !sqlite_refuses_writes(&source_path)
        },
    );
    let before = writer.count_on(0);
    wait_until(
        "writes on the source again",
        Duration::from_secs(30),
        || writer.count_on(0) >= before + 20,
    );
    assert!(sqlite_refuses_writes(&target_path));
    let acked = writer.finish();
    wait_until("every write on the target", Duration::from_secs(60), || {
        sqlite_tags(&target_path).len() >= acked.len()
    });
    assert_each_once(&sqlite_tags(&target_path), &acked, "target");
    assert_each_once(&sqlite_tags(&source_path), &acked, "source");
    // The audit trigger fired once per write, on the side that took it (never on applied
    // changes), and lives on the source again.
    let audit = |path: &std::path::Path| -> Vec<String> {
        let conn = rusqlite::Connection::open(path).expect("open");
        let mut stmt = conn
            .prepare("SELECT tag FROM ledger_audit WHERE tag LIKE 'w%'")
            .expect("audit");
        stmt.query_map([], |r| r.get(0))
            .expect("audit")
            .collect::<Result<_, _>>()
            .expect("audit")
    };
    wait_until("audit rows on the target", Duration::from_secs(30), || {
        audit(&target_path).len() >= acked.len()
    });
    assert_each_once(&audit(&target_path), &acked, "target's audit");
    assert_each_once(&audit(&source_path), &acked, "source's audit");
    let triggers = |path: &std::path::Path| -> i64 {
        rusqlite::Connection::open(path)
            .expect("open")
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE type = 'trigger' AND name = 'ledger_audit_ins'",
                [],
                |r| r.get(0),
            )
            .expect("triggers")
    };
    assert_eq!((triggers(&source_path), triggers(&target_path)), (1, 0));
    sigterm(last);
    let mut verify = kuaka();
    verify.args(["verify", "--source", &source, "--target", &target]);
    let out = run(verify);
    assert_eq!(out.status.code(), Some(0), "{}\n{}", out.stdout, out.stderr);
}
