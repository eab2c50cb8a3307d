//! Code shared by lockmeter's examples and their tests.
#![deny(missing_docs)]

pub mod redis_lock;
