//! SIP and media protocol machines for Sautikit.
//!
//! Everything here is sans-IO: no sockets, no clocks, no databases. Machines take input plus the
//! current `Instant` and hand back what to send and when they next need to be woken; a thin tokio
//! driver in `sautikit-actors` owns the sockets and timers.

pub use rsip;

pub mod auth;
pub mod dialog;
pub mod digest;
pub mod dtmf;
pub mod halfband;
pub mod jitter;
pub mod message;
pub mod playout;
pub mod registrar;
pub mod rtp;
pub mod sdp;
pub mod stream;
pub mod tone;
pub mod transaction;
pub mod uas;
pub mod wav;
