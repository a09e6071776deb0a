//! The demo's token issuer: serves a JWKS for one published ES256 key and
//! mints tokens with it, so `warden demo` can show a JWT caller end to end.
//! DEMO ONLY: the private key ships in `examples/` for anyone to read.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use super::{DemoBody, response};

/// The demo issuer's private key (published; demo only).
const KEY_PEM: &[u8] = include_bytes!("../../examples/demo-issuer.key.pem");
/// Its JWKS.
const JWKS: &str = include_str!("../../examples/demo-issuer.jwks.json");
/// The key id in the JWKS.
pub const KEY_ID: &str = "demo-1";
/// The audience demo tokens are for.
pub const AUDIENCE: &str = "warden-demo";

/// Serves `GET /jwks.json` on `listener` until the task is dropped.
pub async fn serve_issuer(listener: tokio::net::TcpListener) {
    super::serve(listener, "demo issuer", handle).await;
}

async fn handle(req: Request<Incoming>) -> Response<DemoBody> {
    match req.uri().path() {
        "/jwks.json" | "/.well-known/jwks.json" => {
            response(StatusCode::OK, "application/json", DemoBody::full(JWKS.as_bytes()))
        }
        _ => response(StatusCode::NOT_FOUND, "text/plain", DemoBody::full("not found\n")),
    }
}

/// A token from `issuer` for `subject` in `tenant`, valid for `ttl_secs`.
pub fn mint(issuer: &str, subject: &str, tenant: &str, ttl_secs: i64) -> Result<String, jsonwebtoken::errors::Error> {
    let now = jiff::Timestamp::now().as_second();
    let claims = serde_json::json!({
        "iss": issuer,
        "sub": subject,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + ttl_secs,
        "tenant": tenant,
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(KEY_ID.to_owned());
    let key = jsonwebtoken::EncodingKey::from_ec_pem(KEY_PEM)?;
    jsonwebtoken::encode(&header, &claims, &key)
}
