//! kuaka: migrate and continuously sync live databases with near-zero downtime.
//!
//! Data flow and module map: see `ARCHITECTURE.md`. `main.rs` only parses the command line and
//! calls [`commands`].

pub mod changelog;
pub mod cli;
pub mod commands;
pub mod config;
pub mod demo_data;
pub mod engine;
pub mod failpoint;
pub mod model;
pub mod pipeline;
pub mod state;
pub mod ui;
pub mod verify;
