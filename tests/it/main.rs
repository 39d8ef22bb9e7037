//! The integration-test binary: every test module lives here (one link step for all tests).

mod harness;
mod replay;
mod replay_jobs;
mod replay_selftest;
