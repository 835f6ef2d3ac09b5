//! What each subcommand does, on top of the pipeline. Errors are printed here, once, as
//! `kuaka: <message>`, and mapped to exit codes.

use std::fmt::Write as _;

use tokio_util::sync::CancellationToken;

use crate::cli::{
    CleanArgs, Cli, Command, DemoArgs, EndpointArgs, PlanArgs, RunArgs, StatusArgs, SwitchArgs,
    VerifyArgs,
};
use crate::config::ConfigError;
use crate::engine::postgres::snapshot::{CopyFormat, ExportedSnapshot, plan_chunks};
use crate::engine::postgres::{self, Context, Side, catalog, ddl};
use crate::pipeline;
use crate::state::StateStore;
use crate::ui::{LogWriter, Ui, human_bytes};

pub const EXIT_OK: u8 = 0;
pub const EXIT_ERROR: u8 = 2;
pub const EXIT_INTERRUPTED: u8 = 130;

pub async fn dispatch(cli: Cli, writer: &LogWriter, cancel: &CancellationToken) -> u8 {
    let ui = Ui::new(!cli.no_progress);
    writer.attach(&ui);
    match cli.command {
        Command::Run(args) => run(&args, &ui, cancel).await,
        Command::Plan(args) => plan(&args).await,
        Command::Status(args) => status(&args),
        Command::Clean(args) => clean(&args).await,
        Command::Verify(args) => verify(&args, cancel).await,
        Command::Cutover(args) => {
            switch_over(
                &args.switch,
                "cutover",
                args.full_verify,
                args.no_reverse,
                cancel,
            )
            .await
        }
        Command::Fallback(args) => {
            switch_over(&args.switch, "fallback", args.full_verify, false, cancel).await
        }
        Command::Demo(args) => demo(&args, &ui, cancel).await,
    }
}

fn config_errors(errors: Vec<ConfigError>) -> u8 {
    for e in errors {
        eprintln!("kuaka: {e}");
    }
    EXIT_ERROR
}

async fn run(args: &RunArgs, ui: &Ui, cancel: &CancellationToken) -> u8 {
    let spec = match args.resolve() {
        Ok(s) => s,
        Err(errors) => return config_errors(errors),
    };
    tracing::info!(source = %spec.source, target = %spec.target, jobs = spec.jobs, "starting the snapshot");
    match pipeline::snapshot::run(&spec, &args.state, ui, cancel).await {
        Ok(summary) if summary.already_done => {
            eprintln!(
                "kuaka: nothing to do, this job's snapshot is complete (see kuaka status --state {})",
                args.state.display()
            );
            EXIT_OK
        }
        Ok(summary) if summary.cut_over => {
            eprintln!(
                "kuaka: this job is cut over to its target without reverse replication: nothing is left to stream (kuaka status --state {} shows the cutover; kuaka clean removes the job)",
                args.state.display()
            );
            EXIT_OK
        }
        Ok(summary) => {
            let secs = summary.copy_seconds.max(0.001);
            if let Some(stream) = &summary.mysql_stream {
                eprintln!(
                    "kuaka: snapshot: {} tables, {} rows ({} copied by this run in {:.1}s)",
                    summary.tables, summary.rows, summary.rows_this_run, summary.copy_seconds
                );
                eprintln!(
                    "kuaka: caught up: the target holds every change committed on the source up to {} ({} transactions, {} row changes applied by this run; capture started at {}, consistent from {})",
                    stream.applied, stream.transactions, stream.changes, stream.p0, stream.p1
                );
                return EXIT_OK;
            }
            if let Some(stream) = &summary.rows_stream {
                eprintln!(
                    "kuaka: snapshot: {} tables, {} rows ({} copied by this run in {:.1}s)",
                    summary.tables, summary.rows, summary.rows_this_run, summary.copy_seconds
                );
                eprintln!(
                    "kuaka: caught up: the target holds every change made on the source up to change {} ({} batches, {} row changes applied by this run; capture started at {}, consistent from {})",
                    stream.applied, stream.batches, stream.changes, stream.p0, stream.p1
                );
                return EXIT_OK;
            }
            if let Some(stream) = &summary.stream {
                if summary.tables > 0 {
                    eprintln!(
                        "kuaka: snapshot: {} tables, {} rows in {:.1}s",
                        summary.tables, summary.rows, summary.copy_seconds
                    );
                }
                eprintln!(
                    "kuaka: caught up: the target holds every change committed on the source up to {} ({} transactions, {} changes applied by this run; capture started at {}, consistent from {})",
                    stream.applied, stream.transactions, stream.changes, stream.p0, stream.p1
                );
                return EXIT_OK;
            }
            // MySQL/MariaDB and SQLite sources count rows, not bytes: say nothing rather than 0 B.
            let (bytes, bytes_this_run, bytes_per_sec) = if summary.bytes_this_run > 0 {
                (
                    format!(", {}", human_bytes(summary.bytes)),
                    format!(", {}", human_bytes(summary.bytes_this_run)),
                    format!(
                        ", {}/s",
                        human_bytes((summary.bytes_this_run as f64 / secs) as u64)
                    ),
                )
            } else {
                Default::default()
            };
            eprintln!(
                "kuaka: snapshot complete{}: {} tables, {} rows{bytes}; this run copied {} rows{bytes_this_run} in {:.1}s ({:.0} rows/s{bytes_per_sec}); total {:.1}s",
                if summary.resumed { " (resumed)" } else { "" },
                summary.tables,
                summary.rows,
                summary.rows_this_run,
                summary.copy_seconds,
                summary.rows_this_run as f64 / secs,
                summary.total_seconds
            );
            EXIT_OK
        }
        Err(pipeline::Error::Interrupted) => {
            eprintln!("kuaka: stopped; run the same command again to resume");
            EXIT_INTERRUPTED
        }
        Err(e) => {
            eprintln!("kuaka: {e}");
            EXIT_ERROR
        }
    }
}

async fn plan(args: &PlanArgs) -> u8 {
    let (source, target) = match args.endpoints.resolve() {
        Ok(e) => e,
        Err(errors) => return config_errors(errors),
    };
    let selection = match args.selection.resolve() {
        Ok(s) => s,
        Err(errors) => return config_errors(errors),
    };
    let result = async {
        let client = postgres::connect(&source, Side::Source, "plan").await?;
        let snapshot = ExportedSnapshot::export(client).await?;
        let schema = catalog::read_schema(&snapshot.client, &selection).await?;
        let mut out = String::new();
        let _ = writeln!(out, "-- kuaka plan: {source} -> {target}");
        let _ = writeln!(out, "-- {} tables", schema.tables.len());
        let _ = writeln!(out, "-- {:<40} {:>12} {:>10} {:>7} {:>7}  chunking", "table", "rows (est.)", "size", "format", "chunks");
        for t in schema.tables.iter() {
            if !t.holds_rows() {
                let _ = writeln!(out, "-- {:<40} {:>12} {:>10} {:>7} {:>7}  (partitioned: rows live in its partitions)", t.name.display_name(), "-", "-", "-", "-");
                continue;
            }
            let (chunking, ranges, rows) = plan_chunks(
                &snapshot.client,
                t,
                args.chunk_rows,
                crate::config::DEFAULT_CHUNK_BYTES,
                crate::config::DEFAULT_CHUNK_ROWS,
            )
            .await?;
            let chunking = match chunking {
                postgres::snapshot::Chunking::Whole => "whole table".to_owned(),
                postgres::snapshot::Chunking::Key { columns, .. } => format!("primary key ({})", columns.join(", ")),
                postgres::snapshot::Chunking::Pages => "page ranges (no primary key)".to_owned(),
            };
            let format = match CopyFormat::for_table(t) {
                CopyFormat::Binary => "binary",
                CopyFormat::Text => "text",
            };
            let _ = writeln!(
                out,
                "-- {:<40} {:>12} {:>10} {:>7} {:>7}  {chunking}",
                t.name.display_name(),
                rows,
                human_bytes(t.estimated_bytes.max(0) as u64),
                format,
                ranges.len()
            );
        }
        for note in &schema.skipped {
            let _ = writeln!(out, "-- note: {note}");
        }
        let _ = writeln!(out, "\n-- target schema, before the data");
        for step in ddl::pre_data(&schema) {
            let _ = writeln!(out, "{};", step.sql);
        }
        let _ = writeln!(out, "\n-- target schema, after the data");
        for phase in ddl::post_data(&schema) {
            for step in phase.steps {
                let _ = writeln!(out, "{};", step.sql);
            }
        }
        let _ = snapshot.client.batch_execute("COMMIT").await;
        // Read-only look at the target: does it already hold any of these tables?
        match postgres::connect(&target, Side::Target, "plan").await {
            Ok(t) => {
                let names: Vec<String> = schema.tables.iter().map(|t| t.name.to_string()).collect();
                let rows = t
                    .query(
                        &format!(
                            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
                             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {} = ANY($1)",
                            catalog::QUOTED_RELATION
                        ),
                        &[&names],
                    )
                    .await
                    .ctx(|| "looking for existing tables on the target".into())?;
                if !rows.is_empty() {
                    let list: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
                    let _ = writeln!(out, "\n-- warning: the target already has {}: a run needs --target-exists", list.join(", "));
                }
            }
            Err(e) => {
                let _ = writeln!(out, "\n-- warning: target not checked: {e}");
            }
        }
        Ok::<_, postgres::Error>(out)
    }
    .await;
    match result {
        Ok(out) => {
            print!("{out}");
            EXIT_OK
        }
        Err(e) => {
            eprintln!("kuaka: {e}");
            EXIT_ERROR
        }
    }
}

fn status(args: &StatusArgs) -> u8 {
    let store = match StateStore::open_for_reading(&args.state) {
        Ok(Some(s)) => s,
        Ok(None) => {
            eprintln!(
                "kuaka: no job in {} (no state.db); start one with kuaka run --state {}",
                args.state.display(),
                args.state.display()
            );
            return EXIT_ERROR;
        }
        Err(e) => {
            eprintln!("kuaka: {e}");
            return EXIT_ERROR;
        }
    };
    let result = (|| {
        let job = store.job()?;
        let tables = store.tables()?;
        let positions = store.positions()?;
        let post_done = store.steps_done("post_data")?;
        let runs = store.run_count()?;
        let counts: std::collections::BTreeMap<String, postgres::apply::TableCounts> = store
            .meta("apply_counts")?
            .and_then(|j| serde_json::from_str(&j).ok())
            .unwrap_or_default();
        let slot = store.meta("slot")?;
        Ok::<_, crate::state::StateError>((job, tables, positions, post_done, runs, counts, slot))
    })();
    let (job, tables, positions, post_done, runs, counts, slot) = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kuaka: {e}");
            return EXIT_ERROR;
        }
    };
    let Some(job) = job else {
        eprintln!(
            "kuaka: the state store in {} holds no job yet",
            args.state.display()
        );
        return EXIT_ERROR;
    };
    let rows_total: i64 = tables.iter().map(|t| t.rows_copied).sum();
    let direction = pipeline::cutover::direction(&store).unwrap_or_else(|_| "forward".into());
    let kept_back: std::collections::BTreeMap<String, u64> = store
        .meta("newer_wins_kept_back")
        .ok()
        .flatten()
        .and_then(|j| serde_json::from_str(&j).ok())
        .unwrap_or_default();
    let switch = pipeline::cutover::read_progress(&args.state);
    // After a cutover the reverse leg keeps its own positions.
    let reverse_positions = if direction == "reverse" {
        Some(pipeline::cutover::cutovers(&store))
            .filter(|n| *n > 0)
            .and_then(|n| {
                StateStore::open_for_reading(&pipeline::cutover::reverse_dir(&args.state, n))
                    .ok()
                    .flatten()
            })
            .and_then(|s| s.positions().ok())
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let last_verification: Option<serde_json::Value> =
        std::fs::read_to_string(args.state.join(crate::verify::SUMMARY_FILE))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
    // The local change log (PostgreSQL WAL or the MySQL binlog spool) not yet applied.
    let log_dir = pipeline::cdc::log_dir(&args.state);
    let log_segments = crate::changelog::segments(&log_dir)
        .map(|s| s.len())
        .unwrap_or(0);
    let log_bytes = crate::changelog::ChangeLog::disk_bytes(&log_dir);
    if args.json {
        let value = serde_json::json!({
            "job_id": job.job_id,
            "change_log": {"segments": log_segments, "bytes": log_bytes},
            "source": job.source,
            "target": job.target,
            "phase": job.phase,
            "created_at": job.created_at,
            "updated_at": job.updated_at,
            "last_error": job.last_error,
            "runs": runs,
            "rows_copied": rows_total,
            "post_data_steps_done": post_done,
            "positions": positions.iter().map(|(n, v, at)| serde_json::json!({"name": n, "value": v, "recorded_at": at})).collect::<Vec<_>>(),
            "replication_slot": slot,
            "direction": direction,
            "newer_wins_kept_back": kept_back,
            "last_switch": switch,
            "reverse_positions": reverse_positions.iter().map(|(n, v, at)| serde_json::json!({"name": n, "value": v, "recorded_at": at})).collect::<Vec<_>>(),
            "last_verification": last_verification,
            "applied_changes_by_table": counts,
            "tables": tables.iter().map(|t| serde_json::json!({
                "schema": t.schema,
                "table": t.name,
                "state": t.state,
                "rows_estimated": t.rows_estimated,
                "rows_copied": t.rows_copied,
                "bytes_copied": t.bytes_copied,
                "chunks_done": t.chunks_done,
                "chunks_total": t.chunks_total,
                "copy_format": serde_json::from_str::<serde_json::Value>(&t.copy_format).unwrap_or_default(),
                "last_error": t.last_error,
            })).collect::<Vec<_>>(),
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
        return EXIT_OK;
    }
    println!("job {}: {} -> {}", job.job_id, job.source, job.target);
    println!(
        "phase: {}   (started {}, updated {}, {} runs)",
        describe_phase(&job.phase),
        job.created_at,
        job.updated_at,
        runs
    );
    if let Some(e) = &job.last_error
        && job.phase != "done"
    {
        println!("last error: {e}");
    }
    for (name, value, at) in &positions {
        println!("position {name}: {value} (recorded {at})");
    }
    if log_segments > 0 {
        println!(
            "change log: {} in {log_segments} segment{} ({})",
            crate::ui::human_bytes(log_bytes),
            if log_segments == 1 { "" } else { "s" },
            log_dir.display()
        );
    }
    match direction.as_str() {
        "reverse" => println!(
            "direction: reverse (cut over: the target's changes stream back to the source)"
        ),
        "none" => println!("direction: none (cut over without reverse replication)"),
        _ => {}
    }
    for (name, value, _) in &reverse_positions {
        println!("reverse position {name}: {value}");
    }
    for (table, n) in &kept_back {
        println!("newer wins: {n} changes to {table} not applied (the target's row was newer)");
    }
    if let Some(p) = &switch {
        println!(
            "last {}: {}{}{}",
            p.action,
            p.state,
            p.window_seconds
                .map(|w| format!(", write-unavailability window {w:.3} s"))
                .unwrap_or_default(),
            p.error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
        for (i, step) in p.steps.iter().enumerate() {
            println!(
                "  {}. {} ({:.3} s): {}",
                i + 1,
                step.name,
                step.seconds,
                step.detail
            );
        }
    }
    if let Some(v) = last_verification.as_ref().filter(|v| v["running"] == true) {
        println!(
            "verification running (or interrupted) since {}: {}/{} parts, {} rows compared",
            v["started_at"].as_str().unwrap_or("?"),
            v["parts_done"],
            v["parts"],
            v["rows"]
        );
    } else if let Some(v) = &last_verification {
        println!(
            "last verification ({}, {}): {} — {} tables, {} rows, {} differing rows in {} tables, {} transient, {} repaired, {:.1} s",
            v["mode"].as_str().unwrap_or("?"),
            v["finished_at"].as_str().unwrap_or("?"),
            if v["equal"] == true {
                "equal"
            } else {
                "DIFFERENT"
            },
            v["tables"],
            v["rows"],
            v["differences"],
            v["tables_different"],
            v["transient"],
            v["repaired"],
            v["seconds"].as_f64().unwrap_or(0.0)
        );
    }
    if !tables.is_empty() {
        println!(
            "{:<40} {:<9} {:>12} {:>12} {:>10} {:>9}",
            "table", "state", "rows", "estimated", "size", "chunks"
        );
        for t in &tables {
            println!(
                "{:<40} {:<9} {:>12} {:>12} {:>10} {:>4}/{:<4}",
                format!("{}.{}", t.schema, t.name),
                t.state,
                t.rows_copied,
                t.rows_estimated,
                human_bytes(t.bytes_copied.max(0) as u64),
                t.chunks_done,
                t.chunks_total
            );
            if let Some(e) = &t.last_error {
                println!("    error: {e}");
            }
        }
        println!("total rows copied: {rows_total}; post-data steps done: {post_done}");
    }
    if let Some(slot) = &slot {
        println!("change capture: replication slot {slot} on the source");
        let value = |name: &str| {
            positions
                .iter()
                .find(|(n, _, _)| n == name)
                .map(|(_, v, _)| v.as_str())
                .unwrap_or("-")
        };
        println!(
            "  captured {}  applied {}  source now {}  lag {} bytes, {} s",
            value("captured"),
            value("applied"),
            value("source_current"),
            value("lag_bytes"),
            value("lag_seconds")
        );
        if !counts.is_empty() {
            println!(
                "{:<40} {:>12} {:>12} {:>12} {:>9}",
                "table (changes applied)", "upserts", "updates", "deletes", "truncates"
            );
            for (t, c) in &counts {
                println!(
                    "{:<40} {:>12} {:>12} {:>12} {:>9}",
                    t, c.upserts, c.updates, c.deletes, c.truncates
                );
            }
        }
    }
    EXIT_OK
}

fn describe_phase(phase: &str) -> &str {
    match phase {
        "planned" => "planned (schema being created)",
        "copying" => "copying data",
        "done" => "snapshot complete",
        "snapshot" => "snapshot (changes are captured meanwhile)",
        "catching_up" => "catching up (the target is not consistent until apply passes P1)",
        "streaming" => "streaming (the target is consistent and follows the source)",
        other => other,
    }
}

async fn clean(args: &CleanArgs) -> u8 {
    let store = match StateStore::open_locked(&args.state) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kuaka: {e}");
            return EXIT_ERROR;
        }
    };
    let job = match store.job() {
        Ok(Some(j)) => j,
        Ok(None) => {
            eprintln!("kuaka: no job in {}", args.state.display());
            return EXIT_ERROR;
        }
        Err(e) => {
            eprintln!("kuaka: {e}");
            return EXIT_ERROR;
        }
    };
    let (source, target) = match args.endpoints(&job.source, &job.target) {
        Ok(e) => e,
        Err(errors) => return config_errors(errors),
    };
    let slot = store.meta("slot").ok().flatten();
    let publication = store.meta("publication").ok().flatten();
    if source.engine == crate::config::EngineKind::Sqlite {
        let result = tokio::task::block_in_place(|| {
            let removed = pipeline::rows::clean_source(&source.database)?;
            pipeline::rows::clean_target(&target, &job.job_id)?;
            Ok::<_, pipeline::Error>(removed)
        });
        match result {
            Ok(n) => eprintln!(
                "kuaka: removed {n} capture triggers and the change table _kuaka_changes from {source}"
            ),
            Err(e) => {
                eprintln!("kuaka: {e}");
                return EXIT_ERROR;
            }
        }
    }
    if source.engine != crate::config::EngineKind::Sqlite
        && target.engine == crate::config::EngineKind::Sqlite
        && let Err(e) =
            tokio::task::block_in_place(|| pipeline::rows::clean_target(&target, &job.job_id))
    {
        eprintln!("kuaka: {e}");
        return EXIT_ERROR;
    }
    if target.engine == crate::config::EngineKind::Mysql {
        // kuaka's bookkeeping on a MySQL/MariaDB target lives in its `kuaka` database.
        let result = async {
            use mysql_async::prelude::Queryable;
            let mut conn = crate::engine::mysql::connect(&target, "clean").await?;
            // Reverse legs of cutovers wrote their positions into the source's kuaka database.
            if source.engine == crate::config::EngineKind::Mysql {
                let mut on_source = crate::engine::mysql::connect(&source, "clean").await?;
                for n in 1..=pipeline::cutover::cutovers(&store) {
                    let id = pipeline::cutover::reverse_job_id(&job.job_id, n);
                    on_source
                        .exec_drop(
                            "DELETE FROM kuaka.apply_position WHERE job_id = ?",
                            (id.as_str(),),
                        )
                        .await
                        .or_else(|e| match &e {
                            // No bookkeeping there: nothing to remove.
                            mysql_async::Error::Server(s) if s.code == 1146 || s.code == 1049 => {
                                Ok(())
                            }
                            _ => Err(crate::engine::mysql::error(
                                format!("removing the reverse position {id} from the source"),
                                e,
                            )),
                        })?;
                }
                on_source.disconnect().await.ok();
            }
            for table in [
                "kuaka.apply_position",
                "kuaka.row_copied",
                "kuaka.added_column",
            ] {
                conn.exec_drop(
                    format!("DELETE FROM {table} WHERE job_id = ?"),
                    (job.job_id.as_str(),),
                )
                .await
                .or_else(|e| match &e {
                    // No bookkeeping yet: nothing to remove.
                    mysql_async::Error::Server(s) if s.code == 1146 || s.code == 1049 => Ok(()),
                    _ => Err(crate::engine::mysql::error(
                        format!("removing the job's rows from {table}"),
                        e,
                    )),
                })?;
            }
            conn.disconnect().await.ok();
            Ok::<_, crate::engine::mysql::Error>(())
        }
        .await;
        if let Err(e) = result {
            eprintln!("kuaka: {e}");
            return EXIT_ERROR;
        }
    }
    let result = async {
        if source.engine == crate::config::EngineKind::Postgres
            && (slot.is_some() || publication.is_some())
        {
            let client = postgres::connect(&source, Side::Source, "clean").await?;
            let done = postgres::capture::drop_slot_and_publication(
                &client,
                slot.as_deref().unwrap_or(""),
                publication.as_deref().unwrap_or(""),
            )
            .await?;
            for d in done {
                eprintln!("kuaka: {d} on {source}");
            }
        }
        if target.engine != crate::config::EngineKind::Postgres {
            return Ok(());
        }
        let client = postgres::connect(&target, Side::Target, "clean").await?;
        // Reverse legs of cutovers: their slots on the target, positions and origins on the
        // source.
        let cutovers = pipeline::cutover::cutovers(&store);
        if cutovers > 0 && source.engine == crate::config::EngineKind::Mysql {
            // The reverse legs wrote their positions into the MySQL source's kuaka database
            // (removed above with the job's own rows when the target is MySQL; here the
            // target is PostgreSQL).
            let ids: Vec<String> = (1..=cutovers)
                .map(|n| pipeline::cutover::reverse_job_id(&job.job_id, n))
                .collect();
            for id in &ids {
                let done = postgres::capture::drop_slot_and_publication(
                    &client,
                    &postgres::capture::slot_name(id),
                    &postgres::capture::publication_name(id),
                )
                .await?;
                for d in done {
                    eprintln!("kuaka: {d} on {target}");
                }
            }
            use mysql_async::prelude::Queryable;
            match crate::engine::mysql::connect(&source, "clean").await {
                Ok(mut conn) => {
                    for id in &ids {
                        if let Err(e) = conn
                            .exec_drop(
                                "DELETE FROM kuaka.apply_position WHERE job_id = ?",
                                (id.as_str(),),
                            )
                            .await
                        {
                            eprintln!("kuaka: removing the reverse position {id} from the source: {e}");
                        }
                    }
                    conn.disconnect().await.ok();
                }
                Err(e) => eprintln!("kuaka: the reverse positions stay on the source: {e}"),
            }
        } else if cutovers > 0 {
            let source_client = postgres::connect(&source, Side::Source, "clean").await?;
            for n in 1..=cutovers {
                let id = pipeline::cutover::reverse_job_id(&job.job_id, n);
                let done = postgres::capture::drop_slot_and_publication(
                    &client,
                    &postgres::capture::slot_name(&id),
                    &postgres::capture::publication_name(&id),
                )
                .await?;
                for d in done {
                    eprintln!("kuaka: {d} on {target}");
                }
                source_client
                    .execute(
                        "DELETE FROM kuaka.apply_position WHERE job_id = $1",
                        &[&id],
                    )
                    .await
                    .ok();
            }
            source_client
                .execute(
                    "SELECT pg_catalog.pg_replication_origin_drop(roname) FROM pg_catalog.pg_replication_origin WHERE starts_with(roname, $1)",
                    &[&pipeline::cutover::origin_prefix(&job.job_id)],
                )
                .await
                .ctx(|| "dropping the job's replication origins on the source".into())?;
        }
        let removed = client
            .query_one(
                "SELECT (SELECT count(*) FROM pg_tables WHERE schemaname = 'kuaka' AND tablename = 'apply_position')::int",
                &[],
            )
            .await
            .ctx(|| "looking for kuaka's bookkeeping on the target".into())?;
        if removed.get::<_, i32>(0) > 0 {
            client
                .execute("DELETE FROM kuaka.apply_position WHERE job_id = $1", &[&job.job_id])
                .await
                .ctx(|| "removing the job's positions from kuaka.apply_position".into())?;
        }
        client
            .batch_execute(&format!(
                "DELETE FROM kuaka.snapshot_chunks WHERE job_id = {0}; DELETE FROM kuaka.jobs WHERE job_id = {0}",
                crate::model::schema::quote_literal(&job.job_id)
            ))
            .await
            .ok();
        client
            .batch_execute(&format!(
                "DELETE FROM kuaka.row_position WHERE job_id = {0}; DELETE FROM kuaka.row_copied WHERE job_id = {0}",
                crate::model::schema::quote_literal(&job.job_id)
            ))
            .await
            .ok();
        Ok::<_, postgres::Error>(())
    }
    .await;
    if let Err(e) = result {
        eprintln!("kuaka: {e}");
        return EXIT_ERROR;
    }
    if args.keep_state {
        let _ = store.set_phase("cleaned");
        eprintln!(
            "kuaka: job {} cleaned; state kept in {}",
            job.job_id,
            args.state.display()
        );
        return EXIT_OK;
    }
    let legs = pipeline::cutover::cutovers(&store);
    drop(store);
    let dir = &args.state;
    let _ = std::fs::remove_dir_all(pipeline::cdc::log_dir(dir));
    for n in 1..=legs {
        let _ = std::fs::remove_dir_all(pipeline::cutover::reverse_dir(dir, n));
    }
    for f in [
        "state.db",
        "state.db-wal",
        "state.db-shm",
        "lock",
        crate::verify::SUMMARY_FILE,
        pipeline::cutover::PROGRESS_FILE,
        pipeline::cutover::REQUEST_FILE,
    ] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let _ = std::fs::remove_dir(dir);
    eprintln!("kuaka: job {} removed", job.job_id);
    EXIT_OK
}

/// `kuaka verify`: 0 when source and target are equal, 1 when they differ, 2 on error.
async fn verify(args: &VerifyArgs, cancel: &CancellationToken) -> u8 {
    let stored = match &args.state {
        Some(dir) => match StateStore::open_for_reading(dir) {
            Ok(Some(store)) => match store.job() {
                Ok(Some(job)) => Some((job.source, job.target)),
                Ok(None) => None,
                Err(e) => {
                    eprintln!("kuaka: {e}");
                    return EXIT_ERROR;
                }
            },
            Ok(None) => {
                eprintln!("kuaka: no job in {} (no state.db)", dir.display());
                return EXIT_ERROR;
            }
            Err(e) => {
                eprintln!("kuaka: {e}");
                return EXIT_ERROR;
            }
        },
        None => None,
    };
    let pick = |given: &Option<String>, stored: Option<&String>, flag: &str| {
        given
            .clone()
            .or_else(|| stored.cloned())
            .ok_or_else(|| format!("kuaka: verify needs {flag} (or --state of a job that has one)"))
    };
    let (source, target) = match (
        pick(&args.source, stored.as_ref().map(|s| &s.0), "--source"),
        pick(&args.target, stored.as_ref().map(|s| &s.1), "--target"),
    ) {
        (Ok(s), Ok(t)) => (s, t),
        (s, t) => {
            for e in [s.err(), t.err()].into_iter().flatten() {
                eprintln!("{e}");
            }
            return EXIT_ERROR;
        }
    };
    let endpoints = EndpointArgs {
        source,
        target,
        source_password_env: args.source_password_env.clone(),
        target_password_env: args.target_password_env.clone(),
    }
    .resolve();
    let (source, target) = match endpoints {
        Ok(e) => e,
        Err(errors) => return config_errors(errors),
    };
    let selection = match args.selection.resolve() {
        Ok(s) => s,
        Err(errors) => return config_errors(errors),
    };
    if args.chunk_rows == 0 {
        eprintln!("kuaka: --chunk-rows must be at least 1");
        return EXIT_ERROR;
    }
    let options = crate::verify::Options {
        source,
        target,
        selection,
        quick: args.quick,
        show_values: args.show_values,
        server_digests: args.server_digests,
        rechecks: args
            .rechecks
            .unwrap_or(if args.state.is_some() { 3 } else { 0 }),
        repair: args.repair,
        chunk_rows: args.chunk_rows,
        jobs: args.jobs,
        state: args.state.clone(),
        follow_job: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
    };
    let result = tokio::select! {
        r = crate::verify::run(&options) => r,
        _ = cancel.cancelled() => return EXIT_INTERRUPTED,
    };
    match result {
        Ok(report) => {
            if let Some(dir) = &args.state {
                let path = dir.join(crate::verify::SUMMARY_FILE);
                let text = crate::verify::summary(&report, args.quick).to_string();
                if let Err(e) = std::fs::write(&path, text) {
                    eprintln!("kuaka: warning: could not write {}: {e}", path.display());
                }
            }
            if args.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(j) => println!("{j}"),
                    Err(e) => {
                        eprintln!("kuaka: writing the report: {e}");
                        return EXIT_ERROR;
                    }
                }
            } else {
                print!("{}", crate::verify::render(&report));
            }
            if report.equal { EXIT_OK } else { 1 }
        }
        Err(e) => {
            eprintln!("kuaka: verify: {e}");
            EXIT_ERROR
        }
    }
}

/// `kuaka demo`: the whole product on embedded defaults, with no server.
async fn demo(args: &DemoArgs, ui: &Ui, cancel: &CancellationToken) -> u8 {
    match demo_inner(args, ui, cancel).await {
        Ok(true) => EXIT_OK,
        Ok(false) => 1,
        Err(pipeline::Error::Interrupted) => EXIT_INTERRUPTED,
        Err(e) => {
            eprintln!("kuaka: demo: {e}");
            EXIT_ERROR
        }
    }
}

/// Ask the demo's running job for a cutover or fallback and wait until it is done.
async fn demo_switch(
    state: &std::path::Path,
    action: &str,
) -> Result<pipeline::cutover::Progress, pipeline::Error> {
    use pipeline::cutover;
    let id = format!("demo-{action}-{}", cutover::unix_ms());
    let request = cutover::Request {
        id: id.clone(),
        action: action.to_owned(),
        max_lag_seconds: 10.0,
        app_roles: Vec::new(),
        full_verify: false,
        no_reverse: false,
        drain_timeout_seconds: 30.0,
    };
    cutover::write_request(state, &request)
        .map_err(|e| pipeline::Error::Definite(format!("asking for the {action}: {e}")))?;
    let started = std::time::Instant::now();
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        if let Some(p) = cutover::read_progress(state).filter(|p| p.request_id == id) {
            match p.state.as_str() {
                "done" => return Ok(p),
                "failed" => {
                    return Err(pipeline::Error::Definite(format!(
                        "the {action} failed: {}",
                        p.error.as_deref().unwrap_or("unknown error")
                    )));
                }
                _ => {}
            }
        }
        if started.elapsed() > std::time::Duration::from_secs(120) {
            return Err(pipeline::Error::Definite(format!(
                "the {action} did not finish within 120 s"
            )));
        }
    }
}

/// A switch's steps with their durations, for one line.
fn demo_steps(p: &pipeline::cutover::Progress) -> String {
    p.steps
        .iter()
        .map(|s| format!("{} {:.3}s", s.name, s.seconds))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn demo_inner(
    args: &DemoArgs,
    ui: &Ui,
    cancel: &CancellationToken,
) -> Result<bool, pipeline::Error> {
    use crate::config::{Endpoint, JobSpec, Until};
    use crate::demo_data::{ShopWriter, create_shop};
    use pipeline::Error;
    let started = std::time::Instant::now();
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!(
            "kuaka-demo-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        )),
    };
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::Definite(format!("creating {}: {e}", dir.display())))?;
    let source_path = dir.join("shop.db");
    let target_path = dir.join("shop-copy.db");
    let state = dir.join("state");
    for p in [&target_path, &state] {
        let _ = std::fs::remove_dir_all(p);
        let _ = std::fs::remove_file(p);
    }
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", target_path.display()));
    }
    eprintln!("kuaka demo: working in {}", dir.display());
    let t = std::time::Instant::now();
    let counts = tokio::task::block_in_place(|| create_shop(&source_path, args.scale.max(1)))
        .map_err(|e| Error::Definite(format!("creating the demo shop: {e}")))?;
    let source_rows = counts.customers + counts.products + counts.orders + counts.order_lines;
    eprintln!(
        "kuaka demo: 1/7 created the source shop.db: {} customers, {} products, {} orders, {} order lines ({source_rows} rows) in {:.1}s",
        counts.customers,
        counts.products,
        counts.orders,
        counts.order_lines,
        t.elapsed().as_secs_f64()
    );
    let endpoint = |p: &std::path::Path, field: &str| {
        Endpoint::parse(field, &format!("sqlite://{}", p.display()))
            .map_err(|e| Error::Definite(e.to_string()))
    };
    let spec = JobSpec {
        source: endpoint(&source_path, "source")?,
        target: endpoint(&target_path, "target")?,
        selection: Default::default(),
        snapshot_only: false,
        jobs: 1,
        chunk_rows: None,
        max_rows_per_sec: None,
        target_exists: crate::config::TargetExists::Error,
        index_memory: crate::config::DEFAULT_INDEX_MEMORY.to_owned(),
        apply_mode: Default::default(),
        apply_workers: 1,
        newer_wins: None,
        column_types: Vec::new(),
        until: None,
    };
    let writer = ShopWriter::start_pair([source_path.clone(), target_path.clone()], 7);
    eprintln!(
        "kuaka demo: 2/7 a writer keeps placing, paying, shipping and cancelling orders on the source"
    );
    // The first run copies and then follows the source until we stop it.
    let stop = cancel.child_token();
    let job = pipeline::snapshot::run(&spec, &state, ui, &stop);
    tokio::pin!(job);
    let t = std::time::Instant::now();
    let mut max_lag: i64 = 0;
    let mut copied_at: Option<std::time::Duration> = None;
    let monitor = async {
        let mut last_report = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_secs(300) && !cancel.is_cancelled() {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let Ok(Some(store)) = StateStore::open_for_reading(&state) else {
                continue;
            };
            let phase = store
                .job()
                .ok()
                .flatten()
                .map(|j| j.phase)
                .unwrap_or_default();
            let lag: i64 = store
                .positions()
                .unwrap_or_default()
                .iter()
                .find(|(n, _, _)| n == "lag_changes")
                .and_then(|(_, v, _)| v.parse().ok())
                .unwrap_or(0);
            if phase == "streaming" && copied_at.is_none() {
                copied_at = Some(t.elapsed());
                eprintln!(
                    "kuaka demo: 3/7 snapshot copied and consistent after {:.1}s; now streaming the writer's changes for {}s",
                    t.elapsed().as_secs_f64(),
                    args.seconds
                );
            }
            if let Some(at) = copied_at {
                max_lag = max_lag.max(lag);
                if last_report.elapsed() >= std::time::Duration::from_secs(1) {
                    last_report = std::time::Instant::now();
                    eprintln!(
                        "kuaka demo:     writer {} transactions so far, apply lag {lag} changes",
                        writer.transactions()
                    );
                }
                if t.elapsed() - at >= std::time::Duration::from_secs(args.seconds) {
                    break;
                }
            }
        }
        if copied_at.is_none() || cancel.is_cancelled() {
            return Ok((None, None));
        }
        // The application moves to the copy, and back.
        writer.prefer(1);
        let cut = demo_switch(&state, "cutover").await?;
        eprintln!(
            "kuaka demo: 4/7 cutover: the writer now writes to shop-copy.db and its changes stream back to shop.db; it could not write for {:.3}s ({})",
            cut.window_seconds.unwrap_or(0.0),
            demo_steps(&cut)
        );
        let on_target = writer.transactions();
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        eprintln!(
            "kuaka demo:     writer {} transactions on shop-copy.db so far",
            writer.transactions() - on_target
        );
        writer.prefer(0);
        let back = demo_switch(&state, "fallback").await?;
        eprintln!(
            "kuaka demo: 5/7 fallback: the writer is back on shop.db and the copy follows it again; it could not write for {:.3}s",
            back.window_seconds.unwrap_or(0.0)
        );
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        Ok::<_, Error>((Some(cut), Some(back)))
    };
    let mut switches = (None, None);
    let early = tokio::select! {
        r = &mut job => Some(r),
        m = monitor => match m {
            Ok(s) => {
                switches = s;
                None
            }
            Err(e) => Some(Err(e)),
        },
    };
    let writes = writer.stop();
    stop.cancel();
    let result = match early {
        Some(r) => r,
        None => job.await,
    };
    match result {
        Ok(_) | Err(Error::Interrupted) => {}
        Err(e) => return Err(e),
    }
    if cancel.is_cancelled() {
        return Err(Error::Interrupted);
    }
    if let Some(e) = &writes.error {
        return Err(Error::Definite(format!("the demo writer failed: {e}")));
    }
    eprintln!(
        "kuaka demo: 6/7 writer stopped after {} transactions ({} inserts, {} updates, {} deletes); catching up",
        writes.transactions, writes.inserts, writes.updates, writes.deletes
    );
    // The same job again, now until caught up: it resumes from its state.
    let mut spec = spec.clone();
    spec.until = Some(Until::CaughtUp);
    let t2 = std::time::Instant::now();
    let summary = pipeline::snapshot::run(&spec, &state, ui, cancel).await?;
    let stream = summary.rows_stream.unwrap_or_default();
    let catch_up = t2.elapsed().as_secs_f64();
    // kuaka verify, as a user would run it: every row of every table, by value and storage
    // class.
    let verification = crate::verify::run(&crate::verify::Options::once(
        spec.source.clone(),
        spec.target.clone(),
        crate::config::Selection::default(),
        false,
    ))
    .await?;
    let _ = std::fs::write(
        state.join(crate::verify::SUMMARY_FILE),
        crate::verify::summary(&verification, false).to_string(),
    );
    let equal = verification.equal;
    let report: Vec<String> = verification
        .tables
        .iter()
        .map(|t| {
            format!(
                "{}: {} rows {}",
                t.source.trim_start_matches("main."),
                t.target_rows,
                if t.equal() { "equal" } else { "DIFFERENT" }
            )
        })
        .collect();
    let total = started.elapsed().as_secs_f64();
    let copy = copied_at
        .map(|d| d.as_secs_f64())
        .unwrap_or(summary.copy_seconds);
    eprintln!("kuaka demo: 7/7 verified: {}", report.join(", "));
    println!();
    println!("  kuaka demo summary");
    println!("  source        {}", source_path.display());
    println!("  target        {}", target_path.display());
    println!(
        "  snapshot      {source_rows} rows copied and consistent in {copy:.1}s ({:.0} rows/s)",
        source_rows as f64 / copy.max(0.001)
    );
    println!(
        "  live changes  {} writer transactions, applied with at most {max_lag} changes of lag; caught up {:.2}s after the writer stopped",
        writes.transactions, catch_up
    );
    if let (Some(cut), Some(back)) = &switches {
        println!(
            "  cutover       writes unavailable for {:.3}s; the writer made {} transactions on the copy, streamed back to the source",
            cut.window_seconds.unwrap_or(0.0),
            writes.on_second
        );
        println!(
            "  fallback      writes unavailable for {:.3}s; the source is written again and the copy follows",
            back.window_seconds.unwrap_or(0.0)
        );
    }
    println!(
        "  positions     capture started at change {}, applied through change {}",
        stream.p0, stream.applied
    );
    println!(
        "  verification  {}",
        if equal {
            "source and target are equal (kuaka verify: every row, by value and storage class)"
        } else {
            "DIFFERENCES FOUND"
        }
    );
    println!("  total         {total:.1}s");
    println!(
        "  look inside   sqlite3 {} / kuaka status --state {}",
        target_path.display(),
        state.display()
    );
    Ok(equal)
}

/// `kuaka cutover` / `kuaka fallback`: hand the request to the job's running `kuaka run` and
/// follow its steps.
async fn switch_over(
    args: &SwitchArgs,
    action: &str,
    full_verify: bool,
    no_reverse: bool,
    cancel: &CancellationToken,
) -> u8 {
    use pipeline::cutover;
    let state = &args.state;
    let store = match StateStore::open_for_reading(state) {
        Ok(Some(s)) => s,
        Ok(None) => {
            eprintln!("kuaka: no job in {} (no state.db)", state.display());
            return EXIT_ERROR;
        }
        Err(e) => {
            eprintln!("kuaka: {e}");
            return EXIT_ERROR;
        }
    };
    let checked = (|| {
        let job = store
            .job()?
            .ok_or_else(|| pipeline::Error::Definite(format!("no job in {}", state.display())))?;
        let spec: crate::config::JobSpec = serde_json::from_str(&job.spec).map_err(|e| {
            pipeline::Error::Definite(format!("unreadable job in the state store: {e}"))
        })?;
        let direction = cutover::direction(&store)?;
        Ok::<_, pipeline::Error>((spec, direction))
    })();
    let (spec, direction) = match checked {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kuaka: {e}");
            return EXIT_ERROR;
        }
    };
    drop(store);
    use crate::config::EngineKind;
    match (spec.source.engine, spec.target.engine) {
        (EngineKind::Postgres, EngineKind::Postgres) => {}
        (EngineKind::Mysql, EngineKind::Postgres) | (EngineKind::Sqlite, EngineKind::Sqlite) => {}
        (EngineKind::Mysql, EngineKind::Mysql) => {
            if spec.source.host_port() == spec.target.host_port() {
                eprintln!(
                    "kuaka: the source and the target are databases of one server ({}): its fence, read_only, would hold the application off both",
                    spec.source.host_port()
                );
                return EXIT_ERROR;
            }
        }
        _ => {
            eprintln!(
                "kuaka: {action} is implemented for PostgreSQL → PostgreSQL, MySQL/MariaDB → PostgreSQL or MySQL/MariaDB, and SQLite → SQLite jobs; this job moves {} to {}",
                spec.source.redacted(),
                spec.target.redacted()
            );
            return EXIT_ERROR;
        }
    }
    if spec.snapshot_only {
        eprintln!("kuaka: this job copies a snapshot only: there is no stream to cut over");
        return EXIT_ERROR;
    }
    let last = cutover::read_progress(state);
    let already = match action {
        "cutover" => direction != "forward",
        _ => direction == "forward",
    };
    if already {
        let done_before = last
            .as_ref()
            .is_some_and(|p| p.action == action && p.state == "done");
        if done_before || (action == "cutover") {
            eprintln!(
                "kuaka: nothing to do: the job is already {} (see kuaka status --state {})",
                if action == "cutover" {
                    "cut over"
                } else {
                    "streaming forward"
                },
                state.display()
            );
            return EXIT_OK;
        }
        eprintln!(
            "kuaka: the job streams forward (it was never cut over): there is nothing to fall back from"
        );
        return EXIT_ERROR;
    }
    if action == "fallback" && direction == "none" {
        eprintln!(
            "kuaka: this job was cut over with --no-reverse: there is no reverse stream to fall back with"
        );
        return EXIT_ERROR;
    }
    if !args.max_lag.is_finite() || args.max_lag < 0.0 {
        eprintln!(
            "kuaka: --max-lag must be a number of seconds ≥ 0 (got {})",
            args.max_lag
        );
        return EXIT_ERROR;
    }
    if !crate::state::is_locked(state) {
        eprintln!(
            "kuaka: no `kuaka run` is running on {}: start it again (with the same arguments); the running job performs the {action}",
            state.display()
        );
        return EXIT_ERROR;
    }
    let id = format!(
        "{action}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    );
    let request = cutover::Request {
        id: id.clone(),
        action: action.to_owned(),
        max_lag_seconds: args.max_lag,
        app_roles: args.app_roles.clone(),
        full_verify,
        no_reverse,
        drain_timeout_seconds: args.drain_timeout,
    };
    if let Err(e) = cutover::write_request(state, &request) {
        eprintln!("kuaka: writing the request into {}: {e}", state.display());
        return EXIT_ERROR;
    }
    eprintln!("kuaka: {action} requested; the running job performs it");
    let started = std::time::Instant::now();
    let mut shown = 0;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(50));
    let mut last_alive_check = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                cutover::remove_request(state, &id);
                eprintln!("kuaka: interrupted; if the job had begun the {action} it goes on (see kuaka status)");
                return EXIT_INTERRUPTED;
            }
            _ = tick.tick() => {}
        }
        if let Some(p) = cutover::read_progress(state).filter(|p| p.request_id == id) {
            for (i, step) in p.steps.iter().enumerate().skip(shown) {
                eprintln!(
                    "kuaka: {action} step {}: {} ({:.3} s): {}",
                    i + 1,
                    step.name,
                    step.seconds,
                    step.detail
                );
            }
            shown = shown.max(p.steps.len());
            match p.state.as_str() {
                "done" => {
                    eprintln!(
                        "kuaka: {action} done: the application could not write for {:.3} s ({}); drained at {}, {} rows verified",
                        p.window_seconds.unwrap_or(0.0),
                        if action == "cutover" {
                            "from fencing the source to the target being writable"
                        } else {
                            "from fencing the target to the source being writable"
                        },
                        p.drained_at.as_deref().unwrap_or("-"),
                        p.rows_verified
                    );
                    match p.direction.as_str() {
                        "reverse" => eprintln!(
                            "kuaka: the target's changes now stream back to the source (slot {}); `kuaka fallback --state {}` goes back",
                            p.reverse_slot.as_deref().unwrap_or("-"),
                            state.display()
                        ),
                        "forward" => {
                            eprintln!("kuaka: the source's changes stream to the target again")
                        }
                        _ => eprintln!("kuaka: no reverse replication; the job has ended"),
                    }
                    return EXIT_OK;
                }
                "failed" => {
                    eprintln!(
                        "kuaka: {action} failed: {}",
                        p.error.as_deref().unwrap_or("unknown error")
                    );
                    return EXIT_ERROR;
                }
                _ => {}
            }
        }
        if last_alive_check.elapsed() >= std::time::Duration::from_millis(500) {
            last_alive_check = std::time::Instant::now();
            if !crate::state::is_locked(state) {
                cutover::remove_request(state, &id);
                // The job may have recorded why just before it exited.
                if let Some(error) = cutover::read_progress(state)
                    .filter(|p| p.request_id == id)
                    .and_then(|p| p.error)
                {
                    eprintln!("kuaka: {action} failed: {error}");
                }
                eprintln!(
                    "kuaka: the running job stopped during the {action} (after {shown} steps); start `kuaka run` again: it finishes a switch that was under way, or run `kuaka {action}` again"
                );
                return EXIT_ERROR;
            }
        }
        if started.elapsed().as_secs_f64() > args.timeout {
            cutover::remove_request(state, &id);
            eprintln!(
                "kuaka: the running job did not finish the {action} within --timeout {:.0} s (see kuaka status)",
                args.timeout
            );
            return EXIT_ERROR;
        }
    }
}
