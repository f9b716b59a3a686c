//! The commands that talk to a running instance's admin API, to Kafka, or to
//! the settings source: `dlq`, `partitions`, `settings`.

use super::*;

pub(super) fn admin_call(
    admin: &AdminArgs,
    method: reqwest::Method,
    path: &str,
    query: &[(&str, String)],
) -> anyhow::Result<serde_json::Value> {
    let client = reqwest::blocking::Client::new();
    let mut req = client
        .request(
            method,
            format!("{}{path}", admin.admin.trim_end_matches('/')),
        )
        .query(query);
    if let Some(t) = &admin.token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().with_context(|| {
        format!(
            "calling the admin API at {} (is orderly run up? --admin)",
            admin.admin
        )
    })?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!(
            "{status}: {}",
            body["error"].as_str().unwrap_or("no details")
        );
    }
    Ok(body)
}

pub(super) fn dlq(cmd: DlqCommand) -> anyhow::Result<()> {
    match cmd {
        DlqCommand::List {
            admin,
            filter,
            status,
            after,
            limit,
        } => {
            let mut q = filter.query();
            q.push(("after", after.to_string()));
            q.push(("limit", limit.to_string()));
            if let Some(s) = status {
                q.push(("status", s));
            }
            let body = admin_call(&admin, reqwest::Method::GET, "/api/dead-letters", &q)?;
            for item in body["items"].as_array().into_iter().flatten() {
                println!("{item}");
            }
            if let Some(next) = body["next_after"].as_u64() {
                eprintln!("more: --after {next}");
            }
        }
        DlqCommand::Retry(t) => dlq_act("retry", &t)?,
        DlqCommand::Skip(t) => dlq_act("skip", &t)?,
    }
    Ok(())
}

pub(super) fn dlq_act(verb: &str, target: &DlqTarget) -> anyhow::Result<()> {
    let DlqTarget {
        id,
        all,
        admin,
        filter,
    } = target;
    let body = match (*all, *id) {
        (true, _) => admin_call(
            admin,
            reqwest::Method::POST,
            &format!("/api/dead-letters/{verb}-all"),
            &filter.query(),
        )?,
        (false, Some(id)) => admin_call(
            admin,
            reqwest::Method::POST,
            &format!("/api/dead-letters/{id}/{verb}"),
            &[],
        )?,
        (false, None) => anyhow::bail!("name a dead letter id, or --all"),
    };
    println!("{body}");
    Ok(())
}

pub(super) fn partitions(a: PartitionsArgs) -> anyhow::Result<()> {
    use std::collections::BTreeMap;
    // (topic, partition) -> rows from each instance that owns or holds it.
    let mut rows: BTreeMap<(String, i64), Vec<serde_json::Value>> = BTreeMap::new();
    let mut problems = Vec::new();
    for url in &a.admin {
        let args = AdminArgs {
            admin: url.clone(),
            token: None,
        };
        match admin_call(&args, reqwest::Method::GET, "/api/partitions", &[]) {
            Ok(body) => {
                let instance = body["instance"].as_str().unwrap_or(url).to_owned();
                for p in body["partitions"].as_array().into_iter().flatten() {
                    let mut p = p.clone();
                    p["owner"] = serde_json::json!(instance);
                    let k = (
                        p["topic"].as_str().unwrap_or_default().to_owned(),
                        p["partition"].as_i64().unwrap_or(-1),
                    );
                    rows.entry(k).or_default().push(p);
                }
            }
            Err(e) => problems.push(format!("{url}: {e}")),
        }
    }
    if a.kafka.brokers.is_some() || a.kafka.config.is_some() {
        use rdkafka::consumer::Consumer;
        let config = a.kafka.load()?;
        let topic = &config.topic;
        let c = crate::kafka::admin(&config)?;
        let md = c.fetch_metadata(Some(topic), std::time::Duration::from_secs(10))?;
        for t in md.topics().iter().filter(|t| t.name() == topic) {
            for p in t.partitions() {
                rows.entry((topic.clone(), i64::from(p.id()))).or_default();
            }
        }
    }
    if a.json {
        let all: Vec<_> = rows.values().flatten().cloned().collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        println!(
            "{:<28} {:>9}  {:<24} {:>9} {:>11} {:>8} {:>11}",
            "topic", "partition", "owner", "entities", "checkpoint", "lag", "changelog"
        );
        let s = |v: &serde_json::Value| match v {
            serde_json::Value::Null => "-".to_owned(),
            v => v.to_string(),
        };
        for ((topic, partition), held) in &rows {
            let owner = held.iter().find(|p| p["assigned"] == true);
            let stale: Vec<&str> = held
                .iter()
                .filter(|p| p["assigned"] != true)
                .filter_map(|p| p["owner"].as_str())
                .collect();
            let (name, p) = match owner {
                Some(p) => (p["owner"].as_str().unwrap_or("?").to_owned(), Some(p)),
                None => ("(unassigned)".to_owned(), None),
            };
            let f = |k: &str| p.map(|p| s(&p[k])).unwrap_or_else(|| "-".into());
            println!(
                "{topic:<28} {partition:>9}  {name:<24} {:>9} {:>11} {:>8} {:>11}{}",
                f("entities"),
                f("checkpoint"),
                f("lag"),
                f("changelog_position"),
                if stale.is_empty() {
                    String::new()
                } else {
                    format!("  (also held by {}, to be purged)", stale.join(", "))
                }
            );
        }
    }
    if !problems.is_empty() {
        anyhow::bail!("some instances did not answer: {}", problems.join("; "));
    }
    Ok(())
}

pub(super) fn settings(cmd: SettingsCommand) -> anyhow::Result<()> {
    use crate::settings::SettingsSource;
    let (SettingsCommand::Get { source, .. } | SettingsCommand::Put { source, .. }) = &cmd;
    let overrides = Overrides {
        brokers: source.brokers.clone(),
        ..Overrides::default()
    };
    let mut config = Config::load(source.config.as_deref(), std::env::vars(), &overrides)?;
    if let Some(t) = &source.settings_topic {
        config.settings.source = SettingsSource::Topic;
        config.settings.topic = t.clone();
    }
    if config.settings.source == SettingsSource::None {
        anyhow::bail!(
            "no settings source is configured: set settings.source (\"topic\" or \"http\") or pass --settings-topic"
        );
    }
    let timeout = std::time::Duration::from_secs(source.timeout);
    match &cmd {
        SettingsCommand::Get { tenant, .. } => {
            let registry =
                crate::settings::load_once(&config, timeout).map_err(anyhow::Error::msg)?;
            let Some(view) = registry.get(tenant) else {
                anyhow::bail!("tenant {tenant:?} has no settings: the defaults apply")
            };
            let doc = view
                .current()
                .document()
                .context("settings in force always have a document")?;
            println!("{}", serde_json::to_string_pretty(doc)?);
        }
        SettingsCommand::Put { tenant, file, .. } => {
            let bytes =
                std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
            let (doc, partition, offset) = crate::settings::put(&config, tenant, &bytes, timeout)
                .map_err(anyhow::Error::msg)?;
            println!(
                "tenant {tenant}: version {} written to {} partition {partition} offset {offset}",
                doc.version, config.settings.topic
            );
        }
    }
    Ok(())
}
