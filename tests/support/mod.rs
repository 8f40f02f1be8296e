//! Helpers shared by the tests that run real processes.

pub mod garage;
pub mod launch;
