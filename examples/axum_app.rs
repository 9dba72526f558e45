//! Read-your-writes across HTTP requests with axum and pgfleet's `SessionLayer`.
//!
//! `cargo run --example axum_app` starts a local primary and two
//! replicas through the testkit, pauses replay on both replicas (so a replica cannot show
//! a new write), and serves on 127.0.0.1:
//!
//! - `POST /items` (body: a value) writes a row under a session write lease and answers
//!   its id;
//! - `GET /items/{id}` reads it under a session read lease and says which server served
//!   it.
//!
//! It then plays the client: a POST, a GET with the cookie the POST set (served by the
//! primary: the token says no replica has the row yet), the same GET without the cookie
//! (an eventual read that a paused replica may serve, without the row), and an API-style
//! GET with the token in the `x-pgfleet-token` header. It prints each exchange and exits.
//! With `-- serve` it keeps serving until Ctrl-C instead (try it with curl).

use std::time::Duration;

use anyhow::Context as _;
use axum::extract::{Path, State};
use axum::http::{Request, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use pgfleet::{Config, Fleet, Intent, Session, SessionLayer};
use pgfleet_testkit::LocalCluster;

/// The demo's signing key. A real deployment reads it from the environment:
/// `keys = ["${PGFLEET_HTTP_KEY}"]` in `[http]`.
const DEMO_KEY: &str = "axum-app-demo-key-not-a-secret-0123456789";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let serve_forever = std::env::args().nth(1).as_deref() == Some("serve");

    println!("starting a local cluster (primary + 2 replicas)...");
    let cluster = LocalCluster::builder().replicas(2).start().await?;
    let toml = cluster.pgfleet_toml_with(&format!(
        "[fleet]\nprobe_interval = \"100ms\"\n\n[http]\ncookie_secure = false\nkeys = [\"{DEMO_KEY}\"]\n"
    ));
    let fleet = Fleet::start(Config::from_toml_str(&toml)?).await?;
    anyhow::ensure!(
        fleet.wait_ready(Duration::from_secs(30)).await,
        "fleet not ready:\n{}",
        fleet.status()
    );

    {
        let w = fleet.lease(Intent::Write).await?;
        w.batch_execute("CREATE TABLE items (id bigserial PRIMARY KEY, v text NOT NULL)")
            .await
            .map_err(|e| w.error(e))?;
    }
    cluster.wait_all_replayed(Duration::from_secs(30)).await?;
    for r in cluster.replicas() {
        cluster.pause_replay(r).await?;
    }
    println!("replay paused on both replicas\n");

    let layer = SessionLayer::new(&fleet)?;
    let app = Router::new()
        .route("/items", post(create))
        .route("/items/{id}", get(read))
        .with_state(fleet.clone())
        .layer(layer.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    println!("serving on http://{addr}");

    if serve_forever {
        println!("try: curl -i -c jar -d hello http://{addr}/items; curl -i -b jar http://{addr}/items/1");
        println!("Ctrl-C to stop");
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
    } else {
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        play_client(&format!("http://{addr}")).await?;
        println!("tokens ignored by the layer: {:?}", layer.rejected_tokens());
        server.abort();
    }
    println!("\n{}", fleet.status());
    fleet.shutdown().await;
    Ok(())
}

/// `POST /items`: writes the body under the session's write lease.
async fn create(
    State(_fleet): State<Fleet>,
    session: Session,
    value: String,
) -> Result<String, (StatusCode, String)> {
    let mut w = session.lease(Intent::Write).await.map_err(internal)?;
    let row = w
        .query_one("INSERT INTO items (v) VALUES ($1) RETURNING id", &[&value])
        .await
        .map_err(|e| internal(w.error(e)))?;
    let id: i64 = row.get(0);
    // The session's mark now includes the write; the layer sends it back signed.
    w.commit_token().await.map_err(internal)?;
    Ok(format!("{id}\n"))
}

/// `GET /items/{id}`: reads under the session's read lease (read-your-writes).
async fn read(
    State(_fleet): State<Fleet>,
    session: Session,
    Path(id): Path<i64>,
) -> Result<String, (StatusCode, String)> {
    let r = session.lease(Intent::read()).await.map_err(internal)?;
    let row = r
        .query_opt("SELECT v FROM items WHERE id = $1", &[&id])
        .await
        .map_err(|e| internal(r.error(e)))?;
    let served = format!(
        "served by {} ({}{})",
        r.server(),
        r.role(),
        if r.is_fallback() { ", fallback" } else { "" }
    );
    match row {
        Some(row) => Ok(format!("{}; {served}\n", row.get::<_, String>(0))),
        None => Err((StatusCode::NOT_FOUND, format!("no item {id}; {served}\n"))),
    }
}

fn internal(e: impl std::fmt::Display) -> (StatusCode, String) {
    (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))
}

/// What a client sees: status, our cookie and header, body.
async fn exchange(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> anyhow::Result<(Option<String>, String)> {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.to_owned())))?;
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .context("request timed out")??;
    let status = resp.status();
    let cookie = resp
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let token = resp
        .headers()
        .get("x-pgfleet-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = String::from_utf8(resp.into_body().collect().await?.to_bytes().to_vec())?;
    println!("\n> {method} {uri} {headers:?}");
    println!("< {status}");
    if let Some(c) = &cookie {
        println!("< set-cookie: {c}");
    }
    print!("< {text}");
    Ok((token, text))
}

async fn play_client(base: &str) -> anyhow::Result<()> {
    let client = Client::builder(TokioExecutor::new()).build_http();
    let items = format!("{base}/items");
    let (token, id) = exchange(&client, "POST", &items, &[], "hello").await?;
    let token = token.context("the POST response carries the session token")?;
    let item = format!("{base}/items/{}", id.trim());

    println!("\n# the same browser, cookie attached: read-your-writes");
    let cookie = format!("pgfleet_token={token}");
    exchange(&client, "GET", &item, &[("cookie", &cookie)], "").await?;

    println!("\n# no cookie: an eventual read, which a paused replica may serve");
    exchange(&client, "GET", &item, &[], "").await?;

    println!("\n# an API client with the header instead of the cookie");
    exchange(&client, "GET", &item, &[("x-pgfleet-token", &token)], "").await?;

    println!("\n# a tampered token (one MAC character changed) is ignored and counted");
    let (text, mac) = token.rsplit_once('.').context("signed form")?;
    let first = if mac.starts_with('A') { 'B' } else { 'A' };
    let tampered = format!("{text}.{first}{}", &mac[1..]);
    exchange(&client, "GET", &item, &[("x-pgfleet-token", &tampered)], "").await?;
    Ok(())
}
