//! flowfarm's gRPC API v1, generated from `proto/flowfarm/v1/*.proto`.
//!
//! The `.proto` files are the reference: their comments state units, defaults
//! and limits of every field. This crate only compiles them (tonic + prost) and
//! exposes the encoded file descriptor set for gRPC server reflection, with
//! what every client shares (the bearer token, TLS channels: [`client`]) and
//! the codec servers decode requests with ([`codec`]).

pub mod client;
pub mod codec;

/// Package `flowfarm.v1`: messages, clients (`*_client`) and servers (`*_server`).
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("flowfarm.v1");
}

/// Encoded `FileDescriptorSet` of the v1 API, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("flowfarm_descriptor");
