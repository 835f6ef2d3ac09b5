//! Integration tests: one binary (`autotests = false`) so the private database servers in
//! `support` start once per test process and are shared by every test.
//!
//! Run with `cargo test --test it`; a single test with `cargo test --test it -- <name> --nocapture`.

mod cutover;
mod mysql;
mod pg_cdc;
mod pg_mysql;
mod pg_replication;
mod pg_snapshot;
mod pg_snapshot_more;
mod pg_tls;
mod sqlite;
mod support;
mod verify;
