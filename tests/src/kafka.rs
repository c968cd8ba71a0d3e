//! A real Kafka-protocol broker for tests: the `tansu` binary, on a free port of
//! 127.0.0.1, storing in SQLite under its own temporary directory (so its data
//! survives [`Tansu::stop`] / [`Tansu::start`], which outage tests need).
//!
//! Plus small helpers: [`create_topics`] and [`consume_all`].

use std::{
    collections::HashMap,
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{Consumer, StreamConsumer},
    message::{Headers, Message},
    types::RDKafkaErrorCode,
    ClientConfig,
};

/// How long the broker may take to accept connections after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The tansu binary: `~/.cargo/bin/tansu`, else `tansu` on PATH.
pub fn tansu_binary() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("HOME") {
        let p = PathBuf::from(home).join(".cargo/bin/tansu");
        if p.is_file() {
            return Some(p);
        }
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("tansu"))
            .find(|p| p.is_file())
    })
}

/// A running (or stopped) tansu broker. Killed on drop.
pub struct Tansu {
    binary: PathBuf,
    storage: String,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Tansu {
    /// Starts a broker on a free port with a fresh, empty SQLite storage
    /// (`sqlite://tansu.db` in its own temporary directory).
    pub async fn start_new() -> anyhow::Result<Self> {
        Self::start_with_storage("sqlite://tansu.db").await
    }

    /// Same, with another `--storage-engine` (e.g. `memory://tansu/`: faster, but
    /// its data does not survive [`Tansu::stop`]).
    pub async fn start_with_storage(storage: &str) -> anyhow::Result<Self> {
        let binary =
            tansu_binary().context("the tansu binary is not installed (~/.cargo/bin/tansu)")?;
        let port = {
            let l = TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        let dir = tempfile::Builder::new()
            .prefix("caracal-tansu-")
            .tempdir()?;
        let mut tansu = Self {
            binary,
            storage: storage.to_owned(),
            port,
            dir,
            child: None,
        };
        tansu.start().await?;
        Ok(tansu)
    }

    /// `127.0.0.1:PORT`, for `bootstrap.servers`.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the broker (again) on the same port and storage; returns once the
    /// port accepts connections.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("tansu.log"))?;
        let child = Command::new(&self.binary)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                &self.storage,
            ])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    bail!("tansu exited with {status}; log:\n{}", self.log());
                }
            }
            if Instant::now() >= deadline {
                self.kill();
                bail!(
                    "tansu did not accept connections within {START_TIMEOUT:?}; log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the broker (kills its process and waits for it); data stays on disk.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.kill();
        // The port must be free before a restart; the kernel releases it on exit.
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            if Instant::now() >= deadline {
                bail!(
                    "port {} still accepts connections after stopping tansu",
                    self.port
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// The broker's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Kill by our own child's PID, then reap it.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Creates topics (an existing topic is fine).
pub async fn create_topics(brokers: &str, topics: &[&str], partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    for r in admin.create_topics(new.iter(), &opts).await? {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => bail!("creating topic {topic}: {code}"),
        }
    }
    Ok(())
}

/// A consumed message: key (lossy UTF-8, "" when absent), payload, headers.
pub type Consumed = (String, Vec<u8>, HashMap<String, String>);

/// Reads `topic` from the beginning with a fresh consumer group until `expected`
/// messages arrived or `timeout` passed, and returns what arrived (so a caller
/// asking for one more than it expects sees duplicates, after the timeout).
pub async fn consume_all(
    brokers: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<Consumed>> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("test-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "20")
        .create()?;
    consumer.subscribe(&[topic])?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < expected {
        let msg = match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Err(_) => break,
            Ok(Err(e)) => {
                // Transient (e.g. the group is still forming): keep trying until the deadline.
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
                note_consumer_error(&e);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Ok(Ok(m)) => m,
        };
        let key = msg
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default();
        let payload = msg.payload().map(<[u8]>::to_vec).unwrap_or_default();
        let mut headers = HashMap::new();
        if let Some(hs) = msg.headers() {
            for h in hs.iter() {
                let value = h
                    .value
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                headers.insert(h.key.to_owned(), value);
            }
        }
        out.push((key, payload, headers));
    }
    Ok(out)
}

fn note_consumer_error(e: &rdkafka::error::KafkaError) {
    if std::env::var_os("CARACAL_TEST_VERBOSE").is_some() {
        eprintln!("consume_all: {e}");
    }
}

/// How many messages a topic holds (sum over its partitions of high - low
/// watermark): counts duplicates without waiting for a consumer to go quiet.
pub fn topic_message_count(brokers: &str, topic: &str, timeout: Duration) -> anyhow::Result<i64> {
    use rdkafka::consumer::BaseConsumer;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("count-{}", uuid::Uuid::new_v4().simple()),
        )
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let partitions = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().len())
        .context("topic not in metadata")?;
    let mut total = 0;
    for p in 0..partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p as i32, timeout)?;
        total += high - low;
    }
    Ok(total)
}
