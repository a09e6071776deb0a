//! The format of keys Warden generates: `wdn_<kid>_<secret>_<check>`.
//!
//! - `wdn_` marks the key as Warden's, so secret scanners can find leaks;
//! - `<kid>`, 12 base32 characters, is the key id: it is not secret, it is
//!   logged and audited, and it finds the key's record without a search;
//! - `<secret>`, 40 base32 characters (200 random bits);
//! - `<check>`, 8 hex digits: CRC-32 of everything before it, so a scanner
//!   (or Warden) can tell a real key from a look-alike without a database.
//!
//! Only the SHA-256 of the whole key is ever stored.

use rand::Rng;

/// The prefix of every generated key.
pub const PREFIX: &str = "wdn_";
const KID_LEN: usize = 12;
const SECRET_LEN: usize = 40;
const CHECK_LEN: usize = 8;
const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// A freshly generated key: shown once, then only its digest is kept.
pub struct NewKey {
    /// The key id.
    pub kid: String,
    /// The whole key, to hand to its owner.
    pub key: String,
}

impl std::fmt::Debug for NewKey {
    // INVARIANT: the key itself never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NewKey({}, [redacted])", self.kid)
    }
}

/// Generates a key with a fresh random id and secret.
pub fn generate() -> NewKey {
    let mut rng = rand::rng();
    let mut pick = |n: usize| -> String {
        (0..n)
            .map(|_| char::from(BASE32[rng.random_range(0..BASE32.len())]))
            .collect()
    };
    let kid = pick(KID_LEN);
    let secret = pick(SECRET_LEN);
    let body = format!("{PREFIX}{kid}_{secret}");
    let key = format!("{body}_{:08x}", crc32fast::hash(body.as_bytes()));
    NewKey { kid, key }
}

/// The key id of a well-formed generated key whose checksum matches, or
/// `None` for anything else (which may still be a key declared in config).
pub fn kid_of(key: &str) -> Option<&str> {
    // Only ASCII can be a key, and it keeps the byte slicing below on
    // character boundaries whatever the input.
    if !key.is_ascii() {
        return None;
    }
    let rest = key.strip_prefix(PREFIX)?;
    if rest.len() != KID_LEN + 1 + SECRET_LEN + 1 + CHECK_LEN {
        return None;
    }
    let (body, check) = key.split_at(key.len() - CHECK_LEN);
    let body = body.strip_suffix('_')?;
    let kid = rest.get(..KID_LEN)?;
    let secret = rest.get(KID_LEN + 1..KID_LEN + 1 + SECRET_LEN)?;
    let shaped = rest.as_bytes().get(KID_LEN) == Some(&b'_')
        && kid.bytes().chain(secret.bytes()).all(|b| BASE32.contains(&b))
        && check.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !shaped || format!("{:08x}", crc32fast::hash(body.as_bytes())) != check {
        return None;
    }
    Some(kid)
}

/// Whether `kid` could be a generated key id (safe to put in a path or query).
pub fn is_kid(kid: &str) -> bool {
    kid.len() == KID_LEN && kid.bytes().all(|b| BASE32.contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_are_distinct() {
        let a = generate();
        let b = generate();
        assert_ne!(a.key, b.key);
        assert_eq!(kid_of(&a.key), Some(a.kid.as_str()));
        assert!(a.key.starts_with("wdn_"));
        assert_eq!(a.key.len(), 4 + 12 + 1 + 40 + 1 + 8);
        assert!(is_kid(&a.kid));
        assert!(!format!("{a:?}").contains(&a.key));
    }

    #[test]
    fn damaged_keys_do_not_parse() {
        let k = generate().key;
        // Any single changed character breaks the shape or the checksum.
        for i in 0..k.len() {
            let mut bytes = k.clone().into_bytes();
            bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
            let damaged = String::from_utf8(bytes).unwrap();
            assert_eq!(kid_of(&damaged), None, "position {i}: {damaged}");
        }
        assert_eq!(kid_of(&k[..k.len() - 1]), None);
        assert_eq!(kid_of("wdn_demo_acme_7Hq2mX9vLk4pR8sT"), None);
        assert_eq!(kid_of(""), None);
        // Multi-byte characters of the right total length neither match nor panic.
        let wide = format!("wdn_{}", "é".repeat(31));
        assert_eq!(kid_of(&wide), None);
    }
}
