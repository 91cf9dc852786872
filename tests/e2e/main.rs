//! End-to-end scenarios: real coordinator and agent processes on loopback.
//! One test binary; the shared harness lives in `tests/harness`.

mod agent_truth;
mod cli;
mod damage;
mod demo;
mod deployments;
mod hosts;
mod identity;
mod install;
mod joining;
mod limits;
mod metadata;
mod packaging;
mod releases;
mod restart;
mod s3_install;
mod tls;
mod tokens;
mod tools;
mod traffic;
mod zero_downtime;
