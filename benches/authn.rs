//! The authentication stage's cost per request, median of many batches:
//!
//!     cargo bench --bench authn
//!
//! Targets (issue 3): under 10 µs for an API key, under 60 µs for an RS256 or
//! ES256 JWT with cached keys. Each case runs in batches of 1,000 calls; the
//! figure printed is the median batch time divided by 1,000.

// A benchmark that cannot set itself up should stop loudly.
#![allow(clippy::expect_used)]

mod support;

use std::hint::black_box;

use http::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use sha2::Digest;
use warden::authn::KeyIndex;
use warden::authn::jwt::{Issuer, JwtVerifier, Keys, VerificationKey};
use warden::config::{ApiKey, IssuerConfig, ModelGrant};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwt");
const BATCH: usize = 1_000;
const BATCHES: usize = 101;

fn median_per_call(call: impl FnMut()) -> f64 {
    support::median_per_call(BATCH, BATCHES, call)
}

fn bearer(token: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        format!("Bearer {token}").parse().expect("header"),
    );
    headers
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    // 10,000 configured keys, the caller's among them.
    let keys: Vec<ApiKey> = (0..10_000)
        .map(|i| ApiKey {
            id: format!("key-{i}"),
            digest: sha2::Sha256::digest(format!("secret-{i}").as_bytes()).into(),
            principal: format!("p{i}"),
            tenant: "t".into(),
            tier: None,
            models: ModelGrant::All,
            ..ApiKey::default()
        })
        .collect();
    let index = KeyIndex::new(&keys);
    let headers = bearer("secret-4242");
    let api_key = median_per_call(|| {
        black_box(runtime.block_on(warden::authn::authenticate(black_box(&headers), only_keys(&index)))).ok();
    });

    let read = |name: &str| std::fs::read(format!("{FIXTURES}/{name}")).expect("fixture");
    let now = jiff::Timestamp::now().as_second();
    let claims = serde_json::json!({"iss": "https://issuer.test", "sub": "svc", "aud": "warden", "exp": now + 3600, "iat": now, "tenant": "acme"});
    let mut static_keys = Vec::new();
    let mut tokens = Vec::new();
    for (alg, kid, private, public) in [
        (Algorithm::RS256, "rsa-1", "rsa.key.pem", "rsa.pub.pem"),
        (Algorithm::ES256, "ec-1", "ec.key.pem", "ec.pub.pem"),
    ] {
        let (encoding, decoding) = match alg {
            Algorithm::RS256 => (
                EncodingKey::from_rsa_pem(&read(private)).expect("key"),
                DecodingKey::from_rsa_pem(&read(public)).expect("key"),
            ),
            _ => (
                EncodingKey::from_ec_pem(&read(private)).expect("key"),
                DecodingKey::from_ec_pem(&read(public)).expect("key"),
            ),
        };
        let mut header = jsonwebtoken::Header::new(alg);
        header.kid = Some(kid.into());
        tokens.push((alg, jsonwebtoken::encode(&header, &claims, &encoding).expect("token")));
        static_keys.push(VerificationKey {
            kid: Some(kid.into()),
            key: decoding,
            alg: Some(alg),
        });
    }
    let verifier = JwtVerifier::new(
        vec![Issuer {
            settings: IssuerConfig {
                issuer: "https://issuer.test".into(),
                audiences: vec!["warden".into()],
                algorithms: vec![Algorithm::RS256, Algorithm::ES256],
                typ: None,
                leeway: 30,
                jwks_url: None,
                discovery_url: None,
                static_keys: Vec::new(),
                min_refresh_interval: std::time::Duration::from_secs(30),
                principal_claim: None,
                kind: warden::config::PrincipalKind::User,
                groups_claim: "groups".into(),
                tenant: None,
                tenant_claim: "tenant".into(),
                tier_claim: None,
                models: ModelGrant::All,
            },
            keys: Keys::Static(static_keys),
        }],
        8 * 1024,
    );
    let empty = KeyIndex::new(&[]);
    println!("authentication stage, median per call ({BATCHES} batches of {BATCH}):");
    println!(
        "  API key (10,000 configured)  {:>8.2} µs   target < 10 µs",
        api_key * 1e6
    );
    for (alg, token) in &tokens {
        let headers = bearer(token);
        let ok = runtime
            .block_on(warden::authn::authenticate(&headers, with_jwt(&empty, &verifier)))
            .is_ok();
        assert!(ok, "the {alg:?} token must verify");
        let per_call = median_per_call(|| {
            black_box(runtime.block_on(warden::authn::authenticate(
                black_box(&headers),
                with_jwt(&empty, &verifier),
            )))
            .ok();
        });
        println!(
            "  JWT {alg:?} (cached keys)     {:>8.2} µs   target < 60 µs",
            per_call * 1e6
        );
    }
}

fn only_keys(keys: &KeyIndex) -> warden::authn::Authenticators<'_> {
    warden::authn::Authenticators {
        keys,
        managed: None,
        jwt: None,
        introspection: None,
        aws: None,
    }
}

fn with_jwt<'a>(keys: &'a KeyIndex, jwt: &'a JwtVerifier) -> warden::authn::Authenticators<'a> {
    warden::authn::Authenticators {
        jwt: Some(jwt),
        ..only_keys(keys)
    }
}
