//! Policy hot reload: a policy file edited on disk takes effect without
//! SIGHUP, a broken one is refused while the active set keeps deciding, and
//! the admin API reloads, lists and rolls back versions (with the admin
//! token only).

use std::path::{Path, PathBuf};
use std::time::Duration;

use http::StatusCode;
use serde_json::Value;
use tokio::time::{Instant, sleep};

use crate::common::*;

const TOKEN: &str = "admin-token-policy-0123456789abcdef0123456789";
const ALLOW_ALL: &str = "permit (principal, action, resource);\n";
const STOP_ACME_CHAT: &str = "permit (principal, action, resource);\n@id(\"stop-acme-chat\")\nforbid (principal, action == Warden::Action::\"invoke\", resource == Warden::Model::\"demo-chat\") when { principal.tenant == \"acme\" };\n";
/// Does not parse.
const UNPARSABLE: &str = "permit (principal, action, resource\n";
/// Parses, but names an attribute the schema does not declare.
const INVALID: &str = "permit (principal, action, resource) when { principal.shoe_size == 42 };\n";
const RELOAD_FAILURES: &str = "warden_config_reloads_total{result=\"failure\"}";

/// A gateway on Cedar policies kept in their own directory (policy file
/// and a copy of the example schema), with the admin token set.
struct PolicyGateway {
    gw: TestGateway,
    policies: PathBuf,
    schema: PathBuf,
    _files: tempfile::TempDir,
}

impl PolicyGateway {
    /// `cedar_extra` is spliced into the `policy.cedar` block.
    async fn start(cedar_extra: &str) -> PolicyGateway {
        let (chat, fraud) = demo_upstreams().await;
        let files = tempfile::tempdir().unwrap();
        let policies = files.path().join("warden.cedar");
        let schema = files.path().join("warden.cedarschema");
        std::fs::write(&policies, ALLOW_ALL).unwrap();
        std::fs::copy(
            concat!(env!("CARGO_MANIFEST_DIR"), "/examples/policies/warden.cedarschema"),
            &schema,
        )
        .unwrap();
        let token_file = files.path().join("admin.token");
        std::fs::write(&token_file, TOKEN).unwrap();
        let yaml = config(chat, fraud, "")
            .replacen(
                "admin:\n  address: 127.0.0.1:0",
                &format!(
                    "admin:\n  address: 127.0.0.1:0\n  token: {{ file: {} }}",
                    token_file.display()
                ),
                1,
            )
            .replace(
                "api_keys:",
                &format!(
                    "policy:\n  cedar:\n    policies: {}\n    schema: {}\n{cedar_extra}api_keys:",
                    policies.display(),
                    schema.display()
                ),
            );
        PolicyGateway {
            gw: TestGateway::start(&yaml).await,
            policies,
            schema,
            _files: files,
        }
    }

    async fn chat_status(&self, key: &str) -> StatusCode {
        post(
            &self.gw,
            "/v1/chat/completions",
            Some(key),
            &chat_body("demo-chat", false),
        )
        .await
        .status()
    }

    /// Waits (at most 3 s) until ACME's chat call gets `want`.
    async fn wait_for_acme(&self, want: StatusCode) {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let got = self.chat_status(ACME).await;
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "ACME's chat still {got} after 3 s; wanted {want}"
            );
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// The number of failed reloads so far.
    async fn reload_failures(&self) -> f64 {
        let text = client()
            .get(format!("{}/metrics", self.gw.admin_url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(RELOAD_FAILURES)?.strip_prefix(' '))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }

    /// Waits (at most 3 s) until at least `n` reloads have failed.
    async fn wait_for_failures(&self, n: f64) {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let got = self.reload_failures().await;
            if got >= n {
                return;
            }
            assert!(Instant::now() < deadline, "{got} failed reloads after 3 s; wanted {n}");
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// An admin call: (status, JSON body).
    async fn admin(&self, method: reqwest::Method, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        let mut req = client().request(method, format!("{}{path}", self.gw.admin_url));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_file_edited_on_disk_takes_effect_without_sighup() {
    let pg = PolicyGateway::start("").await;
    assert_eq!(pg.chat_status(ACME).await, StatusCode::OK);
    let (_, start) = pg.admin(reqwest::Method::GET, "/admin/v1/policy", Some(TOKEN)).await;
    assert_eq!(start["sequence"], 1, "{start}");

    std::fs::write(&pg.policies, STOP_ACME_CHAT).unwrap();
    pg.wait_for_acme(StatusCode::FORBIDDEN).await;
    assert_eq!(pg.chat_status(GLOBEX).await, StatusCode::OK);

    // Broken sets on disk: refused, counted, and the active set keeps deciding.
    let before = pg.reload_failures().await;
    for (i, broken) in [UNPARSABLE, INVALID].into_iter().enumerate() {
        std::fs::write(&pg.policies, broken).unwrap();
        pg.wait_for_failures(before + 1.0 + i as f64).await;
        assert_eq!(pg.chat_status(ACME).await, StatusCode::FORBIDDEN, "{broken}");
        assert_eq!(pg.chat_status(GLOBEX).await, StatusCode::OK, "{broken}");
    }

    // A broken schema is refused too.
    let schema = std::fs::read_to_string(&pg.schema).unwrap();
    std::fs::write(&pg.schema, "namespace Warden {").unwrap();
    pg.wait_for_failures(before + 3.0).await;
    assert_eq!(pg.chat_status(ACME).await, StatusCode::FORBIDDEN);
    std::fs::write(&pg.schema, schema).unwrap();

    // Replaced by rename, as editors and `warden policy rollback` do.
    let staged = pg.policies.with_extension("staged");
    std::fs::write(&staged, ALLOW_ALL).unwrap();
    std::fs::rename(&staged, &pg.policies).unwrap();
    pg.wait_for_acme(StatusCode::OK).await;

    // The allow-all set is in force again: the starting version, recorded
    // anew as the newest (versions 1 and 2 came before it).
    let (_, now) = pg.admin(reqwest::Method::GET, "/admin/v1/policy", Some(TOKEN)).await;
    assert_eq!(now["version"], start["version"], "{now}");
    assert_eq!(now["sequence"], 3, "{now}");
}

#[test]
fn policy_files_are_watched_unless_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let schema = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/policies/warden.cedarschema");
    let policies = dir.path().join("p.cedar");
    std::fs::write(&policies, ALLOW_ALL).unwrap();
    let load = |extra: &str| {
        let chat: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        let yaml = config(chat, chat, "").replace(
            "api_keys:",
            &format!(
                "policy:\n  cedar:\n    policies: {}\n    schema: {schema}\n{extra}api_keys:",
                policies.display()
            ),
        );
        let path = dir.path().join("warden.yaml");
        std::fs::write(&path, yaml).unwrap();
        warden::config::Config::load(&path).unwrap()
    };
    assert_eq!(
        load("").policy_watch,
        [policies.clone(), Path::new(schema).to_path_buf()]
    );
    assert!(load("    watch: false\n").policy_watch.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_reloads_lists_and_rolls_back_policies() {
    use reqwest::Method;
    // Not watched: every change here is the admin API's doing.
    let pg = PolicyGateway::start("    watch: false\n").await;
    let calls = [
        (Method::GET, "/admin/v1/policy"),
        (Method::POST, "/admin/v1/policy/reload"),
        (Method::GET, "/admin/v1/policy/history"),
        (Method::POST, "/admin/v1/policy/rollback/1"),
    ];
    for (method, path) in &calls {
        for token in [None, Some("not-the-token")] {
            let (status, _) = pg.admin(method.clone(), path, token).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path} with {token:?}");
        }
    }

    let (status, v1) = pg.admin(Method::GET, "/admin/v1/policy", Some(TOKEN)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v1["engine"], "cedar");
    assert_eq!(v1["sequence"], 1);
    assert!(v1["loaded_at"].is_string(), "{v1}");

    // A new version on disk: active as soon as the reload answers.
    std::fs::write(&pg.policies, STOP_ACME_CHAT).unwrap();
    let (status, v2) = pg.admin(Method::POST, "/admin/v1/policy/reload", Some(TOKEN)).await;
    assert_eq!(status, StatusCode::OK, "{v2}");
    assert_eq!(v2["sequence"], 2);
    assert_ne!(v2["version"], v1["version"]);
    assert_eq!(pg.chat_status(ACME).await, StatusCode::FORBIDDEN);

    // A set that does not validate: 422 with the errors, version 2 stays.
    std::fs::write(&pg.policies, INVALID).unwrap();
    let (status, refused) = pg.admin(Method::POST, "/admin/v1/policy/reload", Some(TOKEN)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
    let errors = refused["errors"].as_array().unwrap();
    assert!(
        errors.iter().any(|e| e.as_str().unwrap().starts_with("policy.cedar")),
        "{refused}"
    );
    assert_eq!(refused["active"]["sequence"], 2, "{refused}");
    assert_eq!(pg.chat_status(ACME).await, StatusCode::FORBIDDEN);

    let (status, history) = pg.admin(Method::GET, "/admin/v1/policy/history", Some(TOKEN)).await;
    assert_eq!(status, StatusCode::OK);
    let sequences = |h: &Value| -> Vec<u64> {
        h.as_array()
            .unwrap()
            .iter()
            .map(|v| v["sequence"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(sequences(&history), [1, 2]);
    assert_eq!(history[0]["hash"], v1["version"]);

    // Rollback to version 1: written back and in force at once.
    let (status, rolled) = pg.admin(Method::POST, "/admin/v1/policy/rollback/1", Some(TOKEN)).await;
    assert_eq!(status, StatusCode::OK, "{rolled}");
    assert_eq!(rolled["restored"]["sequence"], 1, "{rolled}");
    assert_eq!(rolled["version"], v1["version"], "{rolled}");
    assert_eq!(rolled["sequence"], 3, "a restored version is recorded as the newest");
    assert_eq!(std::fs::read_to_string(&pg.policies).unwrap(), ALLOW_ALL);
    assert_eq!(pg.chat_status(ACME).await, StatusCode::OK);

    let (status, _) = pg
        .admin(Method::POST, "/admin/v1/policy/rollback/99", Some(TOKEN))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A rollback whose reload is refused (here the configuration file is
    // broken) changes nothing: the policy file is put back as it was.
    let config_path = pg.gw.dir.path().join("warden.yaml");
    let yaml = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(&config_path, format!("{yaml}unknown_section: 1\n")).unwrap();
    let (status, refused) = pg.admin(Method::POST, "/admin/v1/policy/rollback/2", Some(TOKEN)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
    assert_eq!(std::fs::read_to_string(&pg.policies).unwrap(), ALLOW_ALL);
    assert_eq!(pg.chat_status(ACME).await, StatusCode::OK);
    std::fs::write(&config_path, yaml).unwrap();

    let (_, history) = pg.admin(Method::GET, "/admin/v1/policy/history", Some(TOKEN)).await;
    assert_eq!(sequences(&history), [1, 2, 3]);
}
