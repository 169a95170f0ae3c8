//! Version 1 of the wire protocol.

pub mod controller;
pub mod idp;
pub mod store;
pub mod worker_auth;
