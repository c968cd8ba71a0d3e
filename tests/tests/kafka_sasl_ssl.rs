//! Kafka `SASL_SSL` + `SCRAM-SHA-512` on the wire. tansu (the tests' broker) cannot
//! terminate TLS or SASL and no other broker installs here, so a fake broker of
//! this test plays the first steps of one: it serves TLS with a certificate of a
//! private CA, then reads what librdkafka, configured by the services' own Kafka
//! settings (`kafka.securityProtocol: SASL_SSL`, `saslMechanism: SCRAM-SHA-512`,
//! `saslUsername`, the password from `saslPasswordFile`, `sslCaLocation`), sends
//! inside it: a SaslHandshake naming SCRAM-SHA-512, and after the broker accepts
//! it, SCRAM's client-first message with the user name (SCRAM never sends the
//! password, and it is in nothing the broker receives).
//!
//! The fake answers ApiVersions as a Kafka 3 broker would, then the SaslHandshake;
//! the client's settings are the services' `client_config` as built (plus a short
//! reconnect backoff). Refused before any Kafka byte is sent: a broker whose
//! certificate comes from another CA, and a broker reached under a name its
//! certificate does not carry.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    sync::Arc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use caracal_service_kit::{
    config::{from_yaml, EnvOverrides},
    kafka::{client_config, KafkaConfig},
};
use caracal_tests::tls::TestCerts;
use rdkafka::producer::BaseProducer;
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

const USER: &str = "caracal-producer";
const PASSWORD: &str = "pw-from-the-mounted-secret";
const WAIT: Duration = Duration::from_secs(20);

/// What the fake broker saw on its first connection.
#[derive(Debug)]
struct Seen {
    /// Bytes received before TLS: a ClientHello starts with 0x16 0x03.
    first_bytes: [u8; 2],
    /// TLS established, or why not.
    tls: Result<(), String>,
    /// The mechanism of the SaslHandshake request, if one came.
    mechanism: Option<String>,
    /// SCRAM's client-first message, if one came.
    client_first: Option<String>,
    /// Everything received inside TLS.
    received: Vec<u8>,
}

fn read_frame(stream: &mut impl Read, into: &mut Vec<u8>) -> std::io::Result<Vec<u8>> {
    let mut prefix = [0u8; 4];
    stream.read_exact(&mut prefix)?;
    let len = u32::from_be_bytes(prefix) as usize;
    if len > 1 << 20 {
        return Err(std::io::Error::other(format!("frame of {len} bytes")));
    }
    let mut frame = vec![0u8; len];
    stream.read_exact(&mut frame)?;
    into.extend_from_slice(&prefix);
    into.extend_from_slice(&frame);
    Ok(frame)
}

/// A Kafka `STRING` (i16 length, bytes) at `at`; the position after it.
fn kafka_string(frame: &[u8], at: usize) -> Option<(String, usize)> {
    let len = i16::from_be_bytes(frame.get(at..at + 2)?.try_into().ok()?);
    if len < 0 {
        return Some((String::new(), at + 2));
    }
    let end = at + 2 + len as usize;
    let text = String::from_utf8_lossy(frame.get(at + 2..end)?).into_owned();
    Some((text, end))
}

/// Serves one connection: TLS with `cert`/`key`, then the SASL handshake.
fn fake_broker(certs: &TestCerts) -> (u16, JoinHandle<Seen>) {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(certs.path("srv.pem"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(certs.path("srv.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let handle = std::thread::spawn(move || {
        let deadline = Instant::now() + WAIT;
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "librdkafka never connected");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        serve(stream, Arc::new(config))
    });
    (port, handle)
}

fn serve(stream: TcpStream, config: Arc<rustls::ServerConfig>) -> Seen {
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut first_bytes = [0u8; 2];
    stream.peek(&mut first_bytes).unwrap();
    let mut seen = Seen {
        first_bytes,
        tls: Ok(()),
        mechanism: None,
        client_first: None,
        received: Vec::new(),
    };
    let conn = rustls::ServerConnection::new(config).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, stream);
    // At most a few requests: ApiVersions, SaslHandshake, SaslAuthenticate.
    for n in 0..6 {
        // The TLS handshake runs inside the first read.
        let frame = match read_frame(&mut tls, &mut seen.received) {
            Ok(frame) => frame,
            Err(e) => {
                if n == 0 {
                    seen.tls = Err(e.to_string());
                }
                return seen;
            }
        };
        // Request header: api_key, api_version, correlation_id, client_id, ...
        let api_key = i16::from_be_bytes([frame[0], frame[1]]);
        let version = i16::from_be_bytes([frame[2], frame[3]]);
        let mut body = frame[4..8].to_vec();
        match api_key {
            18 => api_versions(version, &mut body),
            17 => {
                assert!(seen.mechanism.is_none(), "a second SaslHandshake");
                let (_client_id, at) = kafka_string(&frame, 8).unwrap();
                let (mechanism, _) = kafka_string(&frame, at).unwrap();
                // Accept: error 0, mechanisms [the one asked for].
                body.extend_from_slice(&0i16.to_be_bytes());
                body.extend_from_slice(&1i32.to_be_bytes());
                body.extend_from_slice(&(mechanism.len() as i16).to_be_bytes());
                body.extend_from_slice(mechanism.as_bytes());
                seen.mechanism = Some(mechanism);
            }
            _ => {
                // SaslAuthenticate (or, after a v0 handshake, the raw token).
                if let Some(at) = frame.windows(5).position(|w| w == b"n,,n=") {
                    let end = frame[at..]
                        .iter()
                        .position(|b| !b.is_ascii_graphic())
                        .map_or(frame.len(), |n| at + n);
                    seen.client_first = Some(String::from_utf8_lossy(&frame[at..end]).into_owned());
                }
                return seen;
            }
        }
        let mut response = (body.len() as u32).to_be_bytes().to_vec();
        response.extend_from_slice(&body);
        tls.write_all(&response).unwrap();
        tls.flush().unwrap();
    }
    seen
}

/// An ApiVersions response body (after the correlation id, which `body` holds):
/// what a Kafka 3 broker offers of the APIs a client starts with.
fn api_versions(version: i16, body: &mut Vec<u8>) {
    const APIS: [(i16, i16, i16); 19] = [
        (0, 0, 9),  // Produce
        (1, 0, 13), // Fetch
        (2, 0, 7),  // ListOffsets
        (3, 0, 12), // Metadata
        (8, 0, 8),  // OffsetCommit
        (9, 0, 8),  // OffsetFetch
        (10, 0, 4), // FindCoordinator
        (11, 0, 9), // JoinGroup
        (12, 0, 4), // Heartbeat
        (13, 0, 5), // LeaveGroup
        (14, 0, 5), // SyncGroup
        (15, 0, 5), // DescribeGroups
        (16, 0, 4), // ListGroups
        (17, 0, 1), // SaslHandshake
        (18, 0, 3), // ApiVersions
        (19, 0, 7), // CreateTopics
        (20, 0, 6), // DeleteTopics
        (22, 0, 4), // InitProducerId
        (36, 0, 2), // SaslAuthenticate
    ];
    body.extend_from_slice(&0i16.to_be_bytes());
    let flexible = version >= 3;
    if flexible {
        // COMPACT_ARRAY: length + 1 as an unsigned varint (one byte here).
        body.push(APIS.len() as u8 + 1);
    } else {
        body.extend_from_slice(&(APIS.len() as i32).to_be_bytes());
    }
    for (key, min, max) in APIS {
        body.extend_from_slice(&key.to_be_bytes());
        body.extend_from_slice(&min.to_be_bytes());
        body.extend_from_slice(&max.to_be_bytes());
        if flexible {
            body.push(0); // no tagged fields
        }
    }
    if version >= 1 {
        body.extend_from_slice(&0i32.to_be_bytes()); // throttle_time_ms
    }
    if flexible {
        body.push(0);
    }
}

/// The services' Kafka settings as an operator writes them: YAML plus the
/// password file from the environment (a mounted secret).
fn settings(brokers: &str, ca: &str, password_file: &str) -> KafkaConfig {
    let mut cfg: KafkaConfig = from_yaml(&format!(
        "brokers: {brokers}\nsecurityProtocol: SASL_SSL\nsaslMechanism: SCRAM-SHA-512\n\
         saslUsername: {USER}\nsslCaLocation: {ca}\n"
    ))
    .unwrap();
    cfg.apply_env(&EnvOverrides::new(|k: &str| {
        (k == "CARACAL_KAFKA_SASL_PASSWORD_FILE").then(|| password_file.to_owned())
    }))
    .unwrap();
    cfg.validate().unwrap();
    cfg
}

/// Starts a producer with `cfg` and returns what the fake broker saw.
fn attempt(cfg: &KafkaConfig, broker: JoinHandle<Seen>) -> Seen {
    let mut c = client_config(cfg);
    c.set("reconnect.backoff.max.ms", "500");
    // It connects to a bootstrap broker at once, for metadata.
    let producer: BaseProducer = c.create().unwrap();
    let seen = broker.join().unwrap();
    drop(producer);
    seen
}

#[test]
fn librdkafka_speaks_tls_then_scram_sha_512() {
    let certs = TestCerts::create().unwrap();
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), format!("{PASSWORD}\n")).unwrap();
    let secret_path = secret.path().display().to_string();

    // The broker's certificate is of the configured CA and for 127.0.0.1.
    let (port, broker) = fake_broker(&certs);
    let cfg = settings(
        &format!("127.0.0.1:{port}"),
        &certs.path("ca.pem"),
        &secret_path,
    );
    assert!(!format!("{cfg:?}").contains(PASSWORD));
    let seen = attempt(&cfg, broker);
    assert_eq!(seen.first_bytes, [0x16, 0x03], "a TLS ClientHello first");
    assert_eq!(seen.tls, Ok(()), "{seen:?}");
    assert_eq!(seen.mechanism.as_deref(), Some("SCRAM-SHA-512"), "{seen:?}");
    let client_first = seen.client_first.clone().unwrap_or_default();
    assert!(
        client_first.starts_with(&format!("n,,n={USER},r=")),
        "SCRAM client-first: {seen:?}"
    );
    let received = String::from_utf8_lossy(&seen.received);
    assert!(
        !received.contains(PASSWORD),
        "the password went over the wire"
    );
    eprintln!(
        "inside TLS: SaslHandshake {:?}, then SCRAM client-first {client_first:?}",
        seen.mechanism
    );

    // A broker whose certificate another CA signed: the handshake fails, no request.
    let impostor = TestCerts::create().unwrap();
    let (port, broker) = fake_broker(&impostor);
    let cfg = settings(
        &format!("127.0.0.1:{port}"),
        &certs.path("ca.pem"),
        &secret_path,
    );
    let seen = attempt(&cfg, broker);
    assert_eq!(seen.first_bytes, [0x16, 0x03]);
    let err = seen.tls.clone().unwrap_err();
    assert!(
        seen.received.is_empty() && seen.mechanism.is_none(),
        "{seen:?}"
    );
    eprintln!("another CA's broker: handshake refused by librdkafka: {err}");

    // The right CA, a name the certificate does not carry (it has IP 127.0.0.1
    // only): librdkafka checks the host name, so this fails too.
    let (port, broker) = fake_broker(&certs);
    let cfg = settings(
        &format!("localhost:{port}"),
        &certs.path("ca.pem"),
        &secret_path,
    );
    let seen = attempt(&cfg, broker);
    let err = seen.tls.clone().unwrap_err();
    assert!(
        seen.received.is_empty() && seen.mechanism.is_none(),
        "{seen:?}"
    );
    eprintln!("wrong host name: handshake refused by librdkafka: {err}");
}
