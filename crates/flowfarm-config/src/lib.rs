//! Layered configuration for flowfarm's programs: a TOML file, then
//! environment variables named by one rule, with secrets kept out of the
//! file and masked whenever the configuration is shown.
//!
//! The rule: a key's path, upper-cased, its parts joined by `__`, after the
//! program's prefix. `leases.lease_seconds` of the coordinator is
//! `FLOWFARM_LEASES__LEASE_SECONDS`; the worker's top-level `capacity` is
//! `FLOWFARM_WORKER__CAPACITY`; entries of a list are numbered from 0
//! (`FLOWFARM_WORKER__MODELS__0__PATH`, one past the end adds an entry).
//! A value is read as TOML when it parses as the key's type (`30`, `true`,
//! `["a", "b"]`), else as a string. A variable that names no key is an
//! error that names the variable.
//!
//! Invariant: a secret key is never read from the file: only from the
//! environment (or a `*_file` key naming a file that holds it).

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use toml::{Table, Value};

/// `[tracing]` of both programs: where spans go besides the log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingConfig {
    /// An OTLP/gRPC collector (`http://collector:4317`) that receives every
    /// span (one per RPC, one per job attempt); absent: spans only in the log.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans; absent: the program's name.
    pub service_name: Option<String>,
}

/// Which environment variables set keys of one program's configuration.
#[derive(Debug, Clone, Copy)]
pub struct EnvRule {
    /// `FLOWFARM_` for the coordinator, `FLOWFARM_WORKER__` for the worker.
    pub prefix: &'static str,
    /// Whether a name needs a `__` after the prefix to be a key (so that
    /// `FLOWFARM_TOKEN`, `FLOWFARM_SERVER`, … stay the settings they are).
    pub needs_separator: bool,
    /// First parts that belong to another program sharing the prefix.
    pub others: &'static [&'static str],
}

/// A key that holds a secret: refused in the file, masked when shown.
#[derive(Debug, Clone, Copy)]
pub struct Secret {
    /// Dotted path: `database.password`.
    pub key: &'static str,
    /// Where it may come from instead, for the error message.
    pub instead: &'static str,
    /// The key is a URL that may be in the file, but not with a password in it.
    pub url: bool,
}

/// What a configuration file or variable got wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("environment variable {name}: {reason}")]
    Env { name: String, reason: String },
    #[error("config file {path}: `{key}` is a secret (or holds one) and is not read from the file; {instead}")]
    SecretInFile { path: PathBuf, key: String, instead: String },
}

/// Reads `path`, applies the variables of `env` that `rule` names, refuses
/// `secrets` in the file, and deserializes the result.
///
/// # Errors
/// [`ConfigError`] naming the file, key or variable at fault.
pub fn load<T: DeserializeOwned>(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
    rule: &EnvRule,
    secrets: &[Secret],
) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    from_str(&text, path, env, rule, secrets)
}

/// [`load`] of a file already read.
///
/// # Errors
/// [`ConfigError`] naming the file, key or variable at fault.
pub fn from_str<T: DeserializeOwned>(
    text: &str,
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
    rule: &EnvRule,
    secrets: &[Secret],
) -> Result<T, ConfigError> {
    let mut table: Table = text.parse().map_err(|source| ConfigError::Parse { path: path.into(), source })?;
    for secret in secrets {
        let found = lookup(&table, secret.key);
        let refused = if secret.url { found.and_then(Value::as_str).is_some_and(url_has_password) } else { found.is_some() };
        if refused {
            return Err(ConfigError::SecretInFile { path: path.into(), key: secret.key.into(), instead: secret.instead.into() });
        }
    }
    // The file alone must make sense, so that a later error is the variable's.
    T::deserialize(Value::Table(table.clone())).map_err(|source| ConfigError::Parse { path: path.into(), source })?;
    let mut vars: Vec<(String, Vec<String>, String)> =
        env.into_iter().filter_map(|(name, value)| key_path(rule, &name).map(|parts| (name, parts, value))).collect();
    // Parents before children, list entries in order: `…__MODELS__0__…` before `…__MODELS__1__…`.
    vars.sort_by(|a, b| a.1.cmp(&b.1));
    let applied: Vec<String> = vars.iter().map(|v| v.0.clone()).collect();
    for (name, parts, value) in vars {
        table = apply_var::<T>(&table, &name, &parts, &value)?;
    }
    T::deserialize(Value::Table(table))
        .map_err(|e| ConfigError::Env { name: applied.join(", "), reason: format!("with the file {}: {}", path.display(), e.message()) })
}

/// The key path a variable names under `rule`, lower-cased; `None` if it is
/// not one of the rule's variables.
pub fn key_path(rule: &EnvRule, name: &str) -> Option<Vec<String>> {
    let rest = name.strip_prefix(rule.prefix)?;
    if rest.is_empty() || (rule.needs_separator && !rest.contains("__")) {
        return None;
    }
    let parts: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
    if rule.others.iter().any(|other| other.eq_ignore_ascii_case(&parts[0])) {
        return None;
    }
    Some(parts)
}

/// `table` with the variable applied: its value read as TOML if the result
/// deserializes so, else as a string.
fn apply_var<T: DeserializeOwned>(table: &Table, name: &str, parts: &[String], value: &str) -> Result<Table, ConfigError> {
    let env_error = |reason: String| ConfigError::Env { name: name.to_owned(), reason };
    if parts.iter().any(String::is_empty) {
        return Err(env_error("an empty part in the name (`___` or a trailing `__`)".into()));
    }
    let typed = format!("v = {value}").parse::<Table>().ok().and_then(|mut t| t.remove("v"));
    let mut first_error = None;
    for candidate in typed.into_iter().chain(std::iter::once(Value::String(value.to_owned()))) {
        let mut next = table.clone();
        set(&mut next, parts, candidate).map_err(env_error)?;
        match T::deserialize(Value::Table(next.clone())) {
            Ok(_) => return Ok(next),
            // A list entry made by several variables is whole only after the last.
            Err(e) if e.message().starts_with("missing field") => return Ok(next),
            Err(e) => {
                first_error.get_or_insert(e.message().to_owned());
            }
        }
    }
    Err(env_error(first_error.unwrap_or_default()))
}

fn set(table: &mut Table, parts: &[String], value: Value) -> Result<(), String> {
    let (last, parents) = parts.split_last().ok_or("no key")?;
    let mut node = TableOrArray::Table(table);
    for part in parents {
        node = node.child(part)?;
    }
    match node {
        TableOrArray::Table(t) => {
            t.insert(last.clone(), value);
        }
        TableOrArray::Array(a) => {
            let i = index(last, a.len())?;
            if i == a.len() {
                a.push(value);
            } else {
                a[i] = value;
            }
        }
    }
    Ok(())
}

enum TableOrArray<'a> {
    Table(&'a mut Table),
    Array(&'a mut Vec<Value>),
}

impl<'a> TableOrArray<'a> {
    fn child(self, part: &str) -> Result<TableOrArray<'a>, String> {
        let slot = match self {
            TableOrArray::Table(t) => t.entry(part.to_owned()).or_insert_with(|| Value::Table(Table::new())),
            TableOrArray::Array(a) => {
                let i = index(part, a.len())?;
                if i == a.len() {
                    a.push(Value::Table(Table::new()));
                }
                &mut a[i]
            }
        };
        match slot {
            Value::Table(t) => Ok(TableOrArray::Table(t)),
            Value::Array(a) => Ok(TableOrArray::Array(a)),
            _ => Err(format!("`{part}` is a value, not a section or a list")),
        }
    }
}

fn index(part: &str, len: usize) -> Result<usize, String> {
    let i: usize = part.parse().map_err(|_| format!("`{part}` names a list entry: use its number, from 0"))?;
    if i > len {
        return Err(format!("entry {i} is past the end of the list ({len} entries; {len} adds one)"));
    }
    Ok(i)
}

fn lookup<'a>(table: &'a Table, dotted: &str) -> Option<&'a Value> {
    let mut parts = dotted.split('.');
    let mut value = table.get(parts.next()?)?;
    for part in parts {
        value = value.as_table()?.get(part)?;
    }
    Some(value)
}

/// Every key of `config` with its value as an environment variable would
/// carry it (TOML for numbers, lists and booleans, raw text for strings),
/// named by `rule`: what programs' tests use to show that every key can be
/// set from the environment.
///
/// # Errors
/// A value TOML cannot hold.
pub fn env_for_every_key<T: Serialize>(config: &T, rule: &EnvRule) -> Result<Vec<(String, String)>, toml::ser::Error> {
    fn walk(value: &Value, path: &mut Vec<String>, rule: &EnvRule, out: &mut Vec<(String, String)>) {
        match value {
            Value::Table(t) if !t.is_empty() => {
                for (key, v) in t {
                    path.push(key.to_ascii_uppercase());
                    walk(v, path, rule, out);
                    path.pop();
                }
            }
            Value::Array(a) if a.iter().all(Value::is_table) && !a.is_empty() => {
                for (i, v) in a.iter().enumerate() {
                    path.push(i.to_string());
                    walk(v, path, rule, out);
                    path.pop();
                }
            }
            leaf => {
                let text = match leaf {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                out.push((format!("{}{}", rule.prefix, path.join("__")), text));
            }
        }
    }
    let table = Table::try_from(config)?;
    let mut out = Vec::new();
    walk(&Value::Table(table), &mut Vec::new(), rule, &mut out);
    Ok(out)
}

/// `url` with its password replaced by `***`; other text as it is.
pub fn mask_url(text: &str) -> String {
    match url::Url::parse(text) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => text.to_owned(),
    }
}

/// Whether `text` is a URL that carries a password.
pub fn url_has_password(text: &str) -> bool {
    url::Url::parse(text).is_ok_and(|u| u.password().is_some())
}

/// The configuration as TOML, with every secret and every password inside a
/// URL replaced by `***`.
///
/// # Errors
/// A value TOML cannot hold (none of flowfarm's configurations has one).
pub fn to_masked_toml<T: Serialize>(config: &T, secrets: &[Secret]) -> Result<String, toml::ser::Error> {
    let mut table = Table::try_from(config)?;
    for secret in secrets.iter().filter(|s| !s.url) {
        let mut parts: Vec<&str> = secret.key.split('.').collect();
        let last = parts.pop().unwrap_or_default();
        let mut node = Some(&mut table);
        for part in parts {
            node = node.and_then(|t| t.get_mut(part)).and_then(Value::as_table_mut);
        }
        if let Some(value) = node.and_then(|t| t.get_mut(last)) {
            *value = Value::String("***".into());
        }
    }
    mask_urls(&mut table);
    toml::to_string_pretty(&table)
}

fn mask_urls(table: &mut Table) {
    fn mask(value: &mut Value) {
        match value {
            Value::String(s) => *s = mask_url(s),
            Value::Table(t) => t.iter_mut().for_each(|(_, v)| mask(v)),
            Value::Array(a) => a.iter_mut().for_each(mask),
            _ => {}
        }
    }
    table.iter_mut().for_each(|(_, v)| mask(v));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Conf {
        #[serde(default)]
        db: Db,
        #[serde(default)]
        models: Vec<Model>,
    }

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Db {
        url: String,
        max_connections: u32,
        password: Option<String>,
        tags: Vec<String>,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Model {
        name: String,
        steps: u32,
    }

    const RULE: EnvRule = EnvRule { prefix: "APP_", needs_separator: true, others: &["WORKER"] };
    const SECRETS: &[Secret] = &[
        Secret { key: "db.password", instead: "set APP_DB__PASSWORD", url: false },
        Secret { key: "db.url", instead: "put the password in APP_DB__PASSWORD", url: true },
    ];
    const FILE: &str = "[db]\nurl = \"postgres://u@h/d\"\n[[models]]\nname = \"a\"\nsteps = 4\n";

    fn load_with(vars: &[(&str, &str)]) -> Result<Conf, ConfigError> {
        let env = vars.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        from_str(FILE, Path::new("app.toml"), env, &RULE, SECRETS)
    }

    #[test]
    fn variables_set_keys_by_the_rule_with_their_types() {
        let c = load_with(&[
            ("APP_DB__MAX_CONNECTIONS", "32"),
            // A string key whose value reads as a number stays a string.
            ("APP_DB__URL", "12345"),
            ("APP_DB__TAGS", r#"["x", "y"]"#),
            ("APP_DB__PASSWORD", "hunter2"),
            ("APP_MODELS__0__STEPS", "8"),
            ("APP_MODELS__1__NAME", "b"),
            ("APP_MODELS__1__STEPS", "2"),
            // Not the rule's: no separator, or another program's section.
            ("APP_TOKEN", "t"),
            ("APP_WORKER__CAPACITY", "x"),
            ("OTHER_DB__URL", "nope"),
        ])
        .unwrap();
        assert_eq!(c.db.max_connections, 32);
        assert_eq!(c.db.url, "12345");
        assert_eq!(c.db.tags, ["x", "y"]);
        assert_eq!(c.db.password.as_deref(), Some("hunter2"));
        assert_eq!(c.models, [Model { name: "a".into(), steps: 8 }, Model { name: "b".into(), steps: 2 }]);
    }

    #[test]
    fn a_bad_variable_is_named() {
        for (name, value, says) in [
            ("APP_DB__MAX_CONECTIONS", "3", "unknown field `max_conections`"),
            ("APP_DB__MAX_CONNECTIONS", "many", "invalid type"),
            ("APP_NOPE__X", "1", "unknown field `nope`"),
            ("APP_MODELS__5__STEPS", "1", "past the end"),
            ("APP_MODELS__X__STEPS", "1", "use its number"),
            ("APP_DB__URL__X", "1", "is a value"),
            ("APP_DB__", "1", "empty part"),
        ] {
            let err = load_with(&[(name, value)]).unwrap_err();
            assert!(matches!(&err, ConfigError::Env { name: n, .. } if n == name), "{err}");
            assert!(err.to_string().contains(says), "{name}: {err}");
        }
    }

    #[test]
    fn an_entry_left_incomplete_is_reported_with_the_variables() {
        let err = load_with(&[("APP_MODELS__1__NAME", "b")]).unwrap_err();
        assert!(err.to_string().contains("APP_MODELS__1__NAME") && err.to_string().contains("missing field `steps`"), "{err}");
    }

    #[test]
    fn secrets_are_refused_in_the_file_and_masked_when_shown() {
        let text = format!("{FILE}\n[db.extra]\n").replace("[db]\n", "[db]\npassword = \"hunter2\"\n");
        let err = from_str::<Conf>(&text, Path::new("app.toml"), [], &RULE, SECRETS).unwrap_err();
        assert!(err.to_string().contains("`db.password` is a secret") && err.to_string().contains("APP_DB__PASSWORD"), "{err}");
        let text = FILE.replace("postgres://u@h/d", "postgres://u:pw@h/d");
        let err = from_str::<Conf>(&text, Path::new("app.toml"), [], &RULE, SECRETS).unwrap_err();
        assert!(err.to_string().contains("`db.url` is a secret"), "{err}");
        // From the environment, a URL may carry its password.
        let c = load_with(&[("APP_DB__URL", "postgres://u:pw@h/d")]).unwrap();
        assert_eq!(c.db.url, "postgres://u:pw@h/d");

        let mut c = load_with(&[("APP_DB__PASSWORD", "hunter2")]).unwrap();
        c.db.url = "postgres://u:pw@h/d".into();
        let shown = to_masked_toml(&c, SECRETS).unwrap();
        assert!(!shown.contains("hunter2") && !shown.contains(":pw@"), "{shown}");
        assert!(shown.contains("password = \"***\"") && shown.contains("postgres://u:***@h/d"), "{shown}");
        let back: Conf = toml::from_str(&shown).unwrap();
        assert_eq!(back.models, c.models, "what is shown reads back");
    }
}
