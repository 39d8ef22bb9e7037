//! The integration-test binary: every test module lives here (one link step for all tests).

mod replay;
mod replay_selftest;
