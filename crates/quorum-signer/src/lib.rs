//! The only crate that touches the signing key: re-checks a verdict's evidence and signs its statement
