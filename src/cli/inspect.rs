//! The commands that explain a configuration before it runs: `config`
//! (every value and where it came from) and `doctor` (what librdkafka was
//! built with, what each Kafka client receives, and whether the brokers answer).

use super::*;
use crate::kafka::Role;

/// The configuration `run` would use, from the same layers.
pub(super) fn load_traced(a: &RunArgs) -> anyhow::Result<crate::config::Loaded> {
    Ok(Config::load_traced(
        a.config.as_deref(),
        std::env::vars(),
        &a.overrides(),
    )?)
}

pub(super) fn config(a: RunArgs) -> anyhow::Result<()> {
    print!("{}", load_traced(&a)?.render());
    Ok(())
}

/// librdkafka's `builtin.features`: the codecs and security it was built with.
fn builtin_features() -> anyhow::Result<String> {
    Ok(rdkafka::ClientConfig::new()
        .create_native_config()?
        .get("builtin.features")?)
}

pub(super) fn doctor(a: DoctorArgs) -> anyhow::Result<()> {
    let (_, version) = rdkafka::util::get_rdkafka_version();
    println!("orderly {}", env!("CARGO_PKG_VERSION"));
    println!("librdkafka {version}");
    println!("builtin.features {}", builtin_features()?);
    let config = load_traced(&a.run)?.config;
    println!("configuration valid");
    for role in [
        Role::Consumer,
        Role::Reader("restore"),
        Role::Producer,
        Role::Admin,
    ] {
        println!("\n[{}]", role.name());
        let cc = crate::kafka::client(&config, role);
        for (k, v) in cc.config_map() {
            println!("{k} = {}", crate::config::kafka::shown(k, v));
        }
    }
    if a.no_connect {
        return Ok(());
    }
    use rdkafka::consumer::Consumer;
    let c = crate::kafka::admin(&config)?;
    let timeout = std::time::Duration::from_secs(a.timeout);
    let md = c
        .fetch_metadata(None, timeout)
        .with_context(|| format!("connecting to {}", config.brokers))?;
    println!(
        "\nconnected to {}: {} broker(s)",
        config.brokers,
        md.brokers().len()
    );
    let mut missing = Vec::new();
    let mut partitions = 0;
    for topic in config.input_topics() {
        match md.topics().iter().find(|t| t.name() == topic) {
            Some(t) if t.error().is_none() => {
                partitions += t.partitions().len();
                println!("topic {topic}: {} partitions", t.partitions().len())
            }
            _ => missing.push(topic),
        }
    }
    if !missing.is_empty() {
        anyhow::bail!("input topics not found on the brokers: {missing:?}");
    }
    let source = crate::kafka::group_consumer(&config, partitions);
    println!("source: {}", source.describe(partitions));
    Ok(())
}
