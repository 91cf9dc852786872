//! The Rollwave coordinator (`rollwave server`) and the operator CLI.
//!
//! See ARCHITECTURE.md for the code map and the invariants.

pub mod artifact_store;
pub mod ca;
pub mod cli;
pub mod demo;
pub mod deployer;
pub mod enrollment;
pub mod grpc;
pub mod health;
pub mod identity;
pub mod listener;
pub mod lock;
pub mod model;
pub mod planner;
pub mod presence;
pub mod registry;
pub mod rollout;
pub mod server;
pub mod sessions;
pub mod store;
pub mod traffic;
pub mod wishes;
pub mod wording;
