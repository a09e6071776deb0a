//! The configuration file as written: plain serde types that reject unknown
//! fields. Nothing here is trusted; [`super::Config::from_raw`] checks every
//! field and turns these into runtime types.

use serde::Deserialize;

/// The whole `warden.yaml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// The public listener that clients call.
    pub listen: RawListen,
    /// The operations listener: health, readiness, metrics.
    #[serde(default)]
    pub admin: RawAdmin,
    /// Where the per-request audit records go.
    pub audit: RawAudit,
    /// Model servers Warden forwards to.
    #[serde(default)]
    pub upstreams: Vec<RawUpstream>,
    /// Model endpoints clients may call, each bound to one upstream.
    #[serde(default)]
    pub models: Vec<RawModel>,
    /// API keys, declared by the SHA-256 of the key.
    #[serde(default)]
    pub api_keys: Vec<RawApiKey>,
    /// Where keys created at run time (`warden keys create`) are kept.
    #[serde(default)]
    pub key_store: Option<RawKeyStore>,
    /// JWT bearer tokens from trusted issuers.
    #[serde(default)]
    pub jwt: Option<RawJwt>,
    /// Opaque OAuth 2.0 bearer tokens, checked by RFC 7662 introspection.
    #[serde(default)]
    pub introspection: Option<RawIntrospection>,
    /// The policy engine that decides what callers may do.
    #[serde(default)]
    pub policy: Option<RawPolicy>,
    /// AWS IAM callers, by a signed `sts:GetCallerIdentity` request.
    #[serde(default)]
    pub aws: Option<RawAws>,
    /// Clients authenticated by their certificate (needs
    /// `listen.tls.client_ca_file`).
    #[serde(default)]
    pub mtls: Option<RawMtls>,
    /// Envoy's external authorization gRPC API, so that an Envoy or Istio
    /// mesh can ask Warden's policies about its own traffic.
    #[serde(default)]
    pub ext_authz: Option<RawExtAuthz>,
    /// Rate limits, budgets and fairness.
    #[serde(default)]
    pub limits: Option<RawLimits>,
}

/// RFC 7662 token introspection.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIntrospection {
    /// The introspection endpoint (https, or http on loopback).
    pub endpoint: String,
    /// Warden's client id at the authorization server.
    pub client_id: String,
    /// Warden's client secret, by reference.
    pub client_secret: RawSecret,
    /// When the answer has `aud`, it must name one of these.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Scopes every token must carry.
    #[serde(default)]
    pub required_scopes: Vec<String>,
    /// Longest an active answer is reused (never past the token's `exp`). Default `60s`.
    #[serde(default)]
    pub cache_ttl: Option<String>,
    /// How long an inactive answer is reused. Default `5s`.
    #[serde(default)]
    pub negative_cache_ttl: Option<String>,
    /// Time allowed for the endpoint to answer. Default `2s`.
    #[serde(default)]
    pub timeout: Option<String>,
    /// Member naming the tenant. Default `tenant`.
    #[serde(default)]
    pub tenant_claim: Option<String>,
    /// Member naming the tier, if any.
    #[serde(default)]
    pub tier_claim: Option<String>,
    /// Models these callers may call; `"*"` for all.
    #[serde(default)]
    pub models: Vec<String>,
}

/// The policy engine: exactly one of `cedar` or `opa`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    /// Embedded Cedar: policy and schema files.
    #[serde(default)]
    pub cedar: Option<RawCedar>,
    /// An external Open Policy Agent.
    #[serde(default)]
    pub opa: Option<RawOpa>,
    /// An external OpenID AuthZEN PDP.
    #[serde(default)]
    pub authzen: Option<RawAuthzen>,
}

/// An external AuthZEN PDP.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuthzen {
    /// Base URL; `/access/v1/evaluation` (one decision) and
    /// `/access/v1/evaluations` (a batch) are added (https, or http on loopback).
    pub url: String,
    /// Time allowed per decision; past it, deny. Default `500ms`.
    #[serde(default)]
    pub timeout: Option<String>,
    /// How long a decision is reused for the same request. Default `10s`.
    #[serde(default)]
    pub cache_ttl: Option<String>,
    /// Warden's own credential for the PDP, sent as `Authorization: Bearer
    /// …`; by reference (`{env: NAME}` or `{file: PATH}`), never inline.
    #[serde(default)]
    pub credential: Option<RawSecret>,
}

/// An external OPA server.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOpa {
    /// Base URL, e.g. `http://127.0.0.1:8181` (https, or http on loopback).
    pub url: String,
    /// The decision's path, e.g. `warden/allow`.
    pub path: String,
    /// Time allowed per decision; past it, deny. Default `500ms`.
    #[serde(default)]
    pub timeout: Option<String>,
    /// How long a decision is reused for the same request. Default `10s`.
    #[serde(default)]
    pub cache_ttl: Option<String>,
    /// Warden's own credential for the PDP, sent as `Authorization: Bearer
    /// …`; by reference (`{env: NAME}` or `{file: PATH}`), never inline.
    #[serde(default)]
    pub credential: Option<RawSecret>,
}

/// Cedar policy files.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCedar {
    /// The policies (`.cedar`).
    pub policies: String,
    /// The schema they are validated against (`.cedarschema`).
    pub schema: String,
    /// A candidate policy set (same schema) tried beside the active one on
    /// live traffic: its decisions are recorded and disagreements counted,
    /// never enforced.
    #[serde(default)]
    pub shadow_policies: Option<String>,
    /// Reload when the policy, schema or shadow file changes on disk, as
    /// SIGHUP would (a set that does not validate is refused and the active
    /// one stays). Default `true`.
    #[serde(default)]
    pub watch: Option<bool>,
}

/// AWS IAM authentication.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAws {
    /// STS endpoint the signed requests are for and forwarded to. Default
    /// `https://sts.amazonaws.com/`.
    #[serde(default)]
    pub sts_endpoint: Option<String>,
    /// This gateway's id: callers must sign it in `x-warden-server-id`, so a
    /// signed request made for another service cannot be replayed here.
    pub server_id: String,
    /// Known AWS principals (role ARNs, or user ARNs).
    pub principals: Vec<RawAwsPrincipal>,
}

/// One known AWS principal.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAwsPrincipal {
    /// `arn:aws:iam::<account>:role/<name>` (an assumed role's sessions
    /// count as the role) or `…:user/<name>`.
    pub arn: String,
    /// The tenant it acts for.
    pub tenant: String,
    /// Service tier.
    #[serde(default)]
    pub tier: Option<String>,
    /// Models it may call; `"*"` for all.
    pub models: Vec<String>,
}

/// mTLS client identities.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMtls {
    /// Which part of the certificate names the client: `spiffe` (URI SAN,
    /// the default), `dns` (first DNS SAN) or `cn` (subject CN).
    #[serde(default)]
    pub identity_from: Option<String>,
    /// Known clients; a verified certificate naming no one here is refused.
    pub clients: Vec<RawMtlsClient>,
}

/// One client known by its certificate.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMtlsClient {
    /// The identity, e.g. `spiffe://acme.example/ns/prod/sa/batch`.
    pub identity: String,
    /// The tenant it acts for.
    pub tenant: String,
    /// Service tier.
    #[serde(default)]
    pub tier: Option<String>,
    /// Models it may call; `"*"` for all.
    pub models: Vec<String>,
}

/// JWT authentication.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwt {
    /// Longest token accepted; longer ones are refused unread. Default `8KiB`.
    #[serde(default)]
    pub max_token_bytes: Option<RawSize>,
    /// Trusted issuers.
    pub issuers: Vec<RawIssuer>,
}

/// One trusted token issuer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIssuer {
    /// Defaults for a known identity provider: `google` (GCP service
    /// accounts and users), `azure` (Entra ID; needs `azure_tenant_id`) or
    /// `kubernetes` (projected service-account tokens; needs `issuer` and
    /// `jwks_url`). Fields set here override the preset's.
    #[serde(default)]
    pub preset: Option<String>,
    /// The Entra ID (Azure AD) tenant, for `preset: azure`.
    #[serde(default)]
    pub azure_tenant_id: Option<String>,
    /// The `iss` claim, exactly (the preset's when omitted).
    #[serde(default)]
    pub issuer: Option<String>,
    /// OpenID Connect discovery URL; its `issuer` must equal ours and its
    /// `jwks_uri` gives the keys.
    #[serde(default)]
    pub discovery_url: Option<String>,
    /// Claim (or JSON pointer, e.g. `/kubernetes.io/namespace`) naming the
    /// principal. Default: `<iss>#<sub>`.
    #[serde(default)]
    pub principal_claim: Option<String>,
    /// Tenant for every caller of this issuer, when tokens carry none.
    #[serde(default)]
    pub tenant: Option<String>,
    /// `user` or `service`: what its tokens stand for. Default `user`
    /// (`service` for the `kubernetes` preset).
    #[serde(default)]
    pub principal_kind: Option<String>,
    /// Claim (or JSON pointer) listing the caller's groups. Default `groups`.
    #[serde(default)]
    pub groups_claim: Option<String>,
    /// Accepted `aud` values; a token must name one.
    pub audiences: Vec<String>,
    /// Accepted algorithms. Default: RS256, PS256, ES256, EdDSA. HMAC
    /// (HS256/384/512) only with `hmac_secret`.
    #[serde(default)]
    pub algorithms: Option<Vec<String>>,
    /// JWKS URL to fetch keys from (refreshed on an unknown `kid`).
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// JWKS document on disk.
    #[serde(default)]
    pub jwks_file: Option<String>,
    /// HMAC secret, by reference; at least 32 bytes.
    #[serde(default)]
    pub hmac_secret: Option<RawSecret>,
    /// Required `typ` header, e.g. `at+jwt`.
    #[serde(default)]
    pub typ: Option<String>,
    /// Clock skew allowed on `exp`/`nbf`/`iat`. Default `30s`, at most `5m`.
    #[serde(default)]
    pub leeway: Option<String>,
    /// Fewest time between two JWKS fetches. Default `30s`.
    #[serde(default)]
    pub min_refresh_interval: Option<String>,
    /// Claim (or JSON pointer) naming the tenant. Default `tenant`.
    #[serde(default)]
    pub tenant_claim: Option<String>,
    /// Claim (or JSON pointer) naming the tier, if any.
    #[serde(default)]
    pub tier_claim: Option<String>,
    /// Models callers with this issuer's tokens may call; `"*"` for all.
    #[serde(default)]
    pub models: Vec<String>,
}

/// The store of managed API keys: exactly one of `sqlite` or `postgres`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeyStore {
    /// Path of a SQLite file (created if missing), for a single instance.
    #[serde(default)]
    pub sqlite: Option<String>,
    /// PostgreSQL URL, by reference (it may hold a password), for several
    /// instances sharing keys.
    #[serde(default)]
    pub postgres: Option<RawSecret>,
    /// How often each instance checks the store for changes; a revocation
    /// takes effect within about this long everywhere. Default `1s`.
    #[serde(default)]
    pub refresh_interval: Option<String>,
    /// How long a rotated key keeps working beside its replacement. Default `24h`.
    #[serde(default)]
    pub rotation_overlap: Option<String>,
}

/// The public listener and its limits.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    /// `host:port` to bind, e.g. `0.0.0.0:8443`.
    pub address: String,
    /// Serve TLS (HTTP/1.1 and HTTP/2 by ALPN) instead of plain HTTP/1.1 + h2c.
    #[serde(default)]
    pub tls: Option<RawTls>,
    /// Worker threads serving this listener, each with its own socket
    /// (`SO_REUSEPORT`); defaults to the number of CPUs.
    #[serde(default)]
    pub workers: Option<usize>,
    /// Open connections beyond this wait in the kernel's accept queue.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Largest request head (request line + headers) in bytes; larger gets 431.
    #[serde(default)]
    pub max_header_bytes: Option<RawSize>,
    /// Most headers in one request.
    #[serde(default)]
    pub max_headers: Option<usize>,
    /// A client must send its whole request head within this time, e.g. `10s`.
    #[serde(default)]
    pub header_read_timeout: Option<String>,
    /// A client must send its whole body within this time, e.g. `30s`.
    #[serde(default)]
    pub body_read_timeout: Option<String>,
    /// Largest request body accepted on any route; models may set less.
    #[serde(default)]
    pub max_body_bytes: Option<RawSize>,
    /// Deepest JSON nesting accepted in a request body.
    #[serde(default)]
    pub max_json_depth: Option<usize>,
    /// On SIGTERM/SIGINT, how long in-flight requests and streams may run on.
    #[serde(default)]
    pub shutdown_grace: Option<String>,
    /// Brute-force protection: after `max_failures` failed authentications
    /// within `window` from one address (or against one key id), further
    /// attempts get 429 until the window ends. Default 20 per `1m`.
    #[serde(default)]
    pub auth_failure_limit: Option<RawAuthFailureLimit>,
    /// Proxies (addresses or CIDR ranges) whose `X-Forwarded-For` or
    /// `Forwarded` header is believed; everyone else's is ignored.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Answer the OIP v2 `GET /v2/health/live|ready` routes without a credential
    /// (for orchestrator probes). Everything else always needs one.
    #[serde(default)]
    pub anonymous_health: bool,
}

/// Failed authentications allowed per window.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuthFailureLimit {
    /// Failures allowed in one window.
    pub max_failures: u32,
    /// The window, e.g. `1m`.
    pub window: String,
}

/// Certificate chain and private key, both PEM files.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// PEM file with the certificate chain, leaf first.
    pub cert_file: String,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
    /// PEM file of the CAs that sign client certificates (mTLS). Without
    /// it, client certificates are neither asked for nor accepted.
    #[serde(default)]
    pub client_ca_file: Option<String>,
    /// Refuse the TLS handshake without a valid client certificate. When
    /// false, a certificate is optional and routes decide (`require_mtls`).
    #[serde(default)]
    pub require_client_cert: bool,
}

/// The operations listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// `host:port`; loopback by default so metrics are not exposed by accident.
    #[serde(default = "default_admin_address")]
    pub address: String,
    /// Bearer token for the admin API (`/admin/v1/…`), by reference. Without
    /// it the admin API is off; health and metrics need no token.
    #[serde(default)]
    pub token: Option<RawSecret>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            address: default_admin_address(),
            token: None,
        }
    }
}

fn default_admin_address() -> String {
    "127.0.0.1:9090".to_owned()
}

/// The Envoy ext_authz gRPC listener (`envoy.service.auth.v3.Authorization`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExtAuthz {
    /// `host:port` of the gRPC listener (plain HTTP/2). Loopback by default:
    /// only the proxy that asks should reach it. Default `127.0.0.1:9191`.
    #[serde(default = "default_ext_authz_address")]
    pub listen: String,
    /// Accept the peer identity Envoy reports (`source.principal`, the
    /// SPIFFE ID of the client's verified certificate) for requests that
    /// carry no credential, looked up among the `mtls` clients. Whoever can
    /// reach the listener can claim any principal, so turn this on only when
    /// nothing but the proxy can. Default `false`: every request must carry a
    /// credential Warden verifies itself.
    #[serde(default)]
    pub trust_source_principal: bool,
}

fn default_ext_authz_address() -> String {
    "127.0.0.1:9191".to_owned()
}

/// The audit log.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    /// File the JSON lines are appended to; created if missing.
    pub file: String,
}

/// One model server.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// Name models refer to.
    pub name: String,
    /// Base URL, `http://` or `https://`, optionally with a path prefix.
    pub url: String,
    /// Credential Warden presents to the upstream; the caller's is never forwarded.
    #[serde(default)]
    pub credential: Option<RawSecret>,
    /// Header the credential goes in. `authorization` (the default) sends
    /// `Bearer <credential>`; any other header gets the credential as is.
    #[serde(default)]
    pub credential_header: Option<String>,
    /// Time allowed to open a TCP (and TLS) connection, e.g. `2s`.
    #[serde(default)]
    pub connect_timeout: Option<String>,
    /// Time allowed from sending the request to the response head.
    #[serde(default)]
    pub first_byte_timeout: Option<String>,
    /// Longest silence allowed between two pieces of a response body.
    #[serde(default)]
    pub idle_timeout: Option<String>,
    /// Largest non-streamed response body accepted from the upstream.
    #[serde(default)]
    pub max_response_bytes: Option<RawSize>,
}

/// A secret given by reference, never inline.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSecret {
    /// Name of an environment variable holding the secret.
    #[serde(default)]
    pub env: Option<String>,
    /// Path of a file holding the secret (surrounding whitespace is trimmed).
    #[serde(default)]
    pub file: Option<String>,
}

/// One model endpoint.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    /// The name clients use: the `model` field (OpenAI) or the path (OIP v2).
    pub name: String,
    /// `openai` or `oip_v2`.
    pub protocol: String,
    /// Name of the upstream serving it.
    pub upstream: String,
    /// Name the upstream knows the model by, when it differs.
    #[serde(default)]
    pub upstream_model: Option<String>,
    /// Largest request body for this model; at most `listen.max_body_bytes`.
    #[serde(default)]
    pub max_body_bytes: Option<RawSize>,
    /// Authentication methods this model accepts: any of `api_key`, `jwt`,
    /// `oauth`, `mtls`. Default: every configured method.
    #[serde(default)]
    pub auth: Option<Vec<String>>,
    /// Where the request names the tenant (data partition) it touches;
    /// requests without one are refused. Exactly one of `json_pointer`,
    /// `tensor` (OIP v2 input name) or `header` (believed only from mTLS
    /// services).
    #[serde(default)]
    pub tenant: Option<RawTenantSource>,
    /// Callers must present a verified client certificate of a known client,
    /// besides any token or key they send (both must then pass).
    #[serde(default)]
    pub require_mtls: bool,
    /// How valuable the model is, for policies to tell apart (Cedar's
    /// `resource.value_tier`): `standard` (the default) or `high`.
    #[serde(default)]
    pub value_tier: Option<String>,
    /// Tokenizer, prices, output reservation and capacity, for limits.
    #[serde(default)]
    pub limits: Option<RawModelLimits>,
    /// What requests to this model must look like before it sees them.
    #[serde(default)]
    pub validation: Option<RawValidation>,
    /// Content policy on what the model answers (PII, secrets, deny terms).
    #[serde(default)]
    pub output: Option<RawOutput>,
}

/// Output content policy for one model (`models[].output`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutput {
    /// Detector name → action (`flag`, `redact` or `block`); detectors not
    /// listed are off (`route` is not available yet). Names: `email`,
    /// `phone`, `card`, `us_ssn`, `iban`, `ip`, `aws_access_key_id`, `aws_secret_key`,
    /// `private_key`, `jwt`, `github_token`, `slack_token`, `stripe_key`,
    /// `openai_key`, `connection_string`, `credential`.
    #[serde(default)]
    pub detectors: std::collections::BTreeMap<String, String>,
    /// Terms that must not appear in an answer (ASCII case-insensitive,
    /// whole words).
    #[serde(default)]
    pub deny_terms: Vec<String>,
    /// The action for deny terms; default `redact`.
    #[serde(default)]
    pub deny_action: Option<String>,
}

/// Input validation for one model (`models[].validation`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawValidation {
    /// Prompt plus `max_tokens` may not exceed this many tokens (counted
    /// with `limits.tokenizer`); 400 `context_length_exceeded` otherwise.
    #[serde(default)]
    pub context_window: Option<u64>,
    /// Caps and forbidden parameters.
    #[serde(default)]
    pub params: Option<RawParamPolicy>,
    /// A JSON Schema file every request body must satisfy (custom JSON models).
    #[serde(default)]
    pub schema: Option<String>,
    /// Prompt-injection detection on every text the model would read.
    #[serde(default)]
    pub injection: Option<RawInjection>,
    /// Out-of-distribution detection for a tabular (OIP v2) model.
    #[serde(default)]
    pub profile: Option<RawProfile>,
    /// What an OIP v2 inference request must carry: the model's metadata
    /// (input names, datatypes, shapes), written here or fetched once from
    /// the upstream, and the most rows per request.
    #[serde(default)]
    pub metadata: Option<RawMetadata>,
}

/// An OIP v2 model's metadata (`models[].validation.metadata`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetadata {
    /// Read the metadata from the upstream's `GET /v2/models/{name}` on
    /// first use instead of from `inputs`/`outputs`.
    #[serde(default)]
    pub fetch: bool,
    /// The inputs every request must carry.
    #[serde(default)]
    pub inputs: Option<Vec<RawTensor>>,
    /// The outputs a request may ask for.
    #[serde(default)]
    pub outputs: Vec<RawTensor>,
    /// The most rows (batch size) one request may carry.
    #[serde(default)]
    pub max_rows: Option<u64>,
}

/// One tensor of a model's metadata, as the protocol writes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTensor {
    /// The tensor's name.
    pub name: String,
    /// `BOOL`, `INT8`…`INT64`, `UINT8`…`UINT64`, `FP16`, `FP32`, `FP64` or `BYTES`.
    pub datatype: String,
    /// Its shape; `-1` is a variable dimension (the batch, usually).
    pub shape: Vec<i64>,
}

/// A tabular model's feature profile and what to do with rows outside it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProfile {
    /// The profile (`warden profile build`), relative to this file.
    pub file: String,
    /// `block` (400), `flag` (recorded only) or `route` (sent to
    /// `route_to` instead). Default `block`.
    #[serde(default)]
    pub action: Option<String>,
    /// The upstream that reviews out-of-profile requests, with `route`.
    #[serde(default)]
    pub route_to: Option<String>,
    /// Overrides the profile's distance threshold.
    #[serde(default)]
    pub threshold: Option<f64>,
}

/// Per-model parameter policy.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawParamPolicy {
    /// Largest `max_tokens` / `max_completion_tokens`.
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// Largest `n`.
    #[serde(default)]
    pub max_n: Option<u64>,
    /// Most `tools`.
    #[serde(default)]
    pub max_tools: Option<usize>,
    /// Most `messages`.
    #[serde(default)]
    pub max_messages: Option<usize>,
    /// Parameters refused when set, e.g. `[logprobs, top_logprobs]`.
    #[serde(default)]
    pub forbidden: Vec<String>,
    /// `response_format.type`s allowed, e.g. `[text, json_object]`.
    #[serde(default)]
    pub response_formats: Option<Vec<String>>,
}

/// Prompt-injection detection settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInjection {
    /// `block` (400) or `flag` (recorded only). Default `block`.
    #[serde(default)]
    pub action: Option<String>,
    /// Classifier score from which a text is an injection (0–1); default
    /// the shipped model's calibrated threshold.
    #[serde(default)]
    pub threshold: Option<f32>,
    /// An external detector asked after the local checks pass; `action`
    /// applies to its verdict too.
    #[serde(default)]
    pub external: Option<RawExternalDetector>,
}

/// An external prompt-injection detector
/// (`models[].validation.injection.external`; see
/// [`crate::validate::external`]).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExternalDetector {
    /// `lakera` (Lakera Guard v2) or `llm_guard` (the LLM Guard API). Required.
    #[serde(default)]
    pub kind: Option<String>,
    /// Lakera: the endpoint, e.g. `https://api.lakera.ai/v2/guard`; LLM
    /// Guard: the base URL (`/analyze/prompt` is added). https, or http on
    /// loopback. Required.
    #[serde(default)]
    pub url: Option<String>,
    /// Warden's key for the detector, sent as `Authorization: Bearer …`;
    /// by reference (`{env: NAME}` or `{file: PATH}`), never inline.
    /// Required for `lakera`.
    #[serde(default)]
    pub api_key: Option<RawSecret>,
    /// Time allowed for the detector's answer. Default `500ms`.
    #[serde(default)]
    pub timeout: Option<String>,
    /// Without a usable answer: `closed` (refuse, 503; the default) or
    /// `open` (let the request through, the error recorded).
    #[serde(default)]
    pub fail: Option<String>,
}

/// Where a request names its tenant.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTenantSource {
    /// A JSON pointer into the body, e.g. `/metadata/merchant_id`.
    #[serde(default)]
    pub json_pointer: Option<String>,
    /// An OIP v2 input tensor by name: one tenant per row.
    #[serde(default)]
    pub tensor: Option<String>,
    /// A header, believed only from callers with a known client certificate.
    #[serde(default)]
    pub header: Option<String>,
}

/// One API key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApiKey {
    /// Key id: recorded in the audit log instead of the key.
    pub id: String,
    /// Lowercase hex SHA-256 of the key (`printf %s "$KEY" | sha256sum`).
    pub sha256: String,
    /// Who the key belongs to.
    pub principal: String,
    /// The tenant (data partition) the key acts for.
    pub tenant: String,
    /// Service tier, e.g. `free`, `pro`, `enterprise`.
    #[serde(default)]
    pub tier: Option<String>,
    /// Models the key may call; `"*"` means every model.
    pub models: Vec<String>,
}

/// A size: a number of bytes, or a string such as `64KiB` or `1MiB`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawSize {
    /// Plain bytes.
    Bytes(u64),
    /// With a unit suffix.
    Text(String),
}

/// Rate limits, budgets and their store (`limits:`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Where limit state lives: `memory` (the default: per instance) or
    /// `redis` (shared by every instance using the same Redis and prefix).
    #[serde(default)]
    pub store: Option<String>,
    /// The Redis store, when `store: redis`.
    #[serde(default)]
    pub redis: Option<RawLimitsRedis>,
    /// Time zone of calendar budgets that do not name one (IANA name, e.g.
    /// `Europe/Paris`). Default `UTC`.
    #[serde(default)]
    pub time_zone: Option<String>,
    /// Requests to `value_tier: high` models count each rule at this
    /// fraction of its limit, separately per model, unless the rule says
    /// `high_value: unscaled`. Default `0.25`.
    #[serde(default)]
    pub high_value_factor: Option<f64>,
    /// Send the IETF `RateLimit-Policy` and `RateLimit` fields besides
    /// OpenAI's `x-ratelimit-*` headers. Default `false`.
    #[serde(default)]
    pub ietf_headers: bool,
    /// Service tiers: their fair-queuing weight and their own rules.
    #[serde(default)]
    pub tiers: std::collections::BTreeMap<String, RawTier>,
    /// Rules that apply to every tier (or to those a rule names).
    #[serde(default)]
    pub rules: Vec<RawRule>,
}

/// The Redis limit store.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimitsRedis {
    /// `redis://host:port/db`.
    pub url: String,
    /// Key prefix (a Redis Cluster hash tag). Default `warden`.
    #[serde(default)]
    pub prefix: Option<String>,
    /// How many Warden instances share the store: rules whose fail mode is
    /// `local` enforce 1/instances of their limit per instance while Redis
    /// cannot be reached. Default `1`.
    #[serde(default)]
    pub instances: Option<u32>,
    /// Time allowed for one decision; past it Redis counts as unreachable.
    /// Default `50ms`.
    #[serde(default)]
    pub timeout: Option<String>,
}

/// A service tier.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTier {
    /// Share of a saturated model's capacity relative to other tiers'
    /// tenants. Default `1`.
    #[serde(default)]
    pub weight: Option<u32>,
    /// Rules for callers of this tier only.
    #[serde(default)]
    pub rules: Vec<RawRule>,
}

/// One limit rule: a key, a unit and exactly one of `rate`, `budget` or
/// `concurrency`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    /// Unique name, shown in headers, errors, metrics and the audit record.
    pub name: String,
    /// What is counted apart: any of `principal`, `api_key`, `client_ip`,
    /// `tenant`, `model`, `tier`; or `[global]` for one count for all.
    pub key: Vec<String>,
    /// `requests` (the default), `input_tokens`, `output_tokens`,
    /// `total_tokens`, `compute_seconds` or `dollars`.
    #[serde(default)]
    pub unit: Option<String>,
    /// A GCRA rate: `AMOUNT/PERIOD`, e.g. `60/min`, `100000/day`, `$1/hour`,
    /// `10/30s`.
    #[serde(default)]
    pub rate: Option<String>,
    /// The most a rate admits at once. Default: one period's amount.
    #[serde(default)]
    pub burst: Option<String>,
    /// A calendar budget: the amount per `per` window, e.g. `$5` or `200000`.
    #[serde(default)]
    pub budget: Option<String>,
    /// The budget's window: `hour`, `day` or `month`.
    #[serde(default)]
    pub per: Option<String>,
    /// The budget's time zone; default `limits.time_zone`.
    #[serde(default)]
    pub time_zone: Option<String>,
    /// A concurrency cap: at most this many requests in flight.
    #[serde(default)]
    pub concurrency: Option<u64>,
    /// Only requests to these models.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// Only callers of these tiers.
    #[serde(default)]
    pub tiers: Option<Vec<String>>,
    /// When the Redis store cannot be reached: `deny`, or `local`
    /// (per-instance share). Default `deny` for dollars, `local` otherwise.
    #[serde(default)]
    pub fail: Option<String>,
    /// `scaled` (the default: `limits.high_value_factor` on high-value
    /// models) or `unscaled`.
    #[serde(default)]
    pub high_value: Option<String>,
}

/// Per-model limit settings (`models[].limits`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModelLimits {
    /// The tokenizer input tokens are counted with: `o200k_base`,
    /// `cl100k_base`, or `{file: tokenizer.json}`. Default `o200k_base`.
    #[serde(default)]
    pub tokenizer: Option<RawTokenizer>,
    /// Prices in dollars: per million tokens, or per compute second.
    #[serde(default)]
    pub prices: Option<RawPrices>,
    /// Output tokens reserved when the request sets no `max_tokens`;
    /// Warden then sets it, so the upstream stops there. Default `4096`.
    #[serde(default)]
    pub default_max_tokens: Option<u64>,
    /// Which field Warden writes: `max_tokens` (default) or
    /// `max_completion_tokens`.
    #[serde(default)]
    pub max_tokens_field: Option<String>,
    /// Compute time reserved per request before its real duration is
    /// known (predictive models). Default `1s`.
    #[serde(default)]
    pub compute_estimate: Option<String>,
    /// Concurrency capacity of the endpoint, with its fair queue.
    #[serde(default)]
    pub capacity: Option<RawCapacity>,
}

/// A tokenizer reference.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawTokenizer {
    /// A built-in encoding name.
    Name(String),
    /// A Hugging Face `tokenizer.json`.
    File {
        /// Path, relative to the configuration file.
        file: String,
    },
}

/// A model's prices, as decimal dollar strings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrices {
    /// Per million input tokens.
    #[serde(default)]
    pub input: Option<String>,
    /// Per million cached input tokens. Default: the input price.
    #[serde(default)]
    pub cached_input: Option<String>,
    /// Per million output tokens.
    #[serde(default)]
    pub output: Option<String>,
    /// Per second of compute.
    #[serde(default)]
    pub compute_second: Option<String>,
}

/// A model endpoint's concurrency capacity and wait queue.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCapacity {
    /// Requests in flight to the upstream at once.
    pub concurrency: usize,
    /// Requests that may wait for a slot. Default `4 × concurrency`.
    #[serde(default)]
    pub queue: Option<usize>,
    /// Longest wait. Default `5s`.
    #[serde(default)]
    pub queue_timeout: Option<String>,
    /// Status for a full queue or a wait that timed out: `429` (default) or
    /// `503`.
    #[serde(default)]
    pub status: Option<u16>,
}
