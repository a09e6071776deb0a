//! Output content policy: what the model says is untrusted (pipeline step 8).
//!
//! A [`ContentScanner`] is built once from a checked [`Policy`] (which
//! detectors are on, the [`Action`] of each, deny terms). It scans a `&str`
//! and returns [`Finding`]s (detector, byte span, action); [`Scan::redact`]
//! produces the text with every `redact` finding replaced by
//! `[REDACTED:TAG]`, where TAG is [`Kind::tag`] (stable names, listed there).
//! [`StreamScanner`] does the same for text arriving in pieces (the deltas of
//! SSE chunks) with a bounded hold-back window, and gives the same findings,
//! verdict and redacted text as a whole-text scan for every chunking (held
//! by property tests in `tests.rs`).
//!
//! Detectors (see [`Kind`]): PII (e-mail, phone, payment card with Luhn, US
//! SSN, IBAN with mod 97, IPv4/IPv6), secrets (AWS key ids and secret keys,
//! private key blocks, JWTs, GitHub, Slack, Stripe and OpenAI-style keys,
//! passwords in connection strings, high-entropy values after a credential
//! key name) and configured deny terms. Precision is the design goal next to
//! recall: checksums are validated, the 40-character AWS secret and generic
//! credentials need a key name in front of them, and obvious placeholders
//! (`xoxb-your-token-here`, `AKIAXXXXXXXXXXXXXXXX`, `...EXAMPLE`) are
//! rejected, because a filter that redacts UUIDs, git SHAs and order numbers
//! is switched off by its users.
//!
//! Actions, strongest first: `block` (the client gets an error, nothing of
//! the offending part is released), `route` (the full output goes to a review
//! sink and the client gets a safe refusal; the sink is the pipeline's job),
//! `redact`, `flag` (recorded, text unchanged). A scan's verdict
//! ([`Scan::action`]) is the strongest action among its findings.
//!
//! Not wired into `config` or `pipeline` yet: [`PolicySpec`] is the shape a
//! raw config section converts from, [`Policy::from_spec`] reports every
//! error at once.

mod check;
mod detect;
pub mod inspect;
mod stream;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;

pub use detect::{ContentScanner, MAX_HOLD_BACK, ScannerError};
pub use stream::{CONTEXT, Halt, STEP, StreamScanner};

/// What to do with a finding. Ordered weakest to strongest, so `max` is the
/// verdict of several findings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    /// Record the finding; the text goes out unchanged.
    Flag,
    /// Replace the finding's span with `[REDACTED:TAG]`.
    Redact,
    /// Withhold the output from the client (safe refusal) and send the full
    /// output to the configured review sink.
    Route,
    /// Withhold the output and end the response (or stream) with an error.
    Block,
}

impl Action {
    /// The configuration name: `flag`, `redact`, `route`, `block`.
    pub fn name(self) -> &'static str {
        match self {
            Action::Flag => "flag",
            Action::Redact => "redact",
            Action::Route => "route",
            Action::Block => "block",
        }
    }

    /// Parses a configuration name.
    pub fn parse(name: &str) -> Option<Action> {
        match name {
            "flag" => Some(Action::Flag),
            "redact" => Some(Action::Redact),
            "route" => Some(Action::Route),
            "block" => Some(Action::Block),
            _ => None,
        }
    }

    /// Whether the client must not get the output.
    pub fn halts(self) -> bool {
        matches!(self, Action::Route | Action::Block)
    }
}

/// A detector. The configuration name is [`Kind::name`], the redaction tag
/// [`Kind::tag`]; both are stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `email` / `EMAIL`.
    Email,
    /// `phone` / `PHONE`: 7–15 digits in a phone-like layout (international
    /// prefix, parentheses or at least three separated groups, or a national
    /// number starting with 0, or a bare 10-digit NANP number right after a
    /// phone word); dates and IPv4 addresses excluded.
    Phone,
    /// `card` / `CARD`: 12–19 digits, IIN starting 2–6 (12 digits only for
    /// Maestro 5x/6x; JCB's 15-digit 1800 range too), Luhn-valid.
    Card,
    /// `us_ssn` / `SSN`: `AAA-GG-SSSS` with the SSA's never-issued ranges
    /// excluded.
    UsSsn,
    /// `iban` / `IBAN`: country length and mod-97 checked.
    Iban,
    /// `ip` / `IP`: IPv4 (octets checked) and IPv6 (parsed by `std`).
    Ip,
    /// `aws_access_key_id` / `AWS_ACCESS_KEY_ID`: `AKIA…`/`ASIA…` ids.
    AwsAccessKeyId,
    /// `aws_secret_key` / `AWS_SECRET_KEY`: 40 characters after an
    /// AWS-secret key name only.
    AwsSecretKey,
    /// `private_key` / `PRIVATE_KEY`: a PEM/OpenSSH private key block (up to
    /// the END line, or the end of the base64 body when it is missing).
    PrivateKey,
    /// `jwt` / `JWT`: three base64url segments whose header decodes to JSON
    /// with an `alg`.
    Jwt,
    /// `github_token` / `GITHUB_TOKEN`: `ghp_`, `gho_`, `ghu_`, `ghs_`,
    /// `ghr_`, `github_pat_`.
    GithubToken,
    /// `slack_token` / `SLACK_TOKEN`: `xox[abposr]-` with numeric id segments.
    SlackToken,
    /// `stripe_key` / `STRIPE_KEY`: secret and restricted keys (`sk_`/`rk_`
    /// + `live`/`test`); publishable `pk_` keys are public by design.
    StripeKey,
    /// `openai_key` / `OPENAI_KEY`: `sk-…`, `sk-proj-…`, `sk-ant-…`.
    OpenAiKey,
    /// `connection_string` / `CONNECTION_PASSWORD`: the password of a
    /// `scheme://user:password@host` URL (only the password is the span).
    ConnectionString,
    /// `credential` / `CREDENTIAL`: the value after a credential key name
    /// (`password`, `secret`, `token`, `api_key`, `Bearer`, …) when it looks
    /// like a real secret (length, character classes or entropy).
    Credential,
    /// A configured deny term / `DENY_TERM`.
    DenyTerm,
}

impl Kind {
    /// Every detector except deny terms, which are configured by their terms.
    pub const DETECTORS: [Kind; 16] = [
        Kind::Email,
        Kind::Phone,
        Kind::Card,
        Kind::UsSsn,
        Kind::Iban,
        Kind::Ip,
        Kind::AwsAccessKeyId,
        Kind::AwsSecretKey,
        Kind::PrivateKey,
        Kind::Jwt,
        Kind::GithubToken,
        Kind::SlackToken,
        Kind::StripeKey,
        Kind::OpenAiKey,
        Kind::ConnectionString,
        Kind::Credential,
    ];

    /// The configuration name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Email => "email",
            Kind::Phone => "phone",
            Kind::Card => "card",
            Kind::UsSsn => "us_ssn",
            Kind::Iban => "iban",
            Kind::Ip => "ip",
            Kind::AwsAccessKeyId => "aws_access_key_id",
            Kind::AwsSecretKey => "aws_secret_key",
            Kind::PrivateKey => "private_key",
            Kind::Jwt => "jwt",
            Kind::GithubToken => "github_token",
            Kind::SlackToken => "slack_token",
            Kind::StripeKey => "stripe_key",
            Kind::OpenAiKey => "openai_key",
            Kind::ConnectionString => "connection_string",
            Kind::Credential => "credential",
            Kind::DenyTerm => "deny_term",
        }
    }

    /// The tag in `[REDACTED:TAG]`.
    pub fn tag(self) -> &'static str {
        match self {
            Kind::Email => "EMAIL",
            Kind::Phone => "PHONE",
            Kind::Card => "CARD",
            Kind::UsSsn => "SSN",
            Kind::Iban => "IBAN",
            Kind::Ip => "IP",
            Kind::AwsAccessKeyId => "AWS_ACCESS_KEY_ID",
            Kind::AwsSecretKey => "AWS_SECRET_KEY",
            Kind::PrivateKey => "PRIVATE_KEY",
            Kind::Jwt => "JWT",
            Kind::GithubToken => "GITHUB_TOKEN",
            Kind::SlackToken => "SLACK_TOKEN",
            Kind::StripeKey => "STRIPE_KEY",
            Kind::OpenAiKey => "OPENAI_KEY",
            Kind::ConnectionString => "CONNECTION_PASSWORD",
            Kind::Credential => "CREDENTIAL",
            Kind::DenyTerm => "DENY_TERM",
        }
    }

    /// Parses a configuration name (deny terms are not named detectors).
    pub fn parse(name: &str) -> Option<Kind> {
        Kind::DETECTORS.into_iter().find(|k| k.name() == name)
    }

    /// Specificity when findings overlap: lower wins (after the stronger
    /// action). A token format beats the generic credential detector, and a
    /// checksum-validated number beats the phone layout.
    fn rank(self) -> u8 {
        match self {
            Kind::PrivateKey => 0,
            Kind::Jwt => 1,
            Kind::AwsAccessKeyId => 2,
            Kind::AwsSecretKey => 3,
            Kind::GithubToken => 4,
            Kind::SlackToken => 5,
            Kind::StripeKey => 6,
            Kind::OpenAiKey => 7,
            Kind::ConnectionString => 8,
            Kind::DenyTerm => 9,
            Kind::Iban => 10,
            Kind::Card => 11,
            Kind::UsSsn => 12,
            Kind::Email => 13,
            Kind::Ip => 14,
            Kind::Phone => 15,
            Kind::Credential => 16,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One detected span of the scanned text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finding {
    /// Which detector.
    pub kind: Kind,
    /// Byte offset of the first byte (a char boundary).
    pub start: usize,
    /// Byte offset one past the last byte (a char boundary).
    pub end: usize,
    /// The configured action for this detector.
    pub action: Action,
}

/// The findings of one scan, in text order and never overlapping.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    /// Findings sorted by `start`; of overlapping candidates only one is
    /// kept (the strongest action, then the more specific detector, then the
    /// longer span, then the earlier).
    pub findings: Vec<Finding>,
}

impl Scan {
    /// The verdict: the strongest action among the findings, `None` when
    /// there are none.
    pub fn action(&self) -> Option<Action> {
        self.findings.iter().map(|f| f.action).max()
    }

    /// `text` (the text that was scanned) with every `redact` finding
    /// replaced by `[REDACTED:TAG]`. Findings of other actions are left in
    /// place: `flag` changes nothing and `block`/`route` withhold the whole
    /// output.
    pub fn redact(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for f in &self.findings {
            if f.action != Action::Redact {
                continue;
            }
            if let (Some(before), true) = (text.get(at..f.start), f.end <= text.len()) {
                out.push_str(before);
                push_tag(&mut out, f.kind);
                at = f.end;
            }
        }
        out.push_str(text.get(at..).unwrap_or_default());
        out
    }
}

pub(crate) fn push_tag(out: &mut String, kind: Kind) {
    out.push_str("[REDACTED:");
    out.push_str(kind.tag());
    out.push(']');
}

/// The SSE event that ends a stream the policy halted, in the shape the
/// OpenAI SDKs raise as an API error (`data: {"error":{...}}`); the caller
/// closes the stream after it (no `[DONE]`).
pub fn halt_event(action: Action) -> &'static str {
    match action {
        Action::Route => {
            "data: {\"error\":{\"message\":\"the response was withheld for review by the output content policy\",\"type\":\"content_policy_violation\",\"param\":null,\"code\":\"output_withheld\"}}\n\n"
        }
        _ => {
            "data: {\"error\":{\"message\":\"the response was blocked by the output content policy\",\"type\":\"content_policy_violation\",\"param\":null,\"code\":\"output_blocked\"}}\n\n"
        }
    }
}

/// The unchecked shape of a content policy, as a config section would hold
/// it: detector names and action names as strings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicySpec {
    /// `(detector name, action name)` pairs; detectors not listed are off.
    pub detectors: Vec<(String, String)>,
    /// Deny terms, matched ASCII-case-insensitively on word boundaries.
    pub deny_terms: Vec<String>,
    /// The action for deny terms; `redact` when `None`.
    pub deny_action: Option<String>,
}

/// The longest deny term accepted: the stream hold-back window must cover a
/// whole term.
pub const MAX_DENY_TERM_BYTES: usize = 256;

/// One problem in a [`PolicySpec`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A detector name that does not exist.
    #[error("unknown detector `{0}`")]
    UnknownDetector(String),
    /// An action name that does not exist.
    #[error("unknown action `{action}` for `{detector}` (expected flag, redact, route or block)")]
    UnknownAction {
        /// The detector (or `deny_terms`).
        detector: String,
        /// The bad action name.
        action: String,
    },
    /// The same detector listed twice.
    #[error("detector `{0}` is listed more than once")]
    DuplicateDetector(String),
    /// A deny term that is empty or only whitespace.
    #[error("deny term {0} is empty")]
    EmptyDenyTerm(usize),
    /// A deny term longer than [`MAX_DENY_TERM_BYTES`].
    #[error("deny term {index} is {len} bytes long (at most {MAX_DENY_TERM_BYTES})")]
    DenyTermTooLong {
        /// Position in the list.
        index: usize,
        /// Its length in bytes.
        len: usize,
    },
}

/// Every problem found in a [`PolicySpec`] (never empty).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct PolicyErrors(pub Vec<PolicyError>);

/// A checked content policy: build a [`ContentScanner`] from it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    actions: BTreeMap<Kind, Action>,
    deny_terms: Vec<String>,
    deny_action: Option<Action>,
}

impl Policy {
    /// No detector on.
    pub fn new() -> Policy {
        Policy::default()
    }

    /// Every detector on with `action` (deny terms still need terms).
    pub fn all(action: Action) -> Policy {
        let mut p = Policy::new();
        for kind in Kind::DETECTORS {
            p.actions.insert(kind, action);
        }
        p
    }

    /// Turns `kind` on with `action` (`Kind::DenyTerm` sets the deny-term
    /// action).
    pub fn with(mut self, kind: Kind, action: Action) -> Policy {
        if kind == Kind::DenyTerm {
            self.deny_action = Some(action);
        } else {
            self.actions.insert(kind, action);
        }
        self
    }

    /// Adds deny terms, checked as in [`Policy::from_spec`].
    pub fn with_deny_terms<S: AsRef<str>>(mut self, terms: &[S], action: Action) -> Result<Policy, PolicyErrors> {
        let mut errors = Vec::new();
        for (index, term) in terms.iter().enumerate() {
            if let Some(t) = check_term(index, term.as_ref(), &mut errors) {
                self.deny_terms.push(t);
            }
        }
        self.deny_action = Some(action);
        if errors.is_empty() {
            Ok(self)
        } else {
            Err(PolicyErrors(errors))
        }
    }

    /// Checks a spec, reporting every error at once.
    pub fn from_spec(spec: &PolicySpec) -> Result<Policy, PolicyErrors> {
        let mut errors = Vec::new();
        let mut policy = Policy::new();
        for (name, action) in &spec.detectors {
            let kind = Kind::parse(name);
            let act = Action::parse(action);
            if kind.is_none() {
                errors.push(PolicyError::UnknownDetector(name.clone()));
            }
            if act.is_none() {
                errors.push(PolicyError::UnknownAction {
                    detector: name.clone(),
                    action: action.clone(),
                });
            }
            if let (Some(kind), Some(act)) = (kind, act)
                && policy.actions.insert(kind, act).is_some()
            {
                errors.push(PolicyError::DuplicateDetector(name.clone()));
            }
        }
        for (index, term) in spec.deny_terms.iter().enumerate() {
            if let Some(t) = check_term(index, term, &mut errors) {
                policy.deny_terms.push(t);
            }
        }
        match spec.deny_action.as_deref().map(|a| (a, Action::parse(a))) {
            None => policy.deny_action = Some(Action::Redact),
            Some((_, Some(a))) => policy.deny_action = Some(a),
            Some((a, None)) => errors.push(PolicyError::UnknownAction {
                detector: "deny_terms".to_owned(),
                action: a.to_owned(),
            }),
        }
        if errors.is_empty() {
            Ok(policy)
        } else {
            Err(PolicyErrors(errors))
        }
    }

    /// The action of `kind`, `None` when it is off.
    pub fn action(&self, kind: Kind) -> Option<Action> {
        if kind == Kind::DenyTerm {
            if self.deny_terms.is_empty() {
                return None;
            }
            return Some(self.deny_action.unwrap_or(Action::Redact));
        }
        self.actions.get(&kind).copied()
    }

    /// The deny terms, trimmed.
    pub fn deny_terms(&self) -> &[String] {
        &self.deny_terms
    }
}

fn check_term(index: usize, term: &str, errors: &mut Vec<PolicyError>) -> Option<String> {
    let t = term.trim();
    if t.is_empty() {
        errors.push(PolicyError::EmptyDenyTerm(index));
        None
    } else if t.len() > MAX_DENY_TERM_BYTES {
        errors.push(PolicyError::DenyTermTooLong { index, len: t.len() });
        None
    } else {
        Some(t.to_owned())
    }
}
