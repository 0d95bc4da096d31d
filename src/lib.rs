//! mvm-shard: run every test shard in its own fresh, disposable microVM on AWS
//! Lambda, stream each shard's log back live, and fail when any shard fails.
//!
//! The modules are the stages of a run, which [`run`] drives: [`plan`] turns
//! the command line into one typed [`protocol::ShardRequest`] per shard,
//! [`dispatch`] sends them through a [`backend`] (which encodes them) and
//! turns the answers into events, [`report`] shows them. The
//! [`agent`] runs inside each VM, and the [`emulator`] is a local Lambda.
#![warn(missing_docs)]

pub mod agent;
pub mod artifacts;
pub mod backend;
pub mod cli;
pub mod dispatch;
pub mod doctor;
pub mod emulator;
pub mod github;
pub mod lambda_fit;
pub mod local_env;
pub mod net;
pub mod os;
pub mod plan;
pub mod protocol;
pub mod replay;
pub mod report;
pub mod retry;
pub mod run;
pub mod runner;
pub mod shutdown;
pub mod source;
