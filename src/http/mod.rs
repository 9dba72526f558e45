//! HTTP read-your-writes across requests.
//!
//! A request resumes a [`Session`](crate::Session) from the token an earlier response
//! handed out, so a user who just wrote reads the write back on the next page, wherever
//! that read is served. The token travels signed (HMAC-SHA256, see `TokenSigner`) in a
//! cookie for browsers or a header for API clients.
//!
//! - `config`: [`HttpConfig`], the `[http]` table, compiled in every build so one config
//!   file suits every build.
//! - `sign` (feature `axum`): `TokenSigner`, the signed wire form.
//! - `cookie` (feature `axum`): reading `Cookie`, writing `Set-Cookie`.
//! - `layer` (feature `axum`): `SessionLayer`, the tower layer, and the axum extractor.

mod config;
#[cfg(feature = "axum")]
mod cookie;
#[cfg(feature = "axum")]
mod layer;
#[cfg(feature = "axum")]
mod sign;

pub(crate) use config::KEY_MESSAGES;
pub use config::{HttpConfig, SameSite, TokenKey};
#[cfg(feature = "axum")]
pub use layer::{MissingSession, RejectedTokens, SessionFuture, SessionLayer, SessionService};
#[cfg(feature = "axum")]
pub use sign::{SignedTokenError, TokenSigner};
