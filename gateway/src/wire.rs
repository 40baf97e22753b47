//! What gateways say to each other on a tunnel, as bytes and as values:
//! the stream [`frame`] codec (including the typed [`frame::Refusal`]) and
//! the endpoint [`announce`]ments.
//!
//! Pure codecs with bounded, fuzzed decoders and no I/O: the decisions
//! layer (routing, authorization) and the data path use these types without
//! depending on the QUIC links that carry them ([`crate::tunnel`]).

pub mod announce;
pub mod frame;
