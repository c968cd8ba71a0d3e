//! TLS fixtures for Redis: a private CA with a server certificate for 127.0.0.1
//! and a client certificate (openssl), and a redis-server with a TLS port.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

/// A directory holding `ca.pem`, `srv.pem` + `srv.key` (subjectAltName
/// IP:127.0.0.1) and `client.pem` + `client.key`, all signed by the CA. Deleted
/// on drop.
pub struct TestCerts {
    pub dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("openssl")?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

const EC: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

impl TestCerts {
    pub fn create() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        let mut ca = vec!["req", "-x509"];
        ca.extend(EC);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=caracal-test-ca",
        ]);
        openssl(d, &ca)?;
        std::fs::write(d.join("srv.ext"), "subjectAltName=IP:127.0.0.1\n")?;
        std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n")?;
        for (name, cn) in [("srv", "127.0.0.1"), ("client", "caracal-authz")] {
            let (key, csr, pem, ext) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
                format!("{name}.ext"),
            );
            let subj = format!("/CN={cn}");
            let mut req = vec!["req"];
            req.extend(EC);
            req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
            openssl(d, &req)?;
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &pem,
                    "-days",
                    "2",
                    "-extfile",
                    &ext,
                ],
            )?;
        }
        Ok(Self { dir })
    }

    pub fn path(&self, file: &str) -> String {
        self.dir.path().join(file).display().to_string()
    }
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A redis-server of one test with a TLS port and a plain port (for the test's
/// own reads). Clients must present a certificate of the CA when
/// `require_client_cert`. Killed on drop.
pub struct TlsRedis {
    child: Child,
    pub certs: TestCerts,
    pub plain: u16,
    pub tls: u16,
}

impl TlsRedis {
    pub async fn start(require_client_cert: bool) -> anyhow::Result<Self> {
        let certs = TestCerts::create()?;
        let (plain, tls) = (free_port()?, free_port()?);
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &plain.to_string(),
                "--tls-port",
                &tls.to_string(),
                "--tls-cert-file",
                &certs.path("srv.pem"),
                "--tls-key-file",
                &certs.path("srv.key"),
                "--tls-ca-cert-file",
                &certs.path("ca.pem"),
                "--tls-auth-clients",
                if require_client_cert { "yes" } else { "no" },
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("redis-server")?;
        let server = Self {
            child,
            certs,
            plain,
            tls,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let up = match redis::Client::open(server.plain_url().as_str()) {
                Ok(c) => c.get_multiplexed_async_connection().await.is_ok(),
                Err(_) => false,
            };
            if up {
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!("redis-server with TLS did not start");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn plain_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.plain)
    }

    pub fn tls_url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.tls)
    }

    pub fn ca(&self) -> String {
        self.certs.path("ca.pem")
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
