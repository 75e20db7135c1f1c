//! keyward: keeps service users and their API keys at SaaS providers (ngrok, Okta ASA) in the
//! state one YAML file declares, delivering every new secret to a sink before anything it
//! replaces is revoked.
//!
//! The flow is one direction: config → desired, providers → observed, state dir → state; the pure
//! planner turns those into a [`plan::Plan`], which is rendered or executed by [`apply`].
//!
//! The provider emulators live in the `keyward-sandbox` crate; only the `demo` module (cargo
//! feature `demo`) links them into this library.

pub mod apply;
pub mod cli;
pub mod config;
pub mod daemon;
#[cfg(feature = "demo")]
pub mod demo;
pub mod duration;
pub mod engine;
pub mod files;
pub mod journal;
pub mod keys;
pub mod model;
pub mod oplog;
pub mod plan;
pub mod providers;
pub mod recovery;
pub mod redact;
pub mod rotation;
pub mod sinks;
pub mod state;
pub mod status;
pub mod store;
pub mod text;
