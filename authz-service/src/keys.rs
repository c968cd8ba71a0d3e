//! Agent API keys.
//!
//! A key is `cak_` followed by 256 random bits in unpadded base64url. Only
//! HMAC-SHA-256(pepper, key) is stored: keys have full entropy, so a slow password
//! hash would buy nothing, while a keyed hash keeps a stolen table useless without
//! the server's pepper and lets the hot path find a key with one index probe.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

/// Every Caracal agent key starts with this, so leaked keys are easy to scan for.
pub const KEY_PREFIX: &str = "cak_";
/// Characters of the key kept in clear to recognise it in listings.
pub const DISPLAY_PREFIX_LEN: usize = 12;

/// A freshly generated key: the secret (shown once) and what is stored.
pub struct NewKey {
    pub secret: String,
    pub display_prefix: String,
    pub hash: [u8; 32],
}

pub fn generate(pepper: &str) -> NewKey {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let secret = format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes));
    let display_prefix = secret.chars().take(DISPLAY_PREFIX_LEN).collect();
    let hash = hash(pepper, &secret);
    NewKey {
        secret,
        display_prefix,
        hash,
    }
}

/// The stored form of a key.
pub fn hash(pepper: &str, secret: &str) -> [u8; 32] {
    // HMAC accepts keys of any length, including empty, so this cannot fail.
    let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(pepper.as_bytes()) {
        Ok(mac) => mac,
        Err(_) => return [0u8; 32],
    };
    mac.update(secret.as_bytes());
    mac.finalize().into_bytes().into()
}

/// Whether `text` has the shape of a Caracal key (cheap pre-check before a lookup).
pub fn looks_like_key(text: &str) -> bool {
    text.len() == KEY_PREFIX.len() + 43
        && text.starts_with(KEY_PREFIX)
        && text[KEY_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_well_formed_and_hash_with_the_pepper() {
        let a = generate("pepper");
        let b = generate("pepper");
        assert_ne!(a.secret, b.secret);
        assert!(looks_like_key(&a.secret), "{}", a.secret);
        assert_eq!(a.display_prefix.len(), DISPLAY_PREFIX_LEN);
        assert!(a.secret.starts_with(&a.display_prefix));
        assert_eq!(hash("pepper", &a.secret), a.hash);
        assert_ne!(hash("other", &a.secret), a.hash);
        assert!(!looks_like_key("cak_short"));
        assert!(!looks_like_key(&format!("sk-{}", &a.secret[4..])));
    }
}
