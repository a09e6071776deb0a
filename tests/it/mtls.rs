//! mTLS: client certificates verified against the configured CA, the
//! identity read from the SPIFFE ID, routes that require a certificate (alone
//! or with a token), and the certificates that must not get in.

use std::path::Path;

use http::StatusCode;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};

use crate::common::*;

const SPIFFE: &str = "spiffe://acme.example/ns/prod/sa/batch";

/// A CA: its certificate (PEM) and an issuer to sign with.
fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), Issuer::new(params, key))
}

/// A leaf signed by `issuer`: (certificate PEM, key PEM).
fn leaf(issuer: &Issuer<'static, KeyPair>, dns: &[&str], spiffe: Option<&str>, expired: bool) -> (String, String) {
    let mut params = CertificateParams::new(dns.iter().map(|d| (*d).to_owned()).collect::<Vec<_>>()).unwrap();
    if let Some(id) = spiffe {
        params.subject_alt_names.push(SanType::URI(id.try_into().unwrap()));
    }
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

struct Setup {
    gw: TestGateway,
    server_ca: String,
    client_ca: Issuer<'static, KeyPair>,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let (chat, fraud) = demo_upstreams().await;
    let dir = tempfile::tempdir().unwrap();
    let (server_ca, server_issuer) = ca("server CA");
    let (server_cert, server_key) = leaf(&server_issuer, &["localhost"], None, false);
    let (client_ca_pem, client_ca) = ca("client CA");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let tls = format!(
        "  tls:\n    cert_file: {}\n    key_file: {}\n    client_ca_file: {}",
        write("server.crt", &server_cert).display(),
        write("server.key", &server_key).display(),
        write("client-ca.crt", &client_ca_pem).display(),
    );
    let yaml = config(chat, fraud, &tls)
        .replace(
            "  - name: fraud-scorer\n",
            "  - name: secure-chat\n    protocol: openai\n    upstream: chat\n    upstream_model: demo-chat\n    require_mtls: true\n  - name: fraud-scorer\n",
        )
        .replace(
            "api_keys:",
            &format!("mtls:\n  clients:\n    - identity: {SPIFFE}\n      tenant: acme\n      models: [secure-chat, demo-chat]\napi_keys:"),
        );
    let gw = TestGateway::start(&yaml).await;
    Setup {
        gw,
        server_ca,
        client_ca,
        _dir: dir,
    }
}

fn https_client(server_ca: &str, identity: Option<(String, String)>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([reqwest::Certificate::from_pem(server_ca.as_bytes()).unwrap()]);
    if let Some((cert, key)) = identity {
        builder = builder.identity(reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap());
    }
    builder.build().unwrap()
}

async fn call(
    client: &reqwest::Client,
    gw: &TestGateway,
    model: &str,
    key: Option<&str>,
) -> Result<StatusCode, reqwest::Error> {
    let port = gw.running.as_ref().unwrap().address.port();
    let mut req = client
        .post(format!("https://localhost:{port}/v1/chat/completions"))
        .json(&chat_body(model, false));
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    req.send().await.map(|r| r.status())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_authenticate_and_routes_can_require_them() {
    let s = setup().await;
    let valid = https_client(
        &s.server_ca,
        Some(leaf(&s.client_ca, &["batch.acme.example"], Some(SPIFFE), false)),
    );
    let none = https_client(&s.server_ca, None);

    // The certificate alone, on a route that requires it.
    assert_eq!(call(&valid, &s.gw, "secure-chat", None).await.unwrap(), StatusCode::OK);
    // Certificate and key together: both must pass.
    assert_eq!(
        call(&valid, &s.gw, "secure-chat", Some(ACME)).await.unwrap(),
        StatusCode::OK
    );
    assert_eq!(
        call(&valid, &s.gw, "secure-chat", Some("wrong")).await.unwrap(),
        StatusCode::UNAUTHORIZED
    );
    // A key alone is not enough for that route, but is for the others.
    assert_eq!(
        call(&none, &s.gw, "secure-chat", Some(ACME)).await.unwrap(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&none, &s.gw, "demo-chat", Some(ACME)).await.unwrap(),
        StatusCode::OK
    );
    // A verified certificate of a client nobody configured names no one.
    let stranger = https_client(
        &s.server_ca,
        Some(leaf(
            &s.client_ca,
            &["x.example"],
            Some("spiffe://acme.example/ns/dev/sa/other"),
            false,
        )),
    );
    assert_eq!(
        call(&stranger, &s.gw, "secure-chat", None).await.unwrap(),
        StatusCode::UNAUTHORIZED
    );

    let records = s.gw.audit(6).await;
    assert_eq!(records[0]["auth_method"], "mtls");
    assert_eq!(records[0]["principal"], SPIFFE);
    assert_eq!(records[0]["tenant"], "acme");
    assert_eq!(records[0]["client_cert"], SPIFFE);
    assert_eq!(records[1]["auth_method"], "api_key");
    assert_eq!(records[1]["client_cert"], SPIFFE);
    assert_eq!(records[3]["reject_reason"], "client_certificate_required");
    assert_eq!(records[5]["reject_reason"], "missing_api_key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_and_expired_certificates_get_no_connection() {
    let s = setup().await;
    let (_, other_ca) = ca("someone else's CA");
    let untrusted = https_client(
        &s.server_ca,
        Some(leaf(&other_ca, &["batch.acme.example"], Some(SPIFFE), false)),
    );
    let expired = https_client(
        &s.server_ca,
        Some(leaf(&s.client_ca, &["batch.acme.example"], Some(SPIFFE), true)),
    );
    for (name, client) in [("untrusted CA", untrusted), ("expired", expired)] {
        let result = call(&client, &s.gw, "secure-chat", Some(ACME)).await;
        assert!(result.is_err(), "{name}: the handshake should fail, got {result:?}");
    }
    // Nothing reached the pipeline, so nothing was audited.
    assert!(!Path::new(&s.gw.audit_path).exists() || s.gw.audit(0).await.is_empty());
}
