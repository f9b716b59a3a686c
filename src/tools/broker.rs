//! The embedded Kafka-protocol broker: librdkafka's mock cluster.
//!
//! Used by `orderly demo`, `orderly dev-broker` and the tests. It speaks the
//! Kafka protocol on a localhost port, so any client can use it, but it does
//! not support the CreateTopics admin call: create topics with
//! [`EmbeddedBroker::create_topic`]. It is slow at serving fetches from large
//! partitions; never judge orderly's speed on it.

use rdkafka::error::KafkaResult;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

/// A running embedded broker. Dropping it stops the broker. Not `Send`.
pub struct EmbeddedBroker {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl EmbeddedBroker {
    /// Starts a cluster of `brokers` brokers on localhost ports.
    pub fn start(brokers: i32) -> KafkaResult<Self> {
        Ok(EmbeddedBroker {
            cluster: MockCluster::new(brokers)?,
        })
    }

    /// The bootstrap servers to give clients.
    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// Creates a topic.
    pub fn create_topic(&self, name: &str, partitions: i32) -> KafkaResult<()> {
        self.cluster.create_topic(name, partitions, 1)
    }

    /// The underlying mock cluster, for fault injection in tests.
    pub fn cluster(&self) -> &MockCluster<'static, DefaultProducerContext> {
        &self.cluster
    }
}
