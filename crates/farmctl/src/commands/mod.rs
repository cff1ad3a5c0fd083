//! The commands with more to them than one call: each in its file.

pub(crate) mod jobs;
pub(crate) mod results;
pub(crate) mod top;
pub(crate) mod watch;
