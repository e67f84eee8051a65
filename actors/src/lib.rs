//! The Sautikit supervision tree.
//!
//! Actors serialize work inside one process; the database transaction behind [`store::Store`] is
//! the atomicity boundary for money and ownership (DESIGN §2). This crate knows nothing of HTTP or
//! SQL: it reaches the outside world only through the traits in [`store`] and [`clock`].

pub mod address;
pub mod admission;
pub mod audio;
pub mod call_store;
pub mod callback;
pub mod calls;
pub mod clock;
pub mod decode;
pub mod events;
pub mod flood;
pub mod inventory;
pub mod media;
pub mod model;
pub mod money;
pub mod numbers;
pub mod registrar;
pub mod resample;
pub mod root;
pub mod scheduler;
pub mod sip_endpoint;
pub mod store;
pub mod streaming;
pub mod synth;
pub mod voice;
pub mod wallet;
pub mod webhook;

pub use root::{Engine, EngineError, RegistrarSetup, VoiceSetup};
