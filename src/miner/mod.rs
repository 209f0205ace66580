//! The miner side: one session per miner connection, its job book and share checks, the vardiff,
//! and the credential rewrite and auth backoff.

pub mod auth;
pub mod jobs;
pub mod session;
pub mod submissions;
pub mod vardiff;
