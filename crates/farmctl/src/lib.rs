//! Library side of `farmctl`: reading batch files, talking to the
//! coordinator, and formatting what it returns. The binary (`main.rs`) is the
//! command line around it; tests use the same pieces.

pub mod client;
pub mod input;
pub mod output;
pub mod tokens;
