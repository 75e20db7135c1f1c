//! keyward: keeps service users and their API keys at SaaS providers (ngrok, Okta ASA) in the
//! state one YAML file declares, delivering every new secret to a sink before anything it
//! replaces is revoked.
//!
//! The flow is one direction: config → desired, providers → observed, store → state; the pure
//! planner turns those into a [`plan::Plan`], which is rendered or executed by [`apply`]. One
//! [`engine::Engine::run`] does this for every command and every daemon reconcile.
//!
//! Modules:
//! - Input: [`config`] (the YAML file, resolved and validated), [`duration`] (`30d`, `90m`).
//! - Remote: [`providers`] (the ngrok and Okta ASA clients behind one trait), [`model`] (what
//!   they list: service users and keys).
//! - keyward's record: [`state`] (what it created, as data), [`store`] (where state, journal
//!   and lock are kept), [`journal`] (the write-ahead log), [`oplog`] (its record types).
//! - Decisions, all pure: [`plan`] (the planner, the plan, its text and its JSON document),
//!   [`keys`] (current, retiring, orphan, untracked, foreign and unknown keys), [`rotation`]
//!   (due times), [`recovery`] (what a crash or a lost state left), [`status`] (the key
//!   table), [`import`] (taking over users and keys that existed before keyward).
//! - Doing: [`engine`] (observe → plan → approve → execute), [`apply`] (the executor),
//!   [`sinks`] (delivering a new secret), [`daemon`] (when to reconcile), [`cli`] (the
//!   commands), [`progress`] (a long apply's progress on a terminal).
//! - Safety: [`files`] (private files and directories, bounded reads), [`text`] (escaping
//!   outside text for display), [`redact`] (masking the credentials keyward holds).
//!
//! The provider emulators live in the `keyward-sandbox` crate; only the `demo` module (cargo
//! feature `demo`) links them into this library.

#![deny(missing_docs)]

pub mod apply;
pub mod cli;
pub mod config;
pub mod daemon;
#[cfg(feature = "demo")]
pub mod demo;
pub mod duration;
pub mod engine;
pub mod files;
pub mod import;
pub mod journal;
pub mod keys;
pub mod model;
pub mod oplog;
pub mod pgstore;
pub mod plan;
pub mod progress;
pub mod providers;
pub mod recovery;
pub mod redact;
pub mod rotation;
pub mod sinks;
pub mod state;
pub mod status;
pub mod store;
pub mod text;
