//! Warden as Envoy's external authorizer: a real gRPC client (tonic, with
//! the envoy-types generated client) sends Envoy `CheckRequest`s to the
//! ext_authz listener, which decides them with the gateway's credentials and
//! the demo's Cedar policies (examples/policies/demo.cedar).

use std::collections::HashMap;
use std::net::SocketAddr;

use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use serde_json::Value;

use crate::common::*;

const SPIFFE: &str = "spiffe://acme.example/ns/prod/sa/batch";

/// A gateway on the demo policies with an ext_authz listener; `extra` is
/// spliced into the `ext_authz` section, `tls` into `listen`.
async fn gateway(tls: &str, extra: &str, sections: &str) -> (TestGateway, tempfile::TempDir) {
    let (chat, fraud) = demo_upstreams().await;
    let dir = tempfile::tempdir().unwrap();
    let (policies, schema) = demo_policy_files(dir.path());
    let yaml = config(chat, fraud, tls).replace(
        "api_keys:",
        &format!(
            "policy:\n  cedar:\n    policies: {policies}\n    schema: {schema}\next_authz:\n  listen: 127.0.0.1:0\n{extra}{sections}api_keys:"
        ),
    );
    (TestGateway::start(&yaml).await, dir)
}

fn ext_authz_address(gw: &TestGateway) -> SocketAddr {
    gw.running.as_ref().unwrap().ext_authz_address.unwrap()
}

async fn connect(gw: &TestGateway) -> AuthorizationClient<tonic::transport::Channel> {
    AuthorizationClient::connect(format!("http://{}", ext_authz_address(gw)))
        .await
        .unwrap()
}

/// What Envoy's HTTP ext_authz filter sends for a request.
#[derive(Default)]
struct Call<'a> {
    method: &'a str,
    path: &'a str,
    headers: Vec<(&'a str, String)>,
    body: &'a str,
    principal: &'a str,
    model_extension: Option<&'a str>,
    client: &'a str,
}

impl Call<'_> {
    fn request(&self) -> CheckRequest {
        let mut headers: HashMap<String, String> =
            self.headers.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
        headers.insert(":path".into(), self.path.into());
        headers.insert(":method".into(), self.method.into());
        CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(Peer {
                    address: Some(Address {
                        address: Some(address::Address::SocketAddress(SocketAddress {
                            address: if self.client.is_empty() {
                                "10.0.0.1"
                            } else {
                                self.client
                            }
                            .into(),
                            port_specifier: Some(PortSpecifier::PortValue(43210)),
                            ..Default::default()
                        })),
                    }),
                    principal: self.principal.into(),
                    ..Default::default()
                }),
                request: Some(Request {
                    time: None,
                    http: Some(HttpRequest {
                        id: "req-1".into(),
                        method: self.method.into(),
                        headers,
                        path: self.path.into(),
                        host: "models.mesh.local".into(),
                        scheme: "http".into(),
                        body: self.body.into(),
                        protocol: "HTTP/1.1".into(),
                        size: i64::try_from(self.body.len()).unwrap(),
                        ..Default::default()
                    }),
                }),
                context_extensions: self
                    .model_extension
                    .map(|m| HashMap::from([("model".to_owned(), m.to_owned())]))
                    .unwrap_or_default(),
                ..Default::default()
            }),
        }
    }
}

fn bearer(key: &str) -> Vec<(&'static str, String)> {
    vec![("authorization", format!("Bearer {key}"))]
}

async fn check(client: &mut AuthorizationClient<tonic::transport::Channel>, call: &Call<'_>) -> CheckResponse {
    client.check(call.request()).await.unwrap().into_inner()
}

/// What Envoy is told to do.
#[derive(Debug)]
enum Verdict {
    /// Forward, with these headers set.
    Allowed(HashMap<String, String>),
    /// Answer the client with this status, body and headers.
    Denied(i32, Value, HashMap<String, String>),
}

impl Verdict {
    fn allowed(self) -> HashMap<String, String> {
        match self {
            Verdict::Allowed(headers) => headers,
            denied => panic!("expected an OkResponse, got {denied:?}"),
        }
    }

    fn denied(self) -> (i32, Value, HashMap<String, String>) {
        match self {
            Verdict::Denied(status, body, headers) => (status, body, headers),
            allowed => panic!("expected a DeniedHttpResponse, got {allowed:?}"),
        }
    }
}

fn header_map(headers: &[envoy_types::pb::envoy::config::core::v3::HeaderValueOption]) -> HashMap<String, String> {
    headers
        .iter()
        .map(|h| {
            let h = h.header.as_ref().unwrap();
            (h.key.clone(), h.value.clone())
        })
        .collect()
}

fn verdict(response: &CheckResponse) -> Verdict {
    let code = response.status.as_ref().unwrap().code;
    match &response.http_response {
        Some(HttpResponse::OkResponse(ok)) => {
            assert_eq!(code, 0, "an OkResponse with a non-OK status");
            Verdict::Allowed(header_map(&ok.headers))
        }
        Some(HttpResponse::DeniedResponse(denied)) => {
            assert_ne!(code, 0, "a DeniedResponse with an OK status");
            let status = denied.status.as_ref().unwrap().code;
            Verdict::Denied(
                status,
                serde_json::from_str(&denied.body).unwrap(),
                header_map(&denied.headers),
            )
        }
        other => panic!("unexpected http_response {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_allows_and_denies_as_the_gateway_would() {
    let (gw, _dir) = gateway("", "", "").await;
    let mut client = connect(&gw).await;

    // Allowed: the demo chat model for acme's key, named by the Envoy route.
    let allowed = check(
        &mut client,
        &Call {
            method: "POST",
            path: "/chat",
            headers: bearer(ACME),
            model_extension: Some("demo-chat"),
            ..Default::default()
        },
    )
    .await;
    let added = verdict(&allowed).allowed();
    assert_eq!(added["x-warden-principal"], "alice@acme.example");
    assert_eq!(added["x-warden-tenant"], "acme");

    // Denied by policy: the fraud model is for enterprise callers; acme is on
    // `pro`. Named by the OIP v2 path this time.
    let denied = check(
        &mut client,
        &Call {
            method: "POST",
            path: "/v2/models/fraud-scorer/infer?trace=1",
            headers: bearer(ACME),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        denied.status.as_ref().unwrap().code,
        tonic::Code::PermissionDenied as i32
    );
    let (status, body, headers) = verdict(&denied).denied();
    assert_eq!(status, 403);
    // OIP v2's error format, as the gateway would answer.
    assert_eq!(
        body["error"],
        "the policy does not allow you to call the model `fraud-scorer`"
    );
    assert_eq!(headers["x-should-retry"], "false");

    // Unauthenticated: no credential at all.
    let anonymous = check(
        &mut client,
        &Call {
            method: "POST",
            path: "/chat",
            model_extension: Some("demo-chat"),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        anonymous.status.as_ref().unwrap().code,
        tonic::Code::Unauthenticated as i32
    );
    let (status, body, headers) = verdict(&anonymous).denied();
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("missing_api_key")));
    assert_eq!(headers["www-authenticate"], "Bearer");

    // The rest of the table: (call, HTTP status, OpenAI error code).
    let table: Vec<(Call, i32, &str)> = vec![
        // A wrong key.
        (
            Call {
                method: "POST",
                path: "/chat",
                headers: bearer("wdn_not_a_real_key"),
                model_extension: Some("demo-chat"),
                ..Default::default()
            },
            401,
            "invalid_api_key",
        ),
        // A header that only names a principal proves nothing.
        (
            Call {
                method: "POST",
                path: "/chat",
                headers: vec![("x-warden-principal", "alice@acme.example".into())],
                model_extension: Some("demo-chat"),
                ..Default::default()
            },
            401,
            "missing_api_key",
        ),
        // Nor does a source principal, unless configured to be trusted.
        (
            Call {
                method: "POST",
                path: "/chat",
                principal: SPIFFE,
                model_extension: Some("demo-chat"),
                ..Default::default()
            },
            401,
            "missing_api_key",
        ),
        // The key's own grant: globex may call demo-chat only.
        (
            Call {
                method: "POST",
                path: "/chat",
                headers: bearer(GLOBEX),
                model_extension: Some("other-chat"),
                ..Default::default()
            },
            403,
            "model_not_allowed",
        ),
        // Not a configured model.
        (
            Call {
                method: "POST",
                path: "/chat",
                headers: bearer(ACME),
                model_extension: Some("gpt-9"),
                ..Default::default()
            },
            404,
            "model_not_found",
        ),
        // Nothing names a model.
        (
            Call {
                method: "GET",
                path: "/dashboard",
                headers: bearer(ACME),
                ..Default::default()
            },
            403,
            "no_model",
        ),
        // An OpenAI route names it in the body, which Envoy sent.
        (
            Call {
                method: "POST",
                path: "/v1/chat/completions",
                headers: bearer(GLOBEX),
                body: r#"{"model":"other-chat","messages":[]}"#,
                ..Default::default()
            },
            403,
            "model_not_allowed",
        ),
        // An OIP v2 model is no model on an OpenAI route, as on the gateway.
        (
            Call {
                method: "POST",
                path: "/v1/chat/completions",
                headers: bearer(ACME),
                body: r#"{"model":"fraud-scorer","messages":[]}"#,
                ..Default::default()
            },
            404,
            "model_not_found",
        ),
    ];
    for (call, status, code) in &table {
        let (got, body, _) = verdict(&check(&mut client, call).await).denied();
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (*status, Some(*code)),
            "{}",
            call.path
        );
    }
    // …and allowed when the body names one the key and policies allow.
    let by_body = check(
        &mut client,
        &Call {
            method: "POST",
            path: "/v1/chat/completions",
            headers: vec![("x-api-key", GLOBEX.to_owned())],
            body: r#"{"model":"demo-chat","messages":[]}"#,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(verdict(&by_body).allowed()["x-warden-principal"], "bob@globex.example");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_credentials_count_toward_the_lockout_by_client_address() {
    // No policy here: the lockout comes before any decision.
    let (chat, fraud) = demo_upstreams().await;
    let yaml = config(chat, fraud, "")
        .replace("max_failures: 1000", "max_failures: 2")
        .replace("api_keys:", "ext_authz:\n  listen: 127.0.0.1:0\napi_keys:");
    let gw = TestGateway::start(&yaml).await;
    let mut client = connect(&gw).await;
    let call = |key: &str, client: &'static str| Call {
        method: "POST",
        path: "/chat",
        headers: bearer(key),
        model_extension: Some("demo-chat"),
        client,
        ..Default::default()
    };
    for _ in 0..2 {
        let (status, ..) = verdict(&check(&mut client, &call("wrong-key", "10.9.9.9")).await).denied();
        assert_eq!(status, 401);
    }
    // The address is locked out, even with a good key…
    let locked = check(&mut client, &call(ACME, "10.9.9.9")).await;
    assert_eq!(
        locked.status.as_ref().unwrap().code,
        tonic::Code::ResourceExhausted as i32
    );
    let (status, body, headers) = verdict(&locked).denied();
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("too_many_authentication_failures"))
    );
    assert!(headers.contains_key("retry-after"));
    // …and another client behind the same Envoy is not.
    verdict(&check(&mut client, &call(ACME, "10.8.8.8")).await).allowed();
}

/// A self-signed CA certificate (PEM) and a server certificate and key it
/// does not need to have signed: the client CA only has to parse.
fn tls_files(dir: &std::path::Path) -> String {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&server_key)
        .unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    format!(
        "  tls:\n    cert_file: {}\n    key_file: {}\n    client_ca_file: {}",
        write("server.crt", &server.pem()),
        write("server.key", &server_key.serialize_pem()),
        write("client-ca.crt", &ca_cert.pem()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_principal_counts_only_when_trusted_and_known() {
    let certs = tempfile::tempdir().unwrap();
    let tls = tls_files(certs.path());
    let mtls = format!("mtls:\n  clients:\n    - identity: {SPIFFE}\n      tenant: acme\n      models: [demo-chat]\n");
    let by_principal = |principal: &'static str| Call {
        method: "POST",
        path: "/chat",
        principal,
        model_extension: Some("demo-chat"),
        ..Default::default()
    };

    let (trusting, _dir) = gateway(&tls, "  trust_source_principal: true\n", &mtls).await;
    let mut client = connect(&trusting).await;
    let allowed = verdict(&check(&mut client, &by_principal(SPIFFE)).await).allowed();
    assert_eq!(allowed["x-warden-principal"], SPIFFE);
    // An identity Warden does not know is no identity.
    let (status, ..) = verdict(&check(&mut client, &by_principal("spiffe://evil.example/sa/x")).await).denied();
    assert_eq!(status, 401);
    // The client's grant still applies: it may not call the fraud model.
    let mut fraud = by_principal(SPIFFE);
    fraud.model_extension = Some("fraud-scorer");
    let (status, body, _) = verdict(&check(&mut client, &fraud).await).denied();
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("model_not_allowed"))
    );

    // The same clients, not trusted: the principal is ignored.
    let (wary, _dir) = gateway(&tls, "", &mtls).await;
    let mut client = connect(&wary).await;
    let (status, ..) = verdict(&check(&mut client, &by_principal(SPIFFE)).await).denied();
    assert_eq!(status, 401);
}

#[test]
fn trusting_the_source_principal_needs_mtls_clients() {
    let yaml = "listen: {address: 127.0.0.1:0}\naudit: {file: a.jsonl}\next_authz: {trust_source_principal: true, listen: nowhere}\n";
    let errors = warden::config::Config::parse(yaml, std::path::Path::new("."))
        .unwrap_err()
        .to_string();
    assert!(
        errors.contains("ext_authz.trust_source_principal: needs an `mtls` section"),
        "{errors}"
    );
    assert!(
        errors.contains("ext_authz.listen: `nowhere` is not an `ip:port` address"),
        "{errors}"
    );
    let yaml = "listen: {address: 127.0.0.1:0}\naudit: {file: a.jsonl}\next_authz: {listne: 127.0.0.1:1}\n";
    assert!(warden::config::Config::parse(yaml, std::path::Path::new(".")).is_err());
    // Off unless asked for, and on loopback by default.
    let yaml = "listen: {address: 127.0.0.1:0}\naudit: {file: a.jsonl}\next_authz: {}\n";
    let config = warden::config::Config::parse(yaml, std::path::Path::new(".")).unwrap();
    let ext = config.ext_authz.unwrap();
    assert_eq!(ext.address, "127.0.0.1:9191".parse().unwrap());
    assert!(!ext.trust_source_principal);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_drains_and_closes_on_shutdown() {
    let (mut gw, _dir) = gateway("", "", "").await;
    let address = ext_authz_address(&gw);
    let mut client = connect(&gw).await;
    let call = Call {
        method: "POST",
        path: "/chat",
        headers: bearer(ACME),
        model_extension: Some("demo-chat"),
        ..Default::default()
    };
    verdict(&check(&mut client, &call).await).allowed();
    // `stop` returns once every listener, this one included, has drained.
    tokio::time::timeout(std::time::Duration::from_secs(10), gw.stop())
        .await
        .expect("the ext_authz listener did not drain");
    assert!(tokio::net::TcpStream::connect(address).await.is_err());
}
