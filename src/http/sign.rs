//! Signed tokens: the wire form of a session token in a cookie or header.
//!
//! `<token text>.<MAC>`, where the token text is [`Token`]'s stable form
//! (`v2.<system id>.<timeline>.<LSN X/YYYYYYYY>`) and the MAC is HMAC-SHA256 over
//! `"pgfleet-token\n" || <token text>`, in unpadded base64url (43 characters). Every
//! character is allowed in a cookie value and a header value without quoting, e.g.
//! `v2.6f1c2d3e4a5b6c7d.1.0/03000148.Xk3...` (at most 108 characters).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::config::{invalid, ConfigError};
use crate::http::config::TokenKey;
use crate::token::{Token, TokenError};

type HmacSha256 = Hmac<Sha256>;

/// Domain separation: a key shared with something else never signs a valid token by
/// accident.
const CONTEXT: &[u8] = b"pgfleet-token\n";
/// base64url length of a 32-byte MAC, without padding.
const MAC_TEXT_LEN: usize = 43;
/// The longest token text ([`Token`]'s parser refuses more) plus `.` and the MAC.
const MAX_WIRE_LEN: usize = 64 + 1 + MAC_TEXT_LEN;

/// Signs session tokens with the first of its keys and verifies them with any, in
/// constant time per key.
///
/// `Debug` shows only how many keys it holds.
#[derive(Clone)]
pub struct TokenSigner {
    /// One keyed HMAC state per key (the key schedule computed once); the first signs.
    keys: Vec<HmacSha256>,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner")
            .field("keys", &self.keys.len())
            .finish()
    }
}

/// Why a signed token was refused before its contents were looked at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignedTokenError {
    /// Not of the form `<token text>.<43 base64url characters>`, or (after a valid MAC)
    /// a token text that does not parse.
    #[error("malformed signed token: {reason}")]
    Malformed {
        /// Which part is wrong.
        reason: &'static str,
    },
    /// The MAC matches none of the keys: forged, tampered with, or signed with a key
    /// that has been removed.
    #[error("signed token has a bad signature")]
    BadSignature,
}

impl TokenSigner {
    /// A signer with `keys`: the first signs, every one verifies.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] (key `http.keys`) when `keys` is empty, and every error
    /// of a key's own check (shorter than 32 bytes, unset environment variable).
    pub fn new(keys: &[TokenKey]) -> Result<Self, ConfigError> {
        if keys.is_empty() {
            return Err(invalid(
                "http.keys",
                "the HTTP layer needs at least one signing key",
            ));
        }
        let mut macs = Vec::with_capacity(keys.len());
        for (i, k) in keys.iter().enumerate() {
            k.validate(&format!("http.keys[{i}]"))?;
            let mac = HmacSha256::new_from_slice(k.secret())
                .map_err(|_| invalid(format!("http.keys[{i}]"), "not a usable HMAC key"))?;
            macs.push(mac);
        }
        Ok(Self { keys: macs })
    }

    /// The token's wire form, signed with the first key.
    pub fn sign(&self, token: &Token) -> String {
        let text = token.to_string();
        // `new` refuses an empty key list; an empty signer cannot be built.
        let Some(first) = self.keys.first() else {
            return text;
        };
        let mut mac = first.clone();
        mac.update(CONTEXT);
        mac.update(text.as_bytes());
        let tag = mac.finalize().into_bytes();
        let mut out = String::with_capacity(text.len() + 1 + MAC_TEXT_LEN);
        out.push_str(&text);
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(tag, &mut out);
        out
    }

    /// The token in `wire`, if one of the keys signed it. The MAC is checked (in
    /// constant time, with `verify_slice`) before the token text is parsed.
    ///
    /// # Errors
    ///
    /// [`SignedTokenError::Malformed`] for text not of the wire form;
    /// [`SignedTokenError::BadSignature`] when no key's MAC matches.
    pub fn verify(&self, wire: &str) -> Result<Token, SignedTokenError> {
        let malformed = |reason| SignedTokenError::Malformed { reason };
        if wire.len() > MAX_WIRE_LEN {
            return Err(malformed("too long"));
        }
        let (text, mac_text) = wire
            .rsplit_once('.')
            .ok_or(malformed("no signature (expected <token>.<mac>)"))?;
        if mac_text.len() != MAC_TEXT_LEN {
            return Err(malformed("signature is not 43 base64url characters"));
        }
        let mut tag = [0u8; 32];
        match URL_SAFE_NO_PAD.decode_slice(mac_text, &mut tag) {
            Ok(32) => {}
            _ => return Err(malformed("signature is not 43 base64url characters")),
        }
        let signed = self.keys.iter().any(|k| {
            let mut mac = k.clone();
            mac.update(CONTEXT);
            mac.update(text.as_bytes());
            mac.verify_slice(&tag).is_ok()
        });
        if !signed {
            return Err(SignedTokenError::BadSignature);
        }
        text.parse::<Token>().map_err(|e| match e {
            TokenError::Malformed { reason } => malformed(reason),
            _ => malformed("token text"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;
    use proptest::prelude::*;

    fn signer(keys: &[&str]) -> TokenSigner {
        let keys: Vec<TokenKey> = keys.iter().map(|k| TokenKey::new(*k)).collect();
        match TokenSigner::new(&keys) {
            Ok(s) => s,
            Err(e) => panic!("signer: {e}"),
        }
    }

    const K1: &str = "key-one-0123456789abcdef0123456789abcdef";
    const K2: &str = "key-two-0123456789abcdef0123456789abcdef";

    fn token() -> Token {
        Token::new(0x6f1c_2d3e_4a5b_6c7d, 1, Lsn(0x300_0148))
    }

    #[test]
    fn round_trip_and_wire_form() {
        let s = signer(&[K1]);
        let wire = s.sign(&token());
        let (text, mac) = wire.rsplit_once('.').expect("has a mac");
        assert_eq!(text, "v2.6f1c2d3e4a5b6c7d.1.0/03000148");
        assert_eq!(mac.len(), 43);
        assert!(wire.len() <= MAX_WIRE_LEN);
        // Cookie-octet and header-value safe: no quoting needed.
        assert!(wire
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"./-_".contains(&b)));
        assert_eq!(s.verify(&wire), Ok(token()));
        // Deterministic: the same token signs the same way.
        assert_eq!(s.sign(&token()), wire);
    }

    #[test]
    fn rotation_first_signs_all_verify() {
        let old = signer(&[K2]);
        let rotated = signer(&[K1, K2]);
        let new_only = signer(&[K1]);
        let by_old = old.sign(&token());
        assert_eq!(rotated.verify(&by_old), Ok(token()));
        assert_eq!(
            new_only.verify(&by_old),
            Err(SignedTokenError::BadSignature)
        );
        // The rotated signer signs with its first key.
        assert_eq!(rotated.sign(&token()), new_only.sign(&token()));
    }

    /// A cookie signed by an earlier version (token text `v1.`, variable widths) still
    /// verifies after an upgrade: the MAC covers the text as sent.
    #[test]
    fn tokens_signed_in_the_v1_form_still_verify() {
        let text = "v1.6f1c2d3e4a5b6c7d.1.0/3000148";
        let mut mac =
            <HmacSha256 as KeyInit>::new_from_slice(K1.as_bytes()).expect("any key length");
        mac.update(CONTEXT);
        mac.update(text.as_bytes());
        let wire = format!(
            "{text}.{}",
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        );
        assert_eq!(signer(&[K1]).verify(&wire), Ok(token()));
        assert_eq!(
            signer(&[K2]).verify(&wire),
            Err(SignedTokenError::BadSignature)
        );
    }

    #[test]
    fn malformed_and_forged() {
        let s = signer(&[K1]);
        let wire = s.sign(&token());
        let (text, mac) = wire.rsplit_once('.').expect("mac");
        for bad in [
            "",
            "v1.1.1.0/1",
            &format!("{text}."),
            &format!("{text}.{}", &mac[1..]),
            &format!("{text}.{mac}A"),
            &format!("{text}.{}", "*".repeat(43)),
            &format!("{}.{mac}", "v".repeat(200)),
        ] {
            assert!(
                matches!(s.verify(bad), Err(SignedTokenError::Malformed { .. })),
                "{bad:?}"
            );
        }
        // A valid-looking token with another token's MAC.
        let other = s.sign(&Token::new(1, 1, Lsn(1)));
        let (_, other_mac) = other.rsplit_once('.').expect("mac");
        assert_eq!(
            s.verify(&format!("{text}.{other_mac}")),
            Err(SignedTokenError::BadSignature)
        );
        // A MAC over the same text with another key.
        assert_eq!(
            s.verify(&signer(&[K2]).sign(&token())),
            Err(SignedTokenError::BadSignature)
        );
    }

    #[test]
    fn empty_or_short_keys_are_refused() {
        assert!(TokenSigner::new(&[]).is_err());
        assert!(TokenSigner::new(&[TokenKey::new("short")]).is_err());
        let s = signer(&[K1]);
        assert_eq!(format!("{s:?}"), "TokenSigner { keys: 1 }");
    }

    proptest! {
        /// Any change to a signed token (one byte replaced, removed or inserted) fails
        /// verification: the MAC covers every byte of the token text, and the MAC itself
        /// has no two encodings.
        #[test]
        fn any_tampering_fails(
            sys in any::<u64>(), tl in 1u32.., lsn in any::<u64>(),
            pos in any::<prop::sample::Index>(),
            byte in 0x20u8..0x7f,
            op in 0..3u8,
        ) {
            let s = signer(&[K1]);
            let t = Token::new(sys, tl, Lsn(lsn));
            let wire = s.sign(&t);
            let mut bytes = wire.clone().into_bytes();
            let i = pos.index(bytes.len());
            match op {
                0 => bytes[i] = byte,
                1 => { bytes.remove(i); }
                _ => bytes.insert(i, byte),
            }
            let tampered = String::from_utf8(bytes).expect("ascii");
            prop_assume!(tampered != wire);
            prop_assert!(s.verify(&tampered).is_err(), "{} verified", tampered);
        }

        #[test]
        fn signed_tokens_round_trip(sys in any::<u64>(), tl in 1u32.., lsn in any::<u64>()) {
            let s = signer(&[K1, K2]);
            let t = Token::new(sys, tl, Lsn(lsn));
            prop_assert_eq!(s.verify(&s.sign(&t)), Ok(t));
        }

        #[test]
        fn verify_never_panics(text in "\\PC{0,200}") {
            let _ = signer(&[K1]).verify(&text);
        }
    }
}
