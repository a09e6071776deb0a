//! Client certificates (mTLS). rustls verifies the chain against the
//! configured CAs during the handshake (expired, untrusted or malformed
//! certificates never get a connection); this module reads the identity out
//! of the verified leaf once per connection — its SPIFFE ID (URI SAN), DNS
//! names and subject CN — and maps it to a configured client.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// What a verified client certificate says about its holder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientCert {
    /// The `spiffe://` URI SAN, if there is exactly one.
    pub spiffe_id: Option<String>,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// Subject common name.
    pub common_name: Option<String>,
}

impl ClientCert {
    /// Reads a leaf certificate (DER). `None` if it cannot be parsed, which
    /// for a certificate rustls accepted should not happen.
    pub fn from_der(der: &[u8]) -> Option<ClientCert> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let mut spiffe = Vec::new();
        let mut dns_names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(uri) if uri.starts_with("spiffe://") => spiffe.push((*uri).to_owned()),
                    GeneralName::DNSName(dns) => dns_names.push((*dns).to_owned()),
                    _ => {}
                }
            }
        }
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        Some(ClientCert {
            // A SPIFFE SVID has exactly one URI SAN: more is ambiguous.
            spiffe_id: if spiffe.len() == 1 { spiffe.pop() } else { None },
            dns_names,
            common_name,
        })
    }

    /// The identity named by `source`.
    pub fn identity(&self, source: IdentitySource) -> Option<&str> {
        match source {
            IdentitySource::Spiffe => self.spiffe_id.as_deref(),
            IdentitySource::Dns => self.dns_names.first().map(String::as_str),
            IdentitySource::CommonName => self.common_name.as_deref(),
        }
    }
}

/// Which part of a certificate names its holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentitySource {
    /// The SPIFFE ID (URI SAN).
    Spiffe,
    /// The first DNS SAN.
    Dns,
    /// The subject CN.
    CommonName,
}
