//! The Prepare/Unprepare state machine: claim -> devices + config -> sharing actions ->
//! CDI spec -> checkpoint. The only writer of CDI spec files and the checkpoint.

pub mod allocation;
