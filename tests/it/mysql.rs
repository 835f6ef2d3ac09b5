//! MariaDB sources to PostgreSQL: snapshot, binlog streaming, crashes, cascades, types.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use crate::support::mariadb::{MariaDbServer, mariadb};
use crate::support::postgres::query_rows;
use crate::support::{Background, dataset_dir, kuaka, pg, run, wait_until};

fn gunzip_text(path: &Path) -> String {
    let out = Command::new("gzip")
        .arg("-dc")
        .arg(path)
        .output()
        .expect("gzip");
    assert!(out.status.success(), "gzip -dc {}", path.display());
    String::from_utf8(out.stdout).expect("utf-8 dump")
}

/// sakila (schema, data, triggers) loaded into `db` on the test MariaDB.
fn load_sakila(server: &MariaDbServer, db: &str) -> String {
    let url = server.create_db(db);
    let dir = dataset_dir("sakila", "sakila-mv-schema.sql");
    let schema = std::fs::read_to_string(dir.join("sakila-mv-schema.sql"))
        .expect("sakila schema")
        .replace("DROP SCHEMA IF EXISTS sakila;", "")
        .replace("CREATE SCHEMA sakila;", "")
        .replace("USE sakila;", "")
        .replace("sakila.", "");
    server.exec_script(db, &schema);
    let data = gunzip_text(&dir.join("sakila-mv-data.sql.gz")).replace("USE sakila;", "");
    server.exec_script(db, &data);
    url
}

fn stream_command(source: &str, target: &str, state: &Path, extra: &[&str]) -> Command {
    let mut c = kuaka();
    c.args(["run", "--source", source, "--target", target, "--state"])
        .arg(state)
        .args(extra);
    c
}

const CAUGHT_UP: &[&str] = &["--until", "caught-up"];

/// `kuaka run ... --until caught-up`, to the end.
fn catch_up(source: &str, target: &str, state: &Path) -> crate::support::RunOutput {
    run(stream_command(source, target, state, CAUGHT_UP))
}

/// `kuaka status --json` of a state directory.
fn status_json(state: &Path) -> serde_json::Value {
    let output = run({
        let mut c = kuaka();
        c.args(["status", "--json", "--state"]).arg(state);
        c
    });
    serde_json::from_str(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "kuaka status --json did not print JSON ({e}):\n{}",
            output.stdout
        )
    })
}

fn wait_streaming(background: &mut Background, state: &Path) {
    wait_until("kuaka to stream", Duration::from_secs(120), || {
        assert!(
            background.is_running(),
            "kuaka exited early:\n{}",
            background.stderr()
        );
        crate::support::job_phase(state) == "streaming"
    });
}

/// Per table, `key → md5 of the row's canonical text`, each side computed by its own SQL.
/// Canonical text: integers and decimals as digits, booleans as 0/1, times as
/// `YYYY-MM-DD HH:MM:SS.ffffff` in UTC, bytes as upper-case hex, the rest as text.
fn assert_same_rows(server: &MariaDbServer, db: &str, pg_url: &str) {
    let tables = server.rows(
        db,
        &format!(
            "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = '{db}' AND TABLE_TYPE = 'BASE TABLE' ORDER BY 1"
        ),
    );
    let mut checked = 0;
    for t in tables.iter().map(|r| r[0].clone()) {
        let columns = server.rows(
            db,
            &format!(
                "SELECT COLUMN_NAME, DATA_TYPE, COLUMN_TYPE FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = '{db}' AND TABLE_NAME = '{t}' AND EXTRA NOT LIKE '%GENERATED%' ORDER BY ORDINAL_POSITION"
            ),
        );
        let key: Vec<String> = server
            .rows(
                db,
                &format!(
                    "SELECT COLUMN_NAME FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = '{db}' AND TABLE_NAME = '{t}' AND INDEX_NAME = 'PRIMARY' ORDER BY SEQ_IN_INDEX"
                ),
            )
            .into_iter()
            .map(|r| r[0].clone())
            .collect();
        let pg_types: std::collections::HashMap<String, String> = query_rows(
            pg_url,
            &format!(
                "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = 'public' AND table_name = '{t}'"
            ),
        )
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect();
        let my_exprs: Vec<String> = columns
            .iter()
            .map(|c| {
                let (name, dt, ct) = (&c[0], c[1].as_str(), c[2].as_str());
                let e = match dt {
                    "tinyint" if ct.starts_with("tinyint(1)") => format!("CAST(`{name}` AS SIGNED)"),
                    // Zero dates become NULL on PostgreSQL (kuaka's documented policy).
                    "timestamp" | "datetime" => format!(
                        "NULLIF(DATE_FORMAT(`{name}`, '%Y-%m-%d %H:%i:%s.%f'), '0000-00-00 00:00:00.000000')"
                    ),
                    "date" => format!("NULLIF(DATE_FORMAT(`{name}`, '%Y-%m-%d'), '0000-00-00')"),
                    "year" => format!("CAST(`{name}` + 0 AS CHAR)"),
                    "time" => format!("CAST(ROUND(TIME_TO_SEC(`{name}`) * 1000000) AS CHAR)"),
                    "bit" => {
                        let n: String = ct.chars().filter(char::is_ascii_digit).collect();
                        format!("LPAD(BIN(`{name}`), {n}, '0')")
                    }
                    "blob" | "tinyblob" | "mediumblob" | "longblob" | "binary" | "varbinary"
                    | "geometry" | "point" | "polygon" | "linestring" => format!("HEX(`{name}`)"),
                    _ => format!("CAST(`{name}` AS CHAR)"),
                };
                format!("IFNULL({e}, '~')")
            })
            .collect();
        let pg_exprs: Vec<String> = columns
            .iter()
            .map(|c| {
                let name = &c[0];
                let e = match pg_types.get(name).map(String::as_str) {
                    Some("boolean") => format!("\"{name}\"::int::text"),
                    Some("timestamp with time zone") => {
                        format!(
                            "to_char(\"{name}\" AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')"
                        )
                    }
                    Some("timestamp without time zone") => {
                        format!("to_char(\"{name}\", 'YYYY-MM-DD HH24:MI:SS.US')")
                    }
                    Some("date") => format!("to_char(\"{name}\", 'YYYY-MM-DD')"),
                    Some("interval") => {
                        format!("round(extract(epoch from \"{name}\") * 1000000)::text")
                    }
                    Some("bytea") => format!("upper(encode(\"{name}\", 'hex'))"),
                    Some(_) => format!("\"{name}\"::text"),
                    None => panic!("column {t}.{name} is missing on the target"),
                };
                format!("coalesce({e}, '~')")
            })
            .collect();
        let my_key = key
            .iter()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ");
        let pg_key = key
            .iter()
            .map(|k| format!("\"{k}\"::text"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut source: Vec<String> = server
            .rows(
                db,
                &format!(
                    "SELECT CONCAT_WS(',', {my_key}), MD5(CONCAT_WS('|', {})) FROM `{t}`",
                    my_exprs.join(", ")
                ),
            )
            .into_iter()
            .map(|r| r.join(" "))
            .collect();
        let mut target: Vec<String> = query_rows(
            pg_url,
            &format!(
                "SELECT concat_ws(',', {pg_key}), md5(concat_ws('|', {})) FROM public.\"{t}\"",
                pg_exprs.join(", ")
            ),
        )
        .into_iter()
        .map(|r| r.join(" "))
        .collect();
        source.sort();
        target.sort();
        if source != target {
            let only_source: Vec<_> = source
                .iter()
                .filter(|r| !target.contains(r))
                .take(5)
                .collect();
            let only_target: Vec<_> = target
                .iter()
                .filter(|r| !source.contains(r))
                .take(5)
                .collect();
            // Show the canonical values of a few differing keys on both sides.
            let keys: Vec<String> = only_source
                .iter()
                .chain(&only_target)
                .filter_map(|r| r.split(' ').next().map(str::to_owned))
                .collect();
            let list = keys
                .iter()
                .map(|k| format!("'{k}'"))
                .collect::<Vec<_>>()
                .join(", ");
            let source_values = server.rows(
                db,
                &format!("SELECT CONCAT_WS('|', {}) FROM `{t}` WHERE CONCAT_WS(',', {my_key}) IN ({list})", my_exprs.join(", ")),
            );
            let target_values = query_rows(
                pg_url,
                &format!(
                    "SELECT concat_ws('|', {}) FROM public.\"{t}\" WHERE concat_ws(',', {pg_key}) IN ({list})",
                    pg_exprs.join(", ")
                ),
            );
            panic!(
                "table {t} differs: {} rows on the source, {} on the target; only on the source: {only_source:?}; only on the target: {only_target:?}\nsource: {source_values:?}\ntarget: {target_values:?}",
                source.len(),
                target.len()
            );
        }
        checked += source.len();
    }
    eprintln!("same rows: {} tables, {checked} rows", tables.len());
}

/// Keeps changing sakila: payments in and out, customer updates, new films (their trigger
/// fills film_text), actor key updates (InnoDB cascades them to film_actor, not in the
/// binlog), rental deletes (payment.rental_id is SET NULL by InnoDB), binlog rotations.
fn sakila_writer(
    server: &'static MariaDbServer,
    db: String,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut n: u64 = 0;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let mut sql = format!(
                "START TRANSACTION;
                 INSERT INTO payment (customer_id, staff_id, rental_id, amount, payment_date) VALUES ({c}, 1, NULL, {a}.{b:02}, NOW());
                 UPDATE customer SET email = CONCAT('w{n}·é@example.org'), active = 1 - active WHERE customer_id = {c};
                 DELETE FROM payment WHERE payment_id = {p};
                 INSERT INTO film (title, language_id, rating, special_features, release_year) VALUES ('NEW {n}', 1, 'PG-13', 'Trailers,Commentaries', 2006);
                 UPDATE film SET title = CONCAT(title, '!'), rating = 'R' WHERE film_id = {f};
                 COMMIT;",
                c = 1 + n % 599,
                a = n % 10,
                b = n % 100,
                p = 1 + (n * 37) % 16000,
                f = 1 + n % 1000,
            );
            if n.is_multiple_of(5) {
                // A primary-key change that InnoDB cascades to film_actor.
                sql.push_str(&format!(
                    "UPDATE actor SET actor_id = actor_id + 1000 WHERE actor_id = {};",
                    n / 5 % 200 + 1
                ));
                // ON DELETE SET NULL on payment.rental_id.
                sql.push_str(&format!(
                    "DELETE FROM rental WHERE rental_id = {};",
                    1 + (n * 53) % 16000
                ));
                sql.push_str(&format!("DELETE FROM film WHERE title = 'NEW {}';", n - 3));
            }
            if n.is_multiple_of(40) {
                sql.push_str("FLUSH BINARY LOGS;");
            }
            server.exec_script(&db, &sql);
            done.store(n, Ordering::Relaxed);
            thread::sleep(Duration::from_millis(5));
        }
    })
}

/// Where a test's copy goes, and how the test reads it.
enum Dest {
    Postgres(String),
    Mariadb(String),
}

impl Dest {
    fn new(on_mariadb: bool, name: &str) -> Dest {
        if on_mariadb {
            mariadb().create_db(name);
            Dest::Mariadb(name.to_owned())
        } else {
            Dest::Postgres(pg().create_db(name))
        }
    }

    fn url(&self) -> String {
        match self {
            Dest::Postgres(url) => url.clone(),
            Dest::Mariadb(db) => mariadb().url(db),
        }
    }

    /// The one value of a query (the same SQL reads on both engines here).
    fn value(&self, sql: &str) -> String {
        match self {
            Dest::Postgres(url) => query_rows(url, sql)[0][0].clone(),
            Dest::Mariadb(db) => mariadb().rows(db, sql)[0][0].clone(),
        }
    }

    fn assert_same_rows(&self, server: &MariaDbServer, source_db: &str) {
        match self {
            Dest::Postgres(url) => assert_same_rows(server, source_db, url),
            Dest::Mariadb(db) => assert_same_rows_mariadb(server, source_db, db),
        }
    }
}

/// Every table of `source_db` has the same rows in `target_db` (both on `server`): per row,
/// the key and an MD5 of all values as text (binary types as hex).
fn assert_same_rows_mariadb(server: &MariaDbServer, source_db: &str, target_db: &str) {
    let tables = server.rows(
        source_db,
        &format!(
            "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = '{source_db}' AND TABLE_TYPE = 'BASE TABLE' ORDER BY 1"
        ),
    );
    let mut checked = 0;
    for t in tables.iter().map(|r| r[0].clone()) {
        let columns = server.rows(
            source_db,
            &format!(
                "SELECT COLUMN_NAME, DATA_TYPE FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = '{source_db}' AND TABLE_NAME = '{t}' AND EXTRA NOT LIKE '%GENERATED%' ORDER BY ORDINAL_POSITION"
            ),
        );
        let exprs: Vec<String> = columns
            .iter()
            .map(|c| match c[1].as_str() {
                "blob" | "tinyblob" | "mediumblob" | "longblob" | "binary" | "varbinary"
                | "bit" | "geometry" | "point" | "polygon" | "linestring" => {
                    format!("IFNULL(HEX(`{}`), '~')", c[0])
                }
                _ => format!("IFNULL(CAST(`{}` AS CHAR), '~')", c[0]),
            })
            .collect();
        let sql = format!(
            "SELECT MD5(CONCAT_WS('|', {})) AS h FROM `{t}` ORDER BY h",
            exprs.join(", ")
        );
        let source = server.rows(source_db, &sql);
        let target = server.rows(target_db, &sql);
        if source != target {
            let only_source = source.iter().filter(|r| !target.contains(r)).count();
            let only_target = target.iter().filter(|r| !source.contains(r)).count();
            panic!(
                "table {t} differs: {} rows on the source, {} on the target; {only_source} only on the source, {only_target} only on the target",
                source.len(),
                target.len()
            );
        }
        checked += source.len();
    }
    eprintln!("same rows: {} tables, {checked} rows", tables.len());
    // The same indexes and foreign keys (created after the data on the target).
    for (what, sql) in [
        (
            "index columns",
            "SELECT TABLE_NAME, INDEX_NAME, COLUMN_NAME, NON_UNIQUE FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = '{db}' ORDER BY 1, 2, 3",
        ),
        (
            "foreign keys",
            "SELECT TABLE_NAME, CONSTRAINT_NAME, UPDATE_RULE, DELETE_RULE FROM information_schema.REFERENTIAL_CONSTRAINTS WHERE CONSTRAINT_SCHEMA = '{db}' ORDER BY 1, 2",
        ),
    ] {
        let source = server.rows(source_db, &sql.replace("{db}", source_db));
        let target = server.rows(target_db, &sql.replace("{db}", target_db));
        assert_eq!(source, target, "{what} differ");
    }
}

#[test]
fn mariadb_sakila_to_postgres_with_live_writes_and_kills() {
    sakila_with_live_writes_and_kills(false);
}

#[test]
fn mariadb_sakila_to_mariadb_with_live_writes_and_kills() {
    sakila_with_live_writes_and_kills(true);
}

fn sakila_with_live_writes_and_kills(to_mariadb: bool) {
    let server = mariadb();
    let source_db = if to_mariadb {
        "my_sakila_src2"
    } else {
        "my_sakila_src"
    };
    let source = load_sakila(server, source_db);
    let dest = Dest::new(
        to_mariadb,
        if to_mariadb {
            "my_sakila_dst2"
        } else {
            "my_sakila_dst"
        },
    );
    let target = dest.url();
    let state = tempfile::tempdir().expect("state dir");

    // A crash in the middle of the snapshot, then a resumed one.
    // Small chunks: payment and rental (16k rows each) load in key ranges.
    let mut first = stream_command(
        &source,
        &target,
        state.path(),
        &["--jobs", "2", "--chunk-rows", "2000"],
    );
    first.env("KUAKA_FAILPOINT", "snapshot.chunk.after_commit:14");
    run(first).assert_killed_by_sigkill();

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writer = sakila_writer(server, source_db.into(), stop.clone(), done.clone());

    let mut background = Background::spawn(stream_command(
        &source,
        &target,
        state.path(),
        &["--jobs", "2", "--chunk-rows", "2000"],
    ));
    wait_streaming(&mut background, state.path());
    let seen = done.load(Ordering::Relaxed);
    wait_until("more writes", Duration::from_secs(60), || {
        done.load(Ordering::Relaxed) > seen + 60
    });
    background.kill().assert_killed_by_sigkill();

    // Killed again in the middle of an apply transaction.
    let mut second = stream_command(&source, &target, state.path(), &[]);
    second.env("KUAKA_FAILPOINT", "apply.before_commit:5");
    run(second).assert_killed_by_sigkill();

    let seen = done.load(Ordering::Relaxed);
    wait_until("more writes", Duration::from_secs(60), || {
        done.load(Ordering::Relaxed) > seen + 60
    });
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");

    let output = catch_up(&source, &target, state.path());
    output.assert_success();
    dest.assert_same_rows(server, source_db);

    // The cascades really happened on both sides (the test would be vacuous otherwise).
    let moved = dest.value("SELECT count(*) FROM film_actor WHERE actor_id > 1000");
    assert_ne!(
        moved, "0",
        "no cascaded actor key update reached the target"
    );
    let film_text = dest.value("SELECT count(*) FROM film_text WHERE title LIKE 'NEW %'");
    assert_ne!(film_text, "0", "trigger-maintained rows did not arrive");
    if let Dest::Mariadb(target_db) = &dest {
        // Views and routines came after the data; the triggers wait for the cutover (they
        // would fire on applied rows: film_text rows twice).
        assert_objects(server, source_db, target_db, false);
    }
}

const COUNT_TRIGGERS: &str =
    "SELECT COUNT(*) FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = DATABASE()";

/// The views and routines of sakila on a MariaDB target as on the source, a view reading
/// the copied rows; the triggers there too or not at all.
fn assert_objects(server: &MariaDbServer, source_db: &str, target_db: &str, triggers: bool) {
    let value = |db: &str, sql: &str| server.rows(db, sql)[0][0].clone();
    for (what, sql) in [
        (
            "views",
            "SELECT COUNT(*) FROM information_schema.VIEWS WHERE TABLE_SCHEMA = DATABASE()",
        ),
        (
            "routines",
            "SELECT COUNT(*) FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = DATABASE()",
        ),
    ] {
        let n = value(source_db, sql);
        assert_ne!(n, "0", "sakila has {what}");
        assert_eq!(value(target_db, sql), n, "{what} on the target");
    }
    let info = "SELECT COUNT(*), SUM(LENGTH(film_info)) FROM actor_info";
    assert_eq!(
        server.rows(target_db, info),
        server.rows(source_db, info),
        "view actor_info (it calls no routine but reads four tables)"
    );
    let expected = if triggers {
        value(source_db, COUNT_TRIGGERS)
    } else {
        "0".into()
    };
    assert_eq!(
        value(target_db, COUNT_TRIGGERS),
        expected,
        "triggers on the target"
    );
}

/// `--snapshot-only` MariaDB → MariaDB: nothing is applied afterwards, so the copy gets the
/// triggers too, and they work there.
#[test]
fn mariadb_sakila_snapshot_only_brings_triggers_views_and_routines() {
    let server = mariadb();
    let source = load_sakila(server, "my_sakila_src3");
    let target = server.create_db("my_sakila_dst3");
    let state = tempfile::tempdir().expect("state dir");
    run(stream_command(
        &source,
        &target,
        state.path(),
        &["--snapshot-only"],
    ))
    .assert_success();
    assert_objects(server, "my_sakila_src3", "my_sakila_dst3", true);
    // The film trigger maintains film_text on the copy.
    server.exec(
        "INSERT INTO my_sakila_dst3.film (title, language_id) VALUES ('TRIGGERED ON THE COPY', 1)",
    );
    assert_eq!(
        server.rows(
            "my_sakila_dst3",
            "SELECT COUNT(*) FROM film_text WHERE title = 'TRIGGERED ON THE COPY'"
        )[0][0],
        "1"
    );
}

/// Every MariaDB type (and a latin1 table), for the type-matrix tests.
const MATRIX_SCHEMA: &str = "CREATE TABLE t (
           id int PRIMARY KEY,
           b tinyint(1), ti tinyint, tu tinyint unsigned, si smallint, su smallint unsigned,
           mi mediumint, mu mediumint unsigned, i int, iu int unsigned, bi bigint, bu bigint unsigned,
           d decimal(65,30), d2 decimal(10,2), f float, db double, bt bit(10),
           dt date, dtm datetime(6), ts timestamp(3) NULL, tm time(6), y year,
           c char(5), vc varchar(20), tx text, lt longtext, bn binary(4), vb varbinary(10), bl blob,
           e enum('small','medium','large'), st set('a','b','c'), j json, g geometry,
           zd date, vcol int AS (i * 2) VIRTUAL
         ) CHARACTER SET utf8mb4;
         CREATE TABLE latin (id int PRIMARY KEY, v varchar(20)) CHARACTER SET latin1;";

/// Three rows of the matrix from `id`: every type's extremes, zeros and empties, NULLs.
fn matrix_values(id: i32) -> String {
    format!(
            "({id}, 1, -128, 255, -32768, 65535, -8388608, 16777215, -2147483648, 4294967295,
              -9223372036854775808, 18446744073709551615,
              12345678901234567890123456789012345.123456789012345678901234567890, 1.10, 1.1, 2.000000000000001, b'1000000001',
              '2024-02-29', '2024-02-29 23:59:59.123456', '2038-01-19 03:14:07.999', '-838:59:59.000001', 2155,
              'ab', 'héllo 🎵', 'tab\\there\\nnewline', repeat('x', 70000), x'01', x'00ff', x'DEADBEEF',
              'medium', 'a,c', '{{\"k\": [1, 2.5, \"é\"], \"n\": null}}', ST_GeomFromText('POINT(1 2)'),
              '0000-00-00', DEFAULT),
             ({id2}, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, b'0',
              '1000-01-01', '1000-01-01 00:00:00', NULL, '00:00:00', 0,
              '', '', '', '', x'', x'', x'',
              '', '', '[]', NULL, NULL, DEFAULT),
             ({id3}, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
              NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, DEFAULT)",
            id2 = id + 1,
            id3 = id + 2
        )
}

/// Tables whose columns are all integers, booleans, character data, dates and datetimes are
/// copied to PostgreSQL in binary COPY: edge values of each (widths and signs, leap days,
/// the first and last dates, microseconds, zero dates under the NULL policy, UTF-8, tabs and
/// backslashes, empty strings, NULLs) arrive as they are.
#[test]
fn mariadb_plain_types_copy_to_postgres_in_binary() {
    let server = mariadb();
    let db = "my_plain_src";
    let source = server.create_db(db);
    server.exec_script(
        db,
        "CREATE TABLE plain (id int PRIMARY KEY, t tinyint, tu tinyint unsigned, s smallint,
           su smallint unsigned, m mediumint, mu mediumint unsigned, i int, iu int unsigned,
           b bigint, y year, f tinyint(1), c char(5), v varchar(10) CHARACTER SET latin1,
           tx text, e enum('red','green'), st set('a','b','c'), d date, dt datetime(6),
           d0 datetime) DEFAULT CHARSET utf8mb4;",
    );
    server.exec_script(
        db,
        &format!(
        "SET sql_mode = ''; INSERT INTO {db}.plain VALUES
         (1, -128, 255, -32768, 65535, -8388608, 16777215, -2147483648, 4294967295,
          -9223372036854775808, 2155, 1, 'ab', 'café', 'héllo 🎵\ttab\\back\nline', 'green', 'a,c',
          '2024-02-29', '2024-02-29 23:59:59.000001', '9999-12-31 23:59:59'),
         (2, 127, 0, 32767, 0, 8388607, 0, 2147483647, 0, 9223372036854775807, 1901, 0, '', '',
          '', 'red', '', '0001-01-01', '1000-01-01 00:00:00', '1970-01-01 00:00:00'),
         (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
          NULL, NULL, '0000-00-00', '0000-00-00 00:00:00', '0000-00-00 00:00:00'),
         (4, 0, 1, 0, 1, 0, 1, 0, 1, 0, 0, 1, 'xyz  ', 'ÿ', 'x', 'green', 'b', '1999-12-31',
          '1999-12-31 23:59:59.999999', '2000-01-01 00:00:00');
         INSERT INTO {db}.plain (id, i, tx) SELECT seq, seq, CONCAT('row ', seq) FROM seq_10_to_5000;"
        ),
    );
    let target = pg().create_db("my_plain_dst");
    let state = tempfile::tempdir().expect("state dir");
    run(stream_command(
        &source,
        &target,
        state.path(),
        &["--snapshot-only", "--chunk-rows", "1000"],
    ))
    .assert_success();
    assert_same_rows(server, db, &target);
    assert_eq!(
        query_rows(&target, "SELECT d, dt, d0 FROM plain WHERE id = 3")[0],
        vec!["", "", ""],
        "zero dates become NULL"
    );
}

#[test]
fn mariadb_type_matrix_before_and_after_the_snapshot() {
    type_matrix(false);
}

#[test]
fn mariadb_type_matrix_to_mariadb() {
    type_matrix(true);
}

/// Every MariaDB type, inserted before the snapshot and again after it (so both the
/// text-protocol copy and the binlog decoder see it), then updated and deleted.
fn type_matrix(to_mariadb: bool) {
    let server = mariadb();
    let db = if to_mariadb {
        "my_types_src2"
    } else {
        "my_types_src"
    };
    let source = server.create_db(db);
    let dest = Dest::new(
        to_mariadb,
        if to_mariadb {
            "my_types_dst2"
        } else {
            "my_types_dst"
        },
    );
    let target = dest.url();
    server.exec_script(db, MATRIX_SCHEMA);
    let values = matrix_values;
    server.exec(&format!(
        "SET sql_mode = ''; SET time_zone = '+00:00'; INSERT INTO {db}.t VALUES {}; INSERT INTO {db}.latin VALUES (1, 'café'), (2, 'naïve');",
        values(1)
    ));
    let state = tempfile::tempdir().expect("state dir");
    let mut background = Background::spawn(stream_command(&source, &target, state.path(), &[]));
    wait_streaming(&mut background, state.path());
    // The same values again, now through the binlog; then updates and deletes.
    server.exec(&format!(
        "SET sql_mode = ''; SET time_zone = '+00:00'; INSERT INTO {db}.t VALUES {};
         INSERT INTO {db}.latin VALUES (3, 'café'), (4, 'naïve');
         UPDATE {db}.t SET vc = 'changed' WHERE id = 2; UPDATE {db}.t SET vc = 'changed' WHERE id = 102;
         DELETE FROM {db}.t WHERE id IN (3, 103);",
        values(101)
    ));
    background.kill();
    catch_up(&source, &target, state.path()).assert_success();
    // No false difference across the whole matrix (zero dates are NULL on both sides by
    // kuaka's policy; JSON, bits, times and decimals compared by meaning).
    crate::verify::assert_verified(state.path());

    if let Dest::Mariadb(target_db) = &dest {
        // Zero dates, bit strings, binary padding, JSON text: all as the source has them.
        assert_same_rows_mariadb(server, db, target_db);
        let zero = server.rows(
            target_db,
            "SELECT CAST(zd AS CHAR) FROM t WHERE id IN (1, 101)",
        );
        assert_eq!(
            zero,
            vec![vec!["0000-00-00".to_owned()], vec!["0000-00-00".to_owned()]]
        );
        return;
    }
    // Snapshot (text protocol) and binlog decoding give the same values.
    let columns = "b, ti, tu, si, su, mi, mu, i, iu, bi, bu, d, d2, f, db, bt, dt, dtm, ts, tm, y, c::text, vc, tx, md5(lt), bn, vb, bl, e, st, j, g, zd";
    let snapshot = query_rows(
        &target,
        &format!("SELECT {columns} FROM t WHERE id < 100 ORDER BY id"),
    );
    let streamed = query_rows(
        &target,
        &format!("SELECT {columns} FROM t WHERE id > 100 ORDER BY id"),
    );
    assert_eq!(snapshot.len(), 2);
    assert_eq!(snapshot, streamed);
    let row = &snapshot[0];
    let expected = [
        "t",
        "-128",
        "255",
        "-32768",
        "65535",
        "-8388608",
        "16777215",
        "-2147483648",
        "4294967295",
        "-9223372036854775808",
        "18446744073709551615",
        "12345678901234567890123456789012345.123456789012345678901234567890",
        "1.10",
        "1.1",
        "2.000000000000001",
        "1000000001",
        "2024-02-29",
        "2024-02-29 23:59:59.123456",
    ];
    assert_eq!(&row[..expected.len()], &expected[..]);
    assert!(
        row[18].starts_with("2038-01-19 03:14:07.999"),
        "{}",
        row[18]
    );
    assert_eq!(row[19], "-838:59:59.000001");
    assert_eq!(
        &row[20..24],
        &["2155", "ab", "héllo 🎵", "tab\there\nnewline"]
    );
    assert_eq!(
        &row[25..30],
        &["\\x01000000", "\\x00ff", "\\xdeadbeef", "medium", "a,c"]
    );
    assert_eq!(row[30], r#"{"k": [1, 2.5, "é"], "n": null}"#);
    assert_eq!(
        row[31],
        "\\x000000000101000000000000000000f03f0000000000000040"
    );
    assert_eq!(row[32], "", "a zero date becomes NULL");
    assert_eq!(&snapshot[1][..3], &["f", "0", "0"]);
    let latin = query_rows(&target, "SELECT id, v FROM latin ORDER BY id");
    assert_eq!(
        latin,
        vec![
            vec!["1".to_owned(), "café".to_owned()],
            vec!["2".to_owned(), "naïve".to_owned()],
            vec!["3".to_owned(), "café".to_owned()],
            vec!["4".to_owned(), "naïve".to_owned()],
        ]
    );
    assert_same_rows(server, db, &target);
}

#[test]
fn mariadb_source_restart_mid_stream() {
    // A server of this test's own: restarting the shared one would disturb other tests.
    let server: &'static MariaDbServer = Box::leak(Box::new(MariaDbServer::start_private()));
    let db = "my_restart_src";
    let source = server.create_db(db);
    let target = pg().create_db("my_restart_dst");
    server.exec_script(
        db,
        "CREATE TABLE parent (id int PRIMARY KEY, name varchar(40)) ENGINE=InnoDB;
         CREATE TABLE child (id int PRIMARY KEY, parent_id int, amount decimal(12,2),
           FOREIGN KEY (parent_id) REFERENCES parent (id) ON DELETE CASCADE ON UPDATE CASCADE) ENGINE=InnoDB;
         INSERT INTO parent SELECT seq, CONCAT('p', seq) FROM seq_1_to_500;
         INSERT INTO child SELECT seq, 1 + seq % 500, seq / 7 FROM seq_1_to_5000;",
    );
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, done) = (stop.clone(), done.clone());
        thread::spawn(move || {
            let mut n: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let sql = format!(
                    "START TRANSACTION;
                     INSERT INTO child VALUES ({id}, {p}, {n}.25);
                     UPDATE child SET amount = amount + 1 WHERE id = {u};
                     DELETE FROM parent WHERE id = {d};
                     UPDATE parent SET id = id + 100000 WHERE id = {k};
                     COMMIT;",
                    id = 100_000 + n,
                    p = 400 + n % 100,
                    u = 1 + n % 5000,
                    d = 1 + n % 300,
                    k = 301 + n % 99,
                );
                // The server is down for a moment: writes then fail. A failed one is not
                // retried with the same key: its COMMIT may have landed before the
                // connection dropped, and the retry would then fail forever.
                let ok = server
                    .socket_client()
                    .arg(db)
                    .args(["-e", &sql])
                    .output()
                    .is_ok_and(|o| o.status.success());
                if ok {
                    done.fetch_add(1, Ordering::Relaxed);
                } else {
                    thread::sleep(Duration::from_millis(100));
                }
            }
        })
    };
    let state = tempfile::tempdir().expect("state dir");
    let mut background = Background::spawn(stream_command(&source, &target, state.path(), &[]));
    wait_streaming(&mut background, state.path());
    let seen = done.load(Ordering::Relaxed);
    wait_until("writes", Duration::from_secs(60), || {
        done.load(Ordering::Relaxed) > seen + 30
    });
    server.restart();
    let seen = done.load(Ordering::Relaxed);
    wait_until("writes after the restart", Duration::from_secs(60), || {
        done.load(Ordering::Relaxed) > seen + 30
    });
    assert!(
        background.is_running(),
        "kuaka did not survive the source restart:\n{}",
        background.stderr()
    );
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    let output = background.kill();
    assert!(
        output.stderr.contains("reconnecting"),
        "kuaka never saw the restart:\n{}",
        output.stderr
    );
    catch_up(&source, &target, state.path()).assert_success();
    assert_same_rows(server, db, &target);
    let cascaded = query_rows(
        &target,
        "SELECT count(*) FROM child WHERE parent_id > 100000",
    );
    assert_ne!(
        cascaded[0][0], "0",
        "no cascaded key update reached the target"
    );
}

/// `kuaka status --json`'s position `name` as `(file, offset)` of `binlog:file:offset`.
fn binlog_position(state: &Path, name: &str) -> Option<(String, u64)> {
    let status = status_json(state);
    let value = status["positions"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)?["value"]
        .as_str()?
        .to_owned();
    let (file, offset) = value.strip_prefix("binlog:")?.rsplit_once(':')?;
    Some((file.to_owned(), offset.parse().ok()?))
}

/// The binlog is spooled to the state directory from P0 on while the tables are copied: the
/// source purging every binlog file the job still needs, in the middle of the snapshot,
/// loses nothing (streaming from the server after the copy would find P0's file gone).
#[test]
fn mariadb_binlog_purged_during_the_snapshot_is_in_the_spool() {
    // A server of this test's own: purging the shared one's binlogs would break other jobs.
    let server: &'static MariaDbServer = Box::leak(Box::new(MariaDbServer::start_private()));
    let db = "my_purge_src";
    let source = server.create_db(db);
    let target = pg().create_db("my_purge_dst");
    server.exec_script(
        db,
        "CREATE TABLE t (id int PRIMARY KEY, v varchar(40), n bigint) ENGINE=InnoDB;
         INSERT INTO t SELECT seq, CONCAT('v', seq), seq * 3 FROM seq_1_to_3000;",
    );
    let state = tempfile::tempdir().expect("state dir");
    let pause = tempfile::tempdir().expect("pause dir");
    let release = pause.path().join("go");
    let mut command = stream_command(
        &source,
        &target,
        state.path(),
        &["--until", "caught-up", "--chunk-rows", "500"],
    );
    command.env(
        "KUAKA_PAUSE",
        format!("snapshot.planned={}", release.display()),
    );
    let mut background = Background::spawn(command);
    let reached = pause.path().join("go.reached");
    wait_until(
        "the copy to pause after planning",
        Duration::from_secs(60),
        || {
            assert!(
                background.is_running(),
                "kuaka exited early:\n{}",
                background.stderr()
            );
            reached.exists()
        },
    );
    let first_file = server.rows(db, "SHOW BINARY LOGS")[0][0].clone();
    // Another database's rows (about 4 MB) are not the job's: they stay out of the spool.
    let other = "my_purge_other";
    server.create_db(other);
    server.exec_script(
        other,
        "CREATE TABLE big (id int PRIMARY KEY, v varchar(400)) ENGINE=InnoDB;
         INSERT INTO big SELECT seq, REPEAT('o', 400) FROM seq_1_to_10000;",
    );
    server.exec_script(
        db,
        "INSERT INTO t SELECT seq, 'new', seq FROM seq_5001_to_5200;
         UPDATE t SET v = 'changed', n = n + 1 WHERE id % 7 = 0;
         DELETE FROM t WHERE id % 11 = 0;
         FLUSH BINARY LOGS;
         START TRANSACTION; UPDATE t SET v = 'second file' WHERE id BETWEEN 100 AND 120; COMMIT;
         FLUSH BINARY LOGS;",
    );
    let status = server.rows(db, "SHOW MASTER STATUS");
    let end = (
        status[0][0].clone(),
        status[0][1].parse::<u64>().expect("offset"),
    );
    wait_until(
        "the capture to spool the writes",
        Duration::from_secs(60),
        || binlog_position(state.path(), "spooled").is_some_and(|at| at >= end),
    );
    let spooled: u64 = std::fs::read_dir(state.path().join("changes"))
        .expect("the spool")
        .map(|e| e.expect("entry").metadata().expect("size").len())
        .sum();
    assert!(
        spooled < 1 << 20,
        "the spool holds {spooled} bytes: the other database's rows went into it"
    );
    let status = status_json(state.path());
    assert!(
        status["change_log"]["bytes"]
            .as_u64()
            .is_some_and(|b| b > 0)
            && status["change_log"]["segments"]
                .as_u64()
                .is_some_and(|n| n >= 1),
        "kuaka status does not show the spool: {}",
        status["change_log"]
    );
    server.exec(&format!("PURGE BINARY LOGS TO '{}'", end.0));
    let left = server.rows(db, "SHOW BINARY LOGS");
    assert!(
        left.iter().all(|f| f[0] != first_file),
        "the purge left {first_file}: {left:?}"
    );
    std::fs::write(&release, b"").expect("release the pause");
    background.wait(Duration::from_secs(180)).assert_success();
    assert_same_rows(server, db, &target);
    // Ids 100..=120 but 110 (deleted): the one transaction of the second binlog file.
    assert_eq!(
        query_rows(&target, "SELECT count(*) FROM t WHERE v = 'second file'")[0][0],
        "20"
    );
}

/// SIGKILL when the spool holds, synced to disk, only the first events of a big source
/// transaction: the restart cuts the spool back to the last whole transaction, captures the
/// transaction again from its start, and the target gets it exactly once.
#[test]
fn mariadb_sigkill_with_half_a_transaction_in_the_spool() {
    let server = mariadb();
    let db = "my_spool_kill_src";
    let source = server.create_db(db);
    let target = pg().create_db("my_spool_kill_dst");
    server.exec_script(
        db,
        "CREATE TABLE t (id int PRIMARY KEY, v varchar(200), n bigint) ENGINE=InnoDB;
         INSERT INTO t SELECT seq, CONCAT('v', seq), seq FROM seq_1_to_1000;",
    );
    let state = tempfile::tempdir().expect("state dir");
    let mut command = stream_command(&source, &target, state.path(), &[]);
    command.env("KUAKA_FAILPOINT", "capture.synced_in_transaction");
    let mut background = Background::spawn(command);
    wait_streaming(&mut background, state.path());
    // One transaction of many rows events (about 8 KB each), then a small one after it.
    server.exec_script(
        db,
        "START TRANSACTION;
         INSERT INTO t SELECT seq, REPEAT('x', 150), seq FROM seq_2001_to_12000;
         UPDATE t SET n = n + 1 WHERE id <= 1000;
         DELETE FROM t WHERE id % 9 = 0;
         COMMIT;
         UPDATE t SET v = 'after' WHERE id = 1;",
    );
    background
        .wait(Duration::from_secs(60))
        .assert_killed_by_sigkill();
    let rerun = catch_up(&source, &target, state.path());
    rerun.assert_success();
    assert!(
        rerun.stderr.contains("after the last complete transaction"),
        "the spool held no partial transaction to cut:\n{}",
        rerun.stderr
    );
    assert_same_rows(server, db, &target);
    assert_eq!(
        query_rows(&target, "SELECT count(*), sum(n) FROM t")[0],
        server.rows(db, "SELECT count(*), sum(n) FROM t")[0]
    );
}

/// A failover of the source: kuaka stops, the primary goes away and its replica takes over its
/// address, with the same transactions at other binlog files and offsets. The next run sees
/// another server_id, finds the GTID state it wrote with the target's position in the new
/// server's binlog, and goes on from there: the changes kuaka had not read yet (logged on the
/// old primary, replicated) and those made on the new one all arrive, nothing twice.
#[test]
fn mariadb_source_failover_resumes_by_gtid() {
    let primary = MariaDbServer::start_private();
    let replica = MariaDbServer::start_replica_of(&primary);
    let db = "my_failover_src";
    let source = primary.create_db(db);
    let target = pg().create_db("my_failover_dst");
    primary.exec_script(
        db,
        "CREATE TABLE t (id int PRIMARY KEY, v varchar(40), n bigint) ENGINE=InnoDB;
         INSERT INTO t SELECT seq, CONCAT('v', seq), seq FROM seq_1_to_2000;",
    );
    let state = tempfile::tempdir().expect("state dir");
    let mut background = Background::spawn(stream_command(&source, &target, state.path(), &[]));
    wait_streaming(&mut background, state.path());
    primary.exec_script(
        db,
        "UPDATE t SET n = n + 1 WHERE id <= 100;
         INSERT INTO t SELECT seq, 'live', seq FROM seq_3001_to_3100;",
    );
    wait_until(
        "the live changes on the target",
        Duration::from_secs(60),
        || query_rows(&target, "SELECT count(*) FROM t WHERE v = 'live'")[0][0] == "100",
    );
    crate::support::sigterm(background);
    // Written while kuaka is stopped: only the replica will still have them.
    primary.exec_script(
        db,
        "DELETE FROM t WHERE id % 10 = 0;
         UPDATE t SET v = 'while stopped' WHERE id BETWEEN 500 AND 520;",
    );
    replica.exec("FLUSH BINARY LOGS");
    replica.catch_up_with(&primary);
    let port = primary.port;
    primary.stop();
    replica.exec("STOP SLAVE; RESET SLAVE ALL;");
    let promoted: &'static MariaDbServer = Box::leak(Box::new(replica.move_to_port(port)));
    promoted.exec_script(
        db,
        "INSERT INTO t SELECT seq, 'after the failover', seq FROM seq_5001_to_5050;
         UPDATE t SET n = 0 WHERE id = 1;",
    );
    // Killed half way through moving to the new server: the next run does it again.
    let mut killed = stream_command(&source, &target, state.path(), CAUGHT_UP);
    killed.env("KUAKA_FAILPOINT", "failover.position_moved");
    run(killed).assert_killed_by_sigkill();
    let rerun = catch_up(&source, &target, state.path());
    rerun.assert_success();
    assert!(
        rerun.stderr.contains("resuming by GTID position"),
        "the rerun did not notice the new server:\n{}",
        rerun.stderr
    );
    assert_same_rows(promoted, db, &target);
    assert_eq!(
        query_rows(&target, "SELECT count(*) FROM t WHERE v = 'while stopped'")[0][0],
        "18"
    );
}

/// A failover while kuaka streams: the capture, reconnecting, finds another server behind the
/// source's address and stops the job (its file and offset mean nothing there) instead of
/// reading the new server's binlog at the old coordinates; the next run resumes by GTID.
#[test]
fn mariadb_source_failover_while_streaming_stops_then_resumes() {
    let primary = MariaDbServer::start_private();
    let replica = MariaDbServer::start_replica_of(&primary);
    let db = "my_failover_live_src";
    let source = primary.create_db(db);
    let target = pg().create_db("my_failover_live_dst");
    primary.exec_script(
        db,
        "CREATE TABLE t (id int PRIMARY KEY, v varchar(40)) ENGINE=InnoDB;
         INSERT INTO t SELECT seq, CONCAT('v', seq) FROM seq_1_to_500;",
    );
    let state = tempfile::tempdir().expect("state dir");
    let mut background = Background::spawn(stream_command(&source, &target, state.path(), &[]));
    wait_streaming(&mut background, state.path());
    primary.exec_script(db, "UPDATE t SET v = 'live' WHERE id <= 50;");
    wait_until(
        "the live changes on the target",
        Duration::from_secs(60),
        || query_rows(&target, "SELECT count(*) FROM t WHERE v = 'live'")[0][0] == "50",
    );
    replica.exec("FLUSH BINARY LOGS");
    replica.catch_up_with(&primary);
    let port = primary.port;
    primary.stop();
    replica.exec("STOP SLAVE; RESET SLAVE ALL;");
    let promoted: &'static MariaDbServer = Box::leak(Box::new(replica.move_to_port(port)));
    promoted.exec_script(
        db,
        "DELETE FROM t WHERE id > 450; UPDATE t SET v = 'new primary' WHERE id <= 10;",
    );
    let stopped = background.wait(Duration::from_secs(120));
    stopped.assert_exit_code(2);
    assert!(
        stopped.stderr.contains("the source is another server now"),
        "kuaka did not stop on the new server:\n{}",
        stopped.stderr
    );
    let rerun = catch_up(&source, &target, state.path());
    rerun.assert_success();
    assert_same_rows(promoted, db, &target);
    assert_eq!(query_rows(&target, "SELECT count(*) FROM t")[0][0], "450");
}

/// The employees sample (six tables, composite keys, ON DELETE CASCADE everywhere).
fn load_employees(server: &MariaDbServer, db: &str) -> String {
    let url = server.create_db(db);
    let dir = dataset_dir("employees", "employee.sql");
    let schema = std::fs::read_to_string(dir.join("employee.sql")).expect("employees schema");
    // The DDL only: the loads are `source` commands, fed here one by one.
    let ddl: String = schema
        .lines()
        .take_while(|l| !l.starts_with("flush"))
        .filter(|l| !l.contains("DATABASE") && !l.starts_with("USE "))
        .collect::<Vec<_>>()
        .join("\n");
    server.exec_script(db, &ddl);
    for load in [
        "department",
        "employee",
        "dept_emp",
        "dept_manager",
        "title",
        "salary1",
    ] {
        let plain = dir.join(format!("load_{load}.sql"));
        let text = if plain.exists() {
            std::fs::read_to_string(plain).expect("load file")
        } else {
            gunzip_text(&dir.join(format!("load_{load}.sql.gz")))
        };
        server.exec_script(db, &text);
    }
    url
}

#[test]
fn mariadb_employees_to_postgres_with_cascading_deletes() {
    employees_with_cascading_deletes(false);
}

#[test]
fn mariadb_employees_to_mariadb_with_cascading_deletes() {
    employees_with_cascading_deletes(true);
}

fn employees_with_cascading_deletes(to_mariadb: bool) {
    let server = mariadb();
    let db = if to_mariadb {
        "my_employees_src2"
    } else {
        "my_employees_src"
    };
    let source = load_employees(server, db);
    let dest = Dest::new(
        to_mariadb,
        if to_mariadb {
            "my_employees_dst2"
        } else {
            "my_employees_dst"
        },
    );
    let target = dest.url();
    let state = tempfile::tempdir().expect("state dir");
    let mut background = Background::spawn(stream_command(
        &source,
        &target,
        state.path(),
        &["--chunk-rows", "20000"],
    ));
    wait_streaming(&mut background, state.path());
    // InnoDB deletes each employee's salaries, titles and department rows itself, without
    // writing those deletes to the binlog; a department's too.
    server.exec(&format!(
        "DELETE FROM {db}.employee WHERE emp_no % 97 = 0;
         UPDATE {db}.salary SET amount = amount + 1 WHERE emp_no % 13 = 0;
         DELETE FROM {db}.department WHERE dept_no = 'd009';
         INSERT INTO {db}.department VALUES ('d010', 'Migration');"
    ));
    background.kill();
    catch_up(&source, &target, state.path()).assert_success();
    dest.assert_same_rows(server, db);
    assert_eq!(
        dest.value("SELECT count(*) FROM salary WHERE emp_no % 97 = 0"),
        "0"
    );
}

#[test]
fn mariadb_add_column_is_followed_to_postgres() {
    ddl_add_column(false);
}

#[test]
fn mariadb_add_column_is_followed_to_mariadb() {
    ddl_add_column(true);
}

/// `ALTER TABLE ... ADD COLUMN` while streaming is followed (existing rows get the default on
/// both sides); a later `DROP COLUMN` stops the job with the statement in the message, after
/// everything before it was applied.
fn ddl_add_column(to_mariadb: bool) {
    let server = mariadb();
    let db = if to_mariadb {
        "my_ddl_src2"
    } else {
        "my_ddl_src"
    };
    let source = server.create_db(db);
    let dest = Dest::new(
        to_mariadb,
        if to_mariadb {
            "my_ddl_dst2"
        } else {
            "my_ddl_dst"
        },
    );
    let target = dest.url();
    server.exec_script(
        db,
        "CREATE TABLE item (id int PRIMARY KEY, name varchar(20)) ENGINE=InnoDB;
         INSERT INTO item SELECT seq, CONCAT('i', seq) FROM seq_1_to_100;",
    );
    let state = tempfile::tempdir().expect("state dir");
    let mut background = Background::spawn(stream_command(&source, &target, state.path(), &[]));
    wait_streaming(&mut background, state.path());
    server.exec_script(
        db,
        "INSERT INTO item VALUES (101, 'before');
         ALTER TABLE item ADD COLUMN note varchar(20) DEFAULT 'n/a', ADD COLUMN qty int NOT NULL;
         INSERT INTO item VALUES (102, 'after', 'new', 7);
         UPDATE item SET qty = 3, note = NULL WHERE id = 5;",
    );
    wait_until("the new rows", Duration::from_secs(60), || {
        dest.value("SELECT count(*) FROM item WHERE id = 102") == "1"
    });
    dest.assert_same_rows(server, db);
    // A change that cannot be followed stops the job before it.
    server.exec_script(
        db,
        "INSERT INTO item VALUES (103, 'last', 'x', 1);
         ALTER TABLE item DROP COLUMN note;
         INSERT INTO item VALUES (104, 'never', 2);",
    );
    let output = background.wait(Duration::from_secs(60));
    output.assert_exit_code(2);
    assert!(
        output.stderr.contains("DROP COLUMN note") && output.stderr.contains("item"),
        "{}",
        output.stderr
    );
    assert_eq!(dest.value("SELECT count(*) FROM item WHERE id = 103"), "1");
    assert_eq!(dest.value("SELECT count(*) FROM item WHERE id = 104"), "0");
    // It stays stopped on a rerun (the position is still before the DROP).
    let rerun = catch_up(&source, &target, state.path());
    rerun.assert_exit_code(2);
}

/// MariaDB → SQLite: the type matrix before and after the snapshot (kuaka killed while it
/// streams), then updates and deletes. The snapshot's text-protocol copy and the binlog
/// decoder must give the same stored values (compared with SQLite's quote(), which shows the
/// storage class), the values are as the source has them, and kuaka verify agrees.
#[test]
fn mariadb_type_matrix_to_sqlite() {
    let server = mariadb();
    let db = "my_types_src3";
    let source = server.create_db(db);
    server.exec_script(db, MATRIX_SCHEMA);
    server.exec(&format!(
        "SET sql_mode = ''; SET time_zone = '+00:00'; INSERT INTO {db}.t VALUES {}; INSERT INTO {db}.latin VALUES (1, 'café'), (2, 'naïve');",
        matrix_values(1)
    ));
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("copy.db");
    let target = format!("sqlite://{}", path.display());
    let state = dir.path().join("state");
    let mut background = Background::spawn(stream_command(&source, &target, &state, &[]));
    wait_streaming(&mut background, &state);
    server.exec(&format!(
        "SET sql_mode = ''; SET time_zone = '+00:00'; INSERT INTO {db}.t VALUES {};
         INSERT INTO {db}.latin VALUES (3, 'café'), (4, 'naïve');
         UPDATE {db}.t SET vc = 'changed' WHERE id = 2; UPDATE {db}.t SET vc = 'changed' WHERE id = 102;
         DELETE FROM {db}.t WHERE id IN (3, 103);",
        matrix_values(101)
    ));
    background.kill();
    run(stream_command(
        &source,
        &target,
        &state,
        &["--until", "caught-up"],
    ))
    .assert_success();

    let conn = rusqlite::Connection::open(&path).expect("open copy");
    let columns = "b, ti, tu, si, su, mi, mu, i, iu, bi, bu, d, d2, f, db, bt, dt, dtm, ts, tm, y, c, vc, tx, length(lt), bn, vb, bl, e, st, j, g, zd";
    let read = |condition: &str| -> Vec<Vec<String>> {
        let quoted = columns
            .split(", ")
            .map(|c| format!("quote({c})"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {quoted} FROM t WHERE {condition} ORDER BY id"
            ))
            .expect("select");
        let width = columns.split(", ").count();
        stmt.query_map([], |r| (0..width).map(|i| r.get::<_, String>(i)).collect())
            .expect("rows")
            .collect::<rusqlite::Result<_>>()
            .expect("rows")
    };
    let snapshot = read("id < 100");
    let streamed = read("id > 100");
    assert_eq!(snapshot.len(), 2);
    assert_eq!(
        snapshot, streamed,
        "the copy and the binlog stored different values"
    );
    let row = &snapshot[0];
    for (i, expected) in [
        (0, "1"),
        (1, "-128"),
        (10, "'18446744073709551615'"),
        (
            11,
            "'12345678901234567890123456789012345.123456789012345678901234567890'",
        ),
        (12, "'1.10'"),
        (17, "'2024-02-29 23:59:59.123456'"),
        (21, "'ab'"),
        (22, "'héllo 🎵'"),
        (24, "70000"),
        (27, "X'DEADBEEF'"),
        (28, "'medium'"),
        (29, "'a,c'"),
        (32, "NULL"),
    ] {
        assert_eq!(row[i], expected, "column {i} of {row:?}");
    }
    let latin: i64 = conn
        .query_row(
            "SELECT count(*) FROM latin WHERE v IN ('café', 'naïve')",
            [],
            |r| r.get(0),
        )
        .expect("latin");
    assert_eq!(latin, 4);
    crate::verify::assert_verified(&state);
}

/// `--column-type`: a column gets the type the user names instead of the type map's, in the
/// snapshot and in the stream; a name that does not exist is refused before anything is done.
#[test]
fn mariadb_column_type_overrides_to_postgres() {
    let server = mariadb();
    let db = "my_override_src";
    let source = server.create_db(db);
    server.exec_script(
        db,
        "CREATE TABLE item (id int PRIMARY KEY, active tinyint(1) NOT NULL, size enum('s','m','l'), made datetime(6));
         INSERT INTO item VALUES (1, 1, 's', '2024-01-02 03:04:05.5'), (2, 0, 'l', NULL);",
    );
    let target = pg().create_db("my_override_dst");
    let state = tempfile::tempdir().expect("state");
    let refused = run(stream_command(
        &source,
        &target,
        state.path(),
        &["--column-type", "item.nope=text", "--until", "caught-up"],
    ));
    refused.assert_exit_code(2);
    assert!(
        refused
            .all_output()
            .contains("table item has no column nope"),
        "{}",
        refused.all_output()
    );
    let flags = [
        "--column-type",
        "item.active=smallint",
        "--column-type",
        "item.size=varchar(10)",
    ];
    let mut background = Background::spawn(stream_command(&source, &target, state.path(), &flags));
    wait_streaming(&mut background, state.path());
    server.exec_script(
        db,
        "INSERT INTO item VALUES (3, 1, 'm', NOW()); UPDATE item SET active = 0, size = 'l' WHERE id = 1;",
    );
    background.kill();
    let mut last = flags.to_vec();
    last.extend(["--until", "caught-up"]);
    run(stream_command(&source, &target, state.path(), &last)).assert_success();
    let types = query_rows(
        &target,
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'item' AND column_name IN ('active', 'size') ORDER BY 1",
    );
    assert_eq!(
        types,
        vec![
            vec!["active".to_owned(), "smallint".to_owned()],
            vec!["size".to_owned(), "character varying".to_owned()],
        ]
    );
    let rows = query_rows(&target, "SELECT id, active, size FROM item ORDER BY id");
    let expected: Vec<Vec<String>> = [["1", "0", "l"], ["2", "0", "l"], ["3", "1", "m"]]
        .iter()
        .map(|r| r.iter().map(|v| (*v).to_owned()).collect())
        .collect();
    assert_eq!(rows, expected);
    crate::verify::assert_verified(state.path());
}

/// `--newer-wins gmt_modified` on MariaDB → MariaDB: an older change from the source never
/// replaces a target row with a greater gmt_modified (the application writes both during a
/// dual-write period); newer ones and NULL versions are applied, inserts too; the kept-back
/// change is counted in `kuaka status`.
#[test]
fn mariadb_newer_wins_to_mariadb() {
    newer_wins_case(true);
}

/// The same into PostgreSQL.
#[test]
fn mariadb_newer_wins_to_postgres() {
    newer_wins_case(false);
}

fn newer_wins_case(to_mariadb: bool) {
    let server = mariadb();
    let (db, dst) = if to_mariadb {
        ("my_newer_src2", "my_newer_dst2")
    } else {
        ("my_newer_src", "my_newer_dst")
    };
    let source = server.create_db(db);
    server.exec_script(
        db,
        "CREATE TABLE item (id int PRIMARY KEY, v varchar(40) NOT NULL, n int, gmt_modified datetime(6));
         INSERT INTO item SELECT seq, 'seed', seq, '2026-01-01' FROM seq_1_to_10;
         CREATE TABLE plain (id int PRIMARY KEY, v varchar(40));
         INSERT INTO plain VALUES (1, 'seed');",
    );
    let dest = Dest::new(to_mariadb, dst);
    let target = dest.url();
    let state = tempfile::tempdir().expect("state dir");
    let mut background = Background::spawn(stream_command(
        &source,
        &target,
        state.path(),
        &["--newer-wins", "gmt_modified"],
    ));
    wait_streaming(&mut background, state.path());
    // The application writes to the target too.
    let on_target =
        "UPDATE item SET v = 'target', n = -1, gmt_modified = '2026-06-01' WHERE id IN (1, 3);
                     UPDATE plain SET v = 'target' WHERE id = 1;";
    match &dest {
        Dest::Mariadb(d) => {
            server.exec_script(d, on_target);
        }
        Dest::Postgres(url) => {
            crate::support::postgres::psql(url, on_target);
        }
    }
    server.exec_script(
        db,
        "UPDATE item SET v = 'older source', n = 100, gmt_modified = '2026-03-01' WHERE id = 1;
         UPDATE item SET v = 'newer source', gmt_modified = '2026-09-01' WHERE id = 2;
         UPDATE item SET v = 'newest source', gmt_modified = '2026-12-01' WHERE id = 3;
         UPDATE item SET v = 'no version', gmt_modified = NULL WHERE id = 4;
         INSERT INTO item VALUES (11, 'inserted', 11, '2026-02-01');
         UPDATE plain SET v = 'source' WHERE id = 1;",
    );
    let value = |sql: &str| dest.value(sql);
    wait_until(
        "the source's changes to arrive",
        Duration::from_secs(60),
        || value("SELECT count(*) FROM item WHERE id = 11") == "1",
    );
    let v = |id: i32| value(&format!("SELECT v FROM item WHERE id = {id}"));
    assert_eq!(v(1), "target", "an older change replaced a newer row");
    assert_eq!(
        value("SELECT n FROM item WHERE id = 1"),
        "-1",
        "an older change replaced a column of a newer row"
    );
    assert_eq!(v(2), "newer source");
    assert_eq!(v(3), "newest source");
    assert_eq!(v(4), "no version");
    assert_eq!(
        value("SELECT v FROM plain WHERE id = 1"),
        "source",
        "a table without the column is applied as usual"
    );
    // A later, newer change to the kept row is applied.
    server.exec_script(
        db,
        "UPDATE item SET v = 'newer again', gmt_modified = '2026-07-01' WHERE id = 1;",
    );
    wait_until(
        "the newer change to arrive",
        Duration::from_secs(60),
        || v(1) == "newer again",
    );
    wait_until(
        "status to count the kept-back change",
        Duration::from_secs(30),
        || status_json(state.path())["newer_wins_kept_back"]["item"] == 1,
    );
    background.kill();
}
