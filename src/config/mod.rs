//! Configuration: the YAML file is parsed into [`raw`] types, then checked and
//! converted into the runtime types below, which cannot hold a wrong value.
//! Every error is collected with its path so `warden check` can report them all
//! at once. Secrets are read here, from environment variables or files, and are
//! never written inline in the file.

mod limits;
pub mod raw;
mod validation;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};
use raw::{RawConfig, RawSecret, RawSize};
use sha2::Digest;

/// Every error found in one configuration file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// One configuration error and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the field, e.g. `models[2].upstream`.
    pub path: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// The checked configuration the gateway runs on.
#[derive(Debug)]
pub struct Config {
    /// The public listener.
    pub listen: Listen,
    /// The operations listener address.
    pub admin_address: SocketAddr,
    /// SHA-256 of the admin API token; the admin API is off without one.
    pub admin_token_sha256: Option<[u8; 32]>,
    /// Audit log file.
    pub audit_file: PathBuf,
    /// Model endpoints by the name clients use.
    pub models: HashMap<String, Arc<ModelEndpoint>>,
    /// API keys.
    pub api_keys: Vec<ApiKey>,
    /// The managed-key store, if keys are managed at run time.
    pub key_store: Option<KeyStoreConfig>,
    /// JWT issuers, if JWT bearer tokens are accepted.
    pub jwt: Option<JwtConfig>,
    /// Clients known by their certificate.
    pub mtls: Option<MtlsConfig>,
    /// Opaque-token introspection.
    pub introspection: Option<IntrospectionConfig>,
    /// AWS IAM callers.
    pub aws: Option<AwsConfig>,
    /// The embedded policy engine, validated.
    pub policy: Option<Arc<crate::authz::cedar::CedarPdp>>,
    /// The active policy file, for the version history and rollback.
    pub policy_file: Option<PathBuf>,
    /// The files whose change on disk reloads the configuration (the Cedar
    /// policies, schema and shadow policies); empty when not watched.
    pub policy_watch: Vec<PathBuf>,
    /// An external OPA, when it is the policy engine.
    pub opa: Option<Arc<crate::authz::opa::OpaPdp>>,
    /// An external AuthZEN PDP, when it is the policy engine.
    pub authzen: Option<Arc<crate::authz::authzen::AuthzenPdp>>,
    /// The Envoy ext_authz gRPC listener, when one is configured.
    pub ext_authz: Option<ExtAuthzConfig>,
    /// Rate limits, budgets and fairness; `None` when there is no `limits:`
    /// section, and then the stage costs nothing.
    pub limits: Option<Arc<crate::limits::rules::LimitsConfig>>,
}

/// The Envoy ext_authz gRPC listener, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtAuthzConfig {
    /// Where it listens.
    pub address: SocketAddr,
    /// Whether a request without a credential may be known by the peer
    /// identity Envoy reports, looked up among the `mtls` clients.
    pub trust_source_principal: bool,
}

/// AWS IAM authentication, checked.
#[derive(Debug, Clone)]
pub struct AwsConfig {
    /// STS endpoint.
    pub sts_endpoint: String,
    /// This gateway's id.
    pub server_id: String,
    /// Known principals by ARN.
    pub principals: HashMap<String, Arc<ApiKey>>,
}

/// RFC 7662 introspection settings, checked.
#[derive(Clone)]
pub struct IntrospectionConfig {
    /// Endpoint URL.
    pub endpoint: String,
    /// Warden's client id.
    pub client_id: String,
    /// Warden's client secret.
    pub client_secret: String,
    /// Accepted audiences.
    pub audiences: Vec<String>,
    /// Required scopes.
    pub required_scopes: Vec<String>,
    /// Longest reuse of an active answer.
    pub cache_ttl: Duration,
    /// Reuse of an inactive answer.
    pub negative_cache_ttl: Duration,
    /// Endpoint timeout.
    pub timeout: Duration,
    /// Member naming the tenant.
    pub tenant_claim: String,
    /// Member naming the tier.
    pub tier_claim: Option<String>,
    /// Models these callers may call.
    pub models: ModelGrant,
}

impl fmt::Debug for IntrospectionConfig {
    // INVARIANT: the client secret never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IntrospectionConfig")
            .field("endpoint", &self.endpoint)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

/// Clients known by their certificate.
#[derive(Debug, Clone)]
pub struct MtlsConfig {
    /// Which part of a certificate names its holder.
    pub identity_from: crate::authn::mtls::IdentitySource,
    /// Known clients by identity.
    pub clients: HashMap<String, Arc<ApiKey>>,
}

/// JWT authentication settings.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    /// Longest token accepted.
    pub max_token_bytes: usize,
    /// Trusted issuers.
    pub issuers: Vec<IssuerConfig>,
}

/// One trusted issuer, checked.
#[derive(Clone)]
pub struct IssuerConfig {
    /// `iss`.
    pub issuer: String,
    /// Accepted audiences.
    pub audiences: Vec<String>,
    /// Accepted algorithms.
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    /// Required `typ`.
    pub typ: Option<String>,
    /// Leeway in seconds.
    pub leeway: i64,
    /// JWKS URL, if keys are fetched.
    pub jwks_url: Option<String>,
    /// OpenID Connect discovery URL, if keys are found through it.
    pub discovery_url: Option<String>,
    /// Claim naming the principal; `None` means `<iss>#<sub>`.
    pub principal_claim: Option<String>,
    /// What kind of principal its tokens stand for.
    pub kind: PrincipalKind,
    /// Claim (or JSON pointer) listing the caller's groups.
    pub groups_claim: String,
    /// Tenant for callers whose token names none.
    pub tenant: Option<String>,
    /// Keys given in the configuration (JWKS file, HMAC secret).
    pub static_keys: Vec<crate::authn::jwt::VerificationKey>,
    /// Fewest time between JWKS fetches.
    pub min_refresh_interval: Duration,
    /// Claim naming the tenant.
    pub tenant_claim: String,
    /// Claim naming the tier.
    pub tier_claim: Option<String>,
    /// Models its callers may call.
    pub models: ModelGrant,
}

impl fmt::Debug for IssuerConfig {
    // INVARIANT: an HMAC secret never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuerConfig")
            .field("issuer", &self.issuer)
            .field("audiences", &self.audiences)
            .finish_non_exhaustive()
    }
}

/// Where managed keys live and how fast changes spread.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyStoreConfig {
    /// `sqlite://PATH` or a PostgreSQL URL (which may hold a password).
    pub url: String,
    /// How often the store is polled for changes.
    pub refresh_interval: Duration,
    /// How long a rotated key keeps working.
    pub rotation_overlap: Duration,
}

impl fmt::Debug for KeyStoreConfig {
    // INVARIANT: a database password never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.url.starts_with("sqlite:") {
            "sqlite"
        } else {
            "postgres"
        };
        f.debug_struct("KeyStoreConfig")
            .field("kind", &kind)
            .field("refresh_interval", &self.refresh_interval)
            .finish_non_exhaustive()
    }
}

/// The public listener.
#[derive(Debug)]
pub struct Listen {
    /// Address to bind.
    pub address: SocketAddr,
    /// TLS, when configured; ALPN offers h2 and http/1.1.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Connection and request limits.
    pub limits: ListenLimits,
    /// How long in-flight requests may run on after SIGTERM/SIGINT.
    pub shutdown_grace: Duration,
    /// Worker threads, each with its own socket and upstream pools.
    pub workers: usize,
    /// Whether OIP v2 health routes are answered without a credential.
    pub anonymous_health: bool,
    /// Proxies whose forwarded-address headers are believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Failed authentications allowed per source per window.
    pub auth_failure_limit: (u32, Duration),
}

/// Limits every request on the public listener is held to.
#[derive(Debug, Clone)]
pub struct ListenLimits {
    /// Most open connections at once.
    pub max_connections: usize,
    /// Largest request head in bytes.
    pub max_header_bytes: usize,
    /// Most headers in one request.
    pub max_headers: usize,
    /// Time to receive the request head.
    pub header_read_timeout: Duration,
    /// Time to receive the whole body.
    pub body_read_timeout: Duration,
    /// Largest body on any route.
    pub max_body_bytes: usize,
    /// Deepest JSON nesting.
    pub max_json_depth: usize,
}

/// The wire protocol of a model endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// OpenAI-compatible: `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`.
    Openai,
    /// Open Inference Protocol v2 (KServe, Triton, MLServer).
    OipV2,
}

impl Protocol {
    /// The name used in configuration and audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Openai => "openai",
            Protocol::OipV2 => "oip_v2",
        }
    }
}

/// How valuable a model is: what policies use to keep some models (a
/// fraud scorer, a fine-tuned model that is expensive to extract) for some
/// callers. A closed set, so that a misspelt tier is a configuration error
/// rather than a model silently treated as `standard`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueTier {
    /// The default.
    #[default]
    Standard,
    /// Worth restricting.
    High,
}

impl ValueTier {
    /// The name used in configuration and sent to policy engines.
    pub fn as_str(self) -> &'static str {
        match self {
            ValueTier::Standard => "standard",
            ValueTier::High => "high",
        }
    }
}

/// A model clients may call.
#[derive(Debug)]
pub struct ModelEndpoint {
    /// Name clients use.
    pub name: String,
    /// Wire protocol.
    pub protocol: Protocol,
    /// How valuable it is (`models[].value_tier`), for policies.
    pub value_tier: ValueTier,
    /// Where it is served.
    pub upstream: Arc<Upstream>,
    /// Name the upstream knows it by.
    pub upstream_model: String,
    /// Largest request body for this model.
    pub max_body_bytes: usize,
    /// Callers need a verified, known client certificate.
    pub require_mtls: bool,
    /// Where requests name their tenant, if the model is partitioned.
    pub tenant: Option<TenantSource>,
    /// Authentication methods accepted; `None` means all.
    pub auth_methods: Option<Vec<crate::authn::AuthMethod>>,
    /// How its requests are counted and priced for limits.
    pub limits: crate::limits::rules::ModelLimits,
    /// What its requests must look like.
    pub validation: crate::validate::stage::ModelValidation,
    /// Content policy on its answers, when one is configured.
    pub output: Option<Arc<crate::output::ContentScanner>>,
}

/// Where a request names the tenant it touches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantSource {
    /// A JSON pointer into the body.
    JsonPointer(String),
    /// An OIP v2 input tensor, one tenant per row.
    Tensor(String),
    /// A header, from mTLS services only.
    Header(HeaderName),
}

/// A model server.
#[derive(Debug)]
pub struct Upstream {
    /// Name in configuration.
    pub name: String,
    /// `http` or `https`.
    pub scheme: http::uri::Scheme,
    /// Host and port.
    pub authority: http::uri::Authority,
    /// Path prefix prepended to every forwarded path, without a trailing `/`.
    pub path_prefix: String,
    /// Credential Warden presents to it.
    pub credential: Option<UpstreamCredential>,
    /// Time to connect.
    pub connect_timeout: Duration,
    /// Time to the response head.
    pub first_byte_timeout: Duration,
    /// Longest silence within a response body.
    pub idle_timeout: Duration,
    /// Largest non-streamed response body.
    pub max_response_bytes: usize,
}

/// A header carrying Warden's own credential to an upstream.
pub struct UpstreamCredential {
    /// Header name.
    pub header: HeaderName,
    /// Header value, marked sensitive so HPACK never indexes it.
    pub value: HeaderValue,
}

impl fmt::Debug for UpstreamCredential {
    // INVARIANT: the credential never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UpstreamCredential({}: [redacted])", self.header)
    }
}

/// Who a credential stands for: the same shape whatever proved it (an API
/// key, a token, a certificate, an AWS signature), so that policies and
/// limits read one thing. For API keys it also holds the key's SHA-256.
#[derive(Clone, Default)]
pub struct ApiKey {
    /// Credential id, safe to log (key id, token fingerprint, ARN, …).
    pub id: String,
    /// SHA-256 of the key (API keys only).
    pub digest: [u8; 32],
    /// Who it is.
    pub principal: String,
    /// What kind of principal.
    pub kind: PrincipalKind,
    /// The tenant it acts for by default.
    pub tenant: String,
    /// Every tenant it may act for (the default first).
    pub tenants: Vec<String>,
    /// Service tier.
    pub tier: Option<String>,
    /// Scopes granted.
    pub scopes: Vec<String>,
    /// Groups it belongs to.
    pub groups: Vec<String>,
    /// Models it may call.
    pub models: ModelGrant,
    /// Further attributes for policies: token claims, certificate fields,
    /// the AWS account.
    pub attributes: serde_json::Map<String, serde_json::Value>,
}

/// The kind of a principal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PrincipalKind {
    /// A person.
    User,
    /// A workload.
    Service,
    /// An API key (whoever holds it).
    #[default]
    Key,
}

impl PrincipalKind {
    /// The name in audit records and policies.
    pub fn as_str(self) -> &'static str {
        match self {
            PrincipalKind::User => "user",
            PrincipalKind::Service => "service",
            PrincipalKind::Key => "key",
        }
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("id", &self.id)
            .field("principal", &self.principal)
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

/// The models a credential may call.
#[derive(Debug, Clone)]
pub enum ModelGrant {
    /// Every configured model.
    All,
    /// Only these.
    Only(HashSet<String>),
}

impl Default for ModelGrant {
    /// Default deny: no model.
    fn default() -> Self {
        ModelGrant::Only(HashSet::new())
    }
}

impl ModelGrant {
    /// Whether the grant covers `model`.
    pub fn allows(&self, model: &str) -> bool {
        match self {
            ModelGrant::All => true,
            ModelGrant::Only(set) => set.contains(model),
        }
    }
}

const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
const DEFAULT_MAX_HEADERS: usize = 100;
const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
const DEFAULT_MAX_JSON_DEPTH: usize = 32;
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

impl Config {
    /// Reads, parses and checks a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: path.display().to_string(),
                message: format!("cannot read file: {e}"),
            }])
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, base)
    }

    /// Parses and checks configuration text. Relative file paths in it are
    /// resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Config, ConfigErrors> {
        let raw: RawConfig = serde_saphyr::from_str(text).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: "(yaml)".to_owned(),
                message: e.to_string(),
            }])
        })?;
        Config::from_raw(raw, base)
    }

    /// Checks raw configuration, collecting every error.
    pub fn from_raw(raw: RawConfig, base: &Path) -> Result<Config, ConfigErrors> {
        let mut errs = Errors::default();
        let listen = check_listen(&raw.listen, base, &mut errs);
        let admin_address = errs.socket_addr("admin.address", &raw.admin.address);
        // Only the digest is kept: the token itself is dropped here.
        let admin_token_sha256 = raw.admin.token.as_ref().and_then(|t| {
            let token = read_secret(t, "admin.token", base, &mut errs)?;
            if token.len() < 32 {
                errs.push("admin.token", "must be at least 32 characters");
                return None;
            }
            Some(<[u8; 32]>::from(sha2::Sha256::digest(token.as_bytes())))
        });
        let audit_file = if raw.audit.file.trim().is_empty() {
            errs.push("audit.file", "must name a file");
            None
        } else {
            Some(resolve(base, &raw.audit.file))
        };

        let mut upstreams: HashMap<String, Arc<Upstream>> = HashMap::new();
        for (i, u) in raw.upstreams.iter().enumerate() {
            let path = format!("upstreams[{i}]");
            if let Some(up) = check_upstream(u, &path, base, &mut errs)
                && upstreams.insert(up.name.clone(), Arc::new(up)).is_some()
            {
                errs.push(&format!("{path}.name"), format!("duplicate upstream `{}`", u.name));
            }
        }

        // Names declared in the file, valid or not: a reference to a declared
        // but broken entry is not reported again, so every error shows once.
        let declared_upstreams: HashSet<&str> = raw.upstreams.iter().map(|u| u.name.as_str()).collect();
        let declared_models: HashSet<&str> = raw.models.iter().map(|m| m.name.as_str()).collect();

        let max_body_cap = listen
            .as_ref()
            .map_or(DEFAULT_MAX_BODY_BYTES, |l| l.limits.max_body_bytes);
        let mut models = HashMap::new();
        for (i, m) in raw.models.iter().enumerate() {
            let path = format!("models[{i}]");
            if let Some(model) = check_model(m, &path, base, &upstreams, &declared_upstreams, max_body_cap, &mut errs)
                && models.insert(model.name.clone(), Arc::new(model)).is_some()
            {
                errs.push(&format!("{path}.name"), format!("duplicate model `{}`", m.name));
            }
        }

        let mut api_keys = Vec::new();
        let mut key_ids = HashSet::new();
        let mut digests = HashSet::new();
        for (i, k) in raw.api_keys.iter().enumerate() {
            let path = format!("api_keys[{i}]");
            if let Some(key) = check_api_key(k, &path, &declared_models, &mut errs) {
                if !key_ids.insert(key.id.clone()) {
                    errs.push(&format!("{path}.id"), format!("duplicate key id `{}`", key.id));
                }
                if !digests.insert(key.digest) {
                    errs.push(&format!("{path}.sha256"), "the same key is declared twice");
                }
                api_keys.push(key);
            }
        }

        let key_store = raw.key_store.as_ref().and_then(|k| check_key_store(k, base, &mut errs));
        let jwt = raw
            .jwt
            .as_ref()
            .map(|j| check_jwt(j, base, &declared_models, &mut errs));
        let client_ca = raw.listen.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some());
        let mtls = raw.mtls.as_ref().map(|m| check_mtls(m, &declared_models, &mut errs));
        let introspection = raw
            .introspection
            .as_ref()
            .and_then(|i| check_introspection(i, base, &declared_models, &mut errs));
        let aws = raw.aws.as_ref().map(|a| check_aws(a, &declared_models, &mut errs));
        let policy = raw.policy.as_ref().and_then(|p| p.cedar.as_ref()).and_then(|cedar| {
            let read = |field: &str, file: &str, errs: &mut Errors| {
                let file = resolve(base, file);
                std::fs::read_to_string(&file)
                    .map_err(|e| {
                        errs.push(
                            &format!("policy.cedar.{field}"),
                            format!("cannot read `{}`: {e}", file.display()),
                        )
                    })
                    .ok()
            };
            let policies = read("policies", &cedar.policies, &mut errs);
            let schema = read("schema", &cedar.schema, &mut errs);
            let shadow = cedar
                .shadow_policies
                .as_ref()
                .map(|file| read("shadow_policies", file, &mut errs));
            let schema = schema?;
            let mut build = |text: &str, field: &str| match crate::authz::cedar::CedarPdp::new(text, &schema) {
                Ok(pdp) => Some(pdp),
                Err(problems) => {
                    for problem in problems {
                        errs.push(field, problem);
                    }
                    None
                }
            };
            let active = build(&policies?, "policy.cedar");
            let candidate = match shadow {
                Some(text) => Some(build(&text?, "policy.cedar.shadow_policies")?),
                None => None,
            };
            let active = active?;
            Some(Arc::new(match candidate {
                Some(c) => active.with_shadow(c),
                None => active,
            }))
        });
        let opa = raw.policy.as_ref().and_then(|p| p.opa.as_ref()).map(|o| {
            if !fetchable(&o.url) {
                errs.push("policy.opa.url", "must be https:// (plain http only on loopback)");
            }
            let timeout = errs.duration("policy.opa.timeout", o.timeout.as_deref(), Duration::from_millis(500));
            let ttl = errs.duration("policy.opa.cache_ttl", o.cache_ttl.as_deref(), Duration::from_secs(10));
            let credential = pdp_credential(o.credential.as_ref(), "policy.opa.credential", base, &mut errs);
            Arc::new(crate::authz::opa::OpaPdp::new(
                &o.url, &o.path, timeout, ttl, credential,
            ))
        });
        let authzen = raw.policy.as_ref().and_then(|p| p.authzen.as_ref()).map(|a| {
            if !fetchable(&a.url) {
                errs.push("policy.authzen.url", "must be https:// (plain http only on loopback)");
            }
            let timeout = errs.duration(
                "policy.authzen.timeout",
                a.timeout.as_deref(),
                Duration::from_millis(500),
            );
            let ttl = errs.duration(
                "policy.authzen.cache_ttl",
                a.cache_ttl.as_deref(),
                Duration::from_secs(10),
            );
            let credential = pdp_credential(a.credential.as_ref(), "policy.authzen.credential", base, &mut errs);
            Arc::new(crate::authz::authzen::AuthzenPdp::new(&a.url, timeout, ttl, credential))
        });
        if let Some(p) = &raw.policy {
            let engines =
                usize::from(p.cedar.is_some()) + usize::from(p.opa.is_some()) + usize::from(p.authzen.is_some());
            if engines != 1 {
                errs.push("policy", "give exactly one of `cedar`, `opa` or `authzen`");
            }
        }
        let ext_authz = raw.ext_authz.as_ref().and_then(|e| {
            if e.trust_source_principal && raw.mtls.is_none() {
                errs.push(
                    "ext_authz.trust_source_principal",
                    "needs an `mtls` section with its clients",
                );
            }
            Some(ExtAuthzConfig {
                address: errs.socket_addr("ext_authz.listen", &e.listen)?,
                trust_source_principal: e.trust_source_principal,
            })
        });
        let limits = raw
            .limits
            .as_ref()
            .map(|l| Arc::new(limits::check_limits(l, &declared_models, &mut errs)));
        if mtls.is_some() && !client_ca {
            errs.push(
                "mtls",
                "needs `listen.tls.client_ca_file` to verify client certificates",
            );
        }
        for (i, m) in raw.models.iter().enumerate() {
            if m.require_mtls && mtls.is_none() {
                errs.push(
                    &format!("models[{i}].require_mtls"),
                    "needs an `mtls` section with its clients",
                );
            }
        }

        match (listen, admin_address, audit_file) {
            (Some(listen), Some(admin_address), Some(audit_file)) if errs.0.is_empty() => Ok(Config {
                listen,
                admin_address,
                admin_token_sha256,
                audit_file,
                models,
                api_keys,
                key_store,
                jwt,
                mtls,
                introspection,
                aws,
                policy,
                policy_file: raw
                    .policy
                    .as_ref()
                    .and_then(|p| p.cedar.as_ref())
                    .map(|c| resolve(base, &c.policies)),
                policy_watch: raw
                    .policy
                    .as_ref()
                    .and_then(|p| p.cedar.as_ref())
                    .filter(|c| c.watch.unwrap_or(true))
                    .map(|c| {
                        [Some(&c.policies), Some(&c.schema), c.shadow_policies.as_ref()]
                            .into_iter()
                            .flatten()
                            .map(|file| resolve(base, file))
                            .collect()
                    })
                    .unwrap_or_default(),
                opa,
                authzen,
                ext_authz,
                limits,
            }),
            _ => Err(ConfigErrors(errs.0)),
        }
    }
}

#[derive(Default)]
struct Errors(Vec<ConfigError>);

impl Errors {
    fn push(&mut self, path: &str, message: impl Into<String>) {
        self.0.push(ConfigError {
            path: path.to_owned(),
            message: message.into(),
        });
    }

    fn socket_addr(&mut self, path: &str, value: &str) -> Option<SocketAddr> {
        match value.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.push(path, format!("`{value}` is not an `ip:port` address"));
                None
            }
        }
    }

    fn duration(&mut self, path: &str, value: Option<&str>, default: Duration) -> Duration {
        let Some(value) = value else { return default };
        match humantime::parse_duration(value) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.push(path, "must be greater than zero");
                default
            }
            Err(e) => {
                self.push(
                    path,
                    format!("`{value}` is not a duration such as `10s` or `500ms`: {e}"),
                );
                default
            }
        }
    }

    fn size(&mut self, path: &str, value: Option<&RawSize>, default: usize) -> usize {
        let Some(value) = value else { return default };
        match parse_size(value) {
            Ok(0) => {
                self.push(path, "must be greater than zero");
                default
            }
            Ok(n) => n,
            Err(msg) => {
                self.push(path, msg);
                default
            }
        }
    }

    fn count(&mut self, path: &str, value: Option<usize>, default: usize) -> usize {
        match value {
            Some(0) => {
                self.push(path, "must be greater than zero");
                default
            }
            Some(n) => n,
            None => default,
        }
    }
}

fn check_listen(raw: &raw::RawListen, base: &Path, errs: &mut Errors) -> Option<Listen> {
    let address = errs.socket_addr("listen.address", &raw.address);
    let tls = raw.tls.as_ref().and_then(|t| match load_tls(base, t) {
        Ok(c) => Some(Arc::new(c)),
        Err(msg) => {
            errs.push("listen.tls", msg);
            None
        }
    });
    let limits = ListenLimits {
        max_connections: errs.count("listen.max_connections", raw.max_connections, DEFAULT_MAX_CONNECTIONS),
        max_header_bytes: errs.size(
            "listen.max_header_bytes",
            raw.max_header_bytes.as_ref(),
            DEFAULT_MAX_HEADER_BYTES,
        ),
        max_headers: errs.count("listen.max_headers", raw.max_headers, DEFAULT_MAX_HEADERS),
        header_read_timeout: errs.duration(
            "listen.header_read_timeout",
            raw.header_read_timeout.as_deref(),
            DEFAULT_HEADER_READ_TIMEOUT,
        ),
        body_read_timeout: errs.duration(
            "listen.body_read_timeout",
            raw.body_read_timeout.as_deref(),
            DEFAULT_BODY_READ_TIMEOUT,
        ),
        max_body_bytes: errs.size(
            "listen.max_body_bytes",
            raw.max_body_bytes.as_ref(),
            DEFAULT_MAX_BODY_BYTES,
        ),
        max_json_depth: errs.count("listen.max_json_depth", raw.max_json_depth, DEFAULT_MAX_JSON_DEPTH),
    };
    // hyper cannot read a request head smaller than its minimum buffer.
    if limits.max_header_bytes < 8192 {
        errs.push("listen.max_header_bytes", "must be at least 8KiB");
    }
    let shutdown_grace = errs.duration(
        "listen.shutdown_grace",
        raw.shutdown_grace.as_deref(),
        DEFAULT_SHUTDOWN_GRACE,
    );
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let workers = errs.count("listen.workers", raw.workers, cpus);
    let mut trusted_proxies = Vec::new();
    for (i, p) in raw.trusted_proxies.iter().enumerate() {
        let parsed = p
            .parse::<ipnet::IpNet>()
            .or_else(|_| p.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
        match parsed {
            Ok(net) => trusted_proxies.push(net),
            Err(_) => errs.push(
                &format!("listen.trusted_proxies[{i}]"),
                format!("`{p}` is not an address or CIDR range"),
            ),
        }
    }
    let auth_failure_limit = match &raw.auth_failure_limit {
        None => (20, Duration::from_secs(60)),
        Some(limit) => {
            let window = errs.duration(
                "listen.auth_failure_limit.window",
                Some(&limit.window),
                Duration::from_secs(60),
            );
            if limit.max_failures == 0 {
                errs.push("listen.auth_failure_limit.max_failures", "must be greater than zero");
            }
            (limit.max_failures, window)
        }
    };
    Some(Listen {
        auth_failure_limit,
        trusted_proxies,
        address: address?,
        tls,
        limits,
        shutdown_grace,
        workers,
        anonymous_health: raw.anonymous_health,
    })
}

fn load_tls(base: &Path, raw: &raw::RawTls) -> Result<rustls::ServerConfig, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    let cert_path = resolve(base, &raw.cert_file);
    let key_path = resolve(base, &raw.key_file);
    let certs = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read certificates from `{}`: {e}", cert_path.display()))?;
    if certs.is_empty() {
        return Err(format!("`{}` holds no certificate", cert_path.display()));
    }
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| format!("cannot read private key from `{}`: {e}", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?;
    let builder = match &raw.client_ca_file {
        None if raw.require_client_cert => {
            return Err("`require_client_cert` needs `client_ca_file`".to_owned());
        }
        None => builder.with_no_client_auth(),
        Some(ca_file) => {
            let ca_path = resolve(base, ca_file);
            let mut roots = rustls::RootCertStore::empty();
            for ca in CertificateDer::pem_file_iter(&ca_path)
                .map_err(|e| format!("cannot read client CAs from `{}`: {e}", ca_path.display()))?
            {
                let ca = ca.map_err(|e| format!("bad client CA in `{}`: {e}", ca_path.display()))?;
                roots
                    .add(ca)
                    .map_err(|e| format!("bad client CA in `{}`: {e}", ca_path.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if raw.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier
                .build()
                .map_err(|e| format!("client certificate verifier: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key do not form a valid pair: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn check_upstream(raw: &raw::RawUpstream, path: &str, base: &Path, errs: &mut Errors) -> Option<Upstream> {
    let before = errs.0.len();
    if raw.name.trim().is_empty() {
        errs.push(&format!("{path}.name"), "must not be empty");
    }
    let uri = match raw.url.parse::<Uri>() {
        Ok(u) => Some(u),
        Err(e) => {
            errs.push(&format!("{path}.url"), format!("`{}` is not a URL: {e}", raw.url));
            None
        }
    };
    let parts = uri.and_then(|u| {
        let scheme = u.scheme().cloned();
        let authority = u.authority().cloned();
        match (scheme, authority) {
            (Some(s), Some(a)) if s == http::uri::Scheme::HTTP || s == http::uri::Scheme::HTTPS => {
                if u.query().is_some() {
                    errs.push(&format!("{path}.url"), "must not have a query string");
                }
                Some((s, a, u.path().trim_end_matches('/').to_owned()))
            }
            _ => {
                errs.push(
                    &format!("{path}.url"),
                    format!("`{}` must be an absolute http:// or https:// URL", raw.url),
                );
                None
            }
        }
    });
    let credential = raw.credential.as_ref().and_then(|secret| {
        let header_path = format!("{path}.credential_header");
        let header = match raw.credential_header.as_deref() {
            None => http::header::AUTHORIZATION,
            Some(h) => match HeaderName::from_bytes(h.as_bytes()) {
                Ok(h) => h,
                Err(_) => {
                    errs.push(&header_path, format!("`{h}` is not a header name"));
                    return None;
                }
            },
        };
        let secret = read_secret(secret, &format!("{path}.credential"), base, errs)?;
        let text = if header == http::header::AUTHORIZATION {
            format!("Bearer {secret}")
        } else {
            secret
        };
        match HeaderValue::from_str(&text) {
            Ok(mut value) => {
                value.set_sensitive(true);
                Some(UpstreamCredential { header, value })
            }
            Err(_) => {
                errs.push(&format!("{path}.credential"), "the secret is not a valid header value");
                None
            }
        }
    });
    if raw.credential.is_none() && raw.credential_header.is_some() {
        errs.push(&format!("{path}.credential_header"), "set without a credential");
    }
    let connect_timeout = errs.duration(
        &format!("{path}.connect_timeout"),
        raw.connect_timeout.as_deref(),
        DEFAULT_CONNECT_TIMEOUT,
    );
    let first_byte_timeout = errs.duration(
        &format!("{path}.first_byte_timeout"),
        raw.first_byte_timeout.as_deref(),
        DEFAULT_FIRST_BYTE_TIMEOUT,
    );
    let idle_timeout = errs.duration(
        &format!("{path}.idle_timeout"),
        raw.idle_timeout.as_deref(),
        DEFAULT_IDLE_TIMEOUT,
    );
    let max_response_bytes = errs.size(
        &format!("{path}.max_response_bytes"),
        raw.max_response_bytes.as_ref(),
        DEFAULT_MAX_RESPONSE_BYTES,
    );
    let (scheme, authority, path_prefix) = parts?;
    (errs.0.len() == before).then(|| Upstream {
        name: raw.name.clone(),
        scheme,
        authority,
        path_prefix,
        credential,
        connect_timeout,
        first_byte_timeout,
        idle_timeout,
        max_response_bytes,
    })
}

/// The `Authorization` value Warden presents to an external PDP, marked
/// sensitive so that it is never logged or indexed.
fn pdp_credential(raw: Option<&RawSecret>, path: &str, base: &Path, errs: &mut Errors) -> Option<http::HeaderValue> {
    let token = read_secret(raw?, path, base, errs)?;
    match http::HeaderValue::from_str(&format!("Bearer {token}")) {
        Ok(mut value) => {
            value.set_sensitive(true);
            Some(value)
        }
        Err(_) => {
            errs.push(path, "must be a token that fits in an HTTP header");
            None
        }
    }
}

fn read_secret(raw: &RawSecret, path: &str, base: &Path, errs: &mut Errors) -> Option<String> {
    let value = match (&raw.env, &raw.file) {
        (Some(var), None) => match std::env::var(var) {
            Ok(v) => v,
            Err(_) => {
                errs.push(
                    &format!("{path}.env"),
                    format!("environment variable `{var}` is not set"),
                );
                return None;
            }
        },
        (None, Some(file)) => {
            let file = resolve(base, file);
            match std::fs::read_to_string(&file) {
                Ok(v) => v.trim().to_owned(),
                Err(e) => {
                    errs.push(
                        &format!("{path}.file"),
                        format!("cannot read `{}`: {e}", file.display()),
                    );
                    return None;
                }
            }
        }
        _ => {
            errs.push(path, "give exactly one of `env` or `file`");
            return None;
        }
    };
    if value.is_empty() {
        errs.push(path, "the secret is empty");
        return None;
    }
    Some(value)
}

fn check_model(
    raw: &raw::RawModel,
    path: &str,
    base: &Path,
    upstreams: &HashMap<String, Arc<Upstream>>,
    declared_upstreams: &HashSet<&str>,
    max_body_cap: usize,
    errs: &mut Errors,
) -> Option<ModelEndpoint> {
    let before = errs.0.len();
    // Model names travel in URL paths (OIP v2) and audit records: keep them plain.
    if raw.name.is_empty()
        || !raw
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'@'))
    {
        errs.push(
            &format!("{path}.name"),
            format!(
                "`{}` must be non-empty and use only letters, digits and `-_.:@`",
                raw.name
            ),
        );
    }
    let protocol = match raw.protocol.as_str() {
        "openai" => Some(Protocol::Openai),
        "oip_v2" => Some(Protocol::OipV2),
        other => {
            errs.push(
                &format!("{path}.protocol"),
                format!("unknown protocol `{other}`; expected `openai` or `oip_v2`"),
            );
            None
        }
    };
    let value_tier = match raw.value_tier.as_deref() {
        None | Some("standard") => Some(ValueTier::Standard),
        Some("high") => Some(ValueTier::High),
        Some(other) => {
            errs.push(
                &format!("{path}.value_tier"),
                format!("unknown value tier `{other}`; expected `standard` or `high`"),
            );
            None
        }
    };
    let upstream = upstreams.get(&raw.upstream).cloned();
    if upstream.is_none() && !declared_upstreams.contains(raw.upstream.as_str()) {
        errs.push(
            &format!("{path}.upstream"),
            format!("no upstream named `{}`", raw.upstream),
        );
    }
    let max_body_bytes = errs.size(
        &format!("{path}.max_body_bytes"),
        raw.max_body_bytes.as_ref(),
        max_body_cap,
    );
    if max_body_bytes > max_body_cap {
        errs.push(
            &format!("{path}.max_body_bytes"),
            format!("{max_body_bytes} exceeds listen.max_body_bytes ({max_body_cap})"),
        );
    }
    let auth_methods = raw.auth.as_ref().map(|names| {
        names
            .iter()
            .filter_map(|name| {
                use crate::authn::AuthMethod;
                match name.as_str() {
                    "api_key" => Some(AuthMethod::ApiKey),
                    "jwt" => Some(AuthMethod::Jwt),
                    "oauth" => Some(AuthMethod::OAuth),
                    "mtls" => Some(AuthMethod::Mtls),
                    other => {
                        errs.push(
                            &format!("{path}.auth"),
                            format!("unknown method `{other}`; expected `api_key`, `jwt`, `oauth` or `mtls`"),
                        );
                        None
                    }
                }
            })
            .collect::<Vec<_>>()
    });
    if auth_methods.as_ref().is_some_and(Vec::is_empty) {
        errs.push(&format!("{path}.auth"), "must name at least one method");
    }
    let tenant = raw.tenant.as_ref().and_then(|t| {
        let tpath = format!("{path}.tenant");
        match (&t.json_pointer, &t.tensor, &t.header) {
            (Some(p), None, None) if p.starts_with('/') => Some(TenantSource::JsonPointer(p.clone())),
            (Some(_), None, None) => {
                errs.push(&tpath, "`json_pointer` must start with `/`");
                None
            }
            (None, Some(name), None) if protocol == Some(Protocol::OipV2) => Some(TenantSource::Tensor(name.clone())),
            (None, Some(_), None) => {
                errs.push(&tpath, "`tensor` is only for oip_v2 models");
                None
            }
            (None, None, Some(h)) => match HeaderName::from_bytes(h.as_bytes()) {
                Ok(h) => Some(TenantSource::Header(h)),
                Err(_) => {
                    errs.push(&tpath, format!("`{h}` is not a header name"));
                    None
                }
            },
            _ => {
                errs.push(&tpath, "give exactly one of `json_pointer`, `tensor` or `header`");
                None
            }
        }
    });
    let upstream_model = raw.upstream_model.clone().unwrap_or_else(|| raw.name.clone());
    // OIP v2 puts the upstream's name in the URL path; OpenAI only in the body
    // (where names such as `meta-llama/Llama-3.1-8B-Instruct` are normal).
    let in_path = protocol == Some(Protocol::OipV2);
    if in_path && upstream_model.contains(['/', '?', '#', '%']) {
        errs.push(
            &format!("{path}.upstream_model"),
            "must not contain `/`, `?`, `#` or `%` on an oip_v2 model",
        );
    }
    let limits = limits::check_model_limits(raw.limits.as_ref(), path, base, errs);
    let validation = validation::check_validation(raw.validation.as_ref(), path, base, protocol, upstreams, errs);
    let output = raw
        .output
        .as_ref()
        .and_then(|o| check_output(o, &format!("{path}.output"), errs));
    if errs.0.len() != before {
        return None;
    }
    Some(ModelEndpoint {
        name: raw.name.clone(),
        protocol: protocol?,
        value_tier: value_tier?,
        upstream: upstream?,
        upstream_model,
        max_body_bytes,
        require_mtls: raw.require_mtls,
        tenant,
        auth_methods,
        limits,
        validation,
        output,
    })
}

/// Checks a model's output content policy and builds its scanner.
fn check_output(raw: &raw::RawOutput, path: &str, errs: &mut Errors) -> Option<Arc<crate::output::ContentScanner>> {
    use crate::output::{ContentScanner, Policy, PolicySpec};
    let before = errs.0.len();
    // `route` needs a review sink, which is not built yet: refusing it here
    // is better than a policy that silently does something else.
    for (detector, action) in &raw.detectors {
        if action == "route" {
            errs.push(
                &format!("{path}.detectors.{detector}"),
                "`route` is not available yet (flag, redact or block)",
            );
        }
    }
    if raw.deny_action.as_deref() == Some("route") {
        errs.push(
            &format!("{path}.deny_action"),
            "`route` is not available yet (flag, redact or block)",
        );
    }
    if raw.detectors.is_empty() && raw.deny_terms.is_empty() {
        errs.push(path, "names no detector and no deny term");
    }
    let spec = PolicySpec {
        detectors: raw.detectors.iter().map(|(d, a)| (d.clone(), a.clone())).collect(),
        deny_terms: raw.deny_terms.clone(),
        deny_action: raw.deny_action.clone(),
    };
    let policy = match Policy::from_spec(&spec) {
        Ok(policy) => policy,
        Err(problems) => {
            for problem in problems.0 {
                errs.push(path, problem.to_string());
            }
            return None;
        }
    };
    if errs.0.len() != before {
        return None;
    }
    match ContentScanner::new(&policy) {
        Ok(scanner) => Some(Arc::new(scanner)),
        Err(e) => {
            errs.push(path, e.to_string());
            None
        }
    }
}

/// The models a credential may call: `["*"]` for all, or configured names.
fn model_grant(names: &[String], declared: &HashSet<&str>, path: &str, errs: &mut Errors) -> ModelGrant {
    if names.iter().any(|m| m == "*") {
        if names.len() > 1 {
            errs.push(path, "`*` must stand alone");
        }
        return ModelGrant::All;
    }
    for (j, m) in names.iter().enumerate() {
        if !declared.contains(m.as_str()) {
            errs.push(&format!("{path}[{j}]"), format!("no model named `{m}`"));
        }
    }
    ModelGrant::Only(names.iter().cloned().collect())
}

fn check_api_key(
    raw: &raw::RawApiKey,
    path: &str,
    declared_models: &HashSet<&str>,
    errs: &mut Errors,
) -> Option<ApiKey> {
    let before = errs.0.len();
    if raw.id.trim().is_empty() {
        errs.push(&format!("{path}.id"), "must not be empty");
    }
    if raw.principal.trim().is_empty() {
        errs.push(&format!("{path}.principal"), "must not be empty");
    }
    if raw.tenant.trim().is_empty() {
        errs.push(&format!("{path}.tenant"), "must not be empty");
    }
    let mut digest = [0u8; 32];
    let hex_ok = raw.sha256.len() == 64
        && raw
            .sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && hex::decode_to_slice(&raw.sha256, &mut digest).is_ok();
    if !hex_ok {
        errs.push(
            &format!("{path}.sha256"),
            "must be 64 lowercase hex digits (the SHA-256 of the key, not the key)",
        );
    }
    let grant = model_grant(&raw.models, declared_models, &format!("{path}.models"), errs);
    (errs.0.len() == before).then(|| ApiKey {
        id: raw.id.clone(),
        digest,
        principal: raw.principal.clone(),
        kind: PrincipalKind::Key,
        tenant: raw.tenant.clone(),
        tenants: vec![raw.tenant.clone()],
        tier: raw.tier.clone(),
        models: grant,
        ..ApiKey::default()
    })
}

fn check_jwt(raw: &raw::RawJwt, base: &Path, models: &HashSet<&str>, errs: &mut Errors) -> JwtConfig {
    use crate::authn::jwt::{VerificationKey, jwks_keys};
    use jsonwebtoken::{Algorithm, AlgorithmFamily};
    let max_token_bytes = errs.size("jwt.max_token_bytes", raw.max_token_bytes.as_ref(), 8 * 1024);
    if raw.issuers.is_empty() {
        errs.push("jwt.issuers", "name at least one issuer");
    }
    let mut issuers = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    for (i, r) in raw.issuers.iter().enumerate() {
        let path = format!("jwt.issuers[{i}]");
        let preset = match r.preset.as_deref() {
            None => Preset::default(),
            Some(name) => match preset(name, r.azure_tenant_id.as_deref()) {
                Ok(p) => p,
                Err(msg) => {
                    errs.push(&format!("{path}.preset"), msg);
                    Preset::default()
                }
            },
        };
        let issuer = r.issuer.clone().or(preset.issuer).unwrap_or_default();
        let discovery_url = r.discovery_url.clone().or(preset.discovery_url);
        if issuer.is_empty() || !seen.insert(issuer.clone()) {
            errs.push(&format!("{path}.issuer"), "must be non-empty and unique");
        }
        if r.audiences.is_empty() {
            errs.push(&format!("{path}.audiences"), "name at least one audience");
        }
        let names: Vec<String> = r
            .algorithms
            .clone()
            .unwrap_or_else(|| ["RS256", "PS256", "ES256", "EdDSA"].map(str::to_owned).to_vec());
        let mut algorithms = Vec::new();
        for name in &names {
            match name.parse::<Algorithm>() {
                Ok(a) => algorithms.push(a),
                Err(_) => errs.push(&format!("{path}.algorithms"), format!("unknown algorithm `{name}`")),
            }
        }
        let hmac = algorithms.iter().any(|a| a.family() == AlgorithmFamily::Hmac);
        let mut static_keys = Vec::new();
        match (&r.hmac_secret, hmac) {
            (Some(secret), true) => {
                if let Some(secret) = read_secret(secret, &format!("{path}.hmac_secret"), base, errs) {
                    if secret.len() < 32 {
                        errs.push(&format!("{path}.hmac_secret"), "must be at least 32 bytes (256 bits)");
                    } else {
                        match jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()) {
                            Ok(key) => static_keys.push(VerificationKey {
                                kid: None,
                                key,
                                alg: None,
                            }),
                            Err(e) => errs.push(&format!("{path}.hmac_secret"), format!("unusable: {e}")),
                        }
                    }
                }
            }
            (None, true) => errs.push(&format!("{path}.algorithms"), "HMAC algorithms need `hmac_secret`"),
            (Some(_), false) => errs.push(&format!("{path}.hmac_secret"), "set, but no HMAC algorithm is allowed"),
            (None, false) => {}
        }
        if let Some(file) = &r.jwks_file {
            let file = resolve(base, file);
            match std::fs::read(&file)
                .map_err(|e| e.to_string())
                .and_then(|b| jwks_keys(&b))
            {
                Ok(keys) => static_keys.extend(keys),
                Err(e) => errs.push(&format!("{path}.jwks_file"), format!("`{}`: {e}", file.display())),
            }
        }
        let sources = usize::from(r.jwks_url.is_some())
            + usize::from(discovery_url.is_some())
            + usize::from(r.jwks_file.is_some() || r.hmac_secret.is_some());
        if sources != 1 {
            errs.push(
                &path,
                "give keys by exactly one of `jwks_url`, `discovery_url` (or a preset), or `jwks_file`/`hmac_secret`",
            );
        }
        for (field, url) in [("jwks_url", &r.jwks_url), ("discovery_url", &discovery_url)] {
            if let Some(url) = url
                && !fetchable(url)
            {
                errs.push(
                    &format!("{path}.{field}"),
                    "must be https:// (plain http only on loopback)",
                );
            }
        }
        let leeway = errs.duration(&format!("{path}.leeway"), r.leeway.as_deref(), Duration::from_secs(30));
        if leeway > Duration::from_secs(300) {
            errs.push(&format!("{path}.leeway"), "must be at most 5m");
        }
        let min_refresh_interval = errs.duration(
            &format!("{path}.min_refresh_interval"),
            r.min_refresh_interval.as_deref(),
            Duration::from_secs(30),
        );
        let grant = model_grant(&r.models, models, &format!("{path}.models"), errs);
        issuers.push(IssuerConfig {
            issuer,
            discovery_url,
            principal_claim: r.principal_claim.clone().or(preset.principal_claim),
            kind: match r.principal_kind.as_deref() {
                None => preset.kind,
                Some("user") => PrincipalKind::User,
                Some("service") => PrincipalKind::Service,
                Some(other) => {
                    errs.push(
                        &format!("{path}.principal_kind"),
                        format!("`{other}` is not `user` or `service`"),
                    );
                    PrincipalKind::User
                }
            },
            groups_claim: r.groups_claim.clone().unwrap_or_else(|| "groups".to_owned()),
            tenant: r.tenant.clone(),
            audiences: r.audiences.clone(),
            algorithms,
            typ: r.typ.clone(),
            leeway: i64::try_from(leeway.as_secs()).unwrap_or(300),
            jwks_url: r.jwks_url.clone(),
            static_keys,
            min_refresh_interval,
            tenant_claim: r
                .tenant_claim
                .clone()
                .or(preset.tenant_claim)
                .unwrap_or_else(|| "tenant".to_owned()),
            tier_claim: r.tier_claim.clone(),
            models: grant,
        });
    }
    JwtConfig {
        max_token_bytes,
        issuers,
    }
}

fn check_introspection(
    raw: &raw::RawIntrospection,
    base: &Path,
    models: &HashSet<&str>,
    errs: &mut Errors,
) -> Option<IntrospectionConfig> {
    let url = &raw.endpoint;
    if !(url.starts_with("https://") || url.starts_with("http://127.") || url.starts_with("http://localhost")) {
        errs.push(
            "introspection.endpoint",
            "must be https:// (plain http only on loopback)",
        );
    }
    let client_secret = read_secret(&raw.client_secret, "introspection.client_secret", base, errs);
    let cache_ttl = errs.duration(
        "introspection.cache_ttl",
        raw.cache_ttl.as_deref(),
        Duration::from_secs(60),
    );
    let negative_cache_ttl = errs.duration(
        "introspection.negative_cache_ttl",
        raw.negative_cache_ttl.as_deref(),
        Duration::from_secs(5),
    );
    let timeout = errs.duration("introspection.timeout", raw.timeout.as_deref(), Duration::from_secs(2));
    let grant = model_grant(&raw.models, models, "introspection.models", errs);
    Some(IntrospectionConfig {
        endpoint: raw.endpoint.clone(),
        client_id: raw.client_id.clone(),
        client_secret: client_secret?,
        audiences: raw.audiences.clone(),
        required_scopes: raw.required_scopes.clone(),
        cache_ttl,
        negative_cache_ttl,
        timeout,
        tenant_claim: raw.tenant_claim.clone().unwrap_or_else(|| "tenant".to_owned()),
        tier_claim: raw.tier_claim.clone(),
        models: grant,
    })
}

/// What a known identity provider's preset fills in.
struct Preset {
    kind: PrincipalKind,
    issuer: Option<String>,
    discovery_url: Option<String>,
    principal_claim: Option<String>,
    tenant_claim: Option<String>,
}

impl Default for Preset {
    fn default() -> Self {
        Preset {
            kind: PrincipalKind::User,
            issuer: None,
            discovery_url: None,
            principal_claim: None,
            tenant_claim: None,
        }
    }
}

/// Known identity providers. Their tokens are OIDC JWTs: the preset names
/// the issuer, where its keys are found, and which claims identify a caller.
fn preset(name: &str, azure_tenant: Option<&str>) -> Result<Preset, String> {
    match name {
        // GCP service accounts (and Google users): `email` names the caller.
        "google" => Ok(Preset {
            kind: PrincipalKind::Service,
            issuer: Some("https://accounts.google.com".into()),
            discovery_url: Some("https://accounts.google.com/.well-known/openid-configuration".into()),
            principal_claim: Some("email".into()),
            tenant_claim: None,
        }),
        // Entra ID managed identities and apps: `oid` names the caller, `tid`
        // the directory.
        "azure" => {
            let tenant = azure_tenant
                .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
                .ok_or("`azure` needs `azure_tenant_id` (the directory id)")?;
            Ok(Preset {
                kind: PrincipalKind::Service,
                issuer: Some(format!("https://login.microsoftonline.com/{tenant}/v2.0")),
                discovery_url: Some(format!(
                    "https://login.microsoftonline.com/{tenant}/v2.0/.well-known/openid-configuration"
                )),
                principal_claim: Some("oid".into()),
                tenant_claim: Some("tid".into()),
            })
        }
        // Projected service-account tokens: the cluster's issuer and JWKS
        // are configured; `sub` is `system:serviceaccount:<ns>:<name>`.
        "kubernetes" => Ok(Preset {
            kind: PrincipalKind::Service,
            principal_claim: Some("sub".into()),
            tenant_claim: Some("/kubernetes.io/namespace".into()),
            ..Preset::default()
        }),
        other => Err(format!(
            "unknown preset `{other}`; expected `google`, `azure` or `kubernetes`"
        )),
    }
}

/// Whether Warden may fetch keys from `url`: https, or http on loopback.
fn fetchable(url: &str) -> bool {
    url.starts_with("https://") || url.starts_with("http://127.") || url.starts_with("http://localhost")
}

fn check_aws(raw: &raw::RawAws, models: &HashSet<&str>, errs: &mut Errors) -> AwsConfig {
    let sts_endpoint = raw
        .sts_endpoint
        .clone()
        .unwrap_or_else(|| "https://sts.amazonaws.com/".to_owned());
    if !fetchable(&sts_endpoint) {
        errs.push("aws.sts_endpoint", "must be https:// (plain http only on loopback)");
    }
    if raw.server_id.trim().is_empty() {
        errs.push("aws.server_id", "must not be empty");
    }
    let mut principals = HashMap::new();
    for (i, p) in raw.principals.iter().enumerate() {
        let path = format!("aws.principals[{i}]");
        if !p.arn.starts_with("arn:") || p.tenant.is_empty() {
            errs.push(&path, "needs an `arn:` ARN and a tenant");
        }
        let grant = model_grant(&p.models, models, &format!("{path}.models"), errs);
        let account = p.arn.split(':').nth(4).unwrap_or_default();
        let principal = ApiKey {
            id: format!("aws:{}", p.arn),
            principal: p.arn.clone(),
            kind: PrincipalKind::Service,
            tenant: p.tenant.clone(),
            tenants: vec![p.tenant.clone()],
            tier: p.tier.clone(),
            models: grant,
            attributes: [
                ("arn".to_owned(), serde_json::Value::from(p.arn.clone())),
                ("aws_account".to_owned(), serde_json::Value::from(account)),
            ]
            .into_iter()
            .collect(),
            ..ApiKey::default()
        };
        if principals.insert(p.arn.clone(), Arc::new(principal)).is_some() {
            errs.push(&format!("{path}.arn"), format!("duplicate principal `{}`", p.arn));
        }
    }
    AwsConfig {
        sts_endpoint,
        server_id: raw.server_id.clone(),
        principals,
    }
}

fn check_mtls(raw: &raw::RawMtls, models: &HashSet<&str>, errs: &mut Errors) -> MtlsConfig {
    use crate::authn::mtls::IdentitySource;
    let identity_from = match raw.identity_from.as_deref() {
        None | Some("spiffe") => IdentitySource::Spiffe,
        Some("dns") => IdentitySource::Dns,
        Some("cn") => IdentitySource::CommonName,
        Some(other) => {
            errs.push(
                "mtls.identity_from",
                format!("`{other}` is not one of `spiffe`, `dns`, `cn`"),
            );
            IdentitySource::Spiffe
        }
    };
    let mut clients = HashMap::new();
    for (i, c) in raw.clients.iter().enumerate() {
        let path = format!("mtls.clients[{i}]");
        if c.identity.is_empty() || c.tenant.is_empty() {
            errs.push(&path, "needs a non-empty `identity` and `tenant`");
        }
        let grant = model_grant(&c.models, models, &format!("{path}.models"), errs);
        let client = ApiKey {
            id: format!("mtls:{}", c.identity),
            principal: c.identity.clone(),
            kind: PrincipalKind::Service,
            tenant: c.tenant.clone(),
            tenants: vec![c.tenant.clone()],
            tier: c.tier.clone(),
            models: grant,
            attributes: [(
                "certificate_identity".to_owned(),
                serde_json::Value::from(c.identity.clone()),
            )]
            .into_iter()
            .collect(),
            ..ApiKey::default()
        };
        if clients.insert(c.identity.clone(), Arc::new(client)).is_some() {
            errs.push(
                &format!("{path}.identity"),
                format!("duplicate client `{}`", c.identity),
            );
        }
    }
    MtlsConfig { identity_from, clients }
}

fn check_key_store(raw: &raw::RawKeyStore, base: &Path, errs: &mut Errors) -> Option<KeyStoreConfig> {
    let refresh_interval = errs.duration(
        "key_store.refresh_interval",
        raw.refresh_interval.as_deref(),
        Duration::from_secs(1),
    );
    let rotation_overlap = errs.duration(
        "key_store.rotation_overlap",
        raw.rotation_overlap.as_deref(),
        Duration::from_secs(24 * 3600),
    );
    let url = match (&raw.sqlite, &raw.postgres) {
        (Some(path), None) => format!("sqlite://{}", resolve(base, path).display()),
        (None, Some(secret)) => {
            let url = read_secret(secret, "key_store.postgres", base, errs)?;
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                errs.push("key_store.postgres", "must be a `postgres://` URL");
                return None;
            }
            url
        }
        _ => {
            errs.push("key_store", "give exactly one of `sqlite` or `postgres`");
            return None;
        }
    };
    Some(KeyStoreConfig {
        url,
        refresh_interval,
        rotation_overlap,
    })
}

fn parse_size(value: &RawSize) -> Result<usize, String> {
    let bytes = match value {
        RawSize::Bytes(n) => *n,
        RawSize::Text(text) => {
            let t = text.trim();
            let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
            let (num, unit) = t.split_at(split);
            let num: u64 = num
                .parse()
                .map_err(|_| format!("`{text}` is not a size such as `65536`, `64KiB` or `1MiB`"))?;
            let mult: u64 = match unit.trim() {
                "" | "B" => 1,
                "KiB" | "K" | "KB" => 1024,
                "MiB" | "M" | "MB" => 1024 * 1024,
                "GiB" | "G" | "GB" => 1024 * 1024 * 1024,
                _ => return Err(format!("`{text}` has an unknown unit; use B, KiB, MiB or GiB")),
            };
            num.checked_mul(mult).ok_or_else(|| format!("`{text}` is too large"))?
        }
    };
    usize::try_from(bytes).map_err(|_| format!("{bytes} is too large"))
}

fn resolve(base: &Path, file: &str) -> PathBuf {
    let p = Path::new(file);
    if p.is_absolute() { p.to_path_buf() } else { base.join(p) }
}

#[cfg(test)]
mod tests;
