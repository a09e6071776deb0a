//! JWT bearer tokens: the RFC 8725 attack table, each attack refused with
//! 401 and its reason in the audit log, and valid RS256 and ES256 accepted.

use std::sync::{Arc, Mutex};

use base64::Engine;
use http::StatusCode;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};

use crate::common::*;

const ISSUER: &str = "https://issuer.test";
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwt");

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{FIXTURES}/{name}")).unwrap()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

fn claims() -> Value {
    json!({"iss": ISSUER, "sub": "svc-batch", "aud": "warden", "exp": now() + 600, "iat": now(), "tenant": "acme"})
}

/// `header.claims.signature`, the header and claims given as raw JSON text.
fn token(header: &str, claims: &str, alg: Option<(Algorithm, &EncodingKey)>) -> String {
    let message = format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()));
    let signature = match alg {
        Some((alg, key)) => jsonwebtoken::crypto::sign(message.as_bytes(), key, alg).unwrap(),
        None => String::new(),
    };
    format!("{message}.{signature}")
}

fn rsa() -> EncodingKey {
    EncodingKey::from_rsa_pem(&fixture("rsa.key.pem")).unwrap()
}

fn ec() -> EncodingKey {
    EncodingKey::from_ec_pem(&fixture("ec.key.pem")).unwrap()
}

fn rs256(claims: &Value) -> String {
    token(
        r#"{"alg":"RS256","typ":"JWT","kid":"rsa-1"}"#,
        &claims.to_string(),
        Some((Algorithm::RS256, &rsa())),
    )
}

fn es256(claims: &Value) -> String {
    token(
        r#"{"alg":"ES256","kid":"ec-1"}"#,
        &claims.to_string(),
        Some((Algorithm::ES256, &ec())),
    )
}

fn with(claims: Value, name: &str, value: Value) -> Value {
    let mut c = claims;
    c[name] = value;
    c
}

fn without(claims: Value, name: &str) -> Value {
    let mut c = claims;
    c.as_object_mut().unwrap().remove(name);
    c
}

/// A JWKS endpoint whose document the test can change.
async fn jwks_server(document: Arc<Mutex<Vec<u8>>>) -> std::net::SocketAddr {
    spawn_upstream(move |_req| {
        let body = document.lock().unwrap().clone();
        async move {
            hyper::Response::builder()
                .header("content-type", "application/json")
                .body(full(body))
                .unwrap()
        }
    })
    .await
}

async fn gateway_with_issuer(jwks: std::net::SocketAddr) -> TestGateway {
    let (chat, fraud) = demo_upstreams().await;
    // Heads up to 512 KiB reach the pipeline, so that the token's own size
    // limit (8 KiB) is what refuses an oversized token, with an audit record.
    let yaml = config(chat, fraud, "  max_header_bytes: 512KiB").replace(
        "api_keys:",
        &format!(
            "jwt:\n  issuers:\n    - issuer: {ISSUER}\n      audiences: [warden]\n      jwks_url: http://{jwks}/jwks.json\n      min_refresh_interval: 1s\n      tier_claim: tier\n      models: [demo-chat]\napi_keys:"
        ),
    );
    TestGateway::start(&yaml).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_attacks_are_refused_and_valid_tokens_accepted() {
    let document = Arc::new(Mutex::new(fixture("jwks.json")));
    let gw = gateway_with_issuer(jwks_server(document).await).await;
    let c = claims();
    let valid = rs256(&c);
    let (h, p, s) = {
        let mut parts = valid.split('.');
        (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap())
    };
    let other = rs256(&with(c.clone(), "sub", json!("admin")));
    let other_payload = other.split('.').nth(1).unwrap();
    let mut flipped = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).unwrap();
    flipped[10] ^= 1;
    let public_pem = EncodingKey::from_secret(&fixture("rsa.pub.pem")).unwrap();
    let jwks_text: Value = serde_json::from_slice(&fixture("jwks.json")).unwrap();
    let public_jwk = EncodingKey::from_secret(jwks_text["keys"][0].to_string().as_bytes()).unwrap();
    let body = c.to_string();

    let attacks: Vec<(&str, String, &str)> = vec![
        ("alg none", token(r#"{"alg":"none"}"#, &body, None), "alg_none"),
        ("alg None", token(r#"{"alg":"None"}"#, &body, None), "alg_none"),
        ("alg NONE", token(r#"{"alg":"NONE"}"#, &body, None), "alg_none"),
        ("alg nOnE", token(r#"{"alg":"nOnE"}"#, &body, None), "alg_none"),
        (
            "HS256 with the public key PEM",
            token(
                r#"{"alg":"HS256","kid":"rsa-1"}"#,
                &body,
                Some((Algorithm::HS256, &public_pem)),
            ),
            "alg_not_allowed",
        ),
        (
            "HS256 with the public key JWK",
            token(
                r#"{"alg":"HS256","kid":"rsa-1"}"#,
                &body,
                Some((Algorithm::HS256, &public_jwk)),
            ),
            "alg_not_allowed",
        ),
        (
            "alg in lower case",
            token(
                r#"{"alg":"rs256","kid":"rsa-1"}"#,
                &body,
                Some((Algorithm::RS256, &rsa())),
            ),
            "alg_not_allowed",
        ),
        (
            "embedded jwk",
            token(
                &format!(r#"{{"alg":"RS256","kid":"rsa-1","jwk":{}}}"#, jwks_text["keys"][0]),
                &body,
                Some((Algorithm::RS256, &rsa())),
            ),
            "forbidden_header",
        ),
        (
            "jku",
            token(
                r#"{"alg":"RS256","kid":"rsa-1","jku":"https://evil.test/jwks.json"}"#,
                &body,
                Some((Algorithm::RS256, &rsa())),
            ),
            "forbidden_header",
        ),
        (
            "x5u",
            token(
                r#"{"alg":"RS256","kid":"rsa-1","x5u":"https://evil.test/cert.pem"}"#,
                &body,
                Some((Algorithm::RS256, &rsa())),
            ),
            "forbidden_header",
        ),
        (
            "x5c",
            token(
                r#"{"alg":"RS256","kid":"rsa-1","x5c":["MIIB"]}"#,
                &body,
                Some((Algorithm::RS256, &rsa())),
            ),
            "forbidden_header",
        ),
        (
            "unknown kid",
            token(
                r#"{"alg":"RS256","kid":"rsa-9"}"#,
                &body,
                Some((Algorithm::RS256, &rsa())),
            ),
            "unknown_kid",
        ),
        (
            "path-like kid",
            token(
                r#"{"alg":"RS256","kid":"../../../../etc/passwd"}"#,
                &body,
                Some((Algorithm::RS256, &rsa())),
            ),
            "unknown_kid",
        ),
        (
            "kid of a key of another type",
            token(
                r#"{"alg":"ES256","kid":"rsa-1"}"#,
                &body,
                Some((Algorithm::ES256, &ec())),
            ),
            "key_mismatch",
        ),
        (
            "bit-flipped signature",
            format!("{h}.{p}.{}", b64(&flipped)),
            "bad_signature",
        ),
        (
            "payload swapped under a valid signature",
            format!("{h}.{other_payload}.{s}"),
            "bad_signature",
        ),
        (
            "ES256 with r = s = 0",
            format!(
                "{}.{}",
                token(r#"{"alg":"ES256","kid":"ec-1"}"#, &body, None).trim_end_matches('.'),
                b64(&[0u8; 64])
            ),
            "bad_signature",
        ),
        (
            "expired",
            rs256(&with(c.clone(), "exp", json!(now() - 3600))),
            "expired",
        ),
        (
            "nbf in the future",
            rs256(&with(c.clone(), "nbf", json!(now() + 3600))),
            "not_yet_valid",
        ),
        (
            "iat in the future",
            rs256(&with(c.clone(), "iat", json!(now() + 3600))),
            "issued_in_future",
        ),
        ("exp missing", rs256(&without(c.clone(), "exp")), "missing_claim"),
        (
            "exp a string",
            rs256(&with(c.clone(), "exp", json!((now() + 600).to_string()))),
            "bad_claim_type",
        ),
        ("sub missing", rs256(&without(c.clone(), "sub")), "missing_claim"),
        ("aud missing", rs256(&without(c.clone(), "aud")), "missing_claim"),
        ("iss missing", rs256(&without(c.clone(), "iss")), "missing_claim"),
        (
            "wrong iss",
            rs256(&with(c.clone(), "iss", json!("https://evil.test"))),
            "unknown_issuer",
        ),
        (
            "iss with a trailing slash",
            rs256(&with(c.clone(), "iss", json!("https://issuer.test/"))),
            "unknown_issuer",
        ),
        (
            "iss with a confusable letter",
            rs256(&with(c.clone(), "iss", json!("https://\u{0456}ssuer.test"))),
            "unknown_issuer",
        ),
        (
            "wrong aud",
            rs256(&with(c.clone(), "aud", json!(["other-service"]))),
            "wrong_audience",
        ),
        (
            "unknown crit",
            token(
                r#"{"alg":"RS256","kid":"rsa-1","crit":["exp2"],"exp2":1}"#,
                &body,
                Some((Algorithm::RS256, &rsa())),
            ),
            "unknown_crit",
        ),
        (
            "200 KB token",
            rs256(&with(c.clone(), "pad", json!("x".repeat(200 * 1024)))),
            "token_too_large",
        ),
        (
            "duplicate claim",
            token(
                r#"{"alg":"RS256","kid":"rsa-1"}"#,
                &format!(r#"{{"sub":"svc-batch","sub":"admin",{}"#, &body[1..]),
                Some((Algorithm::RS256, &rsa())),
            ),
            "duplicate_member",
        ),
        (
            "duplicate header member",
            token(
                r#"{"alg":"RS256","alg":"none","kid":"rsa-1"}"#,
                &body,
                Some((Algorithm::RS256, &rsa())),
            ),
            "duplicate_member",
        ),
        ("no tenant claim", rs256(&without(c.clone(), "tenant")), "missing_claim"),
        ("four segments", format!("{valid}.x"), "malformed_token"),
    ];
    for (name, token, _) in &attacks {
        let resp = post(&gw, "/v1/chat/completions", Some(token), &chat_body("demo-chat", false)).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{name}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_token", "{name}");
    }
    for (name, token) in [
        ("RS256", valid.clone()),
        ("ES256", es256(&with(c.clone(), "tier", json!("gold")))),
    ] {
        let resp = post(
            &gw,
            "/v1/chat/completions",
            Some(&token),
            &chat_body("demo-chat", false),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK, "valid {name} token refused");
    }
    // The issuer's grant applies to its callers.
    let resp = post(&gw, "/v2/models/fraud-scorer/infer", Some(&valid), &fraud_body(1)).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    let records = gw.audit(attacks.len() + 3).await;
    for ((name, token, reason), record) in attacks.iter().zip(&records) {
        assert_eq!(record["reject_reason"], "invalid_token", "{name}");
        assert_eq!(record["reject_detail"], *reason, "{name}");
        assert_eq!(record["principal"], Value::Null, "{name}");
        assert!(
            !record.to_string().contains(token.as_str()),
            "{name}: the token is in the audit log"
        );
    }
    let accepted = &records[attacks.len()];
    assert_eq!(accepted["auth_method"], "jwt");
    assert_eq!(accepted["principal_kind"], "user");
    assert_eq!(accepted["principal"], "https://issuer.test#svc-batch");
    assert_eq!(accepted["tenant"], "acme");
    assert!(accepted["key_id"].as_str().unwrap().starts_with("jwt-sha256:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_kid_refreshes_the_jwks_at_most_once_per_interval() {
    let mut only_rsa: Value = serde_json::from_slice(&fixture("jwks.json")).unwrap();
    only_rsa["keys"].as_array_mut().unwrap().truncate(1);
    let document = Arc::new(Mutex::new(only_rsa.to_string().into_bytes()));
    let gw = gateway_with_issuer(jwks_server(Arc::clone(&document)).await).await;
    let es = es256(&claims());
    assert_eq!(status_of(&gw, &es.clone()).await, StatusCode::UNAUTHORIZED);
    // The issuer publishes its new key: within the refresh interval Warden
    // does not fetch again, after it, the next unknown kid triggers a fetch.
    *document.lock().unwrap() = fixture("jwks.json");
    assert_eq!(status_of(&gw, &es.clone()).await, StatusCode::UNAUTHORIZED);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(status_of(&gw, &es.clone()).await, StatusCode::OK);
    // The issuer's endpoint then fails: the last good set keeps serving.
    *document.lock().unwrap() = b"not json".to_vec();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(
        status_of(&gw, &rs256(&with(claims(), "jti", json!("x")))).await,
        StatusCode::OK
    );
    let unknown = token(
        r#"{"alg":"RS256","kid":"rsa-2"}"#,
        &claims().to_string(),
        Some((Algorithm::RS256, &rsa())),
    );
    assert_eq!(status_of(&gw, &unknown).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status_of(&gw, &es256(&claims())).await, StatusCode::OK);
}

async fn status_of(gw: &TestGateway, token: &str) -> StatusCode {
    post(gw, "/v1/chat/completions", Some(token), &chat_body("demo-chat", false))
        .await
        .status()
}

/// An OpenID provider at `addr`: its discovery document names `issuer` and
/// points at its JWKS.
async fn openid_provider(issuer_override: Option<&'static str>) -> std::net::SocketAddr {
    let addr = Arc::new(Mutex::new(None::<std::net::SocketAddr>));
    let me = Arc::clone(&addr);
    let bound = spawn_upstream(move |req: hyper::Request<hyper::body::Incoming>| {
        let me = *me.lock().unwrap();
        async move {
            let base = format!("http://{}", me.unwrap());
            let body = match req.uri().path() {
                "/.well-known/openid-configuration" => json!({
                    "issuer": issuer_override.map_or(base.clone(), str::to_owned),
                    "jwks_uri": format!("{base}/keys"),
                })
                .to_string()
                .into_bytes(),
                "/keys" => fixture("jwks.json"),
                _ => b"{}".to_vec(),
            };
            hyper::Response::builder()
                .header("content-type", "application/json")
                .body(full(body))
                .unwrap()
        }
    })
    .await;
    *addr.lock().unwrap() = Some(bound);
    bound
}

async fn kubernetes_gateway(provider: std::net::SocketAddr) -> TestGateway {
    let (chat, fraud) = demo_upstreams().await;
    let yaml = config(chat, fraud, "").replace(
        "api_keys:",
        &format!(
            "jwt:\n  issuers:\n    - preset: kubernetes\n      issuer: http://{provider}\n      discovery_url: http://{provider}/.well-known/openid-configuration\n      audiences: [warden]\n      models: [demo-chat]\napi_keys:"
        ),
    );
    TestGateway::start(&yaml).await
}

fn service_account_token(issuer: &str) -> String {
    let claims = json!({
        "iss": issuer, "aud": ["warden"], "exp": now() + 600, "iat": now(),
        "sub": "system:serviceaccount:prod:batch",
        "kubernetes.io": {"namespace": "prod", "serviceaccount": {"name": "batch", "uid": "1234"}},
    });
    rs256(&claims)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_found_by_oidc_discovery_and_nested_claims_mapped() {
    let provider = openid_provider(None).await;
    let gw = kubernetes_gateway(provider).await;
    let token = service_account_token(&format!("http://{provider}"));
    assert_eq!(status_of(&gw, &token).await, StatusCode::OK);
    let records = gw.audit(1).await;
    assert_eq!(records[0]["principal"], "system:serviceaccount:prod:batch");
    assert_eq!(records[0]["principal_kind"], "service");
    assert_eq!(records[0]["tenant"], "prod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discovery_document_for_another_issuer_is_not_trusted() {
    let provider = openid_provider(Some("https://someone-else.example")).await;
    let gw = kubernetes_gateway(provider).await;
    let token = service_account_token(&format!("http://{provider}"));
    assert_eq!(status_of(&gw, &token).await, StatusCode::UNAUTHORIZED);
    assert_eq!(gw.audit(1).await[0]["reject_detail"], "unknown_kid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_typ_is_required() {
    let (chat, fraud) = demo_upstreams().await;
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, fixture("jwks.json")).unwrap();
    let yaml = config(chat, fraud, "").replace(
        "api_keys:",
        &format!(
            "jwt:\n  issuers:\n    - issuer: {ISSUER}\n      audiences: [warden]\n      jwks_file: {}\n      typ: at+jwt\n      models: [demo-chat]\napi_keys:",
            jwks.display()
        ),
    );
    let gw = TestGateway::start(&yaml).await;
    let body = claims().to_string();
    let with_typ = |typ: &str| {
        token(
            &format!(r#"{{"alg":"RS256","kid":"rsa-1","typ":"{typ}"}}"#),
            &body,
            Some((Algorithm::RS256, &rsa())),
        )
    };
    assert_eq!(status_of(&gw, &with_typ("at+jwt")).await, StatusCode::OK);
    assert_eq!(
        status_of(&gw, &with_typ("AT+JWT")).await,
        StatusCode::OK,
        "typ compares case-insensitively"
    );
    assert_eq!(status_of(&gw, &with_typ("JWT")).await, StatusCode::UNAUTHORIZED);
    assert_eq!(
        status_of(&gw, &rs256(&claims())).await,
        StatusCode::UNAUTHORIZED,
        "typ JWT is not at+jwt"
    );
    let records = gw.audit(4).await;
    assert_eq!(records[2]["reject_detail"], "wrong_typ");
}
