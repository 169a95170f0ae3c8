//! The `quorum` library half: launching a local federation of role processes.
