//! The status page in a real browser: Debian's headless Chromium, driven over the DevTools
//! protocol (a WebSocket client sends `Runtime.evaluate`). The page loads, shows FEs and a binding
//! created through the API, then — without a reload — shows a new binding, a VM move with its
//! convergence measured by this replica, a damping alert, a pending migration (listed, then
//! cancelled), filters bindings by search, and after a reload still shows where each VM moved from.
//! Needs `/usr/bin/chromium` (tests/run.sh installs it).

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use victor_proto::v1::*;
use victor_testkit::process::ChildGuard;

const CHROMIUM: &str = "/usr/bin/chromium";

/// A headless Chromium owned by the test (its process group is killed on drop).
struct Browser {
    _child: ChildGuard,
    /// `ws://127.0.0.1:<port>/devtools/browser/<id>`.
    ws_url: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn launch() -> Browser {
        assert!(
            Path::new(CHROMIUM).exists(),
            "{CHROMIUM} not found: install Debian's chromium package (apt-get install -y chromium)"
        );
        let profile = tempfile::tempdir().unwrap();
        let mut cmd = std::process::Command::new(CHROMIUM);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank");
        let child = ChildGuard::spawn("chromium", cmd, Some(&profile.path().join("chromium.log"))).unwrap();
        // Chromium writes the port it picked and the browser target's path into the profile.
        let active = profile.path().join("DevToolsActivePort");
        let ws_url = victor_testkit::process::wait_for("Chromium DevTools port", Duration::from_secs(30), || {
            let active = active.clone();
            async move {
                let text = std::fs::read_to_string(active).ok()?;
                let mut lines = text.lines();
                let port: u16 = lines.next()?.trim().parse().ok()?;
                let path = lines.next()?.trim().to_owned();
                Some(format!("ws://127.0.0.1:{port}{path}"))
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", child.log_tail(4000)));
        Browser { _child: child, ws_url, _profile: profile }
    }

    /// A DevTools session on a new page (flat session on the browser connection).
    async fn page(&self) -> Cdp {
        let (ws, _) = tokio_tungstenite::connect_async(self.ws_url.as_str()).await.unwrap();
        let mut cdp = Cdp { ws, next_id: 0, session: None };
        let target = cdp.call("Target.createTarget", json!({"url": "about:blank"})).await;
        let attached =
            cdp.call("Target.attachToTarget", json!({"targetId": target["targetId"], "flatten": true})).await;
        cdp.session = Some(attached["sessionId"].as_str().unwrap().to_owned());
        cdp
    }
}

/// A DevTools protocol session.
struct Cdp {
    ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    next_id: u64,
    /// The page session commands go to (None: the browser itself).
    session: Option<String>,
}

impl Cdp {
    /// Sends a command and returns its result (events in between are ignored).
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(session) = &self.session {
            msg["sessionId"] = json!(session);
        }
        self.ws.send(Message::text(msg.to_string())).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let msg = self.ws.next().await.expect("DevTools connection closed").unwrap();
                let Message::Text(text) = msg else { continue };
                let v: Value = serde_json::from_str(&text).unwrap();
                if v["id"] == id {
                    return v;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("DevTools {method} did not answer"));
        assert!(reply.get("error").is_none(), "{method}: {reply}");
        reply["result"].clone()
    }

    /// Evaluates a JavaScript expression in the page and returns its value.
    async fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .call("Runtime.evaluate", json!({"expression": expression, "returnByValue": true, "awaitPromise": true}))
            .await;
        assert!(r.get("exceptionDetails").is_none(), "{expression}: {r}");
        r["result"]["value"].clone()
    }

    /// Polls `expression` until it is `true`.
    async fn wait_true(&mut self, what: &str, expression: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            if self.eval(expression).await == Value::Bool(true) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                let body = self.eval("document.body ? document.body.innerText : '(no body)'").await;
                let state =
                    self.eval("JSON.stringify(window.victorStatus, (k, v) => v instanceof Map ? [...v] : v)").await;
                panic!(
                    "the page never showed {what} ({expression}); page text:\n{}\npage state: {}",
                    body.as_str().unwrap_or(""),
                    state.as_str().unwrap_or("")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `document.querySelector(sel)?.textContent.trim()` as a JS expression.
fn text_of(selector: &str) -> String {
    format!("(document.querySelector({})?.textContent ?? '').trim()", json!(selector))
}

/// Keeps an agent stream open (and read) so this replica sends moves and measures convergence.
fn drain(mut stream: tonic::Streaming<SyncUpdate>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move { while let Ok(Some(_)) = stream.message().await {} })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_bindings_and_updates_live_in_chromium() {
    let dir = tempfile::tempdir().unwrap();
    // FEs registered without heartbeats stay "up" for the whole test (Chromium may be slow to start).
    let server = embedded(
        dir.path(),
        &[
            "--damping-max-moves",
            "1",
            "--replica-id",
            "status-test",
            "--session-ttl",
            "300s",
            "--mobile-prefix",
            "fd00:10::/64",
        ],
    )
    .await;
    let mut c = connect(server.grpc_addr).await;
    register(&mut c, "fe1", 1, "site-a").await;
    register(&mut c, "fe2", 2, "site-b").await;
    let mut streams = Vec::new();
    for fe in ["fe1", "fe2"] {
        let s = c.agent.sync(SyncRequest { fe_id: fe.into(), ..Default::default() }).await.unwrap().into_inner();
        streams.push(drain(s));
    }
    assert_eq!(outcome(&learn(&mut c, "fe1", "10.10.0.11", mac(11)).await), ClaimOutcome::Bound);
    // The page's snapshot comes from the cache: wait until it shows the binding.
    victor_testkit::process::wait_for("binding in the cache", Duration::from_secs(5), || {
        let mut c = c.clone();
        async move { binding(&mut c, "10.10.0.11").await.ok() }
    })
    .await
    .unwrap();

    let browser = Browser::launch().await;
    let mut page = browser.page().await;
    page.call("Page.navigate", json!({"url": format!("http://{}/status", server.http_addr)})).await;

    // Loads: replica, FEs with health and site, the binding created through the API, live feed.
    page.wait_true("the live feed", &format!("{} === 'live'", text_of("#feed-state"))).await;
    page.wait_true("the replica id", &format!("{} === 'status-test'", text_of("#replica"))).await;
    page.wait_true("fe1 up", &format!("{} === 'up'", text_of("#fes tr[data-fe='fe1'] td.health"))).await;
    assert_eq!(page.eval(&text_of("#fes tr[data-fe='fe2'] td:nth-child(2)")).await, "site-b");
    page.wait_true("the binding at fe1", &format!("{} === 'fe1'", text_of("#bindings tr[data-ip='10.10.0.11'] td.fe")))
        .await;
    assert_eq!(page.eval(&text_of("#bindings tr[data-ip='10.10.0.11'] td.site")).await, "site-a");
    // A marker that a reload would erase.
    page.eval("window.__noReload = 42").await;

    // Live: a new binding appears.
    assert_eq!(outcome(&learn(&mut c, "fe2", "10.10.0.12", mac(12)).await), ClaimOutcome::Bound);
    page.wait_true("the new binding", &format!("{} === 'fe2'", text_of("#bindings tr[data-ip='10.10.0.12'] td.fe")))
        .await;

    // Live: the VM moves fe1 -> fe2; the table and the moves feed update, with convergence.
    assert_eq!(outcome(&learn(&mut c, "fe2", "10.10.0.11", mac(11)).await), ClaimOutcome::Moved);
    page.wait_true("the moved binding", &format!("{} === 'fe2'", text_of("#bindings tr[data-ip='10.10.0.11'] td.fe")))
        .await;
    assert_eq!(page.eval(&text_of("#bindings tr[data-ip='10.10.0.11'] td.moves")).await, "1");
    page.wait_true(
        "the move in the feed",
        &format!("{} === 'fe1 → fe2'", text_of("#moves tr[data-ip='10.10.0.11'] td.fe")),
    )
    .await;
    page.wait_true(
        "the move's convergence",
        &format!("/^[0-9.]+ ms$/.test({})", text_of("#moves tr[data-ip='10.10.0.11'] td.conv")),
    )
    .await;
    let title = page.eval("document.querySelector(\"#moves tr[data-ip='10.10.0.11'] td.conv\").title").await;
    assert!(title.as_str().unwrap().contains("claim→commit"), "{title}");

    // Live: a second move within the window freezes the binding (max 1 move): a damping alert.
    assert_eq!(outcome(&learn(&mut c, "fe1", "10.10.0.11", mac(11)).await), ClaimOutcome::Moved);
    page.wait_true("the damping alert", "document.querySelector(\"#alerts li[data-ip='10.10.0.11']\") !== null").await;
    let alert = page.eval(&text_of("#alerts li[data-ip='10.10.0.11']")).await;
    assert!(alert.as_str().unwrap().contains("victorctl damping clear 10.10.0.11"), "{alert}");
    assert_eq!(page.eval(&text_of("#bindings tr[data-ip='10.10.0.11'] td.state")).await, "frozen");

    // Live: a pending migration announcement is listed with the command that withdraws it, and
    // leaves the list when it is cancelled.
    let announce =
        AnnounceMigrationRequest { vm_ip: "10.10.0.12".into(), target_fe_id: "fe1".into(), ..Default::default() };
    c.binding.announce_migration(announce).await.unwrap();
    let pending = "document.querySelector(\"#pending li[data-ip='10.10.0.12']\")";
    page.wait_true("the pending migration", &format!("{pending} !== null")).await;
    let text = page.eval(&text_of("#pending li[data-ip='10.10.0.12']")).await;
    assert!(text.as_str().unwrap().contains("to fe1; withdraw with victorctl migrate cancel 10.10.0.12"), "{text}");
    c.binding
        .cancel_migration(CancelMigrationRequest { vm_ip: "10.10.0.12".into(), ..Default::default() })
        .await
        .unwrap();
    page.wait_true("the cancelled migration gone", &format!("{pending} === null")).await;
    assert_eq!(page.eval("window.__noReload").await, 42, "the page reloaded instead of updating live");

    // Search: an exact IP shows only that binding; clearing it shows both again.
    let search = |q: &str| {
        format!(
            "(() => {{ const i = document.getElementById('search'); i.value = {}; i.dispatchEvent(new Event('input')); return true; }})()",
            json!(q)
        )
    };
    page.eval(&search("10.10.0.12")).await;
    page.wait_true("the search result", "document.querySelectorAll('#bindings tbody tr').length === 1").await;
    assert_eq!(page.eval(&text_of("#bindings tbody tr td.ip")).await, "10.10.0.12");
    page.eval(&search("site-a")).await;
    page.wait_true(
        "the site search",
        &format!(
            "document.querySelectorAll('#bindings tbody tr').length === 1 && {} === '10.10.0.11'",
            text_of("#bindings tbody tr td.ip")
        ),
    )
    .await;
    page.eval(&search("")).await;
    page.wait_true("all bindings", "document.querySelectorAll('#bindings tbody tr').length === 2").await;

    // IPv6: a new binding appears live; an IPv6 prefix search shows only the bindings inside it,
    // also those bound while it is shown; the table is in IP order, IPv4 first.
    assert_eq!(outcome(&learn(&mut c, "fe2", "fd00:10::11", mac(21)).await), ClaimOutcome::Bound);
    page.wait_true("the IPv6 binding", &format!("{} === 'fe2'", text_of("#bindings tr[data-ip='fd00:10::11'] td.fe")))
        .await;
    page.eval(&search("fd00:10::/120")).await;
    page.wait_true(
        "the IPv6 prefix search",
        &format!(
            "document.querySelectorAll('#bindings tbody tr').length === 1 && {} === 'fd00:10::11'",
            text_of("#bindings tbody tr td.ip")
        ),
    )
    .await;
    for (ip, last) in [("fd00:10::1:12", 22), ("fd00:10::13", 23)] {
        assert_eq!(outcome(&learn(&mut c, "fe1", ip, mac(last)).await), ClaimOutcome::Bound, "{ip}");
    }
    // Feed events arrive in order: once fd00:10::13 shows, fd00:10::1:12 (outside /120) was skipped.
    page.wait_true(
        "the live IPv6 binding in the search",
        "document.querySelector(\"#bindings tr[data-ip='fd00:10::13']\") !== null",
    )
    .await;
    let shown =
        "JSON.stringify([...document.querySelectorAll('#bindings tbody tr td.ip')].map((td) => td.textContent))";
    assert_eq!(page.eval(shown).await, json!(["fd00:10::11", "fd00:10::13"]).to_string());
    page.eval(&search("")).await;
    page.wait_true("all bindings", "document.querySelectorAll('#bindings tbody tr').length === 5").await;
    assert_eq!(
        page.eval(shown).await,
        json!(["10.10.0.11", "10.10.0.12", "fd00:10::11", "fd00:10::13", "fd00:10::1:12"]).to_string()
    );

    // The feed client is counted while the page is open; both moves' convergence was measured.
    let counted =
        victor_testkit::process::wait_for("status client and convergence metrics", Duration::from_secs(10), || async {
            let metrics = victor_testkit::http::get(server.http_addr, "/metrics").await.ok()?.1;
            (metrics.lines().any(|l| l == "victor_status_clients 1")
                && metrics.contains("victor_move_convergence_seconds_count 2"))
            .then_some(())
        })
        .await;
    if counted.is_err() {
        let metrics = victor_testkit::http::get(server.http_addr, "/metrics").await.unwrap().1;
        panic!("status client or convergence not counted:\n{metrics}");
    }

    // VICTOR_STATUS_SCREENSHOT=/path.b64 saves a base64 PNG of the page for a human to look at.
    if let Ok(path) = std::env::var("VICTOR_STATUS_SCREENSHOT") {
        page.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await;
        let shot = page.call("Page.captureScreenshot", json!({"format": "png"})).await;
        std::fs::write(path, shot["data"].as_str().unwrap()).unwrap();
    }
    // After a reload the moves come from the snapshot, and still say which FE each VM left.
    page.call("Page.navigate", json!({"url": format!("http://{}/status", server.http_addr)})).await;
    page.wait_true("the reloaded page", "window.__noReload === undefined").await;
    let moves = "[...document.querySelectorAll(\"#moves tr[data-ip='10.10.0.11'] td.fe\")].map((td) => td.textContent)";
    page.wait_true(
        "the moves after a reload",
        &format!("JSON.stringify({moves}) === JSON.stringify(['fe2 → fe1 (frozen)', 'fe1 → fe2'])"),
    )
    .await;
    page.session = None;
    let _ = page.call("Browser.close", json!({})).await;
    for s in streams {
        s.abort();
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn status_api_snapshot_and_search() {
    let dir = tempfile::tempdir().unwrap();
    let server = embedded(dir.path(), &[]).await;
    let mut c = connect(server.grpc_addr).await;
    register(&mut c, "fe1", 1, "site-a").await;
    register(&mut c, "fe2", 2, "site-b").await;
    for i in 1..=5u8 {
        learn(&mut c, "fe1", &format!("10.10.{}.{i}", i % 2), mac(i)).await;
    }
    // 10.10.0.2 moves to fe2 and back (each move records the FE it left); 10.10.1.3 is announced
    // to migrate.
    assert_eq!(outcome(&learn(&mut c, "fe2", "10.10.0.2", mac(2)).await), ClaimOutcome::Moved);
    assert_eq!(outcome(&learn(&mut c, "fe1", "10.10.0.2", mac(2)).await), ClaimOutcome::Moved);
    let announce =
        AnnounceMigrationRequest { vm_ip: "10.10.1.3".into(), target_fe_id: "fe2".into(), ..Default::default() };
    c.binding.announce_migration(announce).await.unwrap();
    let get = |path: &'static str| async move {
        let (code, body) = victor_testkit::http::get(server.http_addr, path).await.unwrap();
        assert_eq!(code, 200, "{path}: {body}");
        serde_json::from_str::<Value>(&body).unwrap()
    };
    victor_testkit::process::wait_for("5 bindings and 2 moves", Duration::from_secs(5), || async {
        let s = get("/status/api/summary").await;
        (s["binding_count"] == 5 && s["moves"].as_array().map(Vec::len) == Some(2)).then_some(())
    })
    .await
    .unwrap();
    let s = get("/status/api/summary").await;
    assert_eq!(s["fes"][0]["fe_id"], "fe1");
    assert_eq!(s["fes"][0]["bindings"], 5);
    let moves: Vec<(&str, &str)> = s["moves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["from_fe_id"].as_str().unwrap(), m["fe_id"].as_str().unwrap()))
        .collect();
    assert_eq!(moves, [("fe2", "fe1"), ("fe1", "fe2")], "newest first, each with the FE it left");
    assert_eq!(s["pending"][0]["vm_ip"], "10.10.1.3");
    assert_eq!(s["pending"][0]["pending_fe_id"], "fe2");
    assert_eq!(s["store_kind"], "embedded");
    let ips = |v: &Value| {
        v["bindings"].as_array().unwrap().iter().map(|b| b["vm_ip"].as_str().unwrap().to_owned()).collect::<Vec<_>>()
    };
    assert_eq!(ips(&get("/status/api/bindings?q=10.10.1.0/24").await), ["10.10.1.1", "10.10.1.3", "10.10.1.5"]);
    let page = get("/status/api/bindings?q=fe1&limit=2").await;
    assert_eq!((ips(&page).len(), page["truncated"].as_bool()), (2, Some(true)));
    assert!(ips(&get("/status/api/bindings?q=site-b").await).is_empty());
    let (code, html) = victor_testkit::http::get(server.http_addr, "/status").await.unwrap();
    assert_eq!(code, 200);
    assert!(html.contains("<script src=\"/status/app.js\">"), "{html}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn status_api_lists_and_searches_ipv6_bindings() {
    let dir = tempfile::tempdir().unwrap();
    let server = embedded(dir.path(), &["--mobile-prefix", "fd00:10::/64"]).await;
    let mut c = connect(server.grpc_addr).await;
    register(&mut c, "fe1", 1, "site-a").await;
    register(&mut c, "fe2", 2, "site-b").await;
    for (i, ip) in ["10.10.0.1", "fd00:10::1", "fd00:10::2", "fd00:10::1:3"].into_iter().enumerate() {
        assert_eq!(outcome(&learn(&mut c, "fe1", ip, mac(i as u8 + 1)).await), ClaimOutcome::Bound, "{ip}");
    }
    assert_eq!(outcome(&learn(&mut c, "fe2", "fd00:10::2", mac(3)).await), ClaimOutcome::Moved);
    let announce =
        AnnounceMigrationRequest { vm_ip: "fd00:10::1:3".into(), target_fe_id: "fe2".into(), ..Default::default() };
    c.binding.announce_migration(announce).await.unwrap();
    let http = server.http_addr;
    let get = move |path: String| async move {
        let (code, body) = victor_testkit::http::get(http, &path).await.unwrap();
        assert_eq!(code, 200, "{path}: {body}");
        serde_json::from_str::<Value>(&body).unwrap()
    };
    victor_testkit::process::wait_for("4 bindings, a move and a pending migration", Duration::from_secs(5), || async {
        let s = get("/status/api/summary".into()).await;
        (s["binding_count"] == 4 && s["moves"].as_array().map(Vec::len) == Some(1) && s["pending"][0].is_object())
            .then_some(())
    })
    .await
    .unwrap();
    let s = get("/status/api/summary".into()).await;
    assert_eq!(s["mobile_prefixes"], json!(["10.10.0.0/16", "fd00:10::/64"]));
    assert_eq!(
        (s["moves"][0]["vm_ip"].as_str(), s["moves"][0]["from_fe_id"].as_str()),
        (Some("fd00:10::2"), Some("fe1"))
    );
    assert_eq!(
        (s["pending"][0]["vm_ip"].as_str(), s["pending"][0]["pending_fe_id"].as_str()),
        (Some("fd00:10::1:3"), Some("fe2"))
    );
    let search = |q: &str| {
        let path = format!("/status/api/bindings?q={q}");
        async move {
            let v = get(path).await;
            v["bindings"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b["vm_ip"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    // IP order: IPv4 first, then IPv6 by value.
    assert_eq!(search("").await, ["10.10.0.1", "fd00:10::1", "fd00:10::2", "fd00:10::1:3"]);
    assert_eq!(search("fd00:10::/112").await, ["fd00:10::1", "fd00:10::2"]);
    assert_eq!(search("fd00:10::/64").await, ["fd00:10::1", "fd00:10::2", "fd00:10::1:3"]);
    assert_eq!(search("10.10.0.0/16").await, ["10.10.0.1"]);
    // An exact address, in any spelling; text matches the canonical form.
    assert_eq!(search("FD00:10:0:0:0:0:0:2").await, ["fd00:10::2"]);
    assert_eq!(search("::1:").await, ["fd00:10::1:3"]);
    let row = get("/status/api/bindings?q=fd00:10::2".into()).await["bindings"][0].clone();
    assert_eq!(
        (row["fe_id"].as_str(), row["site"].as_str(), row["mac"].as_str()),
        (Some("fe2"), Some("site-b"), Some("02:00:00:00:00:03"))
    );
    server.shutdown().await.unwrap();
}
