//! The tooling apart from the product, behind the `tools` feature: the
//! benchmark (`orderly bench`), the demo, the workload generator and the
//! embedded broker (librdkafka's mock cluster). The CLI and the tests use
//! them; they are not part of the library's API.

pub mod bench;
pub mod broker;
pub mod demo;
pub mod workload;
