//! The `rollwave.v1` wire types, generated from `proto/rollwave/v1/*.proto`.
//!
//! These types stay at the edges: the coordinator and the agent convert them
//! into their own domain types as soon as a message arrives.

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("rollwave.v1");
}

/// Encoded `FileDescriptorSet` of the API, for the gRPC reflection service.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/rollwave_descriptor.bin"));
