//! Signing keys on disk (read by the sequencer only) and the public keys in
//! `merkle_keys` (read by every verification path).
//!
//! Rotation: a new PKCS#8 PEM in `keyDir` (written by `caracal merkle rotate-key`,
//! or put there by the operator) is registered in `merkle_keys` and, being the
//! newest registered key the sequencer holds, signs every later checkpoint. Older
//! public keys stay in `merkle_keys`, so an older checkpoint still verifies by its
//! key id; nothing is ever re-signed.

use std::path::{Path, PathBuf};

use caracal_domain::merkle::keys::{key_id_hex, Signer, Verifier};
use chrono::{DateTime, Utc};
use diesel::sql_types::{Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use crate::LogError;

/// A public key of `merkle_keys`.
#[derive(Debug, Clone, diesel::QueryableByName)]
pub struct PublicKeyRecord {
    #[diesel(sql_type = Text)]
    pub key_id: String,
    #[diesel(sql_type = Text)]
    pub key_name: String,
    #[diesel(sql_type = Text)]
    pub public_key_pem: String,
    #[diesel(sql_type = Timestamptz)]
    pub registered_at: DateTime<Utc>,
}

/// Reads the passphrase file (empty path: none).
pub fn read_passphrase(path: &Path) -> Result<Option<Vec<u8>>, LogError> {
    if path.as_os_str().is_empty() {
        return Ok(None);
    }
    let text = std::fs::read(path)
        .map_err(|e| LogError::Key(format!("reading {}: {e}", path.display())))?;
    let trimmed = text
        .strip_suffix(b"\r\n")
        .or_else(|| text.strip_suffix(b"\n"))
        .unwrap_or(&text);
    Ok(Some(trimmed.to_vec()))
}

/// Every `*.pem` signing key in `dir`, by file name.
pub fn load_signers(
    dir: &Path,
    name: &str,
    passphrase: Option<&[u8]>,
) -> Result<Vec<(PathBuf, Signer)>, LogError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(LogError::Key(format!("reading {}: {e}", dir.display()))),
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "pem"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let pem = std::fs::read_to_string(&p)
                .map_err(|e| LogError::Key(format!("reading {}: {e}", p.display())))?;
            let signer = Signer::from_pkcs8_pem(name, &pem, passphrase)
                .map_err(|e| LogError::Key(format!("{}: {e}", p.display())))?;
            Ok((p, signer))
        })
        .collect()
}

/// Generates a key into `dir` (created if missing; the file is `0600`, never
/// overwritten): `<key id>-<unix time>.pem`.
pub fn generate_into(
    dir: &Path,
    name: &str,
    passphrase: Option<&[u8]>,
) -> Result<(PathBuf, Signer), LogError> {
    use std::io::Write as _;
    let signer = Signer::generate(name).map_err(|e| LogError::Key(e.to_string()))?;
    let pem = signer
        .to_pkcs8_pem(passphrase)
        .map_err(|e| LogError::Key(e.to_string()))?;
    std::fs::create_dir_all(dir)
        .map_err(|e| LogError::Key(format!("creating {}: {e}", dir.display())))?;
    let path = dir.join(format!(
        "{}-{}.pem",
        Utc::now().format("%Y%m%dT%H%M%S%.6fZ"),
        key_id_hex(&signer.id())
    ));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options
        .open(&path)
        .map_err(|e| LogError::Key(format!("creating {}: {e}", path.display())))?;
    file.write_all(pem.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| LogError::Key(format!("writing {}: {e}", path.display())))?;
    Ok((path, signer))
}

/// Adds a public key to `merkle_keys` (no-op when there).
pub async fn register(conn: &mut AsyncPgConnection, key: &Verifier) -> Result<(), LogError> {
    let pem = key
        .to_public_key_pem()
        .map_err(|e| LogError::Key(e.to_string()))?;
    diesel::sql_query(
        "INSERT INTO merkle_keys (key_id, key_name, public_key_pem) VALUES ($1, $2, $3) \
         ON CONFLICT (key_id) DO NOTHING",
    )
    .bind::<Text, _>(key_id_hex(&key.id()))
    .bind::<Text, _>(key.name())
    .bind::<Text, _>(pem)
    .execute(conn)
    .await?;
    Ok(())
}

/// Every public key, oldest first.
pub async fn public_keys(conn: &mut AsyncPgConnection) -> Result<Vec<PublicKeyRecord>, LogError> {
    Ok(diesel::sql_query(
        "SELECT key_id, key_name, public_key_pem, registered_at FROM merkle_keys \
         ORDER BY registered_at, key_id",
    )
    .load(conn)
    .await?)
}

/// The public keys as verifiers. A record whose PEM does not parse, or whose id
/// does not match its key, is left out (a checkpoint it signed then fails to
/// verify, which names it).
pub async fn verifiers(conn: &mut AsyncPgConnection) -> Result<Vec<Verifier>, LogError> {
    Ok(public_keys(conn)
        .await?
        .into_iter()
        .filter_map(|r| {
            let v = Verifier::from_public_key_pem(&r.key_name, &r.public_key_pem).ok()?;
            (key_id_hex(&v.id()) == r.key_id).then_some(v)
        })
        .collect())
}

/// The key to sign with: registers every held key `merkle_keys` lacks (in file
/// order), then picks the held key registered last.
pub async fn select_signer(
    conn: &mut AsyncPgConnection,
    held: Vec<(PathBuf, Signer)>,
) -> Result<Signer, LogError> {
    for (_, signer) in &held {
        register(conn, &signer.verifier()).await?;
    }
    let records = public_keys(conn).await?;
    let newest = held.into_iter().max_by_key(|(path, s)| {
        let id = key_id_hex(&s.id());
        let at = records
            .iter()
            .find(|r| r.key_id == id)
            .map(|r| r.registered_at);
        (at, path.clone())
    });
    newest
        .map(|(_, s)| s)
        .ok_or_else(|| LogError::Key("no signing key".into()))
}
