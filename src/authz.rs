//! Stage 3, authorize the endpoint: may this principal call this model at all.
//! Today the decision is the key's model grant; the policy engines of later
//! stages plug in here. The [`Permit`] it returns is the proof, required by the
//! forwarding stage, that the check ran.

use crate::authn::Identity;
use crate::config::ModelEndpoint;
use crate::reject::Reject;

/// Proof that a caller may invoke a model endpoint. Only this module makes one.
#[derive(Debug)]
pub struct Permit {
    _private: (),
}

/// Decides whether `identity` may call `model`. Default deny: a caller with
/// no grant (an anonymous one) may call nothing.
pub fn authorize_endpoint(identity: &Identity, model: &ModelEndpoint) -> Result<Permit, Reject> {
    if let Some(accepted) = &model.auth_methods
        && !accepted.contains(&identity.method)
    {
        return Err(Reject::AuthMethodNotAccepted(model.name.clone()));
    }
    if model.require_mtls && identity.client_cert.is_none() {
        return Err(Reject::ClientCertificateRequired(model.name.clone()));
    }
    match identity.models() {
        Some(grant) if grant.allows(&model.name) => Ok(Permit { _private: () }),
        _ => Err(Reject::ModelNotAllowed(model.name.clone())),
    }
}
