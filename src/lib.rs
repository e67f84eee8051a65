//! Sautikit: a programmable voice platform. This crate is the service: configuration, CLI, HTTP
//! API, storage, and the wiring of the actor tree (DESIGN §1).

pub mod admin;
pub mod api;
pub mod cache;
pub mod callback;
pub mod calls_store;
pub mod config;
pub mod db;
mod group_commit;
pub mod idempotency;
pub mod loadtest;
pub mod phone;
pub mod play;
pub mod recordings;
pub mod registrations;
pub mod renewals;
pub mod secrets;
pub mod server;
mod sql;
pub mod store;
pub mod time;
pub mod tts;
pub mod usage;
pub mod webhooks;
