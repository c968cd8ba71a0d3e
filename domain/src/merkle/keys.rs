//! ECDSA P-256 keys that sign and verify the ledger's checkpoints.
//!
//! # Signature type, key id and signature encoding
//!
//! Checkpoints are [C2SP signed notes](https://c2sp.org/signed-note). That
//! specification assigns signature type **`0x02`** to "ECDSA signatures as
//! implemented by github.com/transparency-dev/witness", over NIST P-256
//! (RECOMMENDED), and states that *for this type the key ID is the truncated
//! SHA-256 hash of the DER-encoded public key in SPKI format*. Sigstore's Rekor
//! (v1 `pkg/util/signed_note.go` and the Rekor v2 / rekor-tiles note signer) and
//! the transparency-dev witness ECDSA verifier all do exactly that, so Caracal
//! does too, which lets their tooling verify Caracal checkpoints unchanged:
//!
//! ```text
//! public key  = SubjectPublicKeyInfo, DER (the body of the "PUBLIC KEY" PEM; 91 bytes for P-256)
//! key ID      = SHA-256(public key)[0..4]            (4 bytes, shown as 8 lowercase hex digits)
//! signature   = ECDSA P-256 over SHA-256(note text), ASN.1 DER `SEQUENCE { r INTEGER, s INTEGER }`
//!               (RFC 6979 deterministic nonces; 70-72 bytes; not the fixed 64-byte r||s form)
//! signature line payload = base64(key ID || signature)
//! ```
//!
//! This differs from the signed-note spec's *generic* recommendation
//! `SHA-256(key name || 0x0A || type || public key)[0..4]` (used for Ed25519,
//! `0x01`): the spec carves out type `0x02`, and interoperability with the
//! deployed ECDSA verifiers needs the carve-out. The key *name* still takes part
//! in key selection: a verifier is chosen by the pair (name, key ID), as the
//! signed-note spec requires, so the same key under two names is two keys.
//!
//! A verifier key can also be shared as the transparency-dev "vkey" text
//! `<name>+<hex key ID>+<base64(0x02 || SPKI DER)>` ([`Verifier::to_vkey`],
//! [`Verifier::from_vkey`]).
//!
//! # Key files
//!
//! Private keys are PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), or encrypted
//! PKCS#8 (`-----BEGIN ENCRYPTED PRIVATE KEY-----`, PBES2). Caracal writes
//! encrypted keys with scrypt (N = 2^14, r = 8, p = 1) and AES-256-CBC (readable
//! by `openssl pkey`), and reads PBES2 keys with scrypt or PBKDF2-HMAC-SHA-256
//! and AES-128/192/256-CBC, e.g. one from
//! `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 | openssl pkcs8 -topk8 -v2 aes-256-cbc`.
//! Public keys are SPKI PEM (`-----BEGIN PUBLIC KEY-----`), as printed by
//! `openssl pkey -pubout`. The private key never appears in `Debug` output or in
//! an error message.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use p256::ecdsa::signature::{Signer as _, Verifier as _};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use p256::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding,
};
use pkcs8::der::pem::PemLabel as _;
use pkcs8::der::zeroize::Zeroizing;
use pkcs8::{EncryptedPrivateKeyInfo, PrivateKeyInfo, SecretDocument};
use rand::RngCore as _;
use sha2::{Digest, Sha256};

/// A C2SP signed-note key ID: 4 bytes, big-endian.
pub type KeyId = [u8; 4];

/// The C2SP signed-note signature type byte of ECDSA (P-256, SHA-256, ASN.1 DER).
pub const SIGNATURE_TYPE_ECDSA: u8 = 0x02;

/// Why a key could not be generated, loaded, saved or used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "invalid key name {0:?}: it must be non-empty, without spaces, '+' or control characters"
    )]
    InvalidName(String),
    #[error("invalid key id {0:?}: expected 8 hex digits")]
    InvalidKeyIdHex(String),
    #[error("could not draw a valid P-256 private key from the random source")]
    Generate,
    #[error("the private key is encrypted (ENCRYPTED PRIVATE KEY): a passphrase is required")]
    PassphraseRequired,
    #[error("cannot decrypt the private key: wrong passphrase (or a corrupted key file)")]
    WrongPassphrase,
    #[error("the PEM holds a SEC1 key (EC PRIVATE KEY); convert it to PKCS#8 with `openssl pkcs8 -topk8 -in key.pem` (add -nocrypt for an unencrypted key)")]
    Sec1NotSupported,
    #[error("unexpected PEM label {found:?} (expected {expected})")]
    UnexpectedPemLabel {
        found: String,
        expected: &'static str,
    },
    #[error("malformed private key: {0}")]
    MalformedPrivateKey(String),
    #[error("malformed public key: {0}")]
    MalformedPublicKey(String),
    #[error("cannot encode the key: {0}")]
    Encode(String),
    #[error("malformed signature: not an ASN.1 DER ECDSA P-256 signature")]
    MalformedSignature,
    #[error("signature does not verify with key {name} ({id})")]
    BadSignature { name: String, id: String },
    #[error("invalid verifier key: {0}")]
    InvalidVkey(String),
}

/// Lowercase 8-digit hex of a key ID.
pub fn key_id_hex(id: &KeyId) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses 8 hex digits (either case) into a key ID.
pub fn parse_key_id_hex(s: &str) -> Result<KeyId, KeyError> {
    let bad = || KeyError::InvalidKeyIdHex(s.to_string());
    if s.len() != 8 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let mut id = [0u8; 4];
    for (i, slot) in id.iter_mut().enumerate() {
        *slot =
            u8::from_str_radix(s.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16).map_err(|_| bad())?;
    }
    Ok(id)
}

/// The C2SP key ID of a type-`0x02` (ECDSA) key: `SHA-256(SPKI DER)[0..4]`.
pub fn ecdsa_key_id(spki_der: &[u8]) -> KeyId {
    let digest = Sha256::digest(spki_der);
    [digest[0], digest[1], digest[2], digest[3]]
}

/// Signed-note key name rule: non-empty, no Unicode space, no `+`; and, as the
/// whole note must be, no control characters.
pub fn is_valid_key_name(name: &str) -> bool {
    !name.is_empty()
        && !name
            .chars()
            .any(|c| c.is_whitespace() || c == '+' || c.is_control())
}

fn check_name(name: &str) -> Result<(), KeyError> {
    if is_valid_key_name(name) {
        Ok(())
    } else {
        Err(KeyError::InvalidName(name.to_string()))
    }
}

/// The scrypt cost of encrypted key files Caracal writes: N = 2^14, r = 8, p = 1
/// (16 MiB; what `openssl pkcs8 -topk8 -scrypt` writes). OpenSSL 3 refuses scrypt
/// parameters above its 32 MiB default memory cap, so N = 2^15 (just over it,
/// checked with OpenSSL 3.0) or the `scrypt` crate's recommended 2^17 would make
/// the file unreadable by `openssl pkey`.
fn key_file_scrypt() -> pkcs8::pkcs5::scrypt::Params {
    // (14, 8, 1, 32) is within every bound `Params::new` checks; the fallback is unreachable.
    pkcs8::pkcs5::scrypt::Params::new(14, 8, 1, 32)
        .unwrap_or_else(|_| pkcs8::pkcs5::scrypt::Params::recommended())
}

/// A checkpoint signing key: a name, an ECDSA P-256 private key and its key ID.
#[derive(Clone)]
pub struct Signer {
    key: SigningKey,
    verifier: Verifier,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("name", &self.verifier.name)
            .field("id", &key_id_hex(&self.verifier.id))
            .field("key", &"<redacted>")
            .finish()
    }
}

/// How many 32-byte draws [`Signer::generate`] tries before giving up. A draw
/// fails only when it is zero or not below the group order, with probability
/// about 2^-32 each, so this never runs out with a working random source.
const GENERATE_ATTEMPTS: usize = 16;

impl Signer {
    /// A new random key named `name` (a C2SP key name, e.g. `caracal.example/ledger`).
    ///
    /// Draws 32 bytes from the operating-system seeded CSPRNG (`rand::rng()`) and
    /// retries while they are not a valid P-256 scalar (zero or >= the order).
    pub fn generate(name: &str) -> Result<Self, KeyError> {
        check_name(name)?;
        let mut rng = rand::rng();
        for _ in 0..GENERATE_ATTEMPTS {
            let mut bytes = Zeroizing::new([0u8; 32]);
            rng.fill_bytes(&mut bytes[..]);
            if let Ok(key) = SigningKey::from_slice(&bytes[..]) {
                return Self::from_signing_key(name, key);
            }
        }
        Err(KeyError::Generate)
    }

    fn from_signing_key(name: &str, key: SigningKey) -> Result<Self, KeyError> {
        let verifier = Verifier::from_verifying_key(name, *key.verifying_key())?;
        Ok(Self { key, verifier })
    }

    /// Loads a PKCS#8 PEM private key: plain (`PRIVATE KEY`) or encrypted
    /// (`ENCRYPTED PRIVATE KEY`, which needs `passphrase`). A passphrase given
    /// for a plain key is not used.
    pub fn from_pkcs8_pem(
        name: &str,
        pem: &str,
        passphrase: Option<&[u8]>,
    ) -> Result<Self, KeyError> {
        check_name(name)?;
        let pem = pem.trim();
        let (label, doc) = SecretDocument::from_pem(pem).map_err(|e| {
            match pkcs8::der::pem::decode_label(pem.as_bytes()) {
                Ok("EC PRIVATE KEY") => KeyError::Sec1NotSupported,
                _ => KeyError::MalformedPrivateKey(format!("not a PEM document: {e}")),
            }
        })?;
        let key = match label {
            "PRIVATE KEY" => SigningKey::from_pkcs8_der(doc.as_bytes())
                .map_err(|e| KeyError::MalformedPrivateKey(e.to_string()))?,
            "ENCRYPTED PRIVATE KEY" => {
                let passphrase = passphrase.ok_or(KeyError::PassphraseRequired)?;
                let info = EncryptedPrivateKeyInfo::try_from(doc.as_bytes())
                    .map_err(|e| KeyError::MalformedPrivateKey(e.to_string()))?;
                let plain = info.decrypt(passphrase).map_err(|e| match e {
                    pkcs8::Error::EncryptedPrivateKey(
                        pkcs8::pkcs5::Error::DecryptFailed | pkcs8::pkcs5::Error::EncryptFailed,
                    )
                    | pkcs8::Error::Asn1(_)
                    | pkcs8::Error::KeyMalformed => KeyError::WrongPassphrase,
                    other => KeyError::MalformedPrivateKey(other.to_string()),
                })?;
                // A wrong passphrase can, rarely, still yield valid padding; the
                // garbage then fails to parse as a P-256 PKCS#8 key.
                SigningKey::from_pkcs8_der(plain.as_bytes())
                    .map_err(|_| KeyError::WrongPassphrase)?
            }
            "EC PRIVATE KEY" => return Err(KeyError::Sec1NotSupported),
            other => {
                return Err(KeyError::UnexpectedPemLabel {
                    found: other.to_string(),
                    expected: "PRIVATE KEY or ENCRYPTED PRIVATE KEY",
                })
            }
        };
        Self::from_signing_key(name, key)
    }

    /// The private key as PKCS#8 PEM; encrypted (PBES2: scrypt N=2^14 r=8 p=1,
    /// AES-256-CBC, random 16-byte salt and IV) when a passphrase is given.
    pub fn to_pkcs8_pem(&self, passphrase: Option<&[u8]>) -> Result<String, KeyError> {
        match passphrase {
            None => {
                let der = self
                    .key
                    .to_pkcs8_der()
                    .map_err(|e| KeyError::Encode(e.to_string()))?;
                let pem = der
                    .to_pem(PrivateKeyInfo::PEM_LABEL, LineEnding::LF)
                    .map_err(|e| KeyError::Encode(e.to_string()))?;
                Ok(pem.to_string())
            }
            Some(passphrase) => self.to_encrypted_pem(passphrase, key_file_scrypt()),
        }
    }

    fn to_encrypted_pem(
        &self,
        passphrase: &[u8],
        scrypt: pkcs8::pkcs5::scrypt::Params,
    ) -> Result<String, KeyError> {
        let encode = |e: pkcs8::Error| KeyError::Encode(e.to_string());
        let der = self.key.to_pkcs8_der().map_err(encode)?;
        let mut salt = [0u8; 16];
        let mut iv = [0u8; 16];
        let mut rng = rand::rng();
        rng.fill_bytes(&mut salt);
        rng.fill_bytes(&mut iv);
        let params = pkcs8::pkcs5::pbes2::Parameters::scrypt_aes256cbc(scrypt, &salt, &iv)
            .map_err(|e| KeyError::Encode(e.to_string()))?;
        let info = PrivateKeyInfo::try_from(der.as_bytes()).map_err(encode)?;
        let encrypted = info
            .encrypt_with_params(params, passphrase)
            .map_err(encode)?;
        let pem = encrypted
            .to_pem(EncryptedPrivateKeyInfo::PEM_LABEL, LineEnding::LF)
            .map_err(|e| KeyError::Encode(e.to_string()))?;
        Ok(pem.to_string())
    }

    /// The key name (the C2SP signed-note key name of the signature lines).
    pub fn name(&self) -> &str {
        &self.verifier.name
    }

    /// The key ID, `SHA-256(SPKI DER)[0..4]`.
    pub fn id(&self) -> KeyId {
        self.verifier.id
    }

    /// The public half, to hand to auditors.
    pub fn verifier(&self) -> Verifier {
        self.verifier.clone()
    }

    /// ECDSA P-256 / SHA-256 signature of `msg`, ASN.1 DER encoded (RFC 6979
    /// deterministic: the same key and message give the same bytes).
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        let sig: Signature = self.key.sign(msg);
        sig.to_der().as_bytes().to_vec()
    }
}

/// A checkpoint verification key: a name, an ECDSA P-256 public key and its key ID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verifier {
    name: String,
    key: VerifyingKey,
    id: KeyId,
    spki_der: Vec<u8>,
}

impl Verifier {
    fn from_verifying_key(name: &str, key: VerifyingKey) -> Result<Self, KeyError> {
        check_name(name)?;
        let spki_der = key
            .to_public_key_der()
            .map_err(|e| KeyError::Encode(e.to_string()))?
            .into_vec();
        Ok(Self {
            name: name.to_string(),
            key,
            id: ecdsa_key_id(&spki_der),
            spki_der,
        })
    }

    /// Loads an SPKI PEM public key (`-----BEGIN PUBLIC KEY-----`) on P-256.
    pub fn from_public_key_pem(name: &str, pem: &str) -> Result<Self, KeyError> {
        check_name(name)?;
        let key = VerifyingKey::from_public_key_pem(pem.trim())
            .map_err(|e| KeyError::MalformedPublicKey(e.to_string()))?;
        Self::from_verifying_key(name, key)
    }

    /// Loads a DER SubjectPublicKeyInfo on P-256.
    pub fn from_public_key_der(name: &str, der: &[u8]) -> Result<Self, KeyError> {
        check_name(name)?;
        let key = VerifyingKey::from_public_key_der(der)
            .map_err(|e| KeyError::MalformedPublicKey(e.to_string()))?;
        Self::from_verifying_key(name, key)
    }

    /// The public key as SPKI PEM (LF line endings).
    pub fn to_public_key_pem(&self) -> Result<String, KeyError> {
        self.key
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| KeyError::Encode(e.to_string()))
    }

    /// The public key as DER SubjectPublicKeyInfo: the bytes the key ID hashes.
    pub fn public_key_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// The transparency-dev verifier-key text: `<name>+<hex id>+<base64(0x02 || SPKI DER)>`.
    pub fn to_vkey(&self) -> String {
        let mut typed = Vec::with_capacity(1 + self.spki_der.len());
        typed.push(SIGNATURE_TYPE_ECDSA);
        typed.extend_from_slice(&self.spki_der);
        format!(
            "{}+{}+{}",
            self.name,
            key_id_hex(&self.id),
            STANDARD.encode(typed)
        )
    }

    /// Parses [`to_vkey`](Self::to_vkey) text; the key ID must match the key.
    pub fn from_vkey(vkey: &str) -> Result<Self, KeyError> {
        let bad = |why: &str| KeyError::InvalidVkey(why.to_string());
        let mut parts = vkey.trim().splitn(3, '+');
        let (Some(name), Some(id_hex), Some(key_b64)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("expected <name>+<hex key id>+<base64 key>"));
        };
        let id = parse_key_id_hex(id_hex)?;
        let typed = STANDARD
            .decode(key_b64)
            .map_err(|_| bad("the key is not standard base64"))?;
        let Some((&kind, der)) = typed.split_first() else {
            return Err(bad("empty key"));
        };
        if kind != SIGNATURE_TYPE_ECDSA {
            return Err(KeyError::InvalidVkey(format!(
                "signature type {kind:#04x}, expected {SIGNATURE_TYPE_ECDSA:#04x} (ECDSA)"
            )));
        }
        let verifier = Self::from_public_key_der(name, der)?;
        if verifier.id != id {
            return Err(KeyError::InvalidVkey(format!(
                "key id {} does not match the key (SHA-256 of its SPKI gives {})",
                key_id_hex(&id),
                key_id_hex(&verifier.id)
            )));
        }
        Ok(verifier)
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key ID, `SHA-256(SPKI DER)[0..4]`.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// Checks an ASN.1 DER ECDSA P-256 / SHA-256 signature of `msg`.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> Result<(), KeyError> {
        let sig = Signature::from_der(sig).map_err(|_| KeyError::MalformedSignature)?;
        self.key
            .verify(msg, &sig)
            .map_err(|_| KeyError::BadSignature {
                name: self.name.clone(),
                id: key_id_hex(&self.id),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixed test key (made with `openssl genpkey -algorithm EC -pkeyopt
    /// ec_paramgen_curve:P-256`; never used outside tests). Its key ID was computed
    /// independently: `openssl pkey -pubout -outform DER | sha256sum | cut -c1-8`.
    const TEST_KEY_PEM: &str = concat!(
        "-----BEGIN PRIVATE KEY-----\n",
        "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQghQvMdpVi6V7fyjrd\n",
        "X7j8MyjXwOX2HFmpuaMAZLQBPnihRANCAASBc89sku+HzrqyM388K78t0/yQC+Y0\n",
        "JzxIg9xETow9/4VrcrtswRDhzAUcyuEyxOq1LW7/X+drkK9+8NYyv232\n",
        "-----END PRIVATE KEY-----\n",
    );

    fn signer() -> Signer {
        match Signer::generate("caracal.test/ledger") {
            Ok(s) => s,
            Err(e) => unreachable!("generate: {e}"),
        }
    }

    #[test]
    fn key_id_hex_round_trip() {
        let id = [0x01, 0xab, 0xff, 0x00];
        assert_eq!(key_id_hex(&id), "01abff00");
        assert_eq!(parse_key_id_hex("01abff00"), Ok(id));
        assert_eq!(parse_key_id_hex("01ABFF00"), Ok(id));
        for bad in [
            "",
            "01abff0",
            "01abff000",
            "01abfg00",
            "+1abff00",
            "01ab ff0",
        ] {
            assert!(parse_key_id_hex(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sign_verify_and_reject() {
        let s = signer();
        let v = s.verifier();
        let sig = s.sign(b"hello\n");
        assert_eq!(sig[0], 0x30, "ASN.1 DER SEQUENCE");
        assert!((8..=72).contains(&sig.len()));
        assert_eq!(sig, s.sign(b"hello\n"), "RFC 6979 deterministic");
        assert_eq!(v.verify(b"hello\n", &sig), Ok(()));
        assert!(matches!(
            v.verify(b"hello!\n", &sig),
            Err(KeyError::BadSignature { .. })
        ));
        assert_eq!(
            v.verify(b"hello\n", &sig[..sig.len() - 1]),
            Err(KeyError::MalformedSignature)
        );
        let other = signer().verifier();
        assert!(other.verify(b"hello\n", &sig).is_err());
        assert_ne!(other.id(), v.id());
    }

    #[test]
    fn key_id_is_sha256_of_spki_der() {
        let v = signer().verifier();
        let der = v.public_key_der();
        assert_eq!(der.len(), 91);
        let d = Sha256::digest(der);
        assert_eq!(v.id(), [d[0], d[1], d[2], d[3]]);
        // The id does not depend on the name; (name, id) together select the key.
        let renamed = Verifier::from_public_key_der("other.test/log", der);
        assert_eq!(renamed.as_ref().map(Verifier::id), Ok(v.id()));
        assert_ne!(renamed.ok(), Some(v));
    }

    #[test]
    fn pinned_key_id() {
        let s = Signer::from_pkcs8_pem("caracal.test/ledger", TEST_KEY_PEM, None);
        let id = s.as_ref().map(|s| key_id_hex(&s.id()));
        assert_eq!(id.as_deref(), Ok("f635b4d7"));
    }

    /// TEST_KEY_PEM encrypted by `openssl pkcs8 -topk8 -v2 aes-256-cbc -passout
    /// pass:caracal-test` (PBES2, PBKDF2-HMAC-SHA-256, 2048 iterations).
    const TEST_KEY_OPENSSL_ENCRYPTED_PEM: &str = concat!(
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\n",
        "MIHsMFcGCSqGSIb3DQEFDTBKMCkGCSqGSIb3DQEFDDAcBAjnLAYH1HxF3wICCAAw\n",
        "DAYIKoZIhvcNAgkFADAdBglghkgBZQMEASoEEDCxvczHvtU+TTdkP0s4brMEgZAA\n",
        "n9lpJhF0tk7bxQrtxUJqOJNfXcrPEg0PaLQ2xPbogV7NMFfdGsq4nl1mWS8/E8G8\n",
        "RO0IjX98O9BciCpEvQk08TqTpZl3vQ2S3w4aGtrZVC0P/VwCZnQN2d4Ep4gh8pO7\n",
        "GQDTB+wpKb+9F8lNOs3BaQqDIlZH/09UHq3PD8YTNgVxIQ2s0ehSmudk3uTm2B8=\n",
        "-----END ENCRYPTED PRIVATE KEY-----\n",
    );

    #[test]
    fn reads_openssl_encrypted_pkcs8() {
        let s = Signer::from_pkcs8_pem(
            "caracal.test/ledger",
            TEST_KEY_OPENSSL_ENCRYPTED_PEM,
            Some(b"caracal-test"),
        );
        assert_eq!(s.map(|s| key_id_hex(&s.id())).as_deref(), Ok("f635b4d7"));
        let wrong = Signer::from_pkcs8_pem(
            "caracal.test/ledger",
            TEST_KEY_OPENSSL_ENCRYPTED_PEM,
            Some(b"caracal-tesT"),
        );
        assert_eq!(wrong.map(|s| s.id()), Err(KeyError::WrongPassphrase));
    }

    /// `printf 'caracal.test/ledger\n4\nAAAA\n' | openssl dgst -sha256 -sign key.pem | base64`
    #[test]
    fn verifies_an_openssl_signature() {
        let v = Signer::from_pkcs8_pem("caracal.test/ledger", TEST_KEY_PEM, None)
            .unwrap()
            .verifier();
        let sig = STANDARD
            .decode("MEYCIQCgE3UwCtjM2Q86HeJCBylYi9IQRe11TL4YWv2SKUV65AIhAITuhkdKNmv0P9m+/B/emumZs71D8pOMyUPukiKLOC2s")
            .unwrap();
        assert_eq!(v.verify(b"caracal.test/ledger\n4\nAAAA\n", &sig), Ok(()));
        assert!(v.verify(b"caracal.test/ledger\n5\nAAAA\n", &sig).is_err());
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", "a b", "a+b", "a\nb", "a\tb"] {
            assert!(
                matches!(Signer::generate(bad), Err(KeyError::InvalidName(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn plain_pem_round_trip() {
        let s = signer();
        let pem = s.to_pkcs8_pem(None);
        let pem = pem.as_deref().unwrap_or("");
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let back = Signer::from_pkcs8_pem(s.name(), pem, None);
        assert_eq!(back.map(|b| b.verifier()), Ok(s.verifier()));
        // A passphrase given for a plain key is not used.
        let back = Signer::from_pkcs8_pem(s.name(), pem, Some(b"unused"));
        assert_eq!(back.map(|b| b.id()), Ok(s.id()));
    }

    /// Cheap scrypt parameters so the (unoptimised) test build stays fast; the
    /// code path is the one `to_pkcs8_pem` takes with `key_file_scrypt()`.
    fn cheap_scrypt() -> pkcs8::pkcs5::scrypt::Params {
        pkcs8::pkcs5::scrypt::Params::new(8, 8, 1, 32).unwrap()
    }

    #[test]
    fn key_files_use_scrypt_2_14() {
        let p = key_file_scrypt();
        assert_eq!((p.log_n(), p.r(), p.p()), (14, 8, 1));
    }

    #[test]
    fn encrypted_pem_round_trip_and_errors() {
        let s = signer();
        let pem = s.to_encrypted_pem(b"correct horse", cheap_scrypt());
        let pem = pem.as_deref().unwrap_or("");
        assert!(pem.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----\n"));
        assert_eq!(
            Signer::from_pkcs8_pem(s.name(), pem, None).map(|s| s.id()),
            Err(KeyError::PassphraseRequired)
        );
        assert_eq!(
            Signer::from_pkcs8_pem(s.name(), pem, Some(b"wrong")).map(|s| s.id()),
            Err(KeyError::WrongPassphrase)
        );
        let back = Signer::from_pkcs8_pem(s.name(), pem, Some(b"correct horse"));
        assert_eq!(back.map(|b| b.verifier()), Ok(s.verifier()));
    }

    #[test]
    fn other_pem_kinds_are_named() {
        let sec1 = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIA==\n-----END EC PRIVATE KEY-----\n";
        assert_eq!(
            Signer::from_pkcs8_pem("a", sec1, None).map(|s| s.id()),
            Err(KeyError::Sec1NotSupported)
        );
        let public = signer().verifier().to_public_key_pem().unwrap_or_default();
        assert!(matches!(
            Signer::from_pkcs8_pem("a", &public, None),
            Err(KeyError::UnexpectedPemLabel { .. })
        ));
        assert!(matches!(
            Signer::from_pkcs8_pem("a", "not a pem", None),
            Err(KeyError::MalformedPrivateKey(_))
        ));
    }

    #[test]
    fn public_pem_and_vkey_round_trip() {
        let v = signer().verifier();
        let pem = v.to_public_key_pem().unwrap_or_default();
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"));
        assert_eq!(Verifier::from_public_key_pem(v.name(), &pem), Ok(v.clone()));
        let vkey = v.to_vkey();
        assert!(vkey.starts_with(&format!("caracal.test/ledger+{}+Aj", key_id_hex(&v.id()))));
        assert_eq!(Verifier::from_vkey(&vkey), Ok(v.clone()));
        let wrong_id = vkey.replacen(&key_id_hex(&v.id()), "00000000", 1);
        assert!(matches!(
            Verifier::from_vkey(&wrong_id),
            Err(KeyError::InvalidVkey(_))
        ));
    }

    #[test]
    fn debug_and_errors_never_show_the_private_key() {
        let s = signer();
        let pem = s.to_pkcs8_pem(None).unwrap_or_default();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let scalar_hex: String = s
            .key
            .to_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let debug = format!("{s:?}");
        assert!(debug.contains("redacted"));
        assert!(!debug.contains(&body[..20]));
        assert!(!debug.to_lowercase().contains(&scalar_hex));
        let wrong = s.to_encrypted_pem(b"x", cheap_scrypt()).unwrap_or_default();
        let err = Signer::from_pkcs8_pem(s.name(), &wrong, Some(b"y"))
            .map(|s| s.id())
            .err()
            .map(|e| format!("{e} {e:?}"))
            .unwrap_or_default();
        assert!(!err.contains(&body[..20]));
        assert!(!err.to_lowercase().contains(&scalar_hex));
    }
}
