//! Clients for a controller: the worker side (signed requests) and the user side (API token).
