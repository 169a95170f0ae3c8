//! The `quorum` library half: launching a local federation of role processes (`up`, `run`, and
//! the integration tests all use it) and the small helpers the subcommands share.

pub mod federation;
