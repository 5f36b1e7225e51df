//! The VICTOR wire contract (`victor.v1`) and the small value types both sides of it share.
//!
//! * [`v1`] — generated messages, clients and servers for `BindingService` and `AgentService`.
//! * [`FILE_DESCRIPTOR_SET`] — the encoded descriptors, served by gRPC reflection.
//! * [`tls`] — client TLS (CA, client certificate) for channels to the controllers.
//! * [`types`] — [`types::Mac`] and conversions between wire bytes/text and `std::net` types.

pub mod clock;
pub mod tls;
pub mod types;

/// Generated code for package `victor.v1`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod v1 {
    tonic::include_proto!("victor.v1");
}

/// Encoded `FileDescriptorSet` of `victor.v1`, for tonic-reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("victor_v1_descriptor");

pub use types::{Mac, TypeError};
