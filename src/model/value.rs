//! Typed values, for paths that decode rows (mappings, change capture, verification).
//!
//! Same-engine snapshot copies never decode rows: they stream the source's COPY bytes straight
//! into the target. Values exist for everything else and keep full precision: decimals and
//! timestamps stay exact, text is text and bytes are bytes.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", content = "v", rename_all = "snake_case")]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    /// Unsigned integers that do not fit `i64` (MySQL BIGINT UNSIGNED).
    UInt(u64),
    Float(f64),
    /// Exact decimal as its canonical text (`-12.340`), never a float.
    Decimal(String),
    Text(String),
    Bytes(Vec<u8>),
    /// Engine-native text form of anything else (timestamps, arrays, json, ...), with the
    /// column's type telling how to read it.
    Native(String),
}

/// One row: values in the table's column order.
pub type Row = Vec<Value>;
