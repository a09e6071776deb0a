//! Stage 2, route: which operation the request asks for, in which protocol,
//! and — for path-routed protocols — which model. OpenAI routes name the model
//! in the body, so they are resolved to a model endpoint after the body is read.

use http::Method;

use crate::config::Protocol;
use crate::reject::Reject;

/// What the request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// `POST /v1/chat/completions`
    ChatCompletions,
    /// `POST /v1/completions`
    Completions,
    /// `POST /v1/embeddings`
    Embeddings,
    /// `GET /v1/models`, answered by Warden from the caller's grant.
    ListModels,
    /// `POST /v2/models/{name}[/versions/{v}]/infer`
    Infer,
    /// `GET /v2/models/{name}[/versions/{v}]`
    ModelMetadata,
    /// `GET /v2/models/{name}[/versions/{v}]/ready`
    ModelReady,
    /// `GET /v2/health/live`, answered by Warden.
    Live,
    /// `GET /v2/health/ready`, answered by Warden.
    Ready,
}

impl Operation {
    /// Whether the operation carries a JSON body to the model.
    pub fn has_body(self) -> bool {
        matches!(
            self,
            Operation::ChatCompletions | Operation::Completions | Operation::Embeddings | Operation::Infer
        )
    }
}

/// A routed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The operation.
    pub operation: Operation,
    /// The protocol, which also decides the error format.
    pub protocol: Protocol,
    /// The model named in the path (OIP v2).
    pub model: Option<String>,
    /// The model version named in the path (OIP v2).
    pub version: Option<String>,
}

/// The error format for a path, before it is known to be a route: OIP v2
/// clients live under `/v2/`, everyone else gets OpenAI's.
pub fn protocol_of_path(path: &str) -> Protocol {
    if path.starts_with("/v2/") || path == "/v2" {
        Protocol::OipV2
    } else {
        Protocol::Openai
    }
}

/// Routes a request by method and path.
pub fn route(method: &Method, path: &str) -> Result<Route, Reject> {
    let protocol = protocol_of_path(path);
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    let (operation, model, version, expected) = match segments.as_slice() {
        ["v1", "chat", "completions"] => (Operation::ChatCompletions, None, None, Method::POST),
        ["v1", "completions"] => (Operation::Completions, None, None, Method::POST),
        ["v1", "embeddings"] => (Operation::Embeddings, None, None, Method::POST),
        ["v1", "models"] => (Operation::ListModels, None, None, Method::GET),
        ["v2", "health", "live"] => (Operation::Live, None, None, Method::GET),
        ["v2", "health", "ready"] => (Operation::Ready, None, None, Method::GET),
        ["v2", "models", m, "infer"] => (Operation::Infer, Some(*m), None, Method::POST),
        ["v2", "models", m, "versions", v, "infer"] => (Operation::Infer, Some(*m), Some(*v), Method::POST),
        ["v2", "models", m] => (Operation::ModelMetadata, Some(*m), None, Method::GET),
        ["v2", "models", m, "versions", v] => (Operation::ModelMetadata, Some(*m), Some(*v), Method::GET),
        ["v2", "models", m, "ready"] => (Operation::ModelReady, Some(*m), None, Method::GET),
        ["v2", "models", m, "versions", v, "ready"] => (Operation::ModelReady, Some(*m), Some(*v), Method::GET),
        _ => return Err(Reject::UnknownRoute(path.to_owned())),
    };
    if model.is_some_and(str::is_empty) || version.is_some_and(|v| v.is_empty() || !is_plain(v)) {
        return Err(Reject::UnknownRoute(path.to_owned()));
    }
    if *method != expected {
        return Err(Reject::MethodNotAllowed(method.to_string()));
    }
    Ok(Route {
        operation,
        protocol,
        model: model.map(str::to_owned),
        version: version.map(str::to_owned),
    })
}

/// A version segment is forwarded into the upstream path: keep it plain.
fn is_plain(segment: &str) -> bool {
    segment
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn table_of_routes() {
        let ok = |m: Method, p: &str| route(&m, p).unwrap();
        assert_eq!(
            ok(Method::POST, "/v1/chat/completions").operation,
            Operation::ChatCompletions
        );
        assert_eq!(ok(Method::GET, "/v1/models").protocol, Protocol::Openai);
        let r = ok(Method::POST, "/v2/models/fraud/versions/3/infer");
        assert_eq!(
            (r.operation, r.model.as_deref(), r.version.as_deref()),
            (Operation::Infer, Some("fraud"), Some("3"))
        );
        assert_eq!(ok(Method::GET, "/v2/models/fraud").operation, Operation::ModelMetadata);
        assert_eq!(ok(Method::GET, "/v2/health/ready").operation, Operation::Ready);
        assert_eq!(
            route(&Method::GET, "/v1/chat/completions"),
            Err(Reject::MethodNotAllowed("GET".into()))
        );
        assert_eq!(
            route(&Method::POST, "/v1/chat"),
            Err(Reject::UnknownRoute("/v1/chat".into()))
        );
        assert!(route(&Method::POST, "/v2/models//infer").is_err());
        assert!(route(&Method::POST, "/v2/models/m/versions/..%2f/infer").is_err());
        assert!(route(&Method::POST, "/v1/chat/completions/").is_err());
    }
}
