//! Wire-level tests against a simulator on 127.0.0.1:0.
