//! The pool side: pools and their health, the session with a pool, and the two ways miners
//! share it: passthrough's group of one, and aggregate mode's groups.

pub mod aggregate;
pub mod handshake;
pub mod passthrough;
pub mod prefix;
pub mod session;
pub mod upstream;
