//! The chaos harness: a seeded, reproducible schedule of faults and the
//! verdict over what the two ends logged ([`plan`], no processes in it),
//! and the runner that applies the schedule to real processes ([`run`]),
//! which `steadfast chaos` calls.

mod plan;
mod run;

pub use plan::{broker_name, payload_for, Fault, FaultTally, Schedule, Step, Verdict, CONSUMER_KILLED, FAULT_KINDS};
pub use run::{run, ChaosOptions, ChaosOutcome};
