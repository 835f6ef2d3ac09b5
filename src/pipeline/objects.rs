//! Objects that are not rows: triggers, views and routines of MySQL/MariaDB and SQLite jobs
//! whose target is the same engine.
//!
//! **Triggers live on the database the application writes to.** kuaka applies changes as
//! ordinary SQL on MySQL and SQLite (neither can switch triggers off for one session, as
//! PostgreSQL's `session_replication_role` does), and the rows a trigger writes are captured
//! and applied like any others. A trigger on the database being applied to would fire a
//! second time: an audit row twice, a `SET NEW.created = NOW()` overwriting the copied value.
//! So:
//! - while the job syncs forward, the target has no triggers; `--snapshot-only` creates them
//!   after the data;
//! - at cutover they are created on the target just before it is unfenced, and, when reverse
//!   replication starts, taken off the source (their definitions held in the job's state
//!   store) so that the changes streamed back do not fire them;
//! - at fallback they go back onto the source (as they were, definer included) and off the
//!   target, before either is written again.
//!
//! Views and routines (MySQL → MySQL) never fire on applied rows: they are created with the
//! indexes after the data. A view that cannot be created (it reads a table the job does not
//! move, or a routine the server refuses without `log_bin_trust_function_creators`) is a
//! warning naming it, not a failed job.
//!
//! DEFINER: kept where that account exists on the database created on; otherwise the object
//! is created with the definer clause removed (it then runs as kuaka's user), and the log says
//! so. An object whose definer does not exist fails every time it is used, which would break
//! the application at cutover.

use mysql_async::prelude::Queryable;
use serde::{Deserialize, Serialize};

use super::{Error, Result};
use crate::config::{Endpoint, EngineKind, JobSpec};
use crate::engine::mysql::{self, quote_ident, quote_literal};
use crate::model::QualifiedName;
use crate::state::StateStore;

/// Meta key (`held_triggers_<cutover number>`): the source's triggers as they were at that
/// cutover, moved to the target then and back at its fallback. Kept afterwards, so that a
/// step repeated after a crash reports the same work.
fn held_key(n: u32) -> String {
    format!("held_triggers_{n}")
}

/// One trigger as its database reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trigger {
    pub name: String,
    pub table: String,
    /// The `CREATE TRIGGER` statement as the database holds it (MySQL: with its DEFINER).
    pub create: String,
    /// MySQL: the `sql_mode` it was created under (its body is parsed with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql_mode: Option<String>,
}

/// The triggers of the job's tables on `endpoint` (MySQL/MariaDB or SQLite), in the order
/// they fire (MySQL's FOLLOWS/PRECEDES order is restored by creating them in this order).
pub async fn read_triggers(endpoint: &Endpoint, spec: &JobSpec) -> Result<Vec<Trigger>> {
    match endpoint.engine {
        EngineKind::Mysql => {
            let mut conn = mysql::connect(endpoint, "triggers").await?;
            let what = |e| mysql::error("reading the triggers", e);
            let names: Vec<(String, String)> = conn
                .query(
                    "SELECT TRIGGER_NAME, EVENT_OBJECT_TABLE FROM information_schema.TRIGGERS \
                     WHERE TRIGGER_SCHEMA = DATABASE() \
                     ORDER BY EVENT_OBJECT_TABLE, ACTION_TIMING, EVENT_MANIPULATION, ACTION_ORDER",
                )
                .await
                .map_err(what)?;
            let mut out = Vec::new();
            for (name, table) in names {
                if !spec.selection.selects(&QualifiedName::new(
                    endpoint.database.clone(),
                    table.clone(),
                )) {
                    continue;
                }
                let row: Option<mysql_async::Row> = conn
                    .query_first(format!("SHOW CREATE TRIGGER {}", quote_ident(&name)))
                    .await
                    .map_err(|e| mysql::error(format!("reading trigger {name} of {table}"), e))?;
                let (sql_mode, create) = row
                    .and_then(|r| {
                        let mode: Option<String> = r.get(1);
                        let create: Option<String> = r.get(2);
                        create.map(|c| (mode, c))
                    })
                    .ok_or_else(|| {
                        Error::Definite(format!(
                            "trigger {name} of {table}: SHOW CREATE TRIGGER returned no statement (kuaka's user needs the TRIGGER privilege on the table)"
                        ))
                    })?;
                out.push(Trigger {
                    name,
                    table,
                    create,
                    sql_mode,
                });
            }
            conn.disconnect().await.ok();
            Ok(out)
        }
        EngineKind::Sqlite => {
            let path = endpoint.database.clone();
            let selection = spec.selection.clone();
            tokio::task::block_in_place(move || {
                let conn = crate::engine::sqlite::open(&path, false)?;
                let catalog = crate::engine::sqlite::read_catalog(&conn)?;
                let mut out = Vec::new();
                for t in catalog
                    .tables
                    .iter()
                    .filter(|t| selection.selects(&t.table.name))
                {
                    for create in &t.trigger_sql {
                        out.push(Trigger {
                            name: sqlite_trigger_name(create),
                            table: t.name().to_owned(),
                            create: create.clone(),
                            sql_mode: None,
                        });
                    }
                }
                Ok(out)
            })
        }
        EngineKind::Postgres => Ok(Vec::new()),
    }
}

/// The name in `CREATE [TEMP] TRIGGER [IF NOT EXISTS] name ...`, for messages and lookups.
fn sqlite_trigger_name(create: &str) -> String {
    let upper = create.to_ascii_uppercase();
    let Some(at) = upper.find("TRIGGER") else {
        return "?".into();
    };
    let mut rest = create[at + "TRIGGER".len()..].trim_start();
    if rest.to_ascii_uppercase().starts_with("IF NOT EXISTS") {
        rest = rest["IF NOT EXISTS".len()..].trim_start();
    }
    let close = match rest.chars().next() {
        Some('"') => '"',
        Some('`') => '`',
        Some('[') => ']',
        _ => {
            let end = rest
                .find(|c: char| c.is_whitespace() || c == '(')
                .unwrap_or(rest.len());
            return rest[..end].to_owned();
        }
    };
    let inner = &rest[1..];
    match inner.find(close) {
        Some(end) => inner[..end].to_owned(),
        None => inner.to_owned(),
    }
}

/// `(start, end)` of the ` DEFINER=user@host` clause of a MySQL CREATE statement, when there
/// is one before the object kind.
fn definer_span(create: &str) -> Option<(usize, usize)> {
    let upper = create.to_ascii_uppercase();
    let start = upper.find(" DEFINER=")?;
    // Only in the statement's head (a body could mention the word).
    let kind = ["TRIGGER", "VIEW", "PROCEDURE", "FUNCTION", "EVENT"]
        .iter()
        .filter_map(|k| upper.find(&format!(" {k} ")))
        .min()?;
    if start > kind {
        return None;
    }
    let bytes = create.as_bytes();
    let mut i = start + " DEFINER=".len();
    let mut quote: Option<u8> = None;
    while i < bytes.len() {
        let c = bytes[i];
        match quote {
            Some(q) if c == q => {
                // A doubled quote stays inside.
                if bytes.get(i + 1) == Some(&q) {
                    i += 1;
                } else {
                    quote = None;
                }
            }
            Some(_) => {}
            None if c == b'`' || c == b'\'' || c == b'"' => quote = Some(c),
            None if c.is_ascii_whitespace() => break,
            None => {}
        }
        i += 1;
    }
    Some((start, i))
}

/// The definer account `(user, host)` of a MySQL CREATE statement.
fn definer(create: &str) -> Option<(String, String)> {
    let (start, end) = definer_span(create)?;
    let text = &create[start + " DEFINER=".len()..end];
    let unquote = |s: &str| {
        let s = s.trim();
        for q in ['`', '\'', '"'] {
            if let Some(inner) = s.strip_prefix(q).and_then(|s| s.strip_suffix(q)) {
                return inner.replace(&format!("{q}{q}"), &q.to_string());
            }
        }
        s.to_owned()
    };
    // The `@` outside quotes.
    let mut quote: Option<char> = None;
    for (i, c) in text.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '`' || c == '\'' || c == '"' => quote = Some(c),
            None if c == '@' => return Some((unquote(&text[..i]), unquote(&text[i + 1..]))),
            None => {}
        }
    }
    Some((unquote(text), "%".into()))
}

/// The statement without its DEFINER clause (the object then belongs to whoever creates it).
fn without_definer(create: &str) -> String {
    match definer_span(create) {
        Some((start, end)) => format!("{}{}", &create[..start], &create[end..]),
        None => create.to_owned(),
    }
}

/// The statement to run on `conn`: as it is when its definer exists there, else without the
/// definer clause (said in the log).
async fn for_server(conn: &mut mysql_async::Conn, kind: &str, name: &str, create: &str) -> String {
    let Some((user, host)) = definer(create) else {
        return create.to_owned();
    };
    let exists: Option<u8> = conn
        .exec_first(
            "SELECT 1 FROM mysql.user WHERE User = ? AND Host = ?",
            (user.as_str(), host.as_str()),
        )
        .await
        .ok()
        .flatten();
    if exists.is_some() {
        create.to_owned()
    } else {
        tracing::warn!(
            "{kind} {name}: its definer {user}@{host} does not exist (or cannot be looked up) on {}; created without DEFINER, it runs as kuaka's user",
            conn.opts().db_name().unwrap_or("the target")
        );
        without_definer(create)
    }
}

/// The names of the triggers in the connection's database.
async fn trigger_names(conn: &mut mysql_async::Conn) -> Result<Vec<String>> {
    Ok(conn
        .query(
            "SELECT TRIGGER_NAME FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = DATABASE()",
        )
        .await
        .map_err(|e| mysql::error("listing the triggers", e))?)
}

/// Create `triggers` on `endpoint` where a trigger of that name is not there yet. Returns how
/// many were created.
pub async fn create_triggers(endpoint: &Endpoint, triggers: &[Trigger]) -> Result<usize> {
    if triggers.is_empty() {
        return Ok(0);
    }
    match endpoint.engine {
        EngineKind::Mysql => {
            let mut conn = mysql::connect(endpoint, "triggers").await?;
            let existing = trigger_names(&mut conn).await?;
            let mut created = 0;
            for t in triggers.iter().filter(|t| !existing.contains(&t.name)) {
                let what =
                    |e| mysql::error(format!("creating trigger {} on {}", t.name, t.table), e);
                if let Some(mode) = &t.sql_mode {
                    conn.query_drop(format!("SET SESSION sql_mode = {}", quote_literal(mode)))
                        .await
                        .map_err(what)?;
                }
                let sql = for_server(&mut conn, "trigger", &t.name, &t.create).await;
                conn.query_drop(sql).await.map_err(what)?;
                created += 1;
            }
            conn.disconnect().await.ok();
            Ok(created)
        }
        EngineKind::Sqlite => {
            let path = endpoint.database.clone();
            tokio::task::block_in_place(|| {
                let conn = crate::engine::sqlite::open(&path, false)?;
                let mut created = 0;
                let tx = conn
                    .unchecked_transaction()
                    .map_err(|e| Error::Definite(format!("creating triggers in {path}: {e}")))?;
                for t in triggers {
                    let exists: bool = tx
                        .query_row(
                            "SELECT count(*) > 0 FROM sqlite_schema WHERE type = 'trigger' AND name = ?1",
                            [&t.name],
                            |r| r.get(0),
                        )
                        .map_err(|e| Error::Definite(format!("looking up trigger {}: {e}", t.name)))?;
                    if !exists {
                        tx.execute_batch(&t.create).map_err(|e| {
                            Error::Definite(format!(
                                "creating trigger {} on {} in {path}: {e}",
                                t.name, t.table
                            ))
                        })?;
                        created += 1;
                    }
                }
                tx.commit()
                    .map_err(|e| Error::Definite(format!("creating triggers in {path}: {e}")))?;
                Ok(created)
            })
        }
        EngineKind::Postgres => Ok(0),
    }
}

/// Drop `triggers` from `endpoint` (those not there are skipped). Returns how many were there.
pub async fn drop_triggers(endpoint: &Endpoint, triggers: &[Trigger]) -> Result<usize> {
    if triggers.is_empty() {
        return Ok(0);
    }
    match endpoint.engine {
        EngineKind::Mysql => {
            let mut conn = mysql::connect(endpoint, "triggers").await?;
            let existing = trigger_names(&mut conn).await?;
            let mut dropped = 0;
            for t in triggers.iter().filter(|t| existing.contains(&t.name)) {
                conn.query_drop(format!("DROP TRIGGER IF EXISTS {}", quote_ident(&t.name)))
                    .await
                    .map_err(|e| {
                        mysql::error(format!("dropping trigger {} of {}", t.name, t.table), e)
                    })?;
                dropped += 1;
            }
            conn.disconnect().await.ok();
            Ok(dropped)
        }
        EngineKind::Sqlite => {
            let path = endpoint.database.clone();
            tokio::task::block_in_place(|| {
                let conn = crate::engine::sqlite::open(&path, false)?;
                let tx = conn
                    .unchecked_transaction()
                    .map_err(|e| Error::Definite(format!("dropping triggers in {path}: {e}")))?;
                let mut dropped = 0;
                for t in triggers {
                    let there: bool = tx
                        .query_row(
                            "SELECT count(*) > 0 FROM sqlite_schema WHERE type = 'trigger' AND name = ?1",
                            [&t.name],
                            |r| r.get(0),
                        )
                        .map_err(|e| Error::Definite(format!("looking up trigger {}: {e}", t.name)))?;
                    if there {
                        tx.execute_batch(&format!(
                            "DROP TRIGGER IF EXISTS {}",
                            crate::engine::sqlite::quote_ident(&t.name)
                        ))
                        .map_err(|e| {
                            Error::Definite(format!("dropping trigger {} in {path}: {e}", t.name))
                        })?;
                        dropped += 1;
                    }
                }
                tx.commit()
                    .map_err(|e| Error::Definite(format!("dropping triggers in {path}: {e}")))?;
                Ok(dropped)
            })
        }
        EngineKind::Postgres => Ok(0),
    }
}

fn same_engine(spec: &JobSpec) -> bool {
    spec.source.engine == spec.target.engine && spec.source.engine != EngineKind::Postgres
}

fn held(main: &StateStore, n: u32) -> Result<Option<Vec<Trigger>>> {
    match main.meta(&held_key(n))? {
        Some(json) if !json.is_empty() => serde_json::from_str(&json)
            .map(Some)
            .map_err(|e| Error::Definite(format!("reading the held triggers: {e}"))),
        _ => Ok(None),
    }
}

/// Cutover, just before the target is unfenced: the source's triggers created on a
/// same-engine target and, with reverse replication, taken off the source. Idempotent: the
/// definitions are stored before anything is dropped, and a rerun reads them from there.
/// `None` when the job has nothing to do here (PostgreSQL source, or no triggers).
pub async fn at_cutover(
    spec: &JobSpec,
    main: &StateStore,
    reverse: bool,
) -> Result<Option<String>> {
    if !matches!(spec.source.engine, EngineKind::Mysql | EngineKind::Sqlite)
        || (!same_engine(spec) && !reverse)
    {
        return Ok(None);
    }
    // With reverse replication the cutover's number is recorded before this step; without,
    // this is the job's last one.
    let n = super::cutover::cutovers(main) + u32::from(!reverse);
    let triggers = match held(main, n)? {
        Some(t) => t,
        None => {
            let t = read_triggers(&spec.source, spec).await?;
            main.set_meta(&held_key(n), &serde_json::to_string(&t).unwrap_or_default())?;
            t
        }
    };
    if triggers.is_empty() {
        return Ok(None);
    }
    let mut said = Vec::new();
    if same_engine(spec) {
        let created = create_triggers(&spec.target, &triggers).await?;
        said.push(format!(
            "{} triggers on the target ({created} created now)",
            triggers.len()
        ));
    }
    if reverse {
        let dropped = drop_triggers(&spec.source, &triggers).await?;
        said.push(format!(
            "{} taken off the source while changes stream back to it ({dropped} dropped now; fallback puts them back)",
            triggers.len()
        ));
    }
    Ok(Some(said.join("; ")))
}

/// Fallback, before the source is unfenced and before the forward position is taken: the
/// held triggers back on the source, and off a same-engine target (the forward stream applies
/// to it again). Idempotent.
pub async fn at_fallback(spec: &JobSpec, main: &StateStore) -> Result<Option<String>> {
    let Some(triggers) = held(main, super::cutover::cutovers(main))? else {
        return Ok(None);
    };
    if triggers.is_empty() {
        return Ok(None);
    }
    let mut said = Vec::new();
    if same_engine(spec) {
        let dropped = drop_triggers(&spec.target, &triggers).await?;
        said.push(format!("{dropped} triggers dropped on the target"));
    }
    let created = create_triggers(&spec.source, &triggers).await?;
    said.push(format!(
        "{} triggers back on the source ({created} created now)",
        triggers.len()
    ));
    Ok(Some(said.join("; ")))
}

/// MySQL → MySQL after the data: the source database's routines, then its views (each view
/// after those it reads: created in rounds until no more can be). Idempotent (existing ones
/// are left alone). Returns what could not be created, one line per object, for warnings.
pub async fn copy_routines_and_views(spec: &JobSpec) -> Result<Vec<String>> {
    let mut source = mysql::connect(&spec.source, "views").await?;
    let mut target = mysql::connect(&spec.target, "views").await?;
    let mut problems = Vec::new();
    let routines: Vec<(String, String)> = source
        .query(
            "SELECT ROUTINE_TYPE, ROUTINE_NAME FROM information_schema.ROUTINES \
             WHERE ROUTINE_SCHEMA = DATABASE() ORDER BY 1, 2",
        )
        .await
        .map_err(|e| mysql::error("listing the routines", e))?;
    for (kind, name) in routines {
        let exists: Option<u8> = target
            .exec_first(
                "SELECT 1 FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = DATABASE() AND ROUTINE_TYPE = ? AND ROUTINE_NAME = ?",
                (kind.as_str(), name.as_str()),
            )
            .await
            .map_err(|e| mysql::error("listing the target's routines", e))?;
        if exists.is_some() {
            continue;
        }
        let lower = kind.to_ascii_lowercase();
        let row: Option<mysql_async::Row> = source
            .query_first(format!("SHOW CREATE {kind} {}", quote_ident(&name)))
            .await
            .map_err(|e| mysql::error(format!("reading {lower} {name}"), e))?;
        let Some((mode, create)) = row.and_then(|r| {
            let mode: Option<String> = r.get(1);
            let create: Option<String> = r.get(2);
            create.map(|c| (mode, c))
        }) else {
            problems.push(format!(
                "{lower} {name}: its definition cannot be read (kuaka's user needs SELECT on mysql.proc or to be its definer); create it by hand"
            ));
            continue;
        };
        if let Some(mode) = mode {
            target
                .query_drop(format!("SET SESSION sql_mode = {}", quote_literal(&mode)))
                .await
                .map_err(|e| mysql::error(format!("creating {lower} {name}"), e))?;
        }
        let sql = for_server(&mut target, &lower, &name, &create).await;
        if let Err(e) = target.query_drop(sql).await {
            problems.push(format!("{lower} {name} not created on the target: {e}"));
        }
    }
    let views: Vec<String> = source
        .query(
            "SELECT TABLE_NAME FROM information_schema.VIEWS WHERE TABLE_SCHEMA = DATABASE() ORDER BY 1",
        )
        .await
        .map_err(|e| mysql::error("listing the views", e))?;
    let mut pending = Vec::new();
    for name in views {
        let exists: Option<u8> = target
            .exec_first(
                "SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
                (name.as_str(),),
            )
            .await
            .map_err(|e| mysql::error("listing the target's views", e))?;
        if exists.is_some() {
            continue;
        }
        let row: Option<mysql_async::Row> = source
            .query_first(format!("SHOW CREATE VIEW {}", quote_ident(&name)))
            .await
            .map_err(|e| mysql::error(format!("reading view {name}"), e))?;
        match row.and_then(|r| r.get::<Option<String>, _>(1).flatten()) {
            Some(create) => pending.push((name, create)),
            None => problems.push(format!(
                "view {name}: its definition cannot be read; create it by hand"
            )),
        }
    }
    // Views read other views: create in rounds until a round makes no progress.
    loop {
        let mut failed = Vec::new();
        let before = pending.len();
        for (name, create) in pending {
            let sql = for_server(&mut target, "view", &name, &create).await;
            if let Err(e) = target.query_drop(sql).await {
                failed.push((name, create, e.to_string()));
            }
        }
        if failed.is_empty() || failed.len() == before {
            problems.extend(
                failed
                    .iter()
                    .map(|(name, _, e)| format!("view {name} not created on the target: {e}")),
            );
            break;
        }
        pending = failed.into_iter().map(|(n, c, _)| (n, c)).collect();
    }
    source.disconnect().await.ok();
    target.disconnect().await.ok();
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definer_is_found_and_removed_only_in_the_head() {
        let t = "CREATE DEFINER=`app user`@`%` TRIGGER t1 BEFORE INSERT ON t FOR EACH ROW SET NEW.v = 'DEFINER=x'";
        assert_eq!(definer(t), Some(("app user".into(), "%".into())));
        assert_eq!(
            without_definer(t),
            "CREATE TRIGGER t1 BEFORE INSERT ON t FOR EACH ROW SET NEW.v = 'DEFINER=x'"
        );
        let v = "CREATE ALGORITHM=UNDEFINED DEFINER=`root`@`localhost` SQL SECURITY DEFINER VIEW `v` AS select 1";
        assert_eq!(definer(v), Some(("root".into(), "localhost".into())));
        assert_eq!(
            without_definer(v),
            "CREATE ALGORITHM=UNDEFINED SQL SECURITY DEFINER VIEW `v` AS select 1"
        );
        let quoted = "CREATE DEFINER='o''neil'@'10.0.0.%' PROCEDURE p() SELECT 1";
        assert_eq!(definer(quoted), Some(("o'neil".into(), "10.0.0.%".into())));
        // No clause in the head: nothing to take.
        let none = "CREATE TRIGGER t2 AFTER DELETE ON t FOR EACH ROW INSERT INTO log VALUES ('DEFINER=a@b')";
        assert_eq!(definer(none), None);
        assert_eq!(without_definer(none), none);
    }

    #[test]
    fn sqlite_trigger_names() {
        assert_eq!(
            sqlite_trigger_name(
                "CREATE TRIGGER \"audit ins\" AFTER INSERT ON t BEGIN SELECT 1; END"
            ),
            "audit ins"
        );
        assert_eq!(
            sqlite_trigger_name(
                "CREATE TEMP TRIGGER IF NOT EXISTS tr AFTER INSERT ON t BEGIN SELECT 1; END"
            ),
            "tr"
        );
    }
}
