//! The integration-test binary: every test module lives here (one link step for all tests).

mod cli;
mod harness;
mod job_flow;
mod replay;
mod replay_jobs;
mod replay_selftest;
mod start_script;
