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
    /// `postgres://user:pass@host:port/db`, optionally with libpq's TLS parameters
    /// (`?sslmode=verify-full&sslrootcert=...&sslcert=...&sslkey=...`, see
    /// [`crate::db::tls`]).
    pub url: String,
    /// Connections kept open (the pool's idle floor).
    pub db_pool_size: u32,
    /// Extra connections opened under load, above `dbPoolSize`.
    pub db_max_overflow: u32,
    /// Seconds to wait for a free connection before failing with UNAVAILABLE.
    pub db_pool_timeout: u64,
    /// TLS as separate keys (the production guide's `ssl:` block), written into the
    /// URL's parameters when the configuration is loaded ([`DatabaseConfig::apply_env`]).
    pub ssl: DatabaseSsl,
}

/// `database.ssl`: the production guide's PostgreSQL TLS keys. Each is the URL
/// parameter of the same meaning (`mode` = `sslmode`, `rootCert` = `sslrootcert`,
/// `cert` = `sslcert`, `key` = `sslkey`); a URL that already names one with another
/// value is a configuration error, not a silent choice.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct DatabaseSsl {
    /// TLS is required: `mode` may then only be `require`, `verify-ca` or
    /// `verify-full` (the default when enabled and `mode` is empty).
    pub enabled: bool,
    /// libpq's `sslmode`: `disable`, `require`, `verify-ca`, `verify-full`.
    pub mode: String,
    /// PEM file of the CA(s) that sign the server certificate (`sslrootcert`).
    pub root_cert: String,
    /// PEM file of the client certificate (`sslcert`), for `hostssl ... cert` servers.
    pub cert: String,
    /// PEM file of the client certificate's private key (`sslkey`).
    pub key: String,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/caracal".to_owned(),
            db_pool_size: 20,
            db_max_overflow: 10,
            db_pool_timeout: 30,
            ssl: DatabaseSsl::default(),
        }
    }
}

impl DatabaseConfig {
    /// `CARACAL_DATABASE_URL`, `CARACAL_DB_POOL_SIZE`, `CARACAL_DB_MAX_OVERFLOW`,
    /// `CARACAL_DB_POOL_TIMEOUT`, `CARACAL_DATABASE_SSL_ENABLED`,
    /// `CARACAL_DATABASE_SSL_MODE`, `CARACAL_DATABASE_SSL_ROOT_CERT`,
    /// `CARACAL_DATABASE_SSL_CERT`, `CARACAL_DATABASE_SSL_KEY`; then the `ssl` keys
    /// are written into the URL ([`DatabaseConfig::resolve_ssl`]), so every user of
    /// `url` (pool, migrations, leases) connects the same way.
    pub fn apply_env<F: Fn(&str) -> Option<String>>(
        &mut self,
        env: &EnvOverrides<F>,
    ) -> Result<(), ConfigError> {
        env.text("CARACAL_DATABASE_URL", &mut self.url);
        env.parse("CARACAL_DB_POOL_SIZE", &mut self.db_pool_size)?;
        env.parse("CARACAL_DB_MAX_OVERFLOW", &mut self.db_max_overflow)?;
        env.parse("CARACAL_DB_POOL_TIMEOUT", &mut self.db_pool_timeout)?;
        env.parse("CARACAL_DATABASE_SSL_ENABLED", &mut self.ssl.enabled)?;
        env.text("CARACAL_DATABASE_SSL_MODE", &mut self.ssl.mode);
        env.text("CARACAL_DATABASE_SSL_ROOT_CERT", &mut self.ssl.root_cert);
        env.text("CARACAL_DATABASE_SSL_CERT", &mut self.ssl.cert);
        env.text("CARACAL_DATABASE_SSL_KEY", &mut self.ssl.key);
        self.resolve_ssl()
    }

    /// Writes `ssl` into `url` as libpq's parameters (idempotent: a parameter the
    /// URL already has with the same value is left alone). Refused: a URL parameter
    /// with another value than the key's, `enabled` with a mode that does not
    /// encrypt, and TLS parameters that do not make sense together (a
    /// `verify-*` mode without a root certificate, a certificate without its key).
    pub fn resolve_ssl(&mut self) -> Result<(), ConfigError> {
        let ssl = &self.ssl;
        let present: Vec<(String, String)> = self
            .url
            .split_once('?')
            .map(|(_, q)| q)
            .unwrap_or("")
            .split('&')
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.to_owned(), crate::db::tls::percent_decode(v)))
            .collect();
        let url_has_mode = present.iter().any(|(k, _)| k == "sslmode");
        let mode = match (ssl.enabled, ssl.mode.trim()) {
            // Enabled without a mode: the URL's, else the strictest.
            (true, "") if url_has_mode => "",
            (true, "") => "verify-full",
            (true, m @ ("disable" | "allow" | "prefer")) => {
                return Err(ConfigError::Invalid(format!(
                    "database.ssl.enabled needs mode require, verify-ca or verify-full, not {m}"
                )))
            }
            (_, m) => m,
        };
        let wanted = [
            ("sslmode", mode),
            ("sslrootcert", ssl.root_cert.trim()),
            ("sslcert", ssl.cert.trim()),
            ("sslkey", ssl.key.trim()),
        ];
        let mut added = Vec::new();
        for (param, value) in wanted.into_iter().filter(|(_, v)| !v.is_empty()) {
            match present.iter().find(|(k, _)| k == param) {
                Some((_, v)) if v == value => {}
                Some((_, v)) => {
                    return Err(ConfigError::Invalid(format!(
                        "database.url has {param}={v} but database.ssl says {value}"
                    )))
                }
                None => added.push(format!("{param}={}", crate::db::tls::percent_encode(value))),
            }
        }
        if !added.is_empty() {
            let sep = match self.url.contains('?') {
                false => "?",
                true if self.url.ends_with('?') || self.url.ends_with('&') => "",
                true => "&",
            };
            self.url = format!("{}{sep}{}", self.url, added.join("&"));
        }
        let (_, tls) = crate::db::tls::parse(&self.url)
            .map_err(|e| ConfigError::Invalid(format!("database TLS settings: {e}")))?;
        if ssl.enabled && tls == crate::db::tls::TlsMode::Off {
            return Err(ConfigError::Invalid(
                "database.ssl.enabled but database.url does not ask for TLS".to_owned(),
            ));
        }
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
        crate::db::tls::parse(&self.url)
            .map_err(|e| ConfigError::Invalid(format!("database TLS settings: {e}")))?;
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

    fn resolved(yaml: &str, env: &[(&str, &str)]) -> Result<DatabaseConfig, ConfigError> {
        let mut db: DatabaseConfig = from_yaml(yaml).unwrap();
        let env: HashMap<&str, &str> = env.iter().copied().collect();
        db.apply_env(&EnvOverrides::new(|k: &str| {
            env.get(k).map(|v| v.to_string())
        }))?;
        Ok(db)
    }

    #[test]
    fn the_guides_ssl_keys_become_url_parameters() {
        // YAML keys, as in the production guide.
        let db = resolved(
            "url: postgres://svc@db.internal:5432/caracal\n\
             ssl:\n  enabled: true\n  mode: verify-full\n  rootCert: /etc/ssl/ca.pem\n\
             \x20 cert: /etc/ssl/client cert.pem\n  key: /etc/ssl/client.key\n",
            &[],
        )
        .unwrap();
        assert_eq!(
            db.url,
            "postgres://svc@db.internal:5432/caracal?sslmode=verify-full&sslrootcert=/etc/ssl/ca.pem\
             &sslcert=/etc/ssl/client%20cert.pem&sslkey=/etc/ssl/client.key"
        );
        let (_, mode) = crate::db::tls::parse(&db.url).unwrap();
        assert_eq!(
            mode,
            crate::db::tls::TlsMode::Verify {
                root_cert: "/etc/ssl/ca.pem".into(),
                hostname: true,
                client: Some(crate::db::tls::ClientCert {
                    cert: "/etc/ssl/client cert.pem".into(),
                    key: "/etc/ssl/client.key".into(),
                }),
            }
        );
        // Idempotent: resolving again changes nothing.
        let mut again = db.clone();
        again.resolve_ssl().unwrap();
        assert_eq!(again.url, db.url);

        // The same from CARACAL_* variables; enabled without a mode is verify-full.
        let db = resolved(
            "",
            &[
                (
                    "CARACAL_DATABASE_URL",
                    "postgres://svc@db/caracal?application_name=x",
                ),
                ("CARACAL_DATABASE_SSL_ENABLED", "true"),
                ("CARACAL_DATABASE_SSL_ROOT_CERT", "/ca.pem"),
                ("CARACAL_DATABASE_SSL_CERT", "/c.pem"),
                ("CARACAL_DATABASE_SSL_KEY", "/k.pem"),
            ],
        )
        .unwrap();
        assert_eq!(
            db.url,
            "postgres://svc@db/caracal?application_name=x&sslmode=verify-full&sslrootcert=/ca.pem\
             &sslcert=/c.pem&sslkey=/k.pem"
        );
        // A URL that already says it all is left alone; no ssl keys, nothing changes.
        let url = "postgres://svc@db/caracal?sslmode=require";
        let db = resolved("ssl: { enabled: true }", &[("CARACAL_DATABASE_URL", url)]).unwrap();
        assert_eq!(db.url, url);
        assert_eq!(
            resolved("", &[("CARACAL_DATABASE_URL", url)]).unwrap().url,
            url
        );
    }

    #[test]
    fn contradicting_or_incomplete_ssl_settings_are_refused() {
        let refused = [
            // TLS required, a mode that does not encrypt.
            (
                "ssl: { enabled: true, mode: prefer }",
                "postgres://h/db",
                "enabled",
            ),
            // The URL says one thing, the keys another.
            (
                "ssl: { mode: verify-full, rootCert: /ca.pem }",
                "postgres://h/db?sslmode=require",
                "sslmode=require",
            ),
            (
                "ssl: { enabled: true }",
                "postgres://h/db?sslmode=disable",
                "does not ask for TLS",
            ),
            // verify-full without a root certificate; a certificate without its key.
            ("ssl: { enabled: true }", "postgres://h/db", "sslrootcert"),
            (
                "ssl: { mode: require, cert: /c.pem }",
                "postgres://h/db",
                "sslkey",
            ),
        ];
        for (yaml, url, named) in refused {
            let err = resolved(yaml, &[("CARACAL_DATABASE_URL", url)]).unwrap_err();
            assert!(err.to_string().contains(named), "{yaml} {url}: {err}");
        }
        let bad_url = DatabaseConfig {
            url: "postgres://h/db?sslmode=verify-ca".into(),
            ..Default::default()
        };
        assert!(bad_url.validate().is_err());
        assert!(from_yaml::<DatabaseConfig>("ssl: { rootcert: /x }").is_err());
    }
}
