//! The integration-test binary: every test module lives here (one link step for all tests).

mod cdp;
mod cli;
mod corpus;
mod fake_platform;
mod fake_platform_selftest;
mod faults;
mod harness;
mod inputs;
mod job_flow;
mod outputs;
mod page;
mod replay;
mod replay_jobs;
mod replay_selftest;
mod runpod_client;
mod s3;
mod security;
mod serve;
mod serve_process;
mod serverless;
mod shutdown;
mod start_script;
mod watch;
mod webhooks;
mod worker_process;
