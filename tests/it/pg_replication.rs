//! The logical replication groundwork (issue 3) against a real server: a temporary pgoutput slot
//! with an exported snapshot, the snapshot's isolation, and the stream decoded into messages.

use std::time::Duration;

use kuaka::config::Endpoint;
use kuaka::engine::postgres::decode::{PgOutput, TupleValue, decode};
use kuaka::engine::postgres::replication::{ReplicationConnection, ReplicationEvent};

use crate::support::{pg, psql, query_one, wait_until};

fn text(v: &str) -> TupleValue {
    TupleValue::Text(v.as_bytes().to_vec())
}

#[test]
fn slot_snapshot_and_pgoutput_stream() {
    let db = "replication_stream";
    let url = pg().create_db(db);
    psql(
        &url,
        "CREATE TABLE t (id int PRIMARY KEY, v text); \
         CREATE PUBLICATION kuaka_it_pub FOR TABLE t; \
         INSERT INTO t VALUES (1, 'before');",
    );
    let endpoint = Endpoint::parse("--source", &url).expect("url");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut conn = ReplicationConnection::connect(&endpoint, "it")
            .await
            .expect("replication connection");
        let (_, _, position) = conn.identify_system().await.expect("IDENTIFY_SYSTEM");
        let slot = conn
            .create_slot("kuaka_it_slot", true, true)
            .await
            .expect("slot");
        assert!(slot.consistent_point >= position);
        let snapshot = slot.snapshot.clone().expect("an exported snapshot");

        // Written after the slot: streamed, and invisible to the exported snapshot.
        psql(&url, "INSERT INTO t VALUES (2, 'after')");
        let (reader, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("reader");
        tokio::spawn(connection);
        reader
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT '{snapshot}'"
            ))
            .await
            .expect("import the snapshot");
        let seen: i64 = reader
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(
            seen, 1,
            "the exported snapshot must not see the row written after the slot"
        );

        psql(
            &url,
            "UPDATE t SET id = 10 WHERE id = 1; DELETE FROM t WHERE id = 2;",
        );
        let mut stream = conn
            .start(
                &slot.name,
                slot.consistent_point,
                &["kuaka_it_pub".into()],
                false,
            )
            .await
            .expect("start");
        let mut messages = Vec::new();
        let mut commits = 0;
        let mut last_end = slot.consistent_point;
        while commits < 3 {
            let event = tokio::time::timeout(Duration::from_secs(30), stream.next())
                .await
                .expect("the stream stalled")
                .expect("stream error")
                .expect("the stream ended");
            match event {
                ReplicationEvent::XLogData { data, .. } => {
                    let message = decode(&data).expect("decodable pgoutput");
                    if let PgOutput::Commit { end_lsn, .. } = &message {
                        commits += 1;
                        last_end = *end_lsn;
                    }
                    messages.push(message);
                }
                ReplicationEvent::Keepalive {
                    reply_requested: true,
                    wal_end,
                } => {
                    stream
                        .send_status(wal_end, slot.consistent_point, slot.consistent_point, false)
                        .await
                        .expect("feedback");
                }
                ReplicationEvent::Keepalive { .. } => {}
            }
        }
        stream
            .send_status(last_end, last_end, last_end, false)
            .await
            .expect("feedback");
        let relation = messages
            .iter()
            .find_map(|m| match m {
                PgOutput::Relation {
                    id, name, columns, ..
                } if name == "t" => Some((*id, columns.clone())),
                _ => None,
            })
            .expect("a Relation message for t");
        assert!(relation.1[0].is_key && relation.1[0].name == "id");
        let changes: Vec<&PgOutput> = messages
            .iter()
            .filter(|m| {
                matches!(
                    m,
                    PgOutput::Insert { .. } | PgOutput::Update { .. } | PgOutput::Delete { .. }
                )
            })
            .collect();
        assert_eq!(
            changes,
            vec![
                &PgOutput::Insert {
                    relation: relation.0,
                    new: vec![text("2"), text("after")]
                },
                &PgOutput::Update {
                    relation: relation.0,
                    old_key: Some(vec![text("1"), TupleValue::Null]),
                    old_row: None,
                    new: vec![text("10"), text("before")],
                },
                &PgOutput::Delete {
                    relation: relation.0,
                    old_key: Some(vec![text("2"), TupleValue::Null]),
                    old_row: None
                },
            ]
        );
    });
    drop(runtime);
    // A temporary slot disappears with its connection.
    wait_until(
        "the temporary slot to be dropped",
        Duration::from_secs(30),
        || {
            query_one(
                &url,
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'kuaka_it_slot'",
            ) == "0"
        },
    );
}

/// A slot kuaka streamed from a moment ago may still be held by the server process that
/// served it: dropping it as kuaka's own waits for that process, ending it if it lingers,
/// where `kuaka clean`'s strict drop refuses.
#[test]
fn own_slot_is_dropped_even_while_a_server_process_still_holds_it() {
    let url = pg().create_db("replication_own_slot");
    psql(
        &url,
        "SELECT pg_create_logical_replication_slot('kuaka_it_own', 'test_decoding');",
    );
    let mut holder = std::process::Command::new(format!(
        "{}/pg_recvlogical",
        crate::support::postgres::PG_BIN
    ))
    .args([
        "-d",
        &url,
        "--slot",
        "kuaka_it_own",
        "--start",
        "-f",
        "/dev/null",
    ])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .expect("pg_recvlogical");
    let active =
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'kuaka_it_own' AND active";
    wait_until("the slot to be held", Duration::from_secs(30), || {
        query_one(&url, active) == "1"
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("client");
        tokio::spawn(connection);
        let strict = kuaka::engine::postgres::capture::drop_slot_and_publication(
            &client,
            "kuaka_it_own",
            "",
        )
        .await;
        assert!(strict.is_err(), "a held slot must not be dropped by clean");
        let dropped = kuaka::engine::postgres::capture::drop_own_slot_and_publication(
            &client,
            "kuaka_it_own",
            "",
        )
        .await
        .expect("own slot dropped");
        assert_eq!(
            dropped,
            vec!["dropped replication slot kuaka_it_own".to_string()]
        );
    });
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(
        query_one(
            &url,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'kuaka_it_own'"
        ),
        "0"
    );
}
