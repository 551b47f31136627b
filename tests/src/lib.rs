//! Harness for end-to-end tests: real guests, real peers.
