//! Wire types shared by Quorum's roles and clients: one module per service under `v1`, each type
//! documented with the route that carries it. Nothing here does IO.

pub mod v1;

/// The JSON body of every error response.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: String,
}
