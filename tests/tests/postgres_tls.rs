//! PostgreSQL `sslmode=verify-full` with client certificates, against a real
//! TLS-only PostgreSQL: a throwaway cluster of this test (initdb + pg_ctl on a free
//! 127.0.0.1 port, `ssl=on`, `pg_hba.conf` with one `hostssl ... cert` line and no
//! `host` line, a private CA signing the server and client certificates).
//!
//! The authz-service, configured through the guide's keys (`database.ssl.*`, here as
//! `CARACAL_DATABASE_SSL_*` variables), applies the migrations and serves admin and
//! hot-path calls over its TLS pool, authenticated by its certificate. Refused, each
//! with the error that says why: a plaintext client (the server has no entry for
//! it, also when it is the service), a client without a certificate, a certificate
//! from another CA, a certificate for another user, a server name the certificate
//! does not carry (`verify-full`; `verify-ca` accepts it) and a server certificate
//! from a CA the client does not trust.

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use caracal_proto::v1 as pb;
use caracal_service_kit::db::tls;
use caracal_tests::{tls::TestCerts, TestStack};
use diesel::QueryableByName;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

/// Debian's PostgreSQL programs: `/usr/lib/postgresql/<version>/bin`, the newest.
fn pg_bin() -> anyhow::Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("no /usr/lib/postgresql (bash scripts/services.sh installs PostgreSQL)")?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .context("no initdb under /usr/lib/postgresql/*/bin")
}
/// The bootstrap superuser of the throwaway cluster: the migrator, as in production.
const MIGRATOR: &str = "caracal_migrator";
/// Another login role, which the client certificate is not mapped to.
const OTHER_USER: &str = "caracal_authz_svc";
/// How long one connection attempt may take before the test calls it hung.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// A PostgreSQL cluster of this test, TLS only, on 127.0.0.1. It runs as the
/// `postgres` user when the test runs as root (PostgreSQL refuses root). Dropping it
/// stops the postmaster by the PID in its `postmaster.pid` (fast shutdown, then
/// SIGKILL), then deletes the directory.
struct TlsPostgres {
    port: u16,
    /// `ca.pem`, `srv.pem`/`srv.key` (IP SAN 127.0.0.1), `client.pem`/`client.key`
    /// (CN `caracal-authz`, mapped to the migrator by `pg_ident.conf`).
    certs: TestCerts,
    data: PathBuf,
    pid: Option<u32>,
    /// Last field: deleted after `drop` stopped the server.
    dir: tempfile::TempDir,
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Runs a PostgreSQL program, as `postgres` when we are root.
fn pg_command(program: &str, args: &[&str]) -> anyhow::Result<Output> {
    let path = pg_bin()?.join(program).display().to_string();
    let mut cmd = if running_as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", &path]);
        c
    } else {
        Command::new(&path)
    };
    cmd.args(args)
        .output()
        .with_context(|| format!("running {path}"))
}

fn chown_postgres(path: &Path) -> anyhow::Result<()> {
    if !running_as_root() {
        return Ok(());
    }
    let out = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(path)
        .output()?;
    if !out.status.success() {
        bail!("chown {path:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn append(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

impl TlsPostgres {
    fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("caracal-pg-tls")
            .tempdir()?;
        let certs = TestCerts::create()?;
        let port = caracal_tests::tls::free_port()?;
        let (data, ssl, sock) = (
            dir.path().join("data"),
            dir.path().join("ssl"),
            dir.path().join("sock"),
        );
        std::fs::create_dir(&ssl)?;
        std::fs::create_dir(&sock)?;
        // The server's key must belong to the server's user, mode 0600.
        for file in ["ca.pem", "srv.pem", "srv.key"] {
            let to = ssl.join(file);
            std::fs::copy(certs.path(file), &to)?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600))?;
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        chown_postgres(dir.path())?;

        let data_arg = data.display().to_string();
        let init = pg_command(
            "initdb",
            &[
                "-D",
                &data_arg,
                "-U",
                MIGRATOR,
                "--auth=reject",
                "--no-sync",
                "--encoding=UTF8",
                "--no-locale",
            ],
        )?;
        if !init.status.success() {
            bail!("initdb: {}", String::from_utf8_lossy(&init.stderr));
        }
        // Writing into existing files keeps their owner (postgres).
        append(
            &data.join("postgresql.conf"),
            &format!(
                "\nlisten_addresses = '127.0.0.1'\nport = {port}\n\
                 unix_socket_directories = '{sock}'\nssl = on\n\
                 ssl_cert_file = '{ssl}/srv.pem'\nssl_key_file = '{ssl}/srv.key'\n\
                 ssl_ca_file = '{ssl}/ca.pem'\nfsync = off\nmax_connections = 40\n\
                 log_connections = on\n",
                sock = sock.display(),
                ssl = ssl.display(),
            ),
        )?;
        // TLS with a client certificate of the CA, or nothing: no `host` line, no
        // `local` line. The certificate's CN is mapped to the migrator only.
        std::fs::write(
            data.join("pg_hba.conf"),
            "hostssl all all 127.0.0.1/32 cert map=certs\n",
        )?;
        std::fs::write(
            data.join("pg_ident.conf"),
            format!("certs caracal-authz {MIGRATOR}\n"),
        )?;
        let mut pg = Self {
            port,
            certs,
            data,
            pid: None,
            dir,
        };
        let log = pg.dir.path().join("postgres.log").display().to_string();
        let started = pg_command(
            "pg_ctl",
            &["-D", &data_arg, "-l", &log, "-w", "-t", "60", "start"],
        )?;
        // Even a failed start may have left a postmaster: find it for `drop`.
        pg.pid = pg.postmaster_pid();
        if !started.status.success() {
            bail!(
                "pg_ctl start: {}{}\n{}",
                String::from_utf8_lossy(&started.stdout),
                String::from_utf8_lossy(&started.stderr),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if pg.pid.is_none() {
            bail!("PostgreSQL started but wrote no postmaster.pid");
        }
        Ok(pg)
    }

    fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// `postgres://<user>@<host>:<port>/<db>` plus `params`.
    fn url(&self, user: &str, host: &str, db: &str, params: &[(&str, String)]) -> String {
        let query: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{k}={}", tls::percent_encode(v)))
            .collect();
        let base = format!("postgres://{user}@{host}:{}/{db}", self.port);
        if query.is_empty() {
            base
        } else {
            format!("{base}?{}", query.join("&"))
        }
    }

    /// verify-full against the test CA with the client certificate.
    fn verified(&self) -> Vec<(&'static str, String)> {
        vec![
            ("sslmode", "verify-full".to_owned()),
            ("sslrootcert", self.certs.path("ca.pem")),
            ("sslcert", self.certs.path("client.pem")),
            ("sslkey", self.certs.path("client.key")),
        ]
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let Some(pid) = self.pid.or_else(|| self.postmaster_pid()) else {
            return;
        };
        let alive = || Path::new(&format!("/proc/{pid}")).exists();
        let signal = |sig: &str| {
            let _ = Command::new("kill").args([sig, &pid.to_string()]).output();
        };
        // SIGINT: fast shutdown (ends the sessions, no checkpoint wait to speak of).
        signal("-INT");
        let deadline = Instant::now() + Duration::from_secs(20);
        while alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if alive() {
            signal("-KILL");
            let deadline = Instant::now() + Duration::from_secs(5);
            while alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// One connection through the services' own connect code (`db::tls::establish`),
/// bounded in time; the error as text.
async fn connect(url: &str) -> Result<AsyncPgConnection, String> {
    match tokio::time::timeout(CONNECT_TIMEOUT, tls::establish(url)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {CONNECT_TIMEOUT:?}")),
    }
}

#[derive(QueryableByName, Debug)]
struct SslSession {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    ssl: bool,
    #[diesel(sql_type = diesel::sql_types::Text)]
    version: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    client_dn: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    user: String,
}

/// What PostgreSQL says about this session's TLS.
async fn ssl_session(conn: &mut AsyncPgConnection) -> SslSession {
    diesel::sql_query(
        "SELECT ssl, coalesce(version, '') AS version, coalesce(client_dn, '') AS client_dn, \
         current_user::text AS user FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    .get_result(conn)
    .await
    .unwrap()
}

fn assert_refused(case: &str, result: Result<AsyncPgConnection, String>, says: &[&str]) {
    let err = match result {
        Ok(_) => panic!("{case}: connected, but must be refused"),
        Err(e) => e,
    };
    let lower = err.to_lowercase();
    assert!(
        says.iter().any(|s| lower.contains(&s.to_lowercase())),
        "{case}: refused, but not for the expected reason ({says:?}): {err}"
    );
    eprintln!("refused as expected, {case}: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_client_certificates() {
    let pg = TlsPostgres::start().unwrap();
    let other_ca = TestCerts::create().unwrap();

    // Set-up as the migrator, over verify-full with its certificate: the database and
    // a second login role.
    let mut admin = connect(&pg.url(MIGRATOR, "127.0.0.1", "postgres", &pg.verified()))
        .await
        .unwrap();
    let session = ssl_session(&mut admin).await;
    assert!(session.ssl, "{session:?}");
    assert!(session.version.starts_with("TLSv1."), "{session:?}");
    assert_eq!(session.client_dn, "/CN=caracal-authz");
    assert_eq!(session.user, MIGRATOR);
    for sql in [
        "CREATE DATABASE caracal".to_owned(),
        format!("CREATE ROLE {OTHER_USER} LOGIN"),
    ] {
        diesel::sql_query(sql).execute(&mut admin).await.unwrap();
    }
    drop(admin);

    // The authz-service through its real configuration path: a plain URL and the
    // guide's `database.ssl` keys as CARACAL_* variables; `serve` applies every
    // migration and opens its pool over TLS.
    let plain_url = pg.url(MIGRATOR, "127.0.0.1", "caracal", &[]);
    let env = [
        ("CARACAL_DATABASE_URL", plain_url.clone()),
        ("CARACAL_DATABASE_SSL_ENABLED", "true".to_owned()),
        ("CARACAL_DATABASE_SSL_MODE", "verify-full".to_owned()),
        ("CARACAL_DATABASE_SSL_ROOT_CERT", pg.certs.path("ca.pem")),
        ("CARACAL_DATABASE_SSL_CERT", pg.certs.path("client.pem")),
        ("CARACAL_DATABASE_SSL_KEY", pg.certs.path("client.key")),
    ];
    let mut config = TestStack::config("").await.unwrap();
    config
        .apply_env(|k| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()))
        .unwrap();
    config.validate().unwrap();
    let service_url = config.database.url.clone();
    assert!(
        service_url.starts_with(&plain_url) && service_url.contains("sslmode=verify-full"),
        "{service_url}"
    );
    let key_prefix = config.redis.key_prefix.clone();
    let redis = config.redis.clone();
    let server = caracal_authz::serve(config).await.unwrap();
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    // Not `TestStack::stop`: that drops a database on the shared server.
    let stack = TestStack {
        key_prefix,
        redis,
        database: String::new(),
        database_url: service_url.clone(),
        server: Some(server),
        channel,
    };
    // Admin writes (agent, key, policy) and an Authorize that reads them back.
    let (agent, key) = stack.agent_with_key("pg-tls", None).await.unwrap();
    stack
        .usd_policy(&agent, "10", "daily", "calendar", "")
        .await
        .unwrap();
    let decision = stack
        .authz()
        .authorize(caracal_tests::authorize_request(&key, "pg-tls-1", 40_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        decision.decision,
        pb::Decision::Allow as i32,
        "{decision:?}"
    );
    // Readiness pings the pool.
    let http = stack.server.as_ref().unwrap().http_addr;
    let (status, body) = caracal_tests::probe::http_get(http, "/health/ready").await;
    assert_eq!(status, 200, "ready over the TLS pool: {body}");

    // What the service wrote is there, read over verify-full too.
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut conn = connect(&service_url).await.unwrap();
    let agents: Count = diesel::sql_query("SELECT count(*) AS n FROM agents")
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(agents.n, 1);
    let migrations: Count =
        diesel::sql_query("SELECT count(*) AS n FROM __diesel_schema_migrations")
            .get_result(&mut conn)
            .await
            .unwrap();
    assert!(migrations.n > 0);
    drop(conn);

    // The pool's own connections are TLS sessions authenticated by the certificate
    // (every session of the migrator here is the service's but ours, now closed).
    #[derive(QueryableByName, Debug)]
    struct Sessions {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        total: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        tls_with_cert: i64,
    }
    let mut conn = connect(&service_url).await.unwrap();
    let sessions: Sessions = diesel::sql_query(
        "SELECT count(*) AS total, \
         count(*) FILTER (WHERE s.ssl AND s.client_dn = '/CN=caracal-authz') AS tls_with_cert \
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.backend_type = 'client backend' AND a.pid <> pg_backend_pid()",
    )
    .get_result(&mut conn)
    .await
    .unwrap();
    assert!(sessions.total >= 1, "{sessions:?}");
    assert_eq!(sessions.total, sessions.tls_with_cert, "{sessions:?}");
    drop(conn);

    let server = {
        let mut stack = stack;
        let server = stack.server.take().unwrap();
        let mut redis_conn = stack.redis_conn().unwrap();
        let keys = caracal_tests::redis_keys(&mut redis_conn, &format!("{}:*", stack.key_prefix))
            .await
            .unwrap();
        let deletes = keys.iter().map(|k| redis::cmd("DEL").arg(k).clone());
        caracal_service_kit::redis::query_each(&redis_conn, deletes.collect())
            .await
            .unwrap();
        server
    };
    server.shutdown().await.unwrap();

    // Refused, each for its reason.
    let mut no_cert = pg.verified();
    no_cert.truncate(2);
    let with_ca = |ca: String| {
        let mut p = pg.verified();
        p[1].1 = ca;
        p
    };
    let with_client = |certs: &TestCerts| {
        let mut p = pg.verified();
        p[2].1 = certs.path("client.pem");
        p[3].1 = certs.path("client.key");
        p
    };
    // The certificate is checked against the name in the URL; hostaddr is dialled.
    let mut wrong_name = pg.verified();
    wrong_name.push(("hostaddr", "127.0.0.1".to_owned()));
    let cases: [(&str, String, &[&str]); 6] = [
        (
            "plaintext (no sslmode)",
            pg.url(MIGRATOR, "127.0.0.1", "caracal", &[]),
            &["no pg_hba.conf entry", "no encryption"],
        ),
        (
            "TLS without a client certificate",
            pg.url(MIGRATOR, "127.0.0.1", "caracal", &no_cert),
            &["requires a valid client certificate"],
        ),
        (
            "a client certificate of another CA",
            pg.url(MIGRATOR, "127.0.0.1", "caracal", &with_client(&other_ca)),
            &["unknownca", "unknown ca", "certificate verify failed"],
        ),
        (
            "the certificate of another user",
            pg.url(OTHER_USER, "127.0.0.1", "caracal", &pg.verified()),
            &["certificate authentication failed"],
        ),
        (
            "verify-full, a server name the certificate does not carry",
            pg.url(MIGRATOR, "db.caracal.test", "caracal", &wrong_name),
            &["not valid for name"],
        ),
        (
            "verify-full, the server's CA not trusted",
            pg.url(
                MIGRATOR,
                "127.0.0.1",
                "caracal",
                &with_ca(other_ca.path("ca.pem")),
            ),
            // Both CAs are named alike (TestCerts), so rustls finds the impostor's
            // name and fails its signature; a differently named CA is UnknownIssuer.
            &["unknownissuer", "badsignature"],
        ),
    ];
    for (case, url, says) in cases {
        assert_refused(case, connect(&url).await, says);
    }
    // verify-ca checks the chain only: the same wrong name passes.
    let mut ca_only = wrong_name.clone();
    ca_only[0].1 = "verify-ca".to_owned();
    let mut conn = connect(&pg.url(MIGRATOR, "db.caracal.test", "caracal", &ca_only))
        .await
        .unwrap();
    assert!(ssl_session(&mut conn).await.ssl);
    drop(conn);

    // The service itself, configured without TLS, does not start against a server
    // that requires it (nor falls back to anything): the pool is refused.
    let mut config = TestStack::config(&plain_url).await.unwrap();
    config.database.db_pool_timeout = 2;
    let err = match caracal_authz::serve(config).await {
        Ok(_) => panic!("the service started on a plaintext database URL"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("no encryption"), "{err}");
    // And through the pool directly (what the consumers use).
    let db = caracal_service_kit::config::DatabaseConfig {
        url: plain_url,
        db_pool_size: 1,
        db_max_overflow: 0,
        db_pool_timeout: 2,
        ..Default::default()
    };
    let err = match caracal_service_kit::db::connect(&db).await {
        Ok(_) => panic!("a plaintext pool connected"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("no encryption"), "{err}");
    drop(pg);
}
