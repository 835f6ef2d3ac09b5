//! One module per database engine, each with the same files: `catalog` (catalog → model),
//! `ddl` (model → statements), `snapshot` (consistent parallel reads and bulk writes).

pub mod mysql;
pub mod postgres;
pub mod sqlite;

/// Whether retrying can help.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Network trouble, a restarting server, a serialisation failure: retry with backoff.
    Transient,
    /// Bad input, missing privileges, unsupported objects: stop and say what to do.
    Definite,
}
