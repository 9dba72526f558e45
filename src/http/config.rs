//! `[http]`: how session tokens travel over HTTP (cookie and header) and the keys that
//! sign them. Parsed and validated with every build, so one config file works whether or
//! not the `axum` feature (which provides the layer) is enabled.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

use crate::config::{
    check_duration, check_identifier, env_reference, invalid, is_env_name, ConfigError,
};

/// Shortest accepted signing key, in bytes: HMAC-SHA256 wants a key at least as long as
/// its 256-bit output. Shorter keys are refused rather than warned about.
pub(crate) const MIN_KEY_LEN: usize = 32;
/// Longest accepted cookie or header name: a bound against typos.
const MAX_NAME_LEN: usize = 64;
/// Longest accepted cookie path.
const MAX_PATH_LEN: usize = 256;

/// `[http]`: the session token's cookie and header, and the keys that sign it.
///
/// Used by the HTTP layer (`SessionLayer`, feature `axum`): it resumes a
/// [`Session`](crate::Session) from a signed token in a cookie (browsers) or a request
/// header (API clients), and sends the new token back in both when the session's mark
/// moved. Every key is optional; the section itself may be left out.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[non_exhaustive]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Name of the cookie that carries the token: an RFC 6265 token (letters, digits
    /// and ``!#$%&'*+-.^_`|~``), at most 64 characters. Default: `"pgfleet_token"`.
    pub cookie_name: String,
    /// The cookie's `Max-Age`, at least `1s` (whole seconds are sent), at most `24h`.
    /// A token only matters while a replica may still lag behind it, so it need not
    /// live long. Default: `10m`.
    #[serde(with = "humantime_serde")]
    pub cookie_max_age: Duration,
    /// Whether the cookie carries `Secure` (sent over HTTPS only). Required with
    /// `cookie_same_site = "none"`. Default: `true`.
    pub cookie_secure: bool,
    /// Whether the cookie carries `HttpOnly` (hidden from scripts). Default: `true`.
    pub cookie_http_only: bool,
    /// The cookie's `SameSite`: `"strict"`, `"lax"` or `"none"` (also spelled
    /// `"Strict"`, `"Lax"`, `"None"`). Default: `"lax"`.
    pub cookie_same_site: SameSite,
    /// The cookie's `Path`: starts with `/`, printable ASCII without `;`, at most 256
    /// characters. Default: `"/"`.
    pub cookie_path: String,
    /// Request and response header that carries the token for clients without cookies:
    /// an HTTP header name (letters, digits and ``!#$%&'*+-.^_`|~``), at most 64
    /// characters, not `cookie` or `set-cookie`. Default: `"x-pgfleet-token"`.
    pub header_name: String,
    /// HMAC-SHA256 keys, each at least 32 bytes: the first signs new tokens, every one
    /// verifies, so a key can be rotated by putting the new one first and removing the
    /// old one once the tokens it signed have expired (`cookie_max_age`). A key written
    /// as `"${NAME}"` is read from the environment variable `NAME`. Keys never appear in
    /// `Debug`, `Display`, serialized output, logs or errors. The HTTP layer needs at
    /// least one. Default: none.
    pub keys: Vec<TokenKey>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            cookie_name: "pgfleet_token".to_owned(),
            cookie_max_age: Duration::from_secs(10 * 60),
            cookie_secure: true,
            cookie_http_only: true,
            cookie_same_site: SameSite::default(),
            cookie_path: "/".to_owned(),
            header_name: "x-pgfleet-token".to_owned(),
            keys: Vec::new(),
        }
    }
}

/// The cookie's `SameSite` attribute (`http.cookie_same_site`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[non_exhaustive]
#[serde(rename_all = "snake_case")]
pub enum SameSite {
    /// `"strict"`: sent only with same-site requests.
    #[serde(alias = "Strict")]
    Strict,
    /// `"lax"`: also sent on top-level navigations from other sites. The default.
    #[default]
    #[serde(alias = "Lax")]
    Lax,
    /// `"none"`: sent with cross-site requests too; needs `cookie_secure = true`.
    #[serde(alias = "None")]
    None,
}

impl SameSite {
    /// The attribute's value as sent: `Strict`, `Lax` or `None`.
    pub fn as_str(self) -> &'static str {
        match self {
            SameSite::Strict => "Strict",
            SameSite::Lax => "Lax",
            SameSite::None => "None",
        }
    }
}

impl fmt::Display for SameSite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One HMAC-SHA256 key for session tokens (`http.keys`).
///
/// Its bytes are the UTF-8 bytes of the string as written, or of the environment
/// variable `NAME` when written as `"${NAME}"` (e.g. generated with
/// `openssl rand -base64 32`). `Debug` shows `TokenKey(***)` or `TokenKey(${NAME})`,
/// and it serializes as `"***"` or `"${NAME}"`: the secret never leaves it except to
/// compute MACs, and its bytes are zeroed when it is dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenKey {
    /// The key bytes (empty while `missing_env` is set), zeroed on drop.
    secret: Zeroizing<Vec<u8>>,
    /// The environment variable it came from, if any (not secret: shown instead of it).
    env: Option<String>,
    /// Set when `env` was unset at parse time; [`crate::Config::validate`] reports it.
    missing_env: bool,
}

impl TokenKey {
    /// A key from its bytes. [`crate::Config::validate`] (or the layer) refuses keys
    /// shorter than 32 bytes.
    pub fn new(secret: impl Into<Vec<u8>>) -> Self {
        Self {
            secret: Zeroizing::new(secret.into()),
            env: None,
            missing_env: false,
        }
    }

    /// A key read now from the environment variable `var`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::MissingEnv`] (key `http.keys`) if `var` is not set;
    /// [`ConfigError::Invalid`] if it is not valid UTF-8.
    pub fn from_env(var: &str) -> Result<Self, ConfigError> {
        let key = Self::from_env_inner(var)?;
        if key.missing_env {
            return Err(ConfigError::MissingEnv {
                key: "http.keys".to_owned(),
                var: var.to_owned(),
            });
        }
        Ok(key)
    }

    fn from_env_inner(var: &str) -> Result<Self, ConfigError> {
        match std::env::var(var) {
            Ok(value) => Ok(Self {
                secret: Zeroizing::new(value.into_bytes()),
                env: Some(var.to_owned()),
                missing_env: false,
            }),
            Err(std::env::VarError::NotPresent) => Ok(Self {
                secret: Zeroizing::new(Vec::new()),
                env: Some(var.to_owned()),
                missing_env: true,
            }),
            Err(std::env::VarError::NotUnicode(_)) => Err(invalid(
                "http.keys",
                format!("environment variable `{var}` is not valid UTF-8"),
            )),
        }
    }

    /// The key bytes, for the signer only.
    #[cfg_attr(not(feature = "axum"), allow(dead_code))]
    pub(crate) fn secret(&self) -> &[u8] {
        &self.secret
    }

    /// Checks one key; `key` is its path (`http.keys[0]`). Messages never hold the key.
    pub(crate) fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if self.missing_env {
            return Err(ConfigError::MissingEnv {
                key: key.to_owned(),
                var: self.env.clone().unwrap_or_default(),
            });
        }
        if self.secret.len() < MIN_KEY_LEN {
            return Err(invalid(
                key,
                format!(
                    "is {} bytes long; a signing key needs at least {MIN_KEY_LEN} bytes (e.g. `openssl rand -base64 32`)",
                    self.secret.len()
                ),
            ));
        }
        Ok(())
    }

    /// What is shown instead of the key.
    fn shown(&self) -> String {
        match &self.env {
            Some(var) => format!("${{{var}}}"),
            None => "***".to_owned(),
        }
    }
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenKey({})", self.shown())
    }
}

/// The errors a key's text can give while parsing: they hold no part of it.
pub(crate) const KEY_MESSAGES: [&str; 2] = [
    "looks like `${NAME}` but NAME is not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)",
    "looks like an environment variable: write it `${NAME}` to read the key from the environment",
];

impl<'de> Deserialize<'de> for TokenKey {
    /// A literal key, or `"${NAME}"` read from the environment; an unset variable is
    /// left for [`crate::Config::validate`] to report with the key's path.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Zeroizing::new(String::deserialize(deserializer)?);
        if let Some(var) = env_reference(raw.as_bytes()) {
            return Self::from_env_inner(var).map_err(serde::de::Error::custom);
        }
        // A reference mistyped would otherwise become the key itself: text from the
        // config file, which anyone who reads the file could sign with.
        if raw.starts_with("${") {
            return Err(serde::de::Error::custom(KEY_MESSAGES[0]));
        }
        if raw.strip_prefix('$').is_some_and(is_env_name) {
            return Err(serde::de::Error::custom(KEY_MESSAGES[1]));
        }
        Ok(Self::new(raw.as_bytes().to_vec()))
    }
}

impl Serialize for TokenKey {
    /// `"${NAME}"` for a key from the environment, else `"***"`: a serialized config
    /// never holds a key.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.shown())
    }
}

/// RFC 7230 `tchar`: what cookie and header names are made of.
fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

fn check_token_name(key: &str, name: &str) -> Result<(), ConfigError> {
    check_identifier(
        key,
        name,
        MAX_NAME_LEN,
        is_tchar,
        "letters, digits and !#$%&'*+-.^_`|~",
    )
}

impl HttpConfig {
    /// Checks what the types cannot; called by [`crate::Config::validate`].
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        check_token_name("http.cookie_name", &self.cookie_name)?;
        check_token_name("http.header_name", &self.header_name)?;
        if ["cookie", "set-cookie"]
            .iter()
            .any(|h| h.eq_ignore_ascii_case(&self.header_name))
        {
            return Err(invalid(
                "http.header_name",
                format!(
                    "`{}` is reserved for cookies; choose another name (e.g. x-pgfleet-token)",
                    self.header_name
                ),
            ));
        }
        check_duration("http.cookie_max_age", self.cookie_max_age, false)?;
        if self.cookie_max_age < Duration::from_secs(1) {
            return Err(invalid(
                "http.cookie_max_age",
                "must be at least 1s (Max-Age counts whole seconds; 0 deletes the cookie)",
            ));
        }
        let path_ok = self.cookie_path.starts_with('/')
            && self.cookie_path.len() <= MAX_PATH_LEN
            && self
                .cookie_path
                .chars()
                .all(|c| c.is_ascii_graphic() && c != ';');
        if !path_ok {
            return Err(invalid(
                "http.cookie_path",
                format!(
                    "`{}` is not a cookie path: it must start with `/` and hold at most {MAX_PATH_LEN} printable ASCII characters without spaces or `;`",
                    self.cookie_path.escape_debug()
                ),
            ));
        }
        if self.cookie_same_site == SameSite::None && !self.cookie_secure {
            return Err(invalid(
                "http.cookie_same_site",
                "\"none\" requires http.cookie_secure = true (browsers drop SameSite=None cookies without Secure)",
            ));
        }
        // Cookie name prefixes (RFC 6265bis): browsers drop such a cookie set without
        // what its prefix promises, and read-your-writes would silently stop.
        let prefix = ["__Host-", "__Secure-"].into_iter().find(|p| {
            self.cookie_name
                .get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p))
        });
        if let Some(prefix) = prefix {
            if !self.cookie_secure {
                return Err(invalid(
                    "http.cookie_secure",
                    format!("must be true for a cookie named `{prefix}...` (browsers drop it without Secure)"),
                ));
            }
            if prefix == "__Host-" && self.cookie_path != "/" {
                return Err(invalid(
                    "http.cookie_path",
                    "must be \"/\" for a cookie named `__Host-...` (browsers drop it with any other path)",
                ));
            }
        }
        for (i, k) in self.keys.iter().enumerate() {
            k.validate(&format!("http.keys[{i}]"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key32() -> TokenKey {
        TokenKey::new(vec![b'k'; 32])
    }

    #[test]
    fn defaults_validate() -> Result<(), ConfigError> {
        HttpConfig::default().validate()?;
        let mut c = HttpConfig::default();
        c.keys.push(key32());
        c.validate()
    }

    #[test]
    fn bad_values_name_their_key() {
        type Tweak = Box<dyn Fn(&mut HttpConfig)>;
        let cases: Vec<(&str, Tweak)> = vec![
            (
                "http.cookie_name",
                Box::new(|c| c.cookie_name = String::new()),
            ),
            (
                "http.cookie_name",
                Box::new(|c| c.cookie_name = "a b".into()),
            ),
            (
                "http.cookie_name",
                Box::new(|c| c.cookie_name = "a;b".into()),
            ),
            (
                "http.cookie_name",
                Box::new(|c| c.cookie_name = "x".repeat(65)),
            ),
            (
                "http.header_name",
                Box::new(|c| c.header_name = "x:y".into()),
            ),
            (
                "http.header_name",
                Box::new(|c| c.header_name = "Set-Cookie".into()),
            ),
            (
                "http.cookie_max_age",
                Box::new(|c| c.cookie_max_age = Duration::ZERO),
            ),
            (
                "http.cookie_max_age",
                Box::new(|c| c.cookie_max_age = Duration::from_millis(500)),
            ),
            (
                "http.cookie_max_age",
                Box::new(|c| c.cookie_max_age = Duration::from_secs(90_000)),
            ),
            (
                "http.cookie_path",
                Box::new(|c| c.cookie_path = "app".into()),
            ),
            (
                "http.cookie_path",
                Box::new(|c| c.cookie_path = "/a;b".into()),
            ),
            (
                "http.cookie_path",
                Box::new(|c| c.cookie_path = "/a b".into()),
            ),
            (
                "http.cookie_same_site",
                Box::new(|c| {
                    c.cookie_same_site = SameSite::None;
                    c.cookie_secure = false;
                }),
            ),
            (
                "http.keys[1]",
                Box::new(|c| c.keys = vec![key32(), TokenKey::new("short")]),
            ),
            (
                "http.cookie_secure",
                Box::new(|c| {
                    c.cookie_name = "__Host-token".into();
                    c.cookie_secure = false;
                }),
            ),
            (
                "http.cookie_secure",
                Box::new(|c| {
                    c.cookie_name = "__secure-token".into();
                    c.cookie_secure = false;
                }),
            ),
            (
                "http.cookie_path",
                Box::new(|c| {
                    c.cookie_name = "__Host-token".into();
                    c.cookie_path = "/app".into();
                }),
            ),
        ];
        for (want, tweak) in cases {
            let mut c = HttpConfig::default();
            tweak(&mut c);
            let err = c.validate().expect_err(want);
            assert_eq!(err.key(), Some(want), "{err}");
        }
    }

    #[test]
    fn a_mistyped_environment_reference_is_not_a_key() {
        #[derive(Deserialize)]
        struct Keys {
            #[allow(dead_code)]
            keys: Vec<TokenKey>,
        }
        for raw in [
            "${PGFLEET-HTTP-SIGNING-KEY-PRIMARY-0001}",
            "${}",
            "$PGFLEET_HTTP_SIGNING_KEY_PRIMARY_V2_0001",
        ] {
            let err = toml::from_str::<Keys>(&format!("keys = [\"{raw}\"]"))
                .err()
                .map(|e| e.message().to_owned());
            assert!(
                err.as_deref()
                    .is_some_and(|e| e.contains("${NAME}") && !e.contains(raw)),
                "{raw}: {err:?}"
            );
        }
        // A literal key that merely contains `$` is a key.
        let k: Keys =
            toml::from_str("keys = [\"0123456789$abcdef0123456789abcdef\"]").expect("a key");
        assert_eq!(k.keys.len(), 1);
        let k: Keys =
            toml::from_str("keys = [\"$0123456789abcdef0123456789abcdef\"]").expect("a key");
        assert_eq!(k.keys.len(), 1);
    }

    #[test]
    fn keys_are_never_shown() {
        let secret = "0123456789abcdef0123456789abcdef-secret";
        let k = TokenKey::new(secret);
        assert_eq!(format!("{k:?}"), "TokenKey(***)");
        let c = HttpConfig {
            keys: vec![k.clone(), TokenKey::new("short-secret")],
            ..HttpConfig::default()
        };
        assert!(!format!("{c:?}").contains("secret"));
        let err = c.validate().expect_err("short key");
        assert!(!err.to_string().contains("short-secret"), "{err}");
        assert!(!format!("{err:?}").contains("short-secret"), "{err:?}");
    }
}
