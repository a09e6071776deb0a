//! The shipped example configurations load, and configuration errors are
//! reported with their paths, all at once.

use std::path::Path;

use warden::config::Config;

#[test]
fn every_example_config_loads() {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples"));
    let mut checked = Vec::new();
    let mut failures = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        if let Err(e) = Config::load(&path) {
            failures.push(format!("{}:\n{e}", path.display()));
        }
        checked.push(path);
    }
    assert!(
        checked.len() >= 2,
        "expected at least 2 example configs, found {checked:?}"
    );
    assert!(
        failures.is_empty(),
        "example configs that do not load:\n{}",
        failures.join("\n")
    );
}

/// The smallest valid configuration, to which each test adds one fault.
const MINIMAL: &str = r#"
listen:
  address: 127.0.0.1:8080
admin:
  address: 127.0.0.1:9090
audit:
  file: audit.jsonl
upstreams:
  - name: chat
    url: http://127.0.0.1:8081
models:
  - name: demo-chat
    protocol: openai
    upstream: chat
"#;

#[test]
fn the_minimal_config_is_valid() {
    let config = Config::parse(MINIMAL, Path::new("/tmp")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.listen.address.to_string(), "127.0.0.1:8080");
    assert_eq!(config.audit_file, Path::new("/tmp/audit.jsonl"));
    assert!(config.models.contains_key("demo-chat"));
}

#[test]
fn an_unknown_top_level_field_is_named() {
    let text = format!("{MINIMAL}telemetry_endpoint: http://collector:4317\n");
    let errors = match Config::parse(&text, Path::new("/tmp")) {
        Ok(_) => panic!("a config with an unknown field was accepted"),
        Err(e) => e,
    };
    assert_eq!(errors.0.len(), 1, "{errors}");
    assert!(
        errors.0[0].message.contains("telemetry_endpoint"),
        "the error does not name the field: {errors}"
    );
    assert!(errors.to_string().contains("telemetry_endpoint"), "{errors}");
}

#[test]
fn an_unknown_nested_field_is_named() {
    let text = MINIMAL.replace("    protocol: openai\n", "    protocol: openai\n    temperature: 0.2\n");
    assert_ne!(text, MINIMAL);
    let errors = match Config::parse(&text, Path::new("/tmp")) {
        Ok(_) => panic!("a model with an unknown field was accepted"),
        Err(e) => e,
    };
    assert!(errors.to_string().contains("temperature"), "{errors}");
}

#[test]
fn every_error_is_reported_with_its_path() {
    let text = MINIMAL
        .replace("address: 127.0.0.1:8080", "address: localhost-8080")
        .replace("    upstream: chat\n", "    upstream: nowhere\n");
    let errors = match Config::parse(&text, Path::new("/tmp")) {
        Ok(_) => panic!("a config with two errors was accepted"),
        Err(e) => e,
    };
    let paths: Vec<&str> = errors.0.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths.len(), 2, "{errors}");
    assert!(paths.contains(&"listen.address"), "{paths:?}");
    assert!(paths.contains(&"models[0].upstream"), "{paths:?}");
    let address = errors.0.iter().find(|e| e.path == "listen.address").unwrap();
    assert!(address.message.contains("localhost-8080"), "{}", address.message);
    let upstream = errors.0.iter().find(|e| e.path == "models[0].upstream").unwrap();
    assert!(upstream.message.contains("nowhere"), "{}", upstream.message);
    // The Display form lists both, one per line, each with its path.
    let shown = errors.to_string();
    assert_eq!(shown.lines().count(), 2, "{shown}");
    assert!(shown.contains("listen.address: "), "{shown}");
    assert!(shown.contains("models[0].upstream: "), "{shown}");
}
