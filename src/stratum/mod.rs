//! The Stratum core: line framing, the typed messages, and the share hash.

pub mod codec;
pub mod protocol;
pub mod share;
