//! Loading the layers (defaults, file, `ORDERLY_*` variables, flags) while
//! keeping where each value came from, and printing the result for
//! `orderly config`.

use super::{field_kind, Config, ConfigError, Kind, Overrides, SETTINGS_FIELDS};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Where a configuration value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// orderly's default.
    Default,
    /// The configuration file.
    File(PathBuf),
    /// An environment variable, by name.
    Env(String),
    /// A command-line flag, by name.
    Flag(&'static str),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::File(p) => write!(f, "file {}", p.display()),
            Origin::Env(v) => write!(f, "env {v}"),
            Origin::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

/// A loaded configuration and the origin of every value not left at its
/// default, by key path (`["kafka", "consumer", "session.timeout.ms"]`).
#[derive(Clone, Debug)]
pub struct Loaded {
    /// The configuration.
    pub config: Config,
    /// Where each value that is not a default came from.
    pub origins: BTreeMap<Vec<String>, Origin>,
}

impl Config {
    /// [`Config::load`], keeping where each value came from.
    pub fn load_traced(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Loaded, ConfigError> {
        let mut origins = BTreeMap::new();
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                let t = text
                    .parse::<toml::Table>()
                    .map_err(|e| ConfigError::Parse(format!("{}: {e}", path.display())))?;
                for key in leaves(&t, &mut Vec::new()) {
                    origins.insert(key, Origin::File(path.to_owned()));
                }
                t
            }
            None => toml::Table::new(),
        };
        let mut env: Vec<(String, String)> = env.into_iter().collect();
        // The same variables give the same result whatever the process's order.
        env.sort();
        for (name, value) in env {
            let Some((path, kind)) = env_path(&name)? else {
                continue;
            };
            let value = match kind {
                Kind::Int => value
                    .trim()
                    .parse::<i64>()
                    .map(toml::Value::Integer)
                    // Not a number: the field's type error names the field.
                    .unwrap_or(toml::Value::String(value)),
                Kind::Str => toml::Value::String(value),
            };
            insert(&mut table, &path, value)
                .map_err(|t| ConfigError::Parse(format!("`{t}` must be a table (set by {name})")))?;
            origins.insert(path, Origin::Env(name));
        }
        let flags = [
            ("brokers", "--brokers", overrides.brokers.clone()),
            ("topic", "--topic", overrides.topic.clone()),
            ("group", "--group", overrides.group.clone()),
            (
                "data_dir",
                "--data-dir",
                overrides.data_dir.as_ref().map(|d| d.display().to_string()),
            ),
        ];
        for (field, flag, value) in flags {
            if let Some(v) = value {
                table.insert(field.to_owned(), v.into());
                origins.insert(vec![field.to_owned()], Origin::Flag(flag));
            }
        }
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(Loaded { config, origins })
    }
}

/// The key path and type an `ORDERLY_*` variable sets, `None` for
/// variables that are not configuration (`ORDERLY_CONFIG`, `ORDERLY_LOG_FORMAT`).
fn env_path(name: &str) -> Result<Option<(Vec<String>, Kind)>, ConfigError> {
    let Some(rest) = name.strip_prefix("ORDERLY_") else {
        return Ok(None);
    };
    let rest = rest.to_ascii_lowercase();
    let prop = |p: &str| p.replace('_', ".");
    let unknown = |what: &str| {
        Err(ConfigError::Parse(format!(
            "{name}: {what}; variables set top-level fields, [kafka], [kafka.consumer], \
             [kafka.producer] and [settings]"
        )))
    };
    let Some((section, field)) = rest.split_once("__") else {
        return Ok(field_kind(&rest).map(|k| (vec![rest.clone()], k)));
    };
    match section {
        "kafka" => Ok(Some(match field.split_once("__") {
            Some((role @ ("consumer" | "producer"), p)) => (
                vec!["kafka".into(), role.into(), prop(p)],
                Kind::Str,
            ),
            Some((other, _)) => return unknown(&format!("[kafka.{other}] is not a table orderly knows")),
            None => (vec!["kafka".into(), prop(field)], Kind::Str),
        })),
        "settings" => match SETTINGS_FIELDS.iter().find(|(f, _)| *f == field) {
            Some((f, k)) => Ok(Some((vec!["settings".into(), (*f).into()], *k))),
            None => unknown(&format!("`settings.{field}` is not a settings field")),
        },
        other => unknown(&format!("`{other}` is not a section variables can set")),
    }
}

/// Sets `path` in `table`, making the tables on the way; on a non-table
/// in the way, returns its name.
fn insert(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().expect("a key path is never empty");
    let mut t = table;
    for p in parents {
        t = t
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| p.clone())?;
    }
    t.insert(last.clone(), value);
    Ok(())
}

/// The key paths of every value (not table) in `t`; an array is one value.
fn leaves(t: &toml::Table, prefix: &mut Vec<String>) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for (k, v) in t {
        prefix.push(k.clone());
        match v {
            toml::Value::Table(inner) => out.extend(leaves(inner, prefix)),
            _ => out.push(prefix.clone()),
        }
        prefix.pop();
    }
    out
}

/// A key path as TOML writes it: bare keys where it can, quoted otherwise.
fn dotted(path: &[String]) -> String {
    path.iter()
        .map(|k| {
            if !k.is_empty()
                && k
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                k.clone()
            } else {
                toml::Value::String(k.clone()).to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Whether the value at `path` is a secret: the admin token, or a librdkafka
/// property that [`super::kafka::is_secret`] names.
fn secret(path: &[String]) -> bool {
    match path {
        [f] => f == "admin_token",
        [k, .., p] if k == "kafka" => super::kafka::is_secret(p),
        _ => false,
    }
}

impl Loaded {
    /// Every value of the effective configuration, one `key = value` line
    /// each with its origin, secrets masked.
    pub fn render(&self) -> String {
        let value = toml::Value::try_from(&self.config).expect("a Config serialises");
        let mut out = String::new();
        let Some(table) = value.as_table() else {
            return out;
        };
        let mut keys = leaves(table, &mut Vec::new());
        // Unset options (no value) are listed too, so every field shows.
        for (f, _) in super::FIELDS {
            if !table.contains_key(*f) {
                keys.push(vec![(*f).to_owned()]);
            }
        }
        keys.sort();
        for key in keys {
            let mut v = table.get(&key[0]);
            for k in &key[1..] {
                v = v.and_then(|v| v.get(k));
            }
            let shown = match v {
                None => "(unset)".to_owned(),
                Some(_) if secret(&key) => "\"********\"".to_owned(),
                Some(v) => v.to_string(),
            };
            let origin = self.origins.get(&key).unwrap_or(&Origin::Default);
            let _ = writeln!(out, "{} = {shown}  # {origin}", dotted(&key));
        }
        out
    }
}
