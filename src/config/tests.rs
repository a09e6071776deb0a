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
