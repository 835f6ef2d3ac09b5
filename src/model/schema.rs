//! The schema model: what a source has and a target must get.
//!
//! Each object carries structured fields (for cross-engine mapping) and, where the source engine
//! can render an exact definition itself (PostgreSQL's `pg_get_*def` functions), that native text
//! in `definition` fields, so a same-engine copy loses nothing.

use std::fmt;

use serde::{Deserialize, Serialize};

/// `schema.name`, printed quoted (`"public"."Order"`) so it can go straight into SQL.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QualifiedName {
    pub schema: String,
    pub name: String,
}

impl QualifiedName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        QualifiedName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// Unquoted `schema.name`, for messages and pattern matching.
    pub fn display_name(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// Quote an SQL identifier with double quotes (PostgreSQL and standard SQL).
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Quote an SQL string literal (standard-conforming strings).
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

impl fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}",
            quote_ident(&self.schema),
            quote_ident(&self.name)
        )
    }
}

/// Engine-independent column type, used to pick mappings and copy formats.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DataType {
    Bool,
    Int16,
    Int32,
    Int64,
    Float32,
    Float64,
    Numeric {
        precision: Option<u32>,
        scale: Option<u32>,
    },
    Money,
    Char {
        length: Option<u32>,
    },
    Varchar {
        length: Option<u32>,
    },
    Text,
    Bytes,
    Date,
    Time,
    TimeTz,
    Timestamp,
    TimestampTz,
    Interval,
    Uuid,
    Json,
    Jsonb,
    Bit {
        length: Option<u32>,
        varying: bool,
    },
    Array {
        element: Box<DataType>,
    },
    Enum {
        name: QualifiedName,
    },
    Domain {
        name: QualifiedName,
    },
    Composite {
        name: QualifiedName,
    },
    Range {
        name: String,
    },
    /// Anything else, by its native name (`inet`, `tsvector`, `geometry`, ...).
    Other {
        name: String,
    },
}

/// A column of a table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    pub data_type: DataType,
    /// The type as the source engine spells it (PostgreSQL: `format_type()`, schema-qualified).
    pub native_type: String,
    /// Whether the value travels through a binary COPY between two PostgreSQL servers unchanged
    /// (false for arrays of user types and composites: their binary form carries type OIDs).
    pub binary_portable: bool,
    pub nullable: bool,
    pub default: Option<String>,
    /// Expression of a stored generated column; such columns are computed by the target.
    pub generated: Option<String>,
    pub identity: Option<Identity>,
    /// Collation, when it differs from the type's default (schema-qualified, quoted).
    pub collation: Option<String>,
    pub comment: Option<String>,
    /// Schema of the column's type (its element type for arrays) when it is not a built-in
    /// one: that type's comparison operators live there (e.g. `citext` in `public`).
    #[serde(default)]
    pub type_schema: Option<String>,
}

/// `GENERATED {ALWAYS | BY DEFAULT} AS IDENTITY` with its sequence's options.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    pub always: bool,
    pub sequence: Option<SequenceOptions>,
}

/// A named key (primary or unique) on some columns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Key {
    pub name: String,
    pub columns: Vec<String>,
    /// Native definition (`PRIMARY KEY (a, b)`, `UNIQUE NULLS NOT DISTINCT (c)`).
    pub definition: String,
    /// Comes from the partitioned parent: created with it, not by itself.
    #[serde(default)]
    pub inherited: bool,
}

/// A constraint rendered by the source engine (check, exclusion).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Constraint {
    pub name: String,
    pub definition: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ForeignKey {
    pub name: String,
    pub columns: Vec<String>,
    pub referenced_table: QualifiedName,
    pub referenced_columns: Vec<String>,
    /// Native definition (`FOREIGN KEY (a) REFERENCES s.t(b) ON DELETE CASCADE`).
    pub definition: String,
    /// The source constraint is `NOT VALID`: keep it that way.
    pub not_valid: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Index {
    pub name: String,
    pub unique: bool,
    /// Native `CREATE INDEX` statement.
    pub definition: String,
    /// Indexed columns (`<expression>` for an expression), for rendering on another engine.
    #[serde(default)]
    pub columns: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Trigger {
    pub name: String,
    pub definition: String,
    /// `D` disabled, `O` origin/local (default), `R` replica, `A` always.
    pub enabled: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TableKind {
    /// A table holding rows.
    Plain,
    /// A partitioned table: rows live in its partitions.
    Partitioned,
}

/// Partitioning: how a table is partitioned and/or which table it is a partition of.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Partitioning {
    /// `PARTITION BY ...` clause of a partitioned table.
    pub partition_by: Option<String>,
    /// Parent and bound (`FOR VALUES FROM (..) TO (..)` or `DEFAULT`) of a partition.
    pub partition_of: Option<(QualifiedName, String)>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Table {
    pub name: QualifiedName,
    pub kind: TableKind,
    pub unlogged: bool,
    pub columns: Vec<Column>,
    pub primary_key: Option<Key>,
    pub unique_keys: Vec<Key>,
    pub checks: Vec<Constraint>,
    pub exclusions: Vec<Constraint>,
    pub foreign_keys: Vec<ForeignKey>,
    pub indexes: Vec<Index>,
    pub triggers: Vec<Trigger>,
    pub partitioning: Partitioning,
    pub comment: Option<String>,
    /// Planner estimate of rows (`reltuples`), `None` when never analysed.
    pub estimated_rows: Option<i64>,
    /// Size of the table's main data on disk in bytes.
    pub estimated_bytes: i64,
}

impl Table {
    pub fn holds_rows(&self) -> bool {
        self.kind == TableKind::Plain
    }

    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// Columns whose values are copied (generated columns are computed by the target).
    pub fn copied_columns(&self) -> impl Iterator<Item = &Column> {
        self.columns.iter().filter(|c| c.generated.is_none())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SequenceOptions {
    pub data_type: String,
    pub start: i64,
    pub increment: i64,
    pub min_value: i64,
    pub max_value: i64,
    pub cache: i64,
    pub cycle: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sequence {
    pub name: QualifiedName,
    pub options: SequenceOptions,
    /// `OWNED BY` table and column.
    pub owned_by: Option<(QualifiedName, String)>,
    /// Owned by an identity column: created with the table, only its value is set.
    pub identity_of: Option<(QualifiedName, String)>,
    /// `last_value`, when the sequence has been used.
    pub last_value: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum UserTypeKind {
    Enum {
        labels: Vec<String>,
    },
    Domain {
        base: String,
        not_null: bool,
        default: Option<String>,
        collation: Option<String>,
        constraints: Vec<Constraint>,
    },
    Composite {
        attributes: Vec<(String, String)>,
    },
    Range {
        subtype: String,
        subtype_diff: Option<String>,
        multirange: Option<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UserType {
    pub name: QualifiedName,
    pub kind: UserTypeKind,
    pub comment: Option<String>,
}

/// A function, procedure or aggregate, as its native definition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Routine {
    pub name: QualifiedName,
    /// Identity arguments (`text, integer`), to tell overloads apart.
    pub arguments: String,
    pub kind: RoutineKind,
    pub definition: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutineKind {
    Function,
    Procedure,
    Aggregate,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct View {
    pub name: QualifiedName,
    pub materialized: bool,
    /// A materialized view holds data (`relispopulated`); unpopulated ones stay unpopulated.
    #[serde(default = "yes")]
    pub populated: bool,
    /// The `SELECT` text.
    pub query: String,
    pub indexes: Vec<Index>,
    pub comment: Option<String>,
    pub column_comments: Vec<(String, String)>,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Extension {
    pub name: String,
    pub schema: String,
}

/// Everything read from a source catalog that the job moves.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Schema {
    pub namespaces: Vec<String>,
    pub namespace_comments: Vec<(String, String)>,
    pub extensions: Vec<Extension>,
    pub types: Vec<UserType>,
    pub routines: Vec<Routine>,
    pub sequences: Vec<Sequence>,
    pub tables: Vec<Table>,
    pub views: Vec<View>,
    /// Objects kuaka saw and does not move, each with what to do about it.
    pub skipped: Vec<String>,
}

impl Schema {
    pub fn table(&self, name: &QualifiedName) -> Option<&Table> {
        self.tables.iter().find(|t| &t.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_and_literals_are_quoted() {
        let n = QualifiedName::new("MiXeD case", "we\"ird");
        assert_eq!(n.to_string(), "\"MiXeD case\".\"we\"\"ird\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
