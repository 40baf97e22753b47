//! meshfed's gRPC protocols, generated from the `.proto` files beside this
//! crate by `build.rs` (protox + tonic-prost-build; no protoc needed).
//!
//! - [`config::v1`]: config delivery, the `ConfigDelivery.Subscribe` stream
//!   between the syncer and every gateway. The protocol is documented in
//!   `meshfed/config/v1/config.proto` and docs/delivery.md.
//!
//! This crate holds only wire types. The snapshot itself is not a protobuf
//! message: it travels as the canonical bytes of `meshfed_policy::Snapshot`
//! (see ARCHITECTURE.md, "the Snapshot schema"), and the syncer and gateway
//! own what happens on each side of the stream.

#![forbid(unsafe_code)]

/// `meshfed.config.v1`.
pub mod config {
    /// Config delivery, version 1.
    #[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("meshfed.config.v1");

        /// The Subscribe response's initial-metadata key in which a syncer
        /// names the optional gateway messages it understands
        /// (comma-separated), so that a gateway never sends one to an older
        /// syncer that would refuse it.
        pub const ACCEPTS_METADATA: &str = "meshfed-accepts";
        /// The [`ACCEPTS_METADATA`] value that allows [`Goodbye`].
        pub const ACCEPTS_GOODBYE: &str = "goodbye";

        /// The [`ACCEPTS_METADATA`] value that allows [`GoldenMetrics`].
        pub const ACCEPTS_METRICS: &str = "metrics";

        /// Whether a Subscribe response's metadata allows [`Goodbye`].
        pub fn accepts_goodbye(metadata: &tonic::metadata::MetadataMap) -> bool {
            accepts(metadata, ACCEPTS_GOODBYE)
        }

        /// Whether a Subscribe response's metadata allows [`GoldenMetrics`].
        pub fn accepts_metrics(metadata: &tonic::metadata::MetadataMap) -> bool {
            accepts(metadata, ACCEPTS_METRICS)
        }

        fn accepts(metadata: &tonic::metadata::MetadataMap, what: &str) -> bool {
            metadata
                .get(ACCEPTS_METADATA)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.split(',').any(|m| m.trim() == what))
        }
    }
}
