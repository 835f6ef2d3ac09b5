//! Changes captured from a source, in commit order.

use serde::{Deserialize, Serialize};

use super::position::Position;
use super::schema::QualifiedName;
use super::value::Row;

/// One row change. Updates and deletes carry the key of the old row so that a primary-key
/// change becomes a delete of the old key plus an insert of the new row.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    Insert {
        table: QualifiedName,
        row: Row,
    },
    Update {
        table: QualifiedName,
        old_key: Option<Row>,
        row: Row,
    },
    Delete {
        table: QualifiedName,
        key: Row,
    },
    Truncate {
        tables: Vec<QualifiedName>,
    },
}

/// A source transaction: its changes and the position of its commit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Transaction {
    pub commit_position: Position,
    pub changes: Vec<Change>,
}
