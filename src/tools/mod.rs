//! The tooling apart from the product, behind the `tools` feature: the
//! benchmark (`orderly bench`), the demo, the workload generator, the
//! embedded broker (librdkafka's mock cluster) and the fuzz harnesses. The CLI and the tests use
//! them; they are not part of the library's API.

pub mod bench;
pub mod broker;
pub mod demo;
pub mod fuzzing;
pub mod workload;
