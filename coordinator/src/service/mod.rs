//! gRPC service implementations: thin adapters from tonic to [`crate::cluster`]
//! and [`crate::stream`].

pub mod generation;
pub mod registry;
