//! Read-your-writes across HTTP requests (issue 6): a real axum server with pgfleet's
//! `SessionLayer`, a real HTTP client, and a testkit cluster whose replicas have paused
//! replay, so a read can see the request chain's earlier write only if the signed token
//! came back and routed the read to the primary.
//!
//! Tokens that are forged, malformed, of another cluster or ahead of the primary are
//! ignored (the request is served without them) and counted; a token signed with an
//! older key verifies while that key is still configured; a token ahead of the fleet's
//! cached primary position (a write made outside the fleet) is accepted after a fresh
//! probe of the primary.
#![cfg(feature = "axum")]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use pgfleet::{Config, Fleet, Intent, Lsn, Session, SessionLayer, Token, TokenKey, TokenSigner};
use pgfleet_testkit::LocalCluster;
use tokio::sync::OnceCell;

const KEY: &str = "http-ryw-test-key-0123456789abcdef-0123456789";
const OLD_KEY: &str = "http-ryw-test-old-key-0123456789abcdef-012345";
const OTHER_KEY: &str = "http-ryw-test-unknown-key-0123456789abcdef-01";

/// The shared cluster with this binary's table, replicated everywhere, and then replay
/// paused on every replica: set up once, for every test in this file.
async fn paused_cluster() -> anyhow::Result<(&'static LocalCluster, &'static str)> {
    static TABLE: OnceCell<String> = OnceCell::const_new();
    let cluster = LocalCluster::shared().await?;
    let table = TABLE
        .get_or_try_init(|| async {
            let table = common::table("http_items");
            let c = cluster.app_client(cluster.primary()).await?;
            c.batch_execute(&format!(
                "CREATE TABLE {table} (id bigserial PRIMARY KEY, v text NOT NULL)"
            ))
            .await?;
            cluster.wait_all_replayed(Duration::from_secs(30)).await?;
            for r in cluster.replicas() {
                cluster.pause_replay(r).await?;
            }
            Ok::<_, anyhow::Error>(table)
        })
        .await?;
    Ok((cluster, table.as_str()))
}

fn keys(list: &'static [&'static str]) -> impl FnOnce(&mut Config) {
    move |c: &mut Config| {
        c.http.keys = list.iter().map(|k| TokenKey::new(*k)).collect();
    }
}

fn signer(keys: &[&str]) -> TokenSigner {
    let keys: Vec<TokenKey> = keys.iter().map(|k| TokenKey::new(*k)).collect();
    TokenSigner::new(&keys).expect("valid keys")
}

/// `POST /items` (body: the value) writes a row under a session write lease and answers
/// its id; `GET /items/{id}` reads it under a session read lease and answers what it
/// found, who served it and which token the session came in with, one `key=value` a line.
fn app(table: &'static str, layer: SessionLayer) -> Router {
    Router::new()
        .route("/items", post(create))
        .route("/items/{id}", get(read))
        .with_state(table)
        .layer(layer)
}

async fn create(
    State(table): State<&'static str>,
    session: Session,
    value: String,
) -> Result<String, (StatusCode, String)> {
    let mut w = session.lease(Intent::Write).await.map_err(internal)?;
    let row = w
        .query_one(
            &format!("INSERT INTO {table} (v) VALUES ($1) RETURNING id"),
            &[&value],
        )
        .await
        .map_err(internal)?;
    let id: i64 = row.get(0);
    // Advances the session's mark now; the release would advance it too.
    w.commit_token().await.map_err(internal)?;
    Ok(id.to_string())
}

async fn read(
    State(table): State<&'static str>,
    session: Session,
    Path(id): Path<i64>,
) -> Result<String, (StatusCode, String)> {
    let came_with = session.token();
    let r = session.lease(Intent::read()).await.map_err(internal)?;
    let row = r
        .query_opt(&format!("SELECT v FROM {table} WHERE id = $1"), &[&id])
        .await
        .map_err(internal)?;
    Ok(format!(
        "found={}\nv={}\nserver={}\nrole={}\nfallback={}\ntoken={}\n",
        row.is_some(),
        row.map(|r| r.get::<_, String>(0)).unwrap_or_default(),
        r.server(),
        r.role(),
        r.is_fallback(),
        came_with.map_or("none".to_owned(), |t| t.to_string()),
    ))
}

fn internal(e: impl std::fmt::Display) -> (StatusCode, String) {
    (StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// A fleet on the paused cluster, the app behind its layer on 127.0.0.1:0, and a client.
struct Harness {
    fleet: Fleet,
    layer: SessionLayer,
    addr: SocketAddr,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    server: tokio::task::JoinHandle<()>,
}

impl Harness {
    async fn start(tables: &str, tweak: impl FnOnce(&mut Config)) -> anyhow::Result<Self> {
        let (cluster, table) = paused_cluster().await?;
        let fleet = common::start(common::config(cluster, tables, tweak)).await;
        let layer = SessionLayer::new(&fleet)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let router = app(table, layer.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        let client = Client::builder(TokioExecutor::new()).build_http();
        Ok(Self {
            fleet,
            layer,
            addr,
            client,
            server,
        })
    }

    async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> anyhow::Result<Reply> {
        let mut req = axum::http::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::from(body.to_owned())))?;
        let resp = tokio::time::timeout(Duration::from_secs(20), self.client.request(req))
            .await
            .context("request timed out")??;
        let status = resp.status();
        let set_cookie = resp
            .headers()
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().map(str::to_owned))
            .collect::<Result<Vec<_>, _>>()?;
        let header_token = resp
            .headers()
            .get("x-pgfleet-token")
            .map(|v| v.to_str().map(str::to_owned))
            .transpose()?;
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(Reply {
            status,
            set_cookie,
            header_token,
            body: String::from_utf8(body.to_vec())?,
        })
    }

    /// Writes `value` with no token: answers the row id and the reply.
    async fn post(&self, value: &str, headers: &[(&str, &str)]) -> anyhow::Result<(i64, Reply)> {
        let reply = self.request("POST", "/items", headers, value).await?;
        anyhow::ensure!(reply.status == StatusCode::OK, "POST: {reply:?}");
        Ok((reply.body.trim().parse()?, reply))
    }

    async fn get(&self, id: i64, headers: &[(&str, &str)]) -> anyhow::Result<Reply> {
        let reply = self
            .request("GET", &format!("/items/{id}"), headers, "")
            .await?;
        anyhow::ensure!(
            reply.status == StatusCode::OK,
            "GET: never an error page: {reply:?}"
        );
        Ok(reply)
    }

    async fn stop(self) {
        self.server.abort();
        self.fleet.shutdown().await;
    }
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    set_cookie: Vec<String>,
    header_token: Option<String>,
    body: String,
}

impl Reply {
    /// The body's `key=value` lines.
    fn fields(&self) -> BTreeMap<&str, &str> {
        self.body
            .lines()
            .filter_map(|l| l.split_once('='))
            .collect()
    }

    fn field(&self, key: &str) -> &str {
        self.fields().get(key).copied().unwrap_or("<missing>")
    }

    /// The value of our cookie in the (single) Set-Cookie header.
    fn cookie(&self) -> Option<&str> {
        self.set_cookie.iter().find_map(|c| {
            c.strip_prefix("pgfleet_token=")
                .map(|rest| rest.split(';').next().unwrap_or(rest))
        })
    }

    /// Asserts the read saw the write: found, and (replicas paused) on the primary.
    fn assert_read_own_write(&self, value: &str) {
        let f = self.fields();
        assert_eq!(f.get("found"), Some(&"true"), "{self:?}");
        assert_eq!(f.get("v"), Some(&value), "{self:?}");
        assert_eq!(f.get("server"), Some(&"primary"), "{self:?}");
        assert_eq!(f.get("role"), Some(&"primary"), "{self:?}");
        assert_eq!(f.get("fallback"), Some(&"true"), "{self:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_carries_the_write_to_the_next_request() -> anyhow::Result<()> {
    common::trace();
    let h = Harness::start(common::FAST, keys(&[KEY])).await?;

    let (id, posted) = h.post("cookie-value", &[]).await?;
    let cookie = posted.cookie().context("POST sets the cookie")?.to_owned();
    let set_cookie = &posted.set_cookie[0];
    for attr in [
        "; Max-Age=600",
        "; Path=/",
        "; Secure",
        "; HttpOnly",
        "; SameSite=Lax",
    ] {
        assert!(set_cookie.contains(attr), "{set_cookie} lacks {attr}");
    }
    assert_eq!(
        posted.header_token.as_deref(),
        Some(cookie.as_str()),
        "the header carries the same signed token"
    );
    let token = h.layer.signer().verify(&cookie)?;

    let got = h
        .get(
            id,
            &[("cookie", &format!("theme=dark; pgfleet_token={cookie}"))],
        )
        .await?;
    got.assert_read_own_write("cookie-value");
    assert_eq!(got.field("token"), token.to_string(), "{got:?}");
    assert_eq!(h.layer.rejected_tokens().total(), 0);

    let s = h.fleet.status();
    assert!(s.ryw_on_primary >= 1, "{s}");
    h.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_client_uses_the_header() -> anyhow::Result<()> {
    common::trace();
    let h = Harness::start(common::FAST, keys(&[KEY])).await?;
    let (id, posted) = h.post("header-value", &[]).await?;
    let token = posted
        .header_token
        .clone()
        .context("POST sets the header")?;
    let got = h.get(id, &[("x-pgfleet-token", &token)]).await?;
    got.assert_read_own_write("header-value");
    assert_eq!(
        got.field("token"),
        h.layer.signer().verify(&token)?.to_string()
    );
    assert_eq!(h.layer.rejected_tokens().total(), 0);
    h.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_malformed_and_foreign_tokens_are_ignored_and_counted() -> anyhow::Result<()> {
    common::trace();
    let h = Harness::start(common::FAST, keys(&[KEY])).await?;
    let (id, posted) = h.post("forged-value", &[]).await?;
    let good = posted.cookie().context("cookie")?.to_owned();
    let token = h.layer.signer().verify(&good)?;

    // A bad MAC: the token text kept, the MAC's first character changed (every bit of
    // it counts, so the MAC stays well-formed base64url).
    let (text, mac) = good.rsplit_once('.').context("signed form")?;
    let first = if mac.starts_with('A') { 'B' } else { 'A' };
    let forged = format!("{text}.{first}{}", &mac[1..]);
    let got = h
        .get(id, &[("cookie", &format!("pgfleet_token={forged}"))])
        .await?;
    assert_eq!(got.field("token"), "none", "{got:?}");
    assert_eq!(h.layer.rejected_tokens().bad_signature, 1);
    // The bad cookie is replaced (the read gave the session a mark of its own)...
    assert!(
        got.cookie()
            .is_some_and(|c| c != forged && h.layer.signer().verify(c).is_ok()),
        "{got:?}"
    );
    // ... or, when the request gives no new token, deleted, so the browser stops sending it.
    let none = h
        .request(
            "GET",
            "/no-such-route",
            &[("cookie", &format!("pgfleet_token={forged}"))],
            "",
        )
        .await?;
    assert_eq!(none.cookie(), Some(""), "{none:?}");
    assert!(
        none.set_cookie.iter().any(|c| c.contains("Max-Age=0")),
        "{none:?}"
    );
    // A bad token in the header is not a cookie to delete.
    let none = h
        .request("GET", "/no-such-route", &[("x-pgfleet-token", &forged)], "")
        .await?;
    assert!(none.set_cookie.is_empty(), "{none:?}");

    // Signed with a key the layer does not have.
    let by_stranger = signer(&[OTHER_KEY]).sign(&token);
    let got = h.get(id, &[("x-pgfleet-token", &by_stranger)]).await?;
    assert_eq!(got.field("token"), "none", "{got:?}");
    assert_eq!(h.layer.rejected_tokens().bad_signature, 4);

    // Not a signed token at all.
    let got = h
        .get(
            id,
            &[
                ("cookie", "pgfleet_token=v1.1.1.0/1"),
                ("x-pgfleet-token", "%%%"),
            ],
        )
        .await?;
    assert_eq!(got.field("token"), "none", "{got:?}");
    assert_eq!(h.layer.rejected_tokens().malformed, 2);

    // Validly signed, for another cluster.
    let foreign = Token::new(token.system_id() ^ 1, token.timeline(), token.lsn());
    let foreign = h.layer.signer().sign(&foreign);
    let got = h
        .get(id, &[("cookie", &format!("pgfleet_token={foreign}"))])
        .await?;
    assert_eq!(got.field("token"), "none", "{got:?}");
    assert_eq!(h.layer.rejected_tokens().foreign_system, 1);

    // A forged cookie next to a good header: the good one still counts.
    let got = h
        .get(
            id,
            &[
                ("cookie", &format!("pgfleet_token={forged}")),
                ("x-pgfleet-token", &good),
            ],
        )
        .await?;
    got.assert_read_own_write("forged-value");
    let r = h.layer.rejected_tokens();
    assert_eq!(
        (r.bad_signature, r.malformed, r.foreign_system, r.total()),
        (5, 2, 1, 8),
        "{r:?}"
    );
    h.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_out_key_still_verifies_while_listed() -> anyhow::Result<()> {
    common::trace();
    let h = Harness::start(common::FAST, keys(&[KEY, OLD_KEY])).await?;
    let (id, posted) = h.post("rotated-value", &[]).await?;
    let cookie = posted.cookie().context("cookie")?;
    // New tokens are signed with the first key only.
    let token = signer(&[KEY]).verify(cookie)?;
    assert!(signer(&[OLD_KEY]).verify(cookie).is_err());

    // A token an older deployment signed with the old key.
    let by_old = signer(&[OLD_KEY]).sign(&token);
    let got = h
        .get(id, &[("cookie", &format!("pgfleet_token={by_old}"))])
        .await?;
    got.assert_read_own_write("rotated-value");
    assert_eq!(got.field("token"), token.to_string());
    if let Some(renewed) = got.cookie() {
        signer(&[KEY]).verify(renewed)?;
    }
    assert_eq!(h.layer.rejected_tokens().total(), 0);
    h.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_ahead_of_the_cached_primary_position_is_checked_by_a_fresh_probe(
) -> anyhow::Result<()> {
    common::trace();
    // Probes on the timer only once an hour: the cached primary position stays where the
    // first probe saw it unless something asks for a fresh one.
    let tables = "[fleet]\nprobe_interval = \"1h\"\nprobe_timeout = \"500ms\"\nconnect_timeout = \"1s\"\nlease_timeout = \"2s\"\ndown_after = \"1s\"\n";
    let h = Harness::start(tables, keys(&[KEY])).await?;
    let (cluster, table) = paused_cluster().await?;

    // A write made outside this fleet (another app instance), and its token, taken the
    // way `commit_token` takes one.
    let c = cluster.app_client(cluster.primary()).await?;
    let id: i64 = c
        .query_one(
            &format!("INSERT INTO {table} (v) VALUES ('elsewhere') RETURNING id"),
            &[],
        )
        .await?
        .get(0);
    let row = c
        .query_one(
            "SELECT pg_current_wal_insert_lsn()::text, \
                    ('x' || substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8))::bit(32)::int4::text, \
                    (SELECT system_identifier FROM pg_control_system())::text, \
                    current_setting('wal_block_size'), \
                    pg_size_bytes(current_setting('wal_segment_size'))::text",
            &[],
        )
        .await?;
    let field = |i: usize| row.get::<_, String>(i);
    let lsn: Lsn = field(0).parse()?;
    let lsn = lsn.normalize_page_boundary(field(3).parse()?, field(4).parse()?);
    let token = Token::new(field(2).parse::<i64>()? as u64, field(1).parse()?, lsn);

    let cached = h.fleet.status().server("primary").and_then(|p| p.lsn);
    assert!(
        cached.is_some_and(|c| c < lsn),
        "precondition: the cached primary position ({cached:?}) lags the write ({lsn})"
    );

    let wire = h.layer.signer().sign(&token);
    let got = h
        .get(id, &[("cookie", &format!("pgfleet_token={wire}"))])
        .await?;
    got.assert_read_own_write("elsewhere");
    assert_eq!(got.field("token"), token.to_string(), "{got:?}");
    assert_eq!(h.layer.rejected_tokens().total(), 0);
    let cached = h.fleet.status().server("primary").and_then(|p| p.lsn);
    assert!(
        cached.is_some_and(|c| c >= lsn),
        "the fresh probe moved the cached position ({cached:?}) to the write ({lsn})"
    );

    // A validly signed token the primary has not reached, even after a fresh probe
    // (e.g. from a history lost in a failover): ignored, counted, in bounded time.
    let beyond = Token::new(token.system_id(), token.timeline(), Lsn(lsn.0 + (1 << 30)));
    let started = Instant::now();
    let got = h
        .get(id, &[("x-pgfleet-token", &h.layer.signer().sign(&beyond))])
        .await?;
    let took = started.elapsed();
    assert_eq!(got.field("token"), "none", "{got:?}");
    assert_eq!(h.layer.rejected_tokens().ahead_of_primary, 1);
    assert!(
        took < Duration::from_secs(5),
        "judging a token ahead of the primary is bounded by 2 x probe_timeout: took {took:?}"
    );
    h.stop().await;
    Ok(())
}
