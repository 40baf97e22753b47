//! meshfed's east-west gateway: the data plane.
//!
//! One or more gateways run per cluster or edge site. They link to the
//! gateways of other clusters over QUIC with mutual TLS, and route
//! service-to-service calls (HTTP/1.1, HTTP/2, gRPC, raw TCP) across them,
//! following the per-cluster snapshot the syncer pushes.
//!
//! The crate is a skeleton for now: each module below says what it will own
//! and which issue brings it. Nothing here listens, connects or proxies yet.
//!
//! Modules, from the wire inwards:
//! - [`tunnel`]: QUIC links to peer gateways and the stream protocol on them;
//! - [`identity`]: certificates, SPIFFE IDs and the TLS configuration;
//! - [`proxy`]: the outbound listener and HTTP/TCP forwarding;
//! - [`route`]: picking a destination for a call from the snapshot;
//! - [`discovery`]: local endpoints (static file, DNS, Kubernetes);
//! - [`control`]: the config client that receives snapshots from the syncer;
//! - [`mirror`]: mirror Services that make remote services reachable in
//!   a cluster under ordinary names;
//! - [`admin`]: health, readiness, metrics and the config dump;
//! - [`accept`], [`limits`]: the caller-connection limit and the open-files
//!   budget;
//! - [`trace`]: distributed tracing: a span per hop, W3C/B3 propagation, OTLP.

#![forbid(unsafe_code)]

/// The methods of `tokio::io::AsyncWrite` for a wrapper that writes
/// through to its `Unpin` field `$field` unchanged (vectored writes
/// included), for use inside the `impl AsyncWrite` block of a stream
/// wrapper that only adds to reading or to what it carries.
#[macro_export]
macro_rules! delegate_async_write {
    ($field:ident) => {
        fn poll_write(
            self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
            buf: &[u8],
        ) -> ::std::task::Poll<::std::io::Result<usize>> {
            ::std::pin::Pin::new(&mut self.get_mut().$field).poll_write(cx, buf)
        }

        fn poll_flush(
            self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
        ) -> ::std::task::Poll<::std::io::Result<()>> {
            ::std::pin::Pin::new(&mut self.get_mut().$field).poll_flush(cx)
        }

        fn poll_shutdown(
            self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
        ) -> ::std::task::Poll<::std::io::Result<()>> {
            ::std::pin::Pin::new(&mut self.get_mut().$field).poll_shutdown(cx)
        }

        fn poll_write_vectored(
            self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
            bufs: &[::std::io::IoSlice<'_>],
        ) -> ::std::task::Poll<::std::io::Result<usize>> {
            ::std::pin::Pin::new(&mut self.get_mut().$field).poll_write_vectored(cx, bufs)
        }

        fn is_write_vectored(&self) -> bool {
            self.$field.is_write_vectored()
        }
    };
}

pub mod accept;
pub mod admin;
pub mod authz;
pub mod control;
pub mod discovery;
pub mod identity;
pub mod limits;
pub mod metrics;
pub mod mirror;
pub mod peer_auth;
pub mod proxy;
pub mod route;
pub mod run;
pub mod state;
pub mod trace;
pub mod tunnel;
