//! The engine-independent model: schemas, typed values, changes and positions.
//!
//! Engines read their catalogs into [`schema::Schema`] and render DDL from it; rows travel as
//! [`value::Value`]s when a mapping applies, and capture emits [`change::Change`]s tagged with a
//! [`position::Position`]. Nothing in here talks to a database.

pub mod change;
pub mod position;
pub mod schema;
pub mod value;

pub use position::{PgLsn, Position};
pub use schema::{Column, DataType, QualifiedName, Schema, Table};
