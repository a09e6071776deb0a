//! Managed API keys: the stores, the cache on the request path, revocation
//! across instances, the CLI, and the key never showing up where it should not.

use std::time::{Duration, Instant};

use http::StatusCode;
use warden::authn::key_store::{KeySpec, KeyStore};

use crate::common::*;

fn spec(models: &[&str]) -> KeySpec {
    KeySpec {
        principal: "carol@acme.example".into(),
        tenants: vec!["acme".into(), "acme-eu".into()],
        tier: Some("pro".into()),
        models: models.iter().map(|m| (*m).to_owned()).collect(),
        scopes: vec!["chat".into()],
        expires_in: None,
    }
}

/// Create, show, list, rotate, revoke: the same on both stores.
async fn store_round_trip(store: KeyStore) {
    let (new, record) = store.create(&spec(&["demo-chat"])).await.unwrap();
    assert!(new.key.starts_with(&format!("wdn_{}_", record.kid)));
    let shown = store.show(&record.kid).await.unwrap();
    assert_eq!(shown, record);
    assert_eq!(shown.tenants, ["acme", "acme-eu"]);
    assert_ne!(shown.digest, new.key, "only the digest is stored");
    assert_eq!(store.list().await.unwrap().len(), 1);

    let (rotated, replacement) = store.rotate(&record.kid, Duration::from_secs(3600)).await.unwrap();
    assert_ne!(rotated.key, new.key);
    let old = store.show(&record.kid).await.unwrap();
    assert_eq!(old.status, "rotated");
    assert_eq!(old.replaced_by.as_deref(), Some(replacement.kid.as_str()));
    let mut usable: Vec<String> = store.usable().await.unwrap().into_iter().map(|k| k.kid).collect();
    usable.sort();
    let mut both = vec![record.kid.clone(), replacement.kid.clone()];
    both.sort();
    assert_eq!(usable, both, "the old key works during the overlap");

    let before = store.fingerprint().await.unwrap();
    store.revoke(&record.kid).await.unwrap();
    assert_ne!(store.fingerprint().await.unwrap(), before);
    let usable: Vec<String> = store.usable().await.unwrap().into_iter().map(|k| k.kid).collect();
    assert_eq!(usable, [replacement.kid.as_str()]);
    assert!(store.revoke("nosuchkey123").await.is_err());
    assert!(
        store.rotate(&record.kid, Duration::ZERO).await.is_err(),
        "a revoked key cannot be rotated"
    );

    let expired = store
        .create(&KeySpec {
            expires_in: Some(Duration::ZERO),
            ..spec(&["*"])
        })
        .await
        .unwrap()
        .1;
    assert!(!store.usable().await.unwrap().iter().any(|k| k.kid == expired.kid));
}

#[tokio::test]
async fn sqlite_store_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("keys.db").display());
    store_round_trip(KeyStore::open(&url).await.unwrap()).await;
}

#[tokio::test]
async fn postgres_store_round_trip() {
    let Some(url) = fresh_postgres().await else { return };
    store_round_trip(KeyStore::open(&url).await.unwrap()).await;
}

/// A gateway config with a key store, written next to the gateway's files.
fn with_store(yaml: &str, store: &str) -> String {
    yaml.replace(
        "api_keys:",
        &format!("key_store:\n{store}\n  refresh_interval: 200ms\napi_keys:"),
    )
}

/// Polls `check` until it is true or `within` has passed; returns the wait.
async fn eventually<F, Fut>(within: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while started.elapsed() < within {
        if check().await {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

async fn status_with(gw: &TestGateway, key: &str) -> StatusCode {
    post(gw, "/v1/chat/completions", Some(key), &chat_body("demo-chat", false))
        .await
        .status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_created_key_works_and_a_revoked_one_stops_within_two_seconds() {
    let (chat, fraud) = demo_upstreams().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keys.db");
    let yaml = with_store(&config(chat, fraud, ""), &format!("  sqlite: {}", db.display()));
    let gw = TestGateway::start(&yaml).await;
    let store = KeyStore::open(&format!("sqlite://{}", db.display())).await.unwrap();

    let (new, record) = store.create(&spec(&["demo-chat"])).await.unwrap();
    let took = eventually(Duration::from_secs(2), || async {
        status_with(&gw, &new.key).await == StatusCode::OK
    })
    .await
    .expect("a new key was not accepted within 2 s");
    eprintln!("new key accepted after {took:?}");
    // The key's grant applies: fraud-scorer is not in it.
    let denied = post(&gw, "/v2/models/fraud-scorer/infer", Some(&new.key), &fraud_body(1)).await;
    assert_eq!(denied.status(), StatusCode::FORBIDDEN);
    // A well-formed key with the right id but a wrong secret is refused.
    let body = format!("wdn_{}_{}", record.kid, "a".repeat(40));
    let forged = format!("{body}_{:08x}", crc32fast::hash(body.as_bytes()));
    assert_eq!(warden::authn::key_format::kid_of(&forged), Some(record.kid.as_str()));
    assert_eq!(status_with(&gw, &forged).await, StatusCode::UNAUTHORIZED);

    // Last use reaches the store (written back every ten refreshes, 2 s here).
    eventually(Duration::from_secs(4), || async {
        store.show(&record.kid).await.unwrap().last_used_at.is_some()
    })
    .await
    .expect("last use was never recorded in the store");

    store.revoke(&record.kid).await.unwrap();
    let took = eventually(Duration::from_secs(2), || async {
        status_with(&gw, &new.key).await == StatusCode::UNAUTHORIZED
    })
    .await
    .expect("a revoked key still worked after 2 s");
    eprintln!("revocation effective after {took:?}");

    // The key itself is in no audit record, only its id.
    let records = gw.audit(2).await;
    let text: String = records.iter().map(|r| r.to_string()).collect();
    assert!(!text.contains(&new.key));
    assert!(records.iter().any(|r| r["key_id"] == record.kid.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_through_one_instance_reaches_another_within_two_seconds() {
    let Some(url) = fresh_postgres().await else { return };
    let (chat, fraud) = demo_upstreams().await;
    let dir = tempfile::tempdir().unwrap();
    let url_file = dir.path().join("pg.url");
    std::fs::write(&url_file, &url).unwrap();
    let yaml = with_store(
        &config(chat, fraud, ""),
        &format!("  postgres: {{ file: {} }}", url_file.display()),
    );
    let first = TestGateway::start(&yaml).await;
    let second = TestGateway::start(&yaml).await;

    // Created and revoked through the first instance's store.
    let store = first
        .running
        .as_ref()
        .unwrap()
        .gateway
        .runtime()
        .managed_keys
        .clone()
        .unwrap();
    let (new, record) = store.store().create(&spec(&["*"])).await.unwrap();
    for gw in [&first, &second] {
        eventually(Duration::from_secs(2), || async {
            status_with(gw, &new.key).await == StatusCode::OK
        })
        .await
        .expect("a new key was not accepted within 2 s");
    }
    store.store().revoke(&record.kid).await.unwrap();
    let took = eventually(Duration::from_secs(2), || async {
        status_with(&second, &new.key).await == StatusCode::UNAUTHORIZED
    })
    .await
    .expect("the other instance still accepted a revoked key after 2 s");
    eprintln!("revocation reached the other instance after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_round_trip() {
    let (chat, fraud) = demo_upstreams().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keys.db");
    let yaml = with_store(&config(chat, fraud, ""), &format!("  sqlite: {}", db.display()));
    let path = dir.path().join("warden.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let warden = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_warden"))
            .arg("keys")
            .arg("--config")
            .arg(&path)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (created, stderr) = warden(&[
        "create",
        "--principal",
        "erin@acme.example",
        "--tenant",
        "acme",
        "--model",
        "demo-chat",
        "--expires-in",
        "30d",
    ]);
    let key = created["key"].as_str().unwrap().to_owned();
    let kid = created["record"]["kid"].as_str().unwrap().to_owned();
    assert!(!stderr.contains(&key), "the key is printed once, on stdout only");
    assert!(created["record"].get("digest").is_none());

    let (listed, stderr) = warden(&["list"]);
    assert_eq!(listed[0]["kid"], kid.as_str());
    assert!(!listed.to_string().contains(&key) && !stderr.contains(&key));

    // The gateway, started after the key was made, accepts it.
    let gw = TestGateway::start(&yaml).await;
    assert_eq!(status_with(&gw, &key).await, StatusCode::OK);

    let (rotated, _) = warden(&["rotate", &kid, "--overlap", "1h"]);
    let new_key = rotated["key"].as_str().unwrap().to_owned();
    let (shown, _) = warden(&["show", &kid]);
    assert_eq!(shown["status"], "rotated");
    eventually(Duration::from_secs(2), || async {
        status_with(&gw, &new_key).await == StatusCode::OK
    })
    .await
    .expect("the rotated-in key was not accepted");
    assert_eq!(
        status_with(&gw, &key).await,
        StatusCode::OK,
        "the old key works during the overlap"
    );

    let (revoked, _) = warden(&["revoke", &kid]);
    assert_eq!(revoked["status"], "revoked");
    eventually(Duration::from_secs(2), || async {
        status_with(&gw, &key).await == StatusCode::UNAUTHORIZED
    })
    .await
    .expect("the revoked key still worked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_round_trip() {
    let (chat, fraud) = demo_upstreams().await;
    let dir = tempfile::tempdir().unwrap();
    let token = "admin-token-0123456789abcdef0123456789abcdef";
    std::fs::write(dir.path().join("admin.token"), token).unwrap();
    let yaml = with_store(
        &config(chat, fraud, ""),
        &format!("  sqlite: {}", dir.path().join("keys.db").display()),
    )
    .replacen(
        "admin:\n  address: 127.0.0.1:0",
        &format!(
            "admin:\n  address: 127.0.0.1:0\n  token: {{ file: {} }}",
            dir.path().join("admin.token").display()
        ),
        1,
    );
    let gw = TestGateway::start(&yaml).await;
    let admin = |method: reqwest::Method, path: &str, token: Option<&str>| {
        let mut req = client().request(method, format!("{}{path}", gw.admin_url));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        req
    };

    // No token, a wrong token: 401; health and metrics stay open.
    let resp = admin(reqwest::Method::GET, "/admin/v1/keys", None)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = admin(reqwest::Method::GET, "/admin/v1/keys", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = admin(reqwest::Method::GET, "/healthz", None).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    let resp = admin(reqwest::Method::POST, "/admin/v1/keys", Some(token))
        .json(&serde_json::json!({"principal": "gina@acme.example", "tenants": ["acme"], "models": ["demo-chat"], "expires_in": "1d"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let created: serde_json::Value = resp.json().await.unwrap();
    let key = created["key"].as_str().unwrap().to_owned();
    let kid = created["record"]["kid"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(2), || async {
        status_with(&gw, &key).await == StatusCode::OK
    })
    .await
    .expect("the key made through the admin API was not accepted");

    let listed: serde_json::Value = admin(reqwest::Method::GET, "/admin/v1/keys", Some(token))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed[0]["kid"], kid.as_str());
    assert!(!listed.to_string().contains(&key));
    let shown = admin(reqwest::Method::GET, &format!("/admin/v1/keys/{kid}"), Some(token))
        .send()
        .await
        .unwrap();
    assert_eq!(shown.status(), StatusCode::OK);
    let missing = admin(reqwest::Method::GET, "/admin/v1/keys/aaaaaaaaaaaa", Some(token))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let bad = admin(reqwest::Method::POST, "/admin/v1/keys", Some(token))
        .json(&serde_json::json!({"principal": "x", "tenants": [], "models": ["*"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);

    let rotated: serde_json::Value = admin(
        reqwest::Method::POST,
        &format!("/admin/v1/keys/{kid}/rotate"),
        Some(token),
    )
    .json(&serde_json::json!({"overlap": "1h"}))
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_ne!(rotated["key"], created["key"]);
    let revoked = admin(
        reqwest::Method::POST,
        &format!("/admin/v1/keys/{kid}/revoke"),
        Some(token),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(revoked.status(), StatusCode::OK);
    eventually(Duration::from_secs(2), || async {
        status_with(&gw, &key).await == StatusCode::UNAUTHORIZED
    })
    .await
    .expect("the revoked key still worked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_is_off_without_a_token() {
    let (chat, fraud) = demo_upstreams().await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = with_store(
        &config(chat, fraud, ""),
        &format!("  sqlite: {}", dir.path().join("keys.db").display()),
    );
    let gw = TestGateway::start(&yaml).await;
    let resp = client()
        .get(format!("{}/admin/v1/keys", gw.admin_url))
        .bearer_auth("anything")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}
