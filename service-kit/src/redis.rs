//! Redis connections for every Caracal process: one standalone server or a Redis
//! Cluster (the guide's topology: 3 shards, replicas, automatic failover), plain or
//! TLS (`rediss://`, a private CA and a client certificate from files).
//!
//! [`RedisConn`] hides the difference for the commands that touch one slot (every
//! budget script and every key of one hierarchy carries its partition's hash tag):
//! it is a [`redis::aio::ConnectionLike`], so scripts, commands and single-slot
//! pipelines run on either. In cluster mode the client follows `MOVED`/`ASK` and
//! topology changes by itself. What spans slots goes through [`query_each`]: one
//! pipeline on a standalone server, one command per slot on a cluster.
//!
//! Both kinds connect lazily: a process starts while Redis is down and its calls
//! fail (and are retried by their callers) until it is back.

use std::{sync::Arc, time::Duration};

use redis::{
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClientBuilder,
    cluster_async::ClusterConnection,
    cluster_routing::{
        MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo, SingleNodeRoutingInfo,
    },
    Cmd, Pipeline, RedisFuture, RedisResult, Value,
};
use serde::Deserialize;

/// `redis.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    #[default]
    Standalone,
    Cluster,
}

impl RedisMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RedisMode::Standalone => "standalone",
            RedisMode::Cluster => "cluster",
        }
    }
}

impl std::str::FromStr for RedisMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "standalone" => Ok(RedisMode::Standalone),
            "cluster" => Ok(RedisMode::Cluster),
            other => Err(format!("{other:?} is not standalone or cluster")),
        }
    }
}

/// `redis.tls` (the guide's keys). TLS itself is chosen by the `rediss://` scheme;
/// these name the files that go with it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct RedisTls {
    /// Require TLS: every URL must then be `rediss://`.
    pub enabled: bool,
    /// PEM bundle of the CA that signs the servers' certificates (empty: the
    /// system's roots).
    pub ca_cert_file: String,
    /// Client certificate and key (PEM), for servers that require one.
    pub cert_file: String,
    pub key_file: String,
}

/// Where Redis is and how to talk to it.
#[derive(Debug, Clone)]
pub struct RedisEndpoint {
    pub mode: RedisMode,
    /// Standalone: the server. Cluster: seed nodes (any reachable one tells the
    /// client the whole topology).
    pub urls: Vec<String>,
    pub tls: RedisTls,
    /// Connect and response timeout.
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RedisSetupError {
    #[error("redis: {0}")]
    Config(String),
    #[error("redis: {0}")]
    Client(#[from] redis::RedisError),
}

/// Cluster seeds from a comma-separated list (`CARACAL_REDIS_NODES`).
pub fn parse_nodes(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect()
}

impl RedisEndpoint {
    /// The server at `url` (standalone) or the seeds `nodes` (cluster).
    pub fn new(
        mode: RedisMode,
        url: &str,
        nodes: &[String],
        tls: RedisTls,
        timeout: Duration,
    ) -> Self {
        Self {
            mode,
            urls: match mode {
                RedisMode::Standalone => vec![url.to_owned()],
                RedisMode::Cluster => nodes.to_vec(),
            },
            tls,
            timeout,
        }
    }

    /// One connection (see [`RedisEndpoint::connect`]).
    pub fn connect_one(&self) -> Result<RedisConn, RedisSetupError> {
        self.connect(1)?
            .pop()
            .ok_or_else(|| RedisSetupError::Config("no connection".to_owned()))
    }

    /// Checks the settings (schemes, files, seeds) without connecting.
    pub fn validate(&self) -> Result<(), RedisSetupError> {
        let bad = |m: String| Err(RedisSetupError::Config(m));
        if self.urls.is_empty() {
            return bad(match self.mode {
                RedisMode::Standalone => "redis.url is empty".to_owned(),
                RedisMode::Cluster => {
                    "redis.nodes: cluster mode needs at least one seed node".to_owned()
                }
            });
        }
        for url in &self.urls {
            let tls = url.starts_with("rediss://");
            if !(tls || url.starts_with("redis://")) {
                return bad(format!("{url:?} is not a redis:// or rediss:// URL"));
            }
            if self.tls.enabled && !tls {
                return bad(format!(
                    "redis.tls.enabled needs rediss:// URLs, got {url:?}"
                ));
            }
            let tls_files = !(self.tls.ca_cert_file.is_empty() && self.tls.cert_file.is_empty());
            if tls_files && !tls {
                return bad(format!("redis.tls files need rediss:// URLs, got {url:?}"));
            }
        }
        if self.tls.cert_file.is_empty() != self.tls.key_file.is_empty() {
            return bad("redis.tls.certFile and redis.tls.keyFile go together".to_owned());
        }
        if self.timeout.is_zero() {
            return bad("redis timeout must be at least 1 ms".to_owned());
        }
        Ok(())
    }

    fn certificates(&self) -> Result<Option<redis::TlsCertificates>, RedisSetupError> {
        let read = |what: &str, path: &str| {
            std::fs::read(path).map_err(|e| RedisSetupError::Config(format!("{what} {path}: {e}")))
        };
        let t = &self.tls;
        if t.ca_cert_file.is_empty() && t.cert_file.is_empty() {
            return Ok(None);
        }
        let root_cert = if t.ca_cert_file.is_empty() {
            None
        } else {
            Some(read("redis.tls.caCertFile", &t.ca_cert_file)?)
        };
        let client_tls = if t.cert_file.is_empty() {
            None
        } else {
            Some(redis::ClientTlsConfig {
                client_cert: read("redis.tls.certFile", &t.cert_file)?,
                client_key: read("redis.tls.keyFile", &t.key_file)?,
            })
        };
        Ok(Some(redis::TlsCertificates {
            client_tls,
            root_cert,
        }))
    }

    /// `count` independent connections (each multiplexed, each reconnecting by
    /// itself). Nothing is dialled yet.
    pub fn connect(&self, count: usize) -> Result<Vec<RedisConn>, RedisSetupError> {
        self.validate()?;
        let certs = self.certificates()?;
        // TCP_NODELAY: every call is one small request and reply; with Nagle and
        // delayed ACKs each would wait ~40 ms.
        let tcp = redis::io::tcp::TcpSettings::default().set_nodelay(true);
        let count = count.max(1);
        match self.mode {
            RedisMode::Standalone => {
                let info = redis::IntoConnectionInfo::into_connection_info(self.urls[0].as_str())?
                    .set_tcp_settings(tcp);
                let client = match certs {
                    Some(c) => redis::Client::build_with_tls(info, c)?,
                    None => redis::Client::open(info)?,
                };
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(2));
                (0..count)
                    .map(|_| {
                        ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                            .map(RedisConn::Standalone)
                            .map_err(RedisSetupError::from)
                    })
                    .collect()
            }
            RedisMode::Cluster => {
                let mut builder = ClusterClientBuilder::new(self.urls.iter().map(String::as_str))
                    .tcp_settings(tcp)
                    .connection_timeout(self.timeout)
                    .response_timeout(self.timeout)
                    // A failover takes seconds: the client's own retries (MOVED,
                    // reconnects) stay short, callers retry or fail closed.
                    .retries(2)
                    .max_retry_wait(200)
                    .min_retry_wait(20);
                if let Some(c) = certs {
                    builder = builder.certs(c);
                }
                let client = builder.build()?;
                Ok((0..count)
                    .map(|_| {
                        RedisConn::Cluster(Box::new(
                            client.get_pending_async_connection_with_config(
                                redis::cluster::ClusterConfig::new()
                                    .set_connection_timeout(self.timeout)
                                    .set_response_timeout(self.timeout),
                            ),
                        ))
                    })
                    .collect())
            }
        }
    }
}

/// One connection to a standalone Redis or to a Redis Cluster. Cheap to clone.
#[derive(Clone)]
pub enum RedisConn {
    Standalone(ConnectionManager),
    Cluster(Box<ClusterConnection>),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Standalone(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Standalone(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Standalone(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

impl RedisConn {
    pub fn mode(&self) -> RedisMode {
        match self {
            RedisConn::Standalone(_) => RedisMode::Standalone,
            RedisConn::Cluster(_) => RedisMode::Cluster,
        }
    }

    /// Readiness: a standalone server answers PING; a cluster reports
    /// `cluster_state:ok` and every primary answers PING.
    pub async fn check(&self) -> Result<(), String> {
        let mut conn = self.clone();
        match &mut conn {
            RedisConn::Standalone(c) => redis::cmd("PING")
                .query_async::<String>(c)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            RedisConn::Cluster(c) => {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(c.as_mut())
                    .await
                    .map_err(|e| e.to_string())?;
                let state = info_field(&info, "cluster_state").unwrap_or("unknown");
                if state != "ok" {
                    return Err(format!("cluster_state:{state}"));
                }
                // PING is routed to every primary; one failing fails it.
                redis::cmd("PING")
                    .query_async::<Value>(c.as_mut())
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("a primary does not answer: {e}"))
            }
        }
    }

    /// Per primary: its address and the `MOVED`/`ASK` redirections it has answered
    /// since it started (`INFO errorstats`); empty for a standalone server. The
    /// cluster client follows redirections without telling, so the servers' own
    /// counts are the record of how often the topology moved under clients.
    pub async fn redirections(&self) -> Result<Vec<NodeRedirections>, String> {
        if self.mode() == RedisMode::Standalone {
            return Ok(Vec::new());
        }
        let replies = self
            .on_each_node(redis::cmd("INFO").arg("errorstats"), true)
            .await?;
        Ok(replies
            .into_iter()
            .map(|(node, v)| {
                let info = value_text(&v).unwrap_or_default();
                NodeRedirections {
                    moved: errorstat(&info, "MOVED"),
                    ask: errorstat(&info, "ASK"),
                    node,
                }
            })
            .collect())
    }

    /// Runs `cmd` on every node of a cluster (only the primaries when
    /// `primaries_only`), or on the one server: each node's address and reply.
    pub async fn on_each_node(
        &self,
        cmd: &Cmd,
        primaries_only: bool,
    ) -> Result<Vec<(String, Value)>, String> {
        let mut c = match self {
            RedisConn::Standalone(c) => {
                let mut c = c.clone();
                let reply = cmd.query_async(&mut c).await.map_err(|e| e.to_string())?;
                return Ok(vec![("standalone".to_owned(), reply)]);
            }
            RedisConn::Cluster(c) => c.clone(),
        };
        let nodes = if primaries_only {
            MultipleNodeRoutingInfo::AllMasters
        } else {
            MultipleNodeRoutingInfo::AllNodes
        };
        let reply = c
            .route_command(
                cmd.clone(),
                RoutingInfo::MultiNode((nodes, Some(ResponsePolicy::Special))),
            )
            .await
            .map_err(|e| e.to_string())?;
        match reply {
            Value::Map(m) => Ok(m
                .into_iter()
                .filter_map(|(k, v)| Some((value_text(&k)?, v)))
                .collect()),
            other => Err(format!("per-node reply expected, got {other:?}")),
        }
    }

    /// The primary serving each slot range, from `CLUSTER SLOTS`; empty for a
    /// standalone server.
    pub async fn slot_owners(&self) -> Result<Vec<SlotOwner>, String> {
        let RedisConn::Cluster(c) = self else {
            return Ok(Vec::new());
        };
        let mut c = c.clone();
        let reply = c
            .route_command(
                redis::cmd("CLUSTER").arg("SLOTS").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            )
            .await
            .map_err(|e| e.to_string())?;
        let Value::Array(ranges) = reply else {
            return Err("CLUSTER SLOTS: not an array".to_owned());
        };
        let mut out = Vec::new();
        for r in ranges {
            let Value::Array(parts) = r else { continue };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(primary))) =
                (parts.first(), parts.get(1), parts.get(2))
            else {
                continue;
            };
            let (Some(host), Some(Value::Int(port))) =
                (primary.first().and_then(value_text), primary.get(1))
            else {
                continue;
            };
            out.push(SlotOwner {
                start: u16::try_from(*start).unwrap_or(0),
                end: u16::try_from(*end).unwrap_or(u16::MAX),
                node: format!("{host}:{port}"),
            });
        }
        out.sort_by_key(|o| o.start);
        Ok(out)
    }
}

/// `MOVED`/`ASK` counts of one primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRedirections {
    pub node: String,
    pub moved: u64,
    pub ask: u64,
}

/// A slot range and the address of its primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotOwner {
    pub start: u16,
    pub end: u16,
    pub node: String,
}

/// A key prefix is part of every key: no whitespace or control characters (keys
/// go into line-based records) and no braces (they would move the hash tag).
pub fn check_key_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty()
        || prefix
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '{' || c == '}')
    {
        return Err(
            "redis.keyPrefix must be non-empty, without spaces, control characters or braces"
                .to_owned(),
        );
    }
    Ok(())
}

/// The cluster slot of a key, as the servers compute it: CRC16/XMODEM of its hash
/// tag (the first non-empty `{...}`), or of the whole key, mod 16384.
pub fn slot_of(key: &str) -> u16 {
    let key = key.as_bytes();
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16_xmodem(tagged.unwrap_or(key)) % 16384
}

fn crc16_xmodem(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The node serving `slot` in `owners` (sorted by start), if known.
pub fn owner_of(owners: &[SlotOwner], slot: u16) -> Option<&str> {
    owners
        .iter()
        .find(|o| o.start <= slot && slot <= o.end)
        .map(|o| o.node.as_str())
}

/// Runs commands that may touch different slots, answers in order: one pipeline on
/// a standalone server (one round trip), one command each on a cluster (sent at
/// once; the client batches those for the same node).
pub async fn query_each(conn: &RedisConn, cmds: Vec<Cmd>) -> RedisResult<Vec<Value>> {
    if cmds.is_empty() {
        return Ok(Vec::new());
    }
    match conn {
        RedisConn::Standalone(c) => {
            let mut pipe = redis::pipe();
            for cmd in cmds {
                pipe.add_command(cmd);
            }
            let mut c = c.clone();
            pipe.query_async(&mut c).await
        }
        RedisConn::Cluster(c) => {
            let cmds = Arc::new(cmds);
            let calls = (0..cmds.len()).map(|i| {
                let mut c = c.as_ref().clone();
                let cmds = cmds.clone();
                async move { c.req_packed_command(&cmds[i]).await }
            });
            futures::future::join_all(calls).await.into_iter().collect()
        }
    }
}

fn value_text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == name).then(|| v.trim())
    })
}

/// `errorstat_<PREFIX>:count=N` of `INFO errorstats`.
fn errorstat(info: &str, prefix: &str) -> u64 {
    info_field(info, &format!("errorstat_{prefix}"))
        .and_then(|v| v.split(',').find_map(|kv| kv.strip_prefix("count=")))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(mode: RedisMode, urls: &[&str]) -> RedisEndpoint {
        RedisEndpoint {
            mode,
            urls: urls.iter().map(|u| (*u).to_owned()).collect(),
            tls: RedisTls::default(),
            timeout: Duration::from_millis(500),
        }
    }

    #[test]
    fn settings_are_checked_before_connecting() {
        assert!(endpoint(RedisMode::Standalone, &["redis://127.0.0.1:6379"])
            .validate()
            .is_ok());
        assert!(endpoint(RedisMode::Cluster, &[]).validate().is_err());
        assert!(endpoint(RedisMode::Standalone, &["http://x"])
            .validate()
            .is_err());
        let mut tls = endpoint(RedisMode::Cluster, &["redis://127.0.0.1:7000"]);
        tls.tls.enabled = true;
        assert!(tls
            .validate()
            .unwrap_err()
            .to_string()
            .contains("rediss://"));
        let mut half = endpoint(RedisMode::Standalone, &["rediss://127.0.0.1:6380"]);
        half.tls.cert_file = "/c.pem".into();
        assert!(half
            .validate()
            .unwrap_err()
            .to_string()
            .contains("go together"));
        let mut missing = endpoint(RedisMode::Standalone, &["rediss://127.0.0.1:6380"]);
        missing.tls.ca_cert_file = "/nonexistent/ca.pem".into();
        assert!(missing
            .connect(1)
            .err()
            .is_some_and(|e| e.to_string().contains("caCertFile")));
    }

    #[test]
    fn info_and_slots_parse() {
        let info = "# Errorstats\r\nerrorstat_ERR:count=2\r\nerrorstat_MOVED:count=17\r\nerrorstat_ASK:count=3\r\n";
        assert_eq!(errorstat(info, "MOVED"), 17);
        assert_eq!(errorstat(info, "ASK"), 3);
        assert_eq!(errorstat(info, "NOSCRIPT"), 0);
        assert_eq!(
            info_field("cluster_state:ok\r\n", "cluster_state"),
            Some("ok")
        );
        // The check value of CRC16/XMODEM, and the Redis cluster spec's examples.
        assert_eq!(crc16_xmodem(b"123456789"), 0x31c3);
        assert_eq!(slot_of("foo"), 12182);
        assert_eq!(slot_of("{user1000}.following"), slot_of("user1000"));
        assert_eq!(slot_of("foo{}{bar}"), crc16_xmodem(b"foo{}{bar}") % 16384);
        // Keys of one hash tag share a slot.
        assert_eq!(
            slot_of("caracal:{p3}:outbox"),
            slot_of("caracal:{p3}:rsv:x")
        );
        let owners = vec![
            SlotOwner {
                start: 0,
                end: 5460,
                node: "a".into(),
            },
            SlotOwner {
                start: 5461,
                end: 16383,
                node: "b".into(),
            },
        ];
        assert_eq!(owner_of(&owners, 5461), Some("b"));
        assert_eq!(owner_of(&owners, 0), Some("a"));
    }
}
