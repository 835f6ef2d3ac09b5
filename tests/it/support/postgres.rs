//! A private PostgreSQL 15 for the test process, plus `psql` helpers and independent checks
//! (per-table checksums, a catalog snapshot) that do not share any code with `kuaka`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::Duration;

use super::{INSTALL_HINT, free_port, is_root, shell_quote, spawn_watchdog, wait_until};

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
pub const SUPERUSER: &str = "postgres";
/// A role that logs in with a password over TCP (scram-sha-256), for password tests.
pub const PASSWORD_ROLE: &str = "kuaka_pw";
pub const PASSWORD_ROLE_PASSWORD: &str = "s3cret-pw";
/// A role that logs in with an MD5 password hash (older servers' default), for the wire client.
pub const MD5_ROLE: &str = "kuaka_md5";
/// A role that pg_hba admits only over TLS (`hostssl`), for TLS tests.
pub const TLS_ROLE: &str = "kuaka_tls";

/// Schemas the independent checks ignore: the system ones and kuaka's own bookkeeping.
const USER_SCHEMA_FILTER: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema', 'kuaka') \
     AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'";

const FIELD_SEPARATOR: char = '\u{1f}';
const RECORD_SEPARATOR: char = '\u{1e}';

pub struct PgServer {
    pub port: u16,
    pub dir: PathBuf,
    as_root: bool,
}

static PG: OnceLock<PgServer> = OnceLock::new();

/// The test process's PostgreSQL server, started on first use.
pub fn pg() -> &'static PgServer {
    PG.get_or_init(PgServer::start)
}

fn bin(name: &str) -> String {
    format!("{PG_BIN}/{name}")
}

impl PgServer {
    fn start() -> PgServer {
        for tool in ["initdb", "pg_ctl", "psql"] {
            if !Path::new(&bin(tool)).exists() {
                panic!("{} is missing: {INSTALL_HINT}", bin(tool));
            }
        }
        let as_root = is_root();
        let dir = tempfile::Builder::new()
            .prefix("kuaka-it-pg-")
            .tempdir()
            .expect("temp dir for postgres")
            .keep();
        let data = dir.join("data");
        let port = free_port();
        let server = PgServer {
            port,
            dir: dir.clone(),
            as_root,
        };

        // Watchdog first, so the dir goes away even if the start fails half way.
        let stop = server.as_postgres_shell(&format!(
            "{} -D {} -m immediate -w -t 30 stop",
            bin("pg_ctl"),
            shell_quote(&data.to_string_lossy())
        ));
        spawn_watchdog(&format!(
            "if [ -f {pid} ]; then {stop} >/dev/null 2>&1; fi; rm -rf {dir}",
            pid = shell_quote(&data.join("postmaster.pid").to_string_lossy()),
            dir = shell_quote(&dir.to_string_lossy()),
        ));

        if as_root {
            run_checked(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&dir),
                "chown the postgres temp dir",
            );
        }
        run_checked(
            server
                .as_postgres(&bin("initdb"))
                .arg("-D")
                .arg(&data)
                .args([
                    "-U",
                    SUPERUSER,
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                ])
                .arg("--no-sync"),
            "initdb",
        );
        let tls = make_tls_files(&dir.join("tls"));
        if as_root {
            run_checked(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(dir.join("tls")),
                "chown the tls dir",
            );
        }
        let config = format!(
            "\n# kuaka integration tests\n\
             ssl = on\n\
             ssl_cert_file = '{cert}'\n\
             ssl_key_file = '{key}'\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = '{dir}'\n\
             wal_level = logical\n\
             max_replication_slots = 20\n\
             max_wal_senders = 20\n\
             max_connections = 200\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             shared_buffers = 128MB\n\
             password_encryption = 'scram-sha-256'\n\
             log_min_messages = warning\n",
            dir = dir.display(),
            cert = tls.join("server.crt").display(),
            key = tls.join("server.key").display(),
        );
        append(&data.join("postgresql.conf"), &config);
        // The password line must come before the trust lines: first match wins.
        std::fs::write(
            data.join("pg_hba.conf"),
            format!(
                "local all all trust\n\
                 local replication all trust\n\
                 hostssl all {TLS_ROLE} 127.0.0.1/32 trust\n\
                 hostnossl all {TLS_ROLE} 127.0.0.1/32 reject\n\
                 host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n\
                 host all {MD5_ROLE} 127.0.0.1/32 md5\n\
                 host replication {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n\
                 host all all 127.0.0.1/32 trust\n\
                 host replication all 127.0.0.1/32 trust\n"
            ),
        )
        .expect("write pg_hba.conf");
        run_checked(
            server
                .as_postgres(&bin("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(dir.join("postgres.log"))
                .args(["-w", "-t", "60", "start"]),
            "pg_ctl start",
        );
        let admin = server.url("postgres");
        wait_until(
            "postgres to accept connections",
            Duration::from_secs(30),
            || {
                Command::new(bin("psql"))
                    .args(["-X", "-At", "-c", "SELECT 1", &admin])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false)
            },
        );
        psql(
            &admin,
            &format!(
                "CREATE ROLE {PASSWORD_ROLE} LOGIN SUPERUSER REPLICATION \
                 PASSWORD '{PASSWORD_ROLE_PASSWORD}'; CREATE ROLE {TLS_ROLE} LOGIN SUPERUSER; \
                 SET password_encryption = 'md5'; \
                 CREATE ROLE {MD5_ROLE} LOGIN SUPERUSER PASSWORD '{PASSWORD_ROLE_PASSWORD}';"
            ),
        );
        eprintln!(
            "postgres 15 for tests: port {port}, dir {}, log {}",
            dir.display(),
            dir.join("postgres.log").display()
        );
        server
    }

    fn as_postgres(&self, program: &str) -> Command {
        let mut command = if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", program]);
            c
        } else {
            Command::new(program)
        };
        command.stdin(Stdio::null()).current_dir("/");
        command
    }

    fn as_postgres_shell(&self, command: &str) -> String {
        if self.as_root {
            format!("runuser -u postgres -- {command}")
        } else {
            command.to_owned()
        }
    }

    /// A server of this test's own (not the shared one), for tests that restart it.
    pub fn start_private() -> PgServer {
        PgServer::start()
    }

    /// Restart the server (fast shutdown: sessions are cut, open transactions roll back).
    pub fn restart(&self) {
        run_checked(
            self.as_postgres(&bin("pg_ctl"))
                .arg("-D")
                .arg(self.dir.join("data"))
                .arg("-l")
                .arg(self.dir.join("postgres.log"))
                .args(["-m", "fast", "-w", "-t", "60", "restart"]),
            "pg_ctl restart",
        );
    }

    /// A hot standby of this server (`pg_basebackup -R`, streaming), on its own port; stopped
    /// and removed when the test process ends. Returns its port.
    pub fn start_standby(&self) -> u16 {
        let dir = tempfile::Builder::new()
            .prefix("kuaka-it-standby-")
            .tempdir()
            .expect("temp dir for the standby")
            .keep();
        let data = dir.join("data");
        let port = free_port();
        let stop = self.as_postgres_shell(&format!(
            "{} -D {} -m immediate -w -t 30 stop",
            bin("pg_ctl"),
            shell_quote(&data.to_string_lossy())
        ));
        spawn_watchdog(&format!(
            "if [ -f {pid} ]; then {stop} >/dev/null 2>&1; fi; rm -rf {dir}",
            pid = shell_quote(&data.join("postmaster.pid").to_string_lossy()),
            dir = shell_quote(&dir.to_string_lossy()),
        ));
        if self.as_root {
            run_checked(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&dir),
                "chown the standby dir",
            );
        }
        run_checked(
            self.as_postgres(&bin("pg_basebackup"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    SUPERUSER,
                ])
                .arg("-D")
                .arg(&data)
                .args(["-R", "-X", "stream", "--no-sync", "--checkpoint=fast"]),
            "pg_basebackup for the standby",
        );
        append(
            &data.join("postgresql.conf"),
            &format!(
                "\n# standby\nport = {port}\nunix_socket_directories = '{}'\nhot_standby = on\n",
                dir.display()
            ),
        );
        run_checked(
            self.as_postgres(&bin("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(dir.join("standby.log"))
                .args(["-w", "-t", "60", "start"]),
            "pg_ctl start (standby)",
        );
        let url = format!("postgres://{SUPERUSER}@127.0.0.1:{port}/postgres");
        wait_until(
            "the standby to accept connections",
            Duration::from_secs(30),
            || {
                Command::new(bin("psql"))
                    .args(["-X", "-At", "-c", "SELECT pg_is_in_recovery()", &url])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "t")
                    .unwrap_or(false)
            },
        );
        port
    }

    /// The test CA that signed the server certificate (valid for the name `localhost` only).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("tls").join("ca.pem")
    }

    /// `postgres://postgres@127.0.0.1:<port>/<db>`
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{db}", self.port)
    }

    /// URL with the password role and a password (which may be wrong on purpose).
    pub fn url_with_password(&self, db: &str, password: &str) -> String {
        format!(
            "postgres://{PASSWORD_ROLE}:{password}@127.0.0.1:{}/{db}",
            self.port
        )
    }

    /// (Re)create an empty database `name` and return its URL.
    pub fn create_db(&self, name: &str) -> String {
        let admin = self.url("postgres");
        psql(
            &admin,
            &format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE);"),
        );
        psql(&admin, &format!("CREATE DATABASE \"{name}\";"));
        self.url(name)
    }
}

fn append(path: &Path, text: &str) {
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .expect("open for append");
    file.write_all(text.as_bytes()).expect("append");
}

fn run_checked(command: &mut Command, what: &str) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    if !output.status.success() {
        panic!(
            "{what} failed with {}\n--- stdout:\n{}\n--- stderr:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn psql_command(url: &str) -> Command {
    let mut command = Command::new(bin("psql"));
    command
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-q", "-d", url])
        .env("PGTZ", "UTC")
        .env_remove("PGPASSWORD");
    command
}

/// Run SQL (a script: several statements, psql meta-commands) with psql; panic on error.
/// Returns what psql printed.
pub fn psql(url: &str, sql: &str) -> String {
    let mut child = psql_command(url)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn psql");
    let mut stdin = child.stdin.take().expect("psql stdin");
    let script = sql.to_owned();
    let writer = thread::spawn(move || {
        let _ = stdin.write_all(script.as_bytes());
    });
    let output = child.wait_with_output().expect("wait for psql");
    let _ = writer.join();
    if !output.status.success() {
        panic!(
            "psql failed ({}) on {url}\n--- sql:\n{}\n--- stderr:\n{}",
            output.status,
            if sql.len() > 4000 {
                &sql[..sql.floor_char_boundary(4000)]
            } else {
                sql
            },
            String::from_utf8_lossy(&output.stderr)
        );
    }
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Run a SQL file with psql; panic on error.
pub fn psql_file(url: &str, path: &Path) {
    run_checked(
        psql_command(url).arg("-f").arg(path).stdin(Stdio::null()),
        &format!("psql -f {}", path.display()),
    );
}

/// One value: `psql -At -c sql`, trailing newline removed.
pub fn query_one(url: &str, sql: &str) -> String {
    let out = run_checked(
        psql_command(url).args(["-At", "-c", sql]),
        &format!("query {sql:?}"),
    );
    out.strip_suffix('\n').unwrap_or(&out).to_owned()
}

/// Rows of a query (or a script with `\gexec`), fields split. Values may contain newlines.
pub fn query_rows(url: &str, sql: &str) -> Vec<Vec<String>> {
    let out = run_checked(
        psql_command(url)
            .args(["-At", "-F", &FIELD_SEPARATOR.to_string()])
            .args(["-R", &RECORD_SEPARATOR.to_string()])
            .args(["-c", sql]),
        &format!("query {sql:?}"),
    );
    parse_rows(&out)
}

fn parse_rows(out: &str) -> Vec<Vec<String>> {
    let out = out.strip_suffix('\n').unwrap_or(out);
    out.split(RECORD_SEPARATOR)
        .filter(|record| !record.is_empty())
        .map(|record| record.split(FIELD_SEPARATOR).map(str::to_owned).collect())
        .collect()
}

/// Like `query_rows` but for a psql script (meta-commands such as `\gexec` allowed); values must
/// not contain newlines.
fn script_rows(url: &str, script: &str) -> Vec<Vec<String>> {
    let mut command = psql_command(url);
    command
        .args(["-At", "-F", &FIELD_SEPARATOR.to_string()])
        .args(["-R", &RECORD_SEPARATOR.to_string()]);
    let mut child = command
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn psql");
    let mut stdin = child.stdin.take().expect("psql stdin");
    stdin.write_all(script.as_bytes()).expect("write script");
    drop(stdin);
    let output = child.wait_with_output().expect("wait for psql");
    if !output.status.success() {
        panic!(
            "psql script failed on {url}\n--- script:\n{script}\n--- stderr:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // Each `\gexec` statement prints its own result, ended by a newline rather than the record
    // separator, so both end a record here: values must not contain newlines.
    String::from_utf8_lossy(&output.stdout)
        .split([RECORD_SEPARATOR, '\n'])
        .filter(|record| !record.is_empty())
        .map(|record| record.split(FIELD_SEPARATOR).map(str::to_owned).collect())
        .collect()
}

/// Per user table (relkind 'r': plain tables and partitions, not partitioned parents or views;
/// schema `kuaka` left out): `(count(*), md5 of the rows' text forms in sorted order)`.
/// Keys are `schema.table` with identifiers quoted as PostgreSQL quotes them.
pub fn pg_table_checksums(url: &str) -> BTreeMap<String, (i64, String)> {
    let script = format!(
        "SELECT format(\
           $q$SELECT %L, count(*), md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text COLLATE \"C\"), '')) \
              FROM ONLY %I.%I t$q$, \
           format('%I.%I', n.nspname, c.relname), n.nspname, c.relname) \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind = 'r' AND {USER_SCHEMA_FILTER} \
         ORDER BY n.nspname, c.relname \\gexec\n"
    );
    script_rows(url, &script)
        .into_iter()
        .map(|row| {
            assert_eq!(row.len(), 3, "unexpected checksum row {row:?}");
            let count = row[1].parse().expect("count");
            (row[0].clone(), (count, row[2].clone()))
        })
        .collect()
}

/// Assert that both databases hold the same user tables with the same rows.
pub fn assert_same_data(source_url: &str, target_url: &str) {
    let source = pg_table_checksums(source_url);
    let target = pg_table_checksums(target_url);
    assert!(
        !source.is_empty(),
        "the source {source_url} has no user tables; test setup is wrong"
    );
    let mut problems = Vec::new();
    for (table, (count, md5)) in &source {
        match target.get(table) {
            None => problems.push(format!(
                "  {table}: missing on target ({count} rows on source)"
            )),
            Some((target_count, target_md5)) if target_count != count => problems.push(format!(
                "  {table}: {count} rows on source, {target_count} on target"
            )),
            Some((_, target_md5)) if target_md5 != md5 => problems.push(format!(
                "  {table}: same row count ({count}) but different contents \
                 (md5 {md5} on source, {target_md5} on target)"
            )),
            Some(_) => {}
        }
    }
    for (table, (count, _)) in &target {
        if !source.contains_key(table) {
            problems.push(format!("  {table}: only on target ({count} rows)"));
        }
    }
    if !problems.is_empty() {
        panic!(
            "data differs between source and target ({} of {} tables):\n{}",
            problems.len(),
            source.len(),
            problems.join("\n")
        );
    }
}

/// The catalog facts the schema comparison looks at, one sorted list of lines per section.
pub fn pg_schema_snapshot(url: &str) -> BTreeMap<&'static str, BTreeSet<String>> {
    let filter = USER_SCHEMA_FILTER;
    let sections: [(&'static str, String); 11] = [
        (
            "schemas",
            format!(
                "SELECT n.nspname || coalesce(' comment=' || obj_description(n.oid, 'pg_namespace'), '') \
                 FROM pg_namespace n WHERE {filter}"
            ),
        ),
        (
            "relations",
            format!(
                "SELECT format('%I.%I', n.nspname, c.relname) || ' kind=' || c.relkind::text \
                   || ' persistence=' || c.relpersistence::text \
                   || coalesce(' partition_key=' || pg_get_partkeydef(c.oid), '') \
                   || coalesce(' bound=' || pg_get_expr(c.relpartbound, c.oid), '') \
                   || coalesce(' parent=' || (SELECT i.inhparent::regclass::text FROM pg_inherits i \
                                              WHERE i.inhrelid = c.oid LIMIT 1), '') \
                   || coalesce(' comment=' || obj_description(c.oid, 'pg_class'), '') \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND {filter}"
            ),
        ),
        (
            "columns",
            format!(
                "SELECT format('%I.%I', n.nspname, c.relname) \
                   || ' #' || row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum) \
                   || ' ' || quote_ident(a.attname) || ' ' || format_type(a.atttypid, a.atttypmod) \
                   || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END \
                   || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '') \
                   || CASE a.attidentity WHEN 'a' THEN ' identity always' \
                                         WHEN 'd' THEN ' identity by default' ELSE '' END \
                   || CASE a.attgenerated WHEN 's' THEN ' generated stored' ELSE '' END \
                   || CASE WHEN a.attcollation <> ty.typcollation \
                           THEN ' collate ' || a.attcollation::regcollation::text ELSE '' END \
                   || coalesce(' comment=' || col_description(c.oid, a.attnum), '') \
                 FROM pg_attribute a \
                 JOIN pg_class c ON c.oid = a.attrelid \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 JOIN pg_type ty ON ty.oid = a.atttypid \
                 LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
                 WHERE a.attnum > 0 AND NOT a.attisdropped \
                   AND c.relkind IN ('r', 'p', 'v', 'm', 'f') AND {filter}"
            ),
        ),
        (
            "indexes",
            format!(
                "SELECT pg_get_indexdef(i.indexrelid) \
                   || CASE WHEN i.indisclustered THEN ' clustered' ELSE '' END \
                   || CASE WHEN NOT i.indisvalid THEN ' INVALID' ELSE '' END \
                 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {filter}"
            ),
        ),
        (
            "constraints",
            format!(
                "SELECT CASE WHEN con.conrelid <> 0 THEN con.conrelid::regclass::text \
                             ELSE con.contypid::regtype::text END \
                   || ' ' || quote_ident(con.conname) || ' ' || con.contype::text \
                   || ' ' || pg_get_constraintdef(con.oid) \
                   || CASE WHEN con.convalidated THEN '' ELSE ' not validated' END \
                 FROM pg_constraint con JOIN pg_namespace n ON n.oid = con.connamespace \
                 WHERE {filter}"
            ),
        ),
        (
            "views",
            format!(
                "SELECT format('%I.%I', n.nspname, c.relname) || ' ' || c.relkind::text || ' ' \
                   || pg_get_viewdef(c.oid) \
                   || CASE WHEN c.relkind = 'm' AND NOT c.relispopulated THEN ' (not populated)' \
                           ELSE '' END \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind IN ('v', 'm') AND {filter}"
            ),
        ),
        (
            "sequences",
            format!(
                "SELECT format('%I.%I', n.nspname, c.relname) \
                   || ' type=' || s.seqtypid::regtype::text || ' start=' || s.seqstart \
                   || ' increment=' || s.seqincrement || ' min=' || s.seqmin || ' max=' || s.seqmax \
                   || ' cache=' || s.seqcache || ' cycle=' || s.seqcycle \
                   || ' last_value=' || coalesce(ps.last_value::text, 'null (not called)') \
                   || coalesce(' owned_by=' || (SELECT d.refobjid::regclass::text || '.' \
                                                  || quote_ident(a.attname) \
                                                FROM pg_depend d JOIN pg_attribute a \
                                                  ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid \
                                                WHERE d.classid = 'pg_class'::regclass \
                                                  AND d.objid = c.oid AND d.deptype IN ('a', 'i') \
                                                LIMIT 1), '') \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 JOIN pg_sequence s ON s.seqrelid = c.oid \
                 JOIN pg_sequences ps ON ps.schemaname = n.nspname AND ps.sequencename = c.relname \
                 WHERE {filter}"
            ),
        ),
        (
            "triggers",
            format!(
                "SELECT pg_get_triggerdef(t.oid) || ' enabled=' || t.tgenabled::text \
                 FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE NOT t.tgisinternal AND {filter}"
            ),
        ),
        (
            "functions",
            format!(
                "SELECT format('%I.%I', n.nspname, p.proname) \
                   || '(' || pg_get_function_identity_arguments(p.oid) || ')' \
                   || ' kind=' || p.prokind::text \
                   || coalesce(' returns=' || pg_get_function_result(p.oid), '') \
                   || ' language=' || l.lanname || ' volatility=' || p.provolatile::text \
                   || ' strict=' || p.proisstrict || ' security_definer=' || p.prosecdef \
                   || ' source_md5=' || md5(coalesce(p.prosrc, '')) \
                   || coalesce(' aggregate=' || (SELECT a.aggtransfn::text || '/' \
                                                   || a.aggtranstype::regtype::text || '/' \
                                                   || a.aggfinalfn::text || '/' \
                                                   || coalesce(a.agginitval, 'null') \
                                                 FROM pg_aggregate a WHERE a.aggfnoid = p.oid), '') \
                 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
                 JOIN pg_language l ON l.oid = p.prolang WHERE {filter}"
            ),
        ),
        (
            "types",
            format!(
                "SELECT format('%I.%I', n.nspname, t.typname) || ' ' || t.typtype::text || CASE t.typtype \
                   WHEN 'e' THEN ' labels=' || (SELECT string_agg(quote_literal(e.enumlabel), ',' \
                                                  ORDER BY e.enumsortorder) \
                                                FROM pg_enum e WHERE e.enumtypid = t.oid) \
                   WHEN 'd' THEN ' base=' || format_type(t.typbasetype, t.typtypmod) \
                                 || ' not_null=' || t.typnotnull \
                                 || coalesce(' default=' || t.typdefault, '') \
                   WHEN 'c' THEN ' attributes=' || (SELECT string_agg(quote_ident(a.attname) || ' ' \
                                                      || format_type(a.atttypid, a.atttypmod), ', ' \
                                                      ORDER BY a.attnum) \
                                                    FROM pg_attribute a \
                                                    WHERE a.attrelid = t.typrelid AND a.attnum > 0 \
                                                      AND NOT a.attisdropped) \
                   WHEN 'r' THEN ' subtype=' || (SELECT format_type(r.rngsubtype, NULL) \
                                                 FROM pg_range r WHERE r.rngtypid = t.oid) \
                   ELSE '' END \
                   || coalesce(' comment=' || obj_description(t.oid, 'pg_type'), '') \
                 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace \
                 WHERE t.typtype IN ('e', 'd', 'c', 'r') AND {filter} \
                   AND (t.typtype <> 'c' \
                        OR (SELECT c.relkind FROM pg_class c WHERE c.oid = t.typrelid) = 'c')"
            ),
        ),
        (
            "comments",
            format!(
                "SELECT d.classoid::regclass::text || ' ' \
                   || coalesce(pg_describe_object(d.classoid, d.objoid, d.objsubid), '?') \
                   || ' = ' || d.description \
                 FROM pg_description d \
                 WHERE d.classoid IN ('pg_proc'::regclass, 'pg_constraint'::regclass, \
                                      'pg_trigger'::regclass) \
                   AND EXISTS (SELECT 1 FROM pg_namespace n \
                               WHERE n.oid = CASE d.classoid \
                                 WHEN 'pg_proc'::regclass THEN \
                                   (SELECT pronamespace FROM pg_proc WHERE oid = d.objoid) \
                                 WHEN 'pg_constraint'::regclass THEN \
                                   (SELECT connamespace FROM pg_constraint WHERE oid = d.objoid) \
                                 ELSE (SELECT c.relnamespace FROM pg_trigger tg \
                                       JOIN pg_class c ON c.oid = tg.tgrelid \
                                       WHERE tg.oid = d.objoid) END \
                               AND {filter})"
            ),
        ),
    ];
    sections
        .into_iter()
        .map(|(name, sql)| {
            let lines = query_rows(url, &sql)
                .into_iter()
                .map(|row| row.join(" | "))
                .collect();
            (name, lines)
        })
        .collect()
}

/// Assert both databases have the same schema as far as `pg_schema_snapshot` can see.
pub fn assert_same_schema(source_url: &str, target_url: &str) {
    let source = pg_schema_snapshot(source_url);
    let target = pg_schema_snapshot(target_url);
    for section in ["relations", "columns"] {
        assert!(
            !source[section].is_empty(),
            "the schema snapshot of {source_url} has no {section}; the check is broken"
        );
    }
    let mut report = String::new();
    for (section, source_lines) in &source {
        let target_lines = &target[section];
        let missing: Vec<_> = source_lines.difference(target_lines).collect();
        let extra: Vec<_> = target_lines.difference(source_lines).collect();
        if missing.is_empty() && extra.is_empty() {
            continue;
        }
        report.push_str(&format!("[{section}]\n"));
        for line in missing {
            report.push_str(&format!("  only on source: {line}\n"));
        }
        for line in extra {
            report.push_str(&format!("  only on target: {line}\n"));
        }
    }
    if !report.is_empty() {
        panic!("schema differs between source and target:\n{report}");
    }
}

/// Replication slots that belong to database `db`.
pub fn replication_slot_count(url: &str, db: &str) -> i64 {
    query_one(
        url,
        &format!("SELECT count(*) FROM pg_replication_slots WHERE database = '{db}'"),
    )
    .parse()
    .expect("slot count")
}

#[test]
fn postgres_test_server_starts() {
    let server = pg();
    let url = server.url("postgres");
    assert_eq!(query_one(&url, "SHOW wal_level"), "logical");
    assert_eq!(query_one(&url, "SELECT 1"), "1");
    // The password role logs in with its password over TCP and is refused without it.
    let with_password = Command::new(bin("psql"))
        .args(["-X", "-At", "-c", "SELECT current_user"])
        .arg(server.url_with_password("postgres", PASSWORD_ROLE_PASSWORD))
        .output()
        .expect("psql");
    assert!(with_password.status.success(), "{with_password:?}");
    assert_eq!(
        String::from_utf8_lossy(&with_password.stdout).trim(),
        PASSWORD_ROLE
    );
    let wrong = Command::new(bin("psql"))
        .args(["-X", "-At", "-w", "-c", "SELECT 1"])
        .arg(server.url_with_password("postgres", "wrong"))
        .output()
        .expect("psql");
    assert!(
        !wrong.status.success(),
        "wrong password accepted: {wrong:?}"
    );
    // query_rows keeps newlines inside values.
    let rows = query_rows(&url, "SELECT E'a\\nb', 'c' UNION ALL SELECT 'd', NULL");
    assert_eq!(
        rows,
        vec![
            vec!["a\nb".to_owned(), "c".to_owned()],
            vec!["d".into(), "".into()]
        ]
    );
}

/// A throwaway CA and a server certificate for the name `localhost` (no IP address, so that
/// verify-full against 127.0.0.1 must fail while verify-ca passes).
fn make_tls_files(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("tls dir");
    let openssl = |args: &[&str], what: &str| {
        run_checked(Command::new("openssl").args(args).current_dir(dir), what);
    };
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "3",
            "-subj",
            "/CN=kuaka test CA",
        ],
        "openssl: test CA",
    );
    openssl(
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
        "openssl: server key",
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write ext.cnf");
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "3",
            "-extfile",
            "ext.cnf",
        ],
        "openssl: server certificate",
    );
    let key = dir.join("server.key");
    let mut perms = std::fs::metadata(&key).expect("key metadata").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o600);
    std::fs::set_permissions(&key, perms).expect("chmod server.key");
    dir.to_owned()
}
