//! Configuration loading shared by every process.
//!
//! A YAML file gives the base; every key can be overridden by an environment
//! variable `CARACAL_<KEY_IN_UPPER_SNAKE_CASE>` (for example `CARACAL_DB_POOL_SIZE=40`),
//! which is how Kubernetes secrets and per-pod settings reach the process. Each
//! process owns its top-level struct; the sections they share live here.

use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Deserialize};

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("environment variable {name}={value:?} is not valid: {reason}")]
    Env {
        name: String,
        value: String,
        reason: String,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Parses YAML text; empty text is the default configuration.
pub fn from_yaml<T: DeserializeOwned + Default>(text: &str) -> Result<T, serde_yaml::Error> {
    if text.trim().is_empty() {
        return Ok(T::default());
    }
    serde_yaml::from_str(text)
}

/// Reads `path` (if given) as YAML; no file is the default configuration.
pub fn read_yaml<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T, ConfigError> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    from_yaml(&text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// `CARACAL_*` overrides read through `lookup` (`std::env::var` in production, a
/// map in tests).
pub struct EnvOverrides<F> {
    lookup: F,
}

impl<F: Fn(&str) -> Option<String>> EnvOverrides<F> {
    pub fn new(lookup: F) -> Self {
        Self { lookup }
    }

    /// Replaces `field` with the variable's text when it is set.
    pub fn text(&self, name: &str, field: &mut String) {
        if let Some(value) = (self.lookup)(name) {
            *field = value;
        }
    }

    /// Replaces `field` with the variable's parsed value when it is set; a value
    /// that does not parse is an error naming the variable.
    pub fn parse<T: std::str::FromStr>(&self, name: &str, field: &mut T) -> Result<(), ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        if let Some(value) = (self.lookup)(name) {
            *field = value.trim().parse().map_err(|e: T::Err| ConfigError::Env {
                name: name.to_owned(),
                value: value.clone(),
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }
}

/// The process environment as an override source.
pub fn process_env() -> EnvOverrides<fn(&str) -> Option<String>> {
    fn var(name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
    EnvOverrides::new(var)
}

/// PostgreSQL (`database:` in the config file).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://user:pass@host:port/db`.
    pub url: String,
    /// Connections kept open (the pool's idle floor).
    pub db_pool_size: u32,
    /// Extra connections opened under load, above `dbPoolSize`.
    pub db_max_overflow: u32,
    /// Seconds to wait for a free connection before failing with UNAVAILABLE.
    pub db_pool_timeout: u64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/caracal".to_owned(),
            db_pool_size: 20,
            db_max_overflow: 10,
            db_pool_timeout: 30,
        }
    }
}

impl DatabaseConfig {
    /// `CARACAL_DATABASE_URL`, `CARACAL_DB_POOL_SIZE`, `CARACAL_DB_MAX_OVERFLOW`,
    /// `CARACAL_DB_POOL_TIMEOUT`.
    pub fn apply_env<F: Fn(&str) -> Option<String>>(
        &mut self,
        env: &EnvOverrides<F>,
    ) -> Result<(), ConfigError> {
        env.text("CARACAL_DATABASE_URL", &mut self.url);
        env.parse("CARACAL_DB_POOL_SIZE", &mut self.db_pool_size)?;
        env.parse("CARACAL_DB_MAX_OVERFLOW", &mut self.db_max_overflow)?;
        env.parse("CARACAL_DB_POOL_TIMEOUT", &mut self.db_pool_timeout)?;
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.url.is_empty() {
            return Err(ConfigError::Invalid("database.url is required".to_owned()));
        }
        if self.db_pool_size == 0 {
            return Err(ConfigError::Invalid(
                "database.dbPoolSize must be at least 1".to_owned(),
            ));
        }
        if self.db_pool_timeout == 0 {
            return Err(ConfigError::Invalid(
                "database.dbPoolTimeout must be at least 1 second".to_owned(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn env_overrides_name_the_bad_variable() {
        let env: HashMap<&str, &str> = [
            ("CARACAL_DB_POOL_SIZE", "7"),
            ("CARACAL_DATABASE_URL", "postgres://x/y"),
        ]
        .into_iter()
        .collect();
        let mut db = DatabaseConfig::default();
        db.apply_env(&EnvOverrides::new(|k: &str| {
            env.get(k).map(|v| v.to_string())
        }))
        .unwrap();
        assert_eq!(db.db_pool_size, 7);
        assert_eq!(db.url, "postgres://x/y");
        let err = db
            .apply_env(&EnvOverrides::new(|k: &str| {
                (k == "CARACAL_DB_POOL_TIMEOUT").then(|| "soon".to_owned())
            }))
            .unwrap_err();
        assert!(err.to_string().contains("CARACAL_DB_POOL_TIMEOUT"), "{err}");
        let empty: DatabaseConfig = from_yaml("  \n").unwrap();
        assert_eq!(empty.db_pool_size, 20);
        assert!(from_yaml::<DatabaseConfig>("dbPoolSze: 3").is_err());
    }
}
