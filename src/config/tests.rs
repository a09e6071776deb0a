#![allow(clippy::unwrap_used)]

use super::*;

const MINIMAL: &str = r#"
listen:
  address: 127.0.0.1:8080
audit:
  file: audit.jsonl
upstreams:
  - name: up
    url: http://127.0.0.1:9000/prefix/
models:
  - name: m
    protocol: openai
    upstream: up
api_keys:
  - id: k
    sha256: 0afa2299e2d8d131115738eb24dc74d065fbaf69c1e96c00a5331e9d4e5d4f63
    principal: p
    tenant: t
    models: [m]
"#;

fn paths(text: &str) -> Vec<String> {
    Config::parse(text, Path::new("/base"))
        .unwrap_err()
        .0
        .into_iter()
        .map(|e| e.path)
        .collect()
}

#[test]
fn minimal_config_gets_defaults() {
    let c = Config::parse(MINIMAL, Path::new("/base")).unwrap();
    assert_eq!(c.audit_file, Path::new("/base/audit.jsonl"));
    assert_eq!(c.admin_address, "127.0.0.1:9090".parse().unwrap());
    assert_eq!(c.listen.limits.max_body_bytes, 4 * 1024 * 1024);
    let m = &c.models["m"];
    assert_eq!(m.upstream.path_prefix, "/prefix");
    assert_eq!(m.upstream_model, "m");
    assert_eq!(m.max_body_bytes, c.listen.limits.max_body_bytes);
    assert!(c.api_keys[0].models.allows("m"));
    assert!(!c.api_keys[0].models.allows("other"));
}

#[test]
fn every_error_is_reported_with_its_path() {
    let broken = MINIMAL
        .replace("127.0.0.1:8080", "localhost")
        .replace("upstream: up", "upstream: nowhere")
        .replace("protocol: openai", "protocol: grpc")
        .replace(
            "0afa2299e2d8d131115738eb24dc74d065fbaf69c1e96c00a5331e9d4e5d4f63",
            "0AFA",
        );
    assert_eq!(
        paths(&broken),
        [
            "listen.address",
            "models[0].protocol",
            "models[0].upstream",
            "api_keys[0].sha256",
        ]
    );
}

#[test]
fn unknown_fields_are_rejected() {
    let text = MINIMAL.replace("  file: audit.jsonl", "  file: audit.jsonl\n  fsync: always");
    let errors = Config::parse(&text, Path::new("/")).unwrap_err();
    assert!(errors.to_string().contains("fsync"), "{errors}");
}

#[test]
fn secrets_are_read_by_reference_and_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("key"), "s3cret\n").unwrap();
    let text = MINIMAL.replace(
        "url: http://127.0.0.1:9000/prefix/",
        "url: http://127.0.0.1:9000\n    credential: { file: key }\n    credential_header: x-token",
    );
    let c = Config::parse(&text, dir.path()).unwrap();
    let cred = c.models["m"].upstream.credential.as_ref().unwrap();
    assert_eq!(cred.value, "s3cret");
    assert!(cred.value.is_sensitive());
    assert!(!format!("{c:?}").contains("s3cret"));

    let missing = MINIMAL.replace(
        "url: http://127.0.0.1:9000/prefix/",
        "url: http://127.0.0.1:9000\n    credential: { env: WARDEN_TEST_SURELY_UNSET }",
    );
    assert_eq!(paths(&missing), ["upstreams[0].credential.env"]);
    let both = MINIMAL.replace(
        "url: http://127.0.0.1:9000/prefix/",
        "url: http://127.0.0.1:9000\n    credential: { env: A, file: b }",
    );
    assert_eq!(paths(&both), ["upstreams[0].credential"]);
}

#[test]
fn sizes_and_durations() {
    let text = MINIMAL.replace(
        "  address: 127.0.0.1:8080",
        "  address: 127.0.0.1:8080\n  max_body_bytes: 2MiB\n  body_read_timeout: 250ms\n  max_header_bytes: 1KiB\n  shutdown_grace: soon",
    );
    assert_eq!(paths(&text), ["listen.max_header_bytes", "listen.shutdown_grace"]);
    let text = MINIMAL.replace(
        "  address: 127.0.0.1:8080",
        "  address: 127.0.0.1:8080\n  max_body_bytes: 2MiB\n  body_read_timeout: 250ms",
    );
    let c = Config::parse(&text, Path::new("/")).unwrap();
    assert_eq!(c.listen.limits.max_body_bytes, 2 * 1024 * 1024);
    assert_eq!(c.listen.limits.body_read_timeout, Duration::from_millis(250));
    let too_big = text.replace("    upstream: up\n", "    upstream: up\n    max_body_bytes: 3MiB\n");
    assert_eq!(paths(&too_big), ["models[0].max_body_bytes"]);
}

#[test]
fn identity_provider_presets() {
    let jwt = |issuer_yaml: &str| {
        MINIMAL.replace(
            "api_keys:",
            &format!("jwt:\n  issuers:\n    - audiences: [warden]\n      models: [m]\n{issuer_yaml}\napi_keys:"),
        )
    };
    let google = Config::parse(&jwt("      preset: google\n      tenant: acme"), Path::new("/")).unwrap();
    let issuer = &google.jwt.as_ref().unwrap().issuers[0];
    assert_eq!(issuer.issuer, "https://accounts.google.com");
    assert_eq!(
        issuer.discovery_url.as_deref(),
        Some("https://accounts.google.com/.well-known/openid-configuration")
    );
    assert_eq!(issuer.principal_claim.as_deref(), Some("email"));
    assert_eq!(issuer.tenant.as_deref(), Some("acme"));

    let azure = Config::parse(
        &jwt("      preset: azure\n      azure_tenant_id: 72f988bf-86f1-41af"),
        Path::new("/"),
    )
    .unwrap();
    let issuer = &azure.jwt.as_ref().unwrap().issuers[0];
    assert_eq!(
        issuer.issuer,
        "https://login.microsoftonline.com/72f988bf-86f1-41af/v2.0"
    );
    assert_eq!(issuer.principal_claim.as_deref(), Some("oid"));
    assert_eq!(issuer.tenant_claim, "tid");
    assert_eq!(
        paths(&jwt("      preset: azure")),
        ["jwt.issuers[0].preset", "jwt.issuers[0].issuer", "jwt.issuers[0]"]
    );

    // Kubernetes: the cluster's issuer and JWKS must be given.
    let k8s = "      preset: kubernetes\n      issuer: https://kubernetes.default.svc\n      jwks_url: https://10.0.0.1/openid/v1/jwks";
    let kube = Config::parse(&jwt(k8s), Path::new("/")).unwrap();
    assert_eq!(
        kube.jwt.as_ref().unwrap().issuers[0].tenant_claim,
        "/kubernetes.io/namespace"
    );
    assert_eq!(
        paths(&jwt("      preset: kubernetes\n      issuer: https://k")),
        ["jwt.issuers[0]"]
    );
    assert_eq!(
        paths(&jwt("      preset: okta")),
        ["jwt.issuers[0].preset", "jwt.issuers[0].issuer", "jwt.issuers[0]"]
    );
    assert_eq!(
        paths(&jwt("      issuer: https://x\n      jwks_url: http://203.0.113.5/jwks")),
        ["jwt.issuers[0].jwks_url"]
    );
}

#[test]
fn hmac_needs_a_256_bit_secret_and_asymmetric_is_the_default() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("short"), "too-short-secret").unwrap();
    std::fs::write(dir.path().join("long"), "a-secret-of-at-least-thirty-two-bytes!!").unwrap();
    let jwt = |extra: &str| {
        MINIMAL.replace(
            "api_keys:",
            &format!("jwt:\n  issuers:\n    - issuer: https://i\n      audiences: [w]\n{extra}\napi_keys:"),
        )
    };
    let parse = |text: String| Config::parse(&text, dir.path());
    let short = parse(jwt("      algorithms: [HS256]\n      hmac_secret: { file: short }")).unwrap_err();
    assert_eq!(short.0[0].path, "jwt.issuers[0].hmac_secret");
    let long = parse(jwt("      algorithms: [HS256]\n      hmac_secret: { file: long }")).unwrap();
    assert_eq!(long.jwt.unwrap().issuers[0].static_keys.len(), 1);
    // HS256 is never allowed by default, and a secret without it is an error.
    let default = parse(jwt("      jwks_url: https://i/jwks")).unwrap();
    let algs = &default.jwt.unwrap().issuers[0].algorithms;
    assert!(
        algs.iter().all(|a| a.family() != jsonwebtoken::AlgorithmFamily::Hmac),
        "{algs:?}"
    );
    assert!(parse(jwt("      hmac_secret: { file: long }")).is_err());
    assert!(parse(jwt("      algorithms: [none]\n      jwks_url: https://i/jwks")).is_err());
}

#[test]
fn a_model_value_tier_defaults_to_standard_and_is_checked() {
    let c = Config::parse(MINIMAL, Path::new("/base")).unwrap();
    assert_eq!(c.models["m"].value_tier, ValueTier::Standard);
    let high = MINIMAL.replace("    upstream: up\n", "    upstream: up\n    value_tier: high\n");
    assert_ne!(high, MINIMAL);
    let c = Config::parse(&high, Path::new("/base")).unwrap();
    assert_eq!(c.models["m"].value_tier, ValueTier::High);
    assert_eq!(c.models["m"].value_tier.as_str(), "high");
    // A misspelt tier is an error at its path, not a model silently standard.
    let typo = MINIMAL.replace("    upstream: up\n", "    upstream: up\n    value_tier: hihg\n");
    let errors = Config::parse(&typo, Path::new("/base")).unwrap_err();
    assert_eq!(paths(&typo), ["models[0].value_tier"]);
    assert!(errors.to_string().contains("hihg"), "{errors}");
}

#[test]
fn a_pdp_credential_is_read_by_reference_and_its_absence_reported_with_its_path() {
    let opa = |credential: &str| {
        MINIMAL.replace(
            "api_keys:",
            &format!("policy:\n  opa:\n    url: http://127.0.0.1:8181\n    path: warden/allow\n{credential}api_keys:"),
        )
    };
    assert_eq!(
        paths(&opa("    credential: { file: no-such-token }\n")),
        ["policy.opa.credential.file"]
    );
    assert_eq!(
        paths(&opa("    credential: { value: inline-secret }\n")).len(),
        1,
        "an inline secret is refused"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "t0ken\n").unwrap();
    let config = Config::parse(&opa("    credential: { file: token }\n"), dir.path()).unwrap();
    assert!(config.opa.is_some());
}

#[test]
fn an_external_injection_detector_is_checked_with_its_paths() {
    let external = |fields: &str| {
        MINIMAL.replace(
            "    upstream: up\n",
            &format!("    upstream: up\n    validation:\n      injection:\n        external: {{ {fields} }}\n"),
        )
    };
    let path = "models[0].validation.injection.external";
    // A bad kind and fail mode, a missing URL, a bad timeout: every one at its path.
    assert_eq!(
        paths(&external("kind: rebuff, fail: maybe, timeout: soon")),
        [
            format!("{path}.kind"),
            format!("{path}.url"),
            format!("{path}.fail"),
            format!("{path}.timeout")
        ]
    );
    assert_eq!(paths(&external("url: https://guard.example")), [format!("{path}.kind")]);
    assert_eq!(
        paths(&external("kind: llm_guard, url: http://guard.example")),
        [format!("{path}.url")],
        "plain http only on loopback"
    );
    // Lakera needs a key, by reference.
    assert_eq!(
        paths(&external("kind: lakera, url: https://api.lakera.ai/v2/guard")),
        [format!("{path}.api_key")]
    );
    assert_eq!(
        paths(&external(
            "kind: lakera, url: https://api.lakera.ai/v2/guard, api_key: { env: WARDEN_TEST_SURELY_UNSET }"
        )),
        [format!("{path}.api_key.env")]
    );
    assert!(
        Config::parse(
            &external("kind: lakera, url: https://api.lakera.ai/v2/guard, api_key: s3cret"),
            Path::new("/base"),
        )
        .is_err(),
        "an inline key is refused"
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("lakera.key"), "s3cret\n").unwrap();
    let c = Config::parse(
        &external("kind: lakera, url: https://api.lakera.ai/v2/guard, api_key: { file: lakera.key }, fail: open, timeout: 250ms"),
        dir.path(),
    )
    .unwrap();
    let injection = c.models["m"].validation.injection.as_ref().unwrap();
    let detector = injection.external.as_ref().unwrap();
    assert_eq!(detector.kind(), crate::validate::external::DetectorKind::Lakera);
    assert_eq!(detector.fail_mode(), crate::validate::external::FailMode::Open);
    assert!(!format!("{c:?}").contains("s3cret"));
    // LLM Guard's key is optional; failing closed is the default.
    let c = Config::parse(&external("kind: llm_guard, url: http://127.0.0.1:8000"), dir.path()).unwrap();
    let detector = c.models["m"]
        .validation
        .injection
        .as_ref()
        .unwrap()
        .external
        .as_ref()
        .unwrap();
    assert_eq!(detector.fail_mode(), crate::validate::external::FailMode::Closed);
}

#[test]
fn oip_metadata_is_checked_with_its_paths() {
    let oip = |metadata: &str| {
        MINIMAL
            .replace("    protocol: openai\n", "    protocol: oip_v2\n")
            .replace(
                "    upstream: up\n",
                &format!("    upstream: up\n    validation:\n      metadata: {metadata}\n"),
            )
    };
    let path = "models[0].validation.metadata";
    assert_eq!(paths(&oip("{ max_rows: 10 }")), [path]);
    assert_eq!(
        paths(&oip(
            "{ fetch: true, inputs: [{ name: x, datatype: FP32, shape: [-1] }] }"
        )),
        [path]
    );
    assert_eq!(
        paths(&oip("{ fetch: true, max_rows: 0 }")),
        [format!("{path}.max_rows")]
    );
    assert_eq!(
        paths(&oip(
            "{ inputs: [{ name: x, datatype: FP128, shape: [-1] }, { name: y, datatype: INT8, shape: [-3] }] }"
        )),
        [format!("{path}.inputs[0]"), format!("{path}.inputs[1]")]
    );
    assert_eq!(
        paths(&oip(
            "{ inputs: [{ name: x, datatype: FP32, shape: [-1] }, { name: x, datatype: FP32, shape: [-1] }] }"
        )),
        [path],
        "a name declared twice"
    );
    // Metadata is an OIP v2 notion.
    let openai = MINIMAL.replace(
        "    upstream: up\n",
        "    upstream: up\n    validation:\n      metadata: { fetch: true }\n",
    );
    assert_eq!(paths(&openai), [path]);

    let c = Config::parse(
        &oip("{ max_rows: 8, inputs: [{ name: x, datatype: FP32, shape: [-1, 3] }] }"),
        Path::new("/base"),
    )
    .unwrap();
    let metadata = c.models["m"].validation.metadata.as_ref().unwrap();
    assert_eq!(metadata.max_rows, Some(8));
    let crate::validate::oip::SignatureSource::Configured(signature) = &metadata.source else {
        panic!("configured metadata is not fetched");
    };
    assert_eq!(signature.inputs[0].shape, [-1, 3]);
    assert_eq!(signature.inputs[0].datatype, crate::validate::oip::Datatype::Fp32);
}

#[test]
fn an_output_policy_is_checked_with_every_error_at_its_path() {
    let good = MINIMAL.replace(
        "    upstream: up\n",
        "    upstream: up\n    output:\n      detectors: { card: redact, aws_access_key_id: block }\n      deny_terms: [Project Falcon]\n",
    );
    let c = Config::parse(&good, Path::new("/base")).unwrap();
    assert!(c.models["m"].output.is_some());
    assert!(
        Config::parse(MINIMAL, Path::new("/base")).unwrap().models["m"]
            .output
            .is_none()
    );

    let bad = MINIMAL.replace(
        "    upstream: up\n",
        "    upstream: up\n    output:\n      detectors: { credit_card: redact, email: route, jwt: hide }\n      deny_terms: ['  ']\n",
    );
    let errors = Config::parse(&bad, Path::new("/base")).unwrap_err().to_string();
    for expected in [
        "credit_card",
        "models[0].output.detectors.email",
        "`route` is not available",
        "`hide`",
    ] {
        assert!(errors.contains(expected), "{expected} missing from: {errors}");
    }
    let empty = MINIMAL.replace("    upstream: up\n", "    upstream: up\n    output: {}\n");
    assert_eq!(paths(&empty), ["models[0].output"]);
}
