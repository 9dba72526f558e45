//! [`SessionLayer`]: a tower layer that resumes a [`Session`] from a signed token in a
//! cookie or header, hands it to the handler in the request extensions, and sends the
//! session's new token back when the handler moved its mark.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use ::http::header::{COOKIE, SET_COOKIE};
use ::http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};

use crate::config::{invalid, ConfigError};
use crate::fleet::Fleet;
use crate::http::config::HttpConfig;
use crate::http::cookie::{cookie_attributes, cookie_values, set_cookie, MAX_CANDIDATES};
use crate::http::sign::{SignedTokenError, TokenSigner};
use crate::session::Session;
use crate::token::{Token, TokenError};

const TARGET: &str = "pgfleet::http";

/// A tower [`Layer`](tower_layer::Layer) for read-your-writes across HTTP requests.
///
/// For every request it:
///
/// 1. reads signed tokens from the cookie `http.cookie_name` and the header
///    `http.header_name` (see [`TokenSigner`] for the wire form);
/// 2. checks each one's MAC, then [`Fleet::verify_token`] (system identifier, timeline,
///    and a position the primary has reached, confirmed by a fresh probe when the
///    cached one lags). A token that fails is **ignored** — the request is served as if
///    it had none — counted in [`SessionLayer::rejected_tokens`] and logged at debug
///    level (target `pgfleet::http`); never an error response;
/// 3. puts a [`Session`] that has observed the valid tokens into the request
///    extensions: handlers take it as `Extension<Session>`, or as `Session` itself with
///    axum (it implements `FromRequestParts`);
/// 4. after the response, once the session's released leases have reported their
///    positions ([`Session::settled_token`]), sets the cookie (`Set-Cookie`) and the
///    header to the new signed token if the session's mark moved past what came in.
///
/// Cloning is cheap; clones share the counters.
#[derive(Clone, Debug)]
pub struct SessionLayer {
    shared: Arc<LayerShared>,
}

#[derive(Debug)]
struct LayerShared {
    /// Where sessions come from and tokens are verified.
    fleet: Fleet,
    /// Signs outgoing tokens, verifies incoming ones.
    signer: TokenSigner,
    /// Cookie name.
    cookie_name: String,
    /// `; Max-Age=...; Path=...; ...`, computed once.
    cookie_attributes: String,
    /// A `Set-Cookie` that deletes the cookie (`Max-Age=0`): sent when a request's cookie
    /// was rejected and no new token replaces it, so a browser stops sending it.
    clear_cookie: Option<HeaderValue>,
    /// Request and response header for clients without cookies.
    header: HeaderName,
    /// Tokens ignored, by reason.
    rejected: Counters,
}

/// How many incoming tokens a [`SessionLayer`] ignored, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RejectedTokens {
    /// Not of the signed wire form (or too long).
    pub malformed: u64,
    /// A MAC that none of the keys produced: forged, tampered with, or signed with a
    /// key no longer configured.
    pub bad_signature: u64,
    /// Validly signed, but for another cluster (system identifier).
    pub foreign_system: u64,
    /// Validly signed, but on a timeline beyond the cluster's.
    pub unknown_timeline: u64,
    /// Validly signed, but ahead of the primary's position even after a fresh probe.
    pub ahead_of_primary: u64,
}

impl RejectedTokens {
    /// All reasons together.
    pub fn total(&self) -> u64 {
        self.malformed
            + self.bad_signature
            + self.foreign_system
            + self.unknown_timeline
            + self.ahead_of_primary
    }
}

#[derive(Debug, Default)]
struct Counters {
    malformed: AtomicU64,
    bad_signature: AtomicU64,
    foreign_system: AtomicU64,
    unknown_timeline: AtomicU64,
    ahead_of_primary: AtomicU64,
}

/// Why one incoming token was ignored.
enum Rejection {
    Signature(SignedTokenError),
    Token(TokenError),
}

impl SessionLayer {
    /// A layer configured by the fleet's own `[http]` section.
    ///
    /// # Errors
    ///
    /// As [`SessionLayer::with_config`].
    pub fn new(fleet: &Fleet) -> Result<Self, ConfigError> {
        let config = fleet.shared().config.http.clone();
        Self::with_config(fleet, &config)
    }

    /// A layer configured by `config` (e.g. built in code).
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] or [`ConfigError::MissingEnv`] for anything
    /// `config` fails validation for, and for an empty `keys` list (key `http.keys`).
    pub fn with_config(fleet: &Fleet, config: &HttpConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let signer = TokenSigner::new(&config.keys)?;
        let header = HeaderName::from_bytes(config.header_name.as_bytes())
            .map_err(|_| invalid("http.header_name", "not a valid HTTP header name"))?;
        Ok(Self {
            shared: Arc::new(LayerShared {
                fleet: fleet.clone(),
                signer,
                cookie_name: config.cookie_name.clone(),
                cookie_attributes: cookie_attributes(
                    config.cookie_max_age,
                    &config.cookie_path,
                    config.cookie_secure,
                    config.cookie_http_only,
                    config.cookie_same_site,
                ),
                clear_cookie: HeaderValue::try_from(set_cookie(
                    &config.cookie_name,
                    "",
                    &cookie_attributes(
                        std::time::Duration::ZERO,
                        &config.cookie_path,
                        config.cookie_secure,
                        config.cookie_http_only,
                        config.cookie_same_site,
                    ),
                ))
                .ok(),
                header,
                rejected: Counters::default(),
            }),
        })
    }

    /// Incoming tokens ignored so far, by reason.
    pub fn rejected_tokens(&self) -> RejectedTokens {
        let c = &self.shared.rejected;
        RejectedTokens {
            malformed: c.malformed.load(Ordering::Relaxed),
            bad_signature: c.bad_signature.load(Ordering::Relaxed),
            foreign_system: c.foreign_system.load(Ordering::Relaxed),
            unknown_timeline: c.unknown_timeline.load(Ordering::Relaxed),
            ahead_of_primary: c.ahead_of_primary.load(Ordering::Relaxed),
        }
    }

    /// The signer this layer uses: to hand a token out some other way (a redirect URL,
    /// a WebSocket message) in the same signed form.
    pub fn signer(&self) -> &TokenSigner {
        &self.shared.signer
    }
}

impl LayerShared {
    /// A session that has observed every valid token of the request, and whether a
    /// cookie was rejected.
    async fn resume(&self, headers: &HeaderMap) -> (Session, bool) {
        let session = self.fleet.session();
        // Collected first: the iterators' closures need not live across the awaits.
        let cookies = cookie_values(
            headers
                .get_all(COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok()),
            &self.cookie_name,
        )
        .map(|v| ("cookie", v));
        let header = headers
            .get_all(&self.header)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(|v| ("header", v.trim()));
        let mut candidates: Vec<(&'static str, &str)> = Vec::with_capacity(2);
        for (source, wire) in cookies.chain(header).take(MAX_CANDIDATES) {
            // A client that echoes the cookie in the header too is checked once.
            if !candidates.iter().any(|(_, w)| *w == wire) {
                candidates.push((source, wire));
            }
        }
        let mut bad_cookie = false;
        for (source, wire) in candidates {
            match self.check(wire).await {
                Ok(token) => session.observe(token),
                Err(rejection) => {
                    bad_cookie |= source == "cookie";
                    self.reject(source, &rejection);
                }
            }
        }
        (session, bad_cookie)
    }

    async fn check(&self, wire: &str) -> Result<Token, Rejection> {
        let token = self.signer.verify(wire).map_err(Rejection::Signature)?;
        self.fleet
            .verify_token(&token)
            .await
            .map_err(Rejection::Token)?;
        Ok(token)
    }

    fn reject(&self, source: &'static str, rejection: &Rejection) {
        let c = &self.rejected;
        let (counter, reason) = match rejection {
            Rejection::Signature(SignedTokenError::Malformed { .. })
            | Rejection::Token(TokenError::Malformed { .. }) => (&c.malformed, "malformed"),
            Rejection::Signature(SignedTokenError::BadSignature) => {
                (&c.bad_signature, "bad_signature")
            }
            Rejection::Token(TokenError::ForeignSystem { .. }) => {
                (&c.foreign_system, "foreign_system")
            }
            Rejection::Token(TokenError::UnknownTimeline { .. }) => {
                (&c.unknown_timeline, "unknown_timeline")
            }
            Rejection::Token(TokenError::AheadOfPrimary { .. }) => {
                (&c.ahead_of_primary, "ahead_of_primary")
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
        // The raw value is not logged: it is client input of any length.
        match rejection {
            Rejection::Signature(e) => {
                tracing::debug!(target: TARGET, source, reason, error = %e, "ignoring session token")
            }
            Rejection::Token(e) => {
                tracing::debug!(target: TARGET, source, reason, error = %e, "ignoring session token")
            }
        }
    }

    /// Sets the cookie and the header to `token`, signed.
    fn stamp<B>(&self, response: &mut Response<B>, token: &Token) {
        let wire = self.signer.sign(token);
        let cookie = set_cookie(&self.cookie_name, &wire, &self.cookie_attributes);
        match (HeaderValue::try_from(cookie), HeaderValue::try_from(wire)) {
            (Ok(cookie), Ok(wire)) => {
                let headers = response.headers_mut();
                headers.append(SET_COOKIE, cookie);
                headers.insert(self.header.clone(), wire);
            }
            // Unreachable with a validated config: every part is visible ASCII.
            _ => tracing::debug!(target: TARGET, %token, "token not representable as a header"),
        }
    }
}

impl<S> tower_layer::Layer<S> for SessionLayer {
    type Service = SessionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SessionService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`SessionLayer`] wraps around an inner service.
#[derive(Clone, Debug)]
pub struct SessionService<S> {
    inner: S,
    layer: SessionLayer,
}

/// The future of [`SessionService`]: the inner call between resuming the session and
/// stamping the response.
pub type SessionFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'static>>;

impl<S, ReqBody, ResBody> tower_service::Service<Request<ReqBody>> for SessionService<S>
where
    S: tower_service::Service<Request<ReqBody>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = SessionFuture<Response<ResBody>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        // The service polled ready is the one to call; leave a fresh clone in its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.shared.clone();
        Box::pin(async move {
            let (session, bad_cookie) = layer.resume(req.headers()).await;
            let incoming = session.token();
            req.extensions_mut().insert(session.clone());
            let mut response = inner.call(req).await?;
            let mut stamped = false;
            if let Some(token) = session.settled_token().await {
                if Some(token) != incoming {
                    layer.stamp(&mut response, &token);
                    stamped = true;
                }
            }
            if bad_cookie && !stamped {
                if let Some(clear) = &layer.clear_cookie {
                    response.headers_mut().append(SET_COOKIE, clear.clone());
                }
            }
            Ok(response)
        })
    }
}

/// Handlers behind a [`SessionLayer`] can take the [`Session`] directly.
impl<S: Send + Sync> axum_core::extract::FromRequestParts<S> for Session {
    type Rejection = MissingSession;

    async fn from_request_parts(
        parts: &mut ::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Session>()
            .cloned()
            .ok_or(MissingSession)
    }
}

/// A handler asked for a [`Session`] on a route without a [`SessionLayer`]: a
/// programming error, answered with 500.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("no pgfleet session: the route is not behind pgfleet's SessionLayer")]
pub struct MissingSession;

impl axum_core::response::IntoResponse for MissingSession {
    fn into_response(self) -> axum_core::response::Response {
        (StatusCode::INTERNAL_SERVER_ERROR, self.to_string()).into_response()
    }
}
