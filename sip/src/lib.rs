//! SIP and media protocol machines for Sautikit.
//!
//! Everything here is sans-IO: no sockets, no clocks, no databases. For now the crate holds the
//! digest primitives that SIP credentials need at creation time; transactions, dialogs, SDP and RTP
//! arrive with the inbound-calls issue.

pub mod digest;
