//! Parsing and syntactic validation of exchange requests: form bodies in,
//! typed requests out, every defect an [`OAuthError`] that names the parameter.
//! Policy and token checks happen later; this module only decides whether a
//! request is well-formed.

use std::collections::HashMap;
use std::time::Duration;

use super::oauth::{ErrorCode, OAuthError};

pub const GRANT_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const GRANT_CLIENT_CREDENTIALS: &str = "client_credentials";
/// RFC 7523 §2.1: a JWT as the authorization grant (MCP SEP-1933).
pub const GRANT_JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// RFC 7523 §2.2: a JWT as client authentication (MCP SEP-1046, private_key_jwt).
pub const CLIENT_ASSERTION_JWT_BEARER: &str =
    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// draft-ietf-oauth-spiffe-client-auth: a JWT-SVID as client authentication.
pub const CLIENT_ASSERTION_JWT_SPIFFE: &str =
    "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe";
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
pub const TOKEN_TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";

/// Longest token accepted in a form field; JWT-SVIDs and our access tokens are
/// well under 4 KiB even with deep `act` chains.
const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Longest task id, approval id or audience.
const MAX_ID_LEN: usize = 256;
const MAX_TARGET_LEN: usize = 2048;
const MAX_SCOPES: usize = 32;
const MAX_SCOPE_LEN: usize = 128;

/// A decoded form: each name with all its values, in order.
#[derive(Debug, Default)]
pub struct Form(HashMap<String, Vec<String>>);

impl Form {
    pub fn parse(body: &[u8]) -> Self {
        let mut map: HashMap<String, Vec<String>> = HashMap::new();
        for (k, v) in form_urlencoded::parse(body) {
            map.entry(k.into_owned()).or_default().push(v.into_owned());
        }
        Self(map)
    }

    /// A parameter that may appear at most once (RFC 6749 §3.2: "Request and
    /// response parameters MUST NOT be included more than once").
    pub fn single(&self, name: &str) -> Result<Option<&str>, OAuthError> {
        match self.0.get(name).map(Vec::as_slice) {
            None | Some([]) => Ok(None),
            Some([v]) if v.is_empty() => Ok(None),
            Some([v]) => Ok(Some(v.as_str())),
            Some(_) => Err(OAuthError::invalid_request(format!(
                "parameter `{name}` appears more than once"
            ))),
        }
    }

    pub fn required(&self, name: &str) -> Result<&str, OAuthError> {
        self.single(name)?
            .ok_or_else(|| OAuthError::invalid_request(format!("parameter `{name}` is required")))
    }

    fn all(&self, name: &str) -> &[String] {
        self.0.get(name).map(Vec::as_slice).unwrap_or_default()
    }
}

/// Where the token will be used: an RFC 8707 resource URI or a logical audience.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Resource(String),
    Audience(String),
}

impl Target {
    pub fn as_str(&self) -> &str {
        match self {
            Self::Resource(s) | Self::Audience(s) => s,
        }
    }
}

/// How the client asks for a token. Every grant presents the caller's own
/// JWT-SVID; they differ in the parameter that carries it and in the error
/// code a bad one gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// RFC 8693: the JWT-SVID is `subject_token` (or `actor_token` when
    /// delegating).
    TokenExchange,
    /// RFC 6749 §4.4 with RFC 7523 §2.2 client authentication: the JWT-SVID
    /// is `client_assertion`.
    ClientCredentials,
    /// RFC 7523 §2.1: the JWT-SVID is `assertion`.
    JwtBearer,
}

impl Grant {
    pub fn as_str(self) -> &'static str {
        match self {
            Grant::TokenExchange => GRANT_TOKEN_EXCHANGE,
            Grant::ClientCredentials => GRANT_CLIENT_CREDENTIALS,
            Grant::JwtBearer => GRANT_JWT_BEARER,
        }
    }

    /// The parameter that carries the caller's JWT-SVID.
    pub fn svid_param(self, delegating: bool) -> &'static str {
        match self {
            Grant::TokenExchange if delegating => "actor_token",
            Grant::TokenExchange => "subject_token",
            Grant::ClientCredentials => "client_assertion",
            Grant::JwtBearer => "assertion",
        }
    }

    /// The error for a JWT-SVID that does not authenticate: RFC 8693
    /// §2.2.2 `invalid_request`, RFC 6749 §5.2 `invalid_client` (a failed
    /// client authentication), RFC 7523 §3.1 `invalid_grant`.
    pub fn credential_error(self, description: impl Into<String>) -> OAuthError {
        let code = match self {
            Grant::TokenExchange => ErrorCode::InvalidRequest,
            Grant::ClientCredentials => ErrorCode::InvalidClient,
            Grant::JwtBearer => ErrorCode::InvalidGrant,
        };
        OAuthError::new(code, description)
    }
}

/// A well-formed token request.
///
/// For RFC 8693 the roles are §2.1's: `subject_token` is the party the
/// token is for, `actor_token` the party acting. A direct exchange sends
/// only the caller's JWT-SVID, as `subject_token`; a delegated one sends
/// the delegating access token as `subject_token` and the caller's JWT-SVID
/// as `actor_token`. The other grants carry the JWT-SVID as
/// `client_assertion` or `assertion` and cannot delegate. All arrive here
/// under the names of what they are.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub grant: Grant,
    /// The caller's own JWT-SVID (the subject of a direct exchange, the actor
    /// of a delegated one, the client assertion or the assertion).
    pub svid: String,
    /// `client_id`, when sent: it must name the JWT-SVID's subject.
    pub client_id: Option<String>,
    /// The access token acted for, when delegating.
    pub delegating_token: Option<String>,
    /// The one SPIFFE ID the issued token names in `may_act` (RFC 8693 §4.4):
    /// the workload this token's holder consents to delegate to.
    pub may_act: Option<String>,
    pub target: Target,
    /// Requested scopes, deduplicated, in request order.
    pub scopes: Vec<String>,
    pub task_id: Option<String>,
    pub requested_ttl: Option<Duration>,
    /// Grant the permitted subset instead of refusing when some scopes are denied.
    pub allow_partial: bool,
    pub approval_id: Option<String>,
}

impl TokenRequest {
    pub fn from_form(form: &Form) -> Result<Self, OAuthError> {
        let (grant, svid, delegating_token) = match form.required("grant_type")? {
            GRANT_TOKEN_EXCHANGE => {
                refuse_params(
                    form,
                    GRANT_TOKEN_EXCHANGE,
                    &["assertion", "client_assertion"],
                )?;
                let (svid, delegating) = token_roles(form)?;
                (Grant::TokenExchange, svid, delegating)
            }
            GRANT_CLIENT_CREDENTIALS => {
                refuse_params(form, GRANT_CLIENT_CREDENTIALS, &DELEGATION_PARAMS)?;
                refuse_params(form, GRANT_CLIENT_CREDENTIALS, &["assertion"])?;
                (Grant::ClientCredentials, client_assertion(form)?, None)
            }
            GRANT_JWT_BEARER => {
                refuse_params(form, GRANT_JWT_BEARER, &DELEGATION_PARAMS)?;
                refuse_params(form, GRANT_JWT_BEARER, &["client_assertion"])?;
                let assertion = token_param(form, "assertion")?.ok_or_else(|| {
                    OAuthError::invalid_request(
                        "parameter `assertion` is required: the caller's JWT-SVID (RFC 7523 §2.1)",
                    )
                })?;
                (Grant::JwtBearer, assertion, None)
            }
            other => {
                return Err(OAuthError::new(
                    ErrorCode::UnsupportedGrantType,
                    format!(
                        "grant_type {other:?} is not supported; use {GRANT_TOKEN_EXCHANGE}, {GRANT_CLIENT_CREDENTIALS} or {GRANT_JWT_BEARER}"
                    ),
                ));
            }
        };
        let client_id = match form.single("client_id")? {
            Some(id) if id.len() > MAX_TARGET_LEN => {
                return Err(OAuthError::invalid_request("`client_id` is too long"));
            }
            id => id.map(str::to_string),
        };
        let may_act = match form.single("may_act")? {
            None => None,
            Some(id) => {
                if id.len() > MAX_TARGET_LEN || spiffe::SpiffeId::new(id).is_err() {
                    return Err(OAuthError::invalid_request(
                        "`may_act` must be the SPIFFE ID of the one workload that may act on this token's behalf",
                    ));
                }
                Some(id.to_string())
            }
        };
        if let Some(t) = form.single("requested_token_type")?
            && t != TOKEN_TYPE_ACCESS_TOKEN
        {
            return Err(OAuthError::invalid_request(format!(
                "requested_token_type {t:?} is not supported; only {TOKEN_TYPE_ACCESS_TOKEN}"
            )));
        }
        let target = target(form)?;
        let scopes = parse_scopes(form.single("scope")?.unwrap_or(""))?;
        if scopes.is_empty() {
            return Err(OAuthError::new(
                ErrorCode::InvalidScope,
                "scope is required: name exactly the scopes this task needs",
            ));
        }
        let task_id = form.single("task_id")?.map(str::to_string);
        if let Some(t) = &task_id {
            check_id("task_id", t)?;
        }
        let approval_id = form.single("approval_id")?.map(str::to_string);
        if let Some(a) = &approval_id {
            check_id("approval_id", a)?;
        }
        let requested_ttl = match form.single("requested_ttl")? {
            None => None,
            Some(v) => match v.parse::<u64>() {
                Ok(secs) if secs > 0 => Some(Duration::from_secs(secs)),
                _ => {
                    return Err(OAuthError::invalid_request(
                        "requested_ttl must be a positive number of seconds",
                    ));
                }
            },
        };
        let allow_partial = match form.single("scope_mode")? {
            None | Some("exact") => false,
            Some("subset") => true,
            Some(_) => {
                return Err(OAuthError::invalid_request(
                    "scope_mode must be \"exact\" (default) or \"subset\"",
                ));
            }
        };
        Ok(Self {
            grant,
            svid,
            client_id,
            delegating_token,
            may_act,
            target,
            scopes,
            task_id,
            requested_ttl,
            allow_partial,
            approval_id,
        })
    }
}

/// Which token is the caller's JWT-SVID and which, if any, the delegating
/// access token, from the four token parameters (RFC 8693 §2.1).
fn token_roles(form: &Form) -> Result<(String, Option<String>), OAuthError> {
    let subject = token_param(form, "subject_token")?
        .ok_or_else(|| OAuthError::invalid_request("parameter `subject_token` is required"))?;
    let subject_type = form.required("subject_token_type")?;
    let actor = token_param(form, "actor_token")?;
    let actor_type = form.single("actor_token_type")?;
    match (subject_type, actor, actor_type) {
        (TOKEN_TYPE_JWT, None, None) => Ok((subject, None)),
        (TOKEN_TYPE_ACCESS_TOKEN, Some(actor), Some(TOKEN_TYPE_JWT)) => Ok((actor, Some(subject))),
        (_, Some(_), None) => Err(OAuthError::invalid_request(
            "actor_token_type is required with actor_token",
        )),
        (_, None, Some(_)) => Err(OAuthError::invalid_request(
            "actor_token_type must not be sent without actor_token",
        )),
        (TOKEN_TYPE_JWT, Some(_), Some(TOKEN_TYPE_ACCESS_TOKEN)) => {
            Err(OAuthError::invalid_request(format!(
                "the token roles are reversed: to act on behalf of a token's holder, send that access token as subject_token ({TOKEN_TYPE_ACCESS_TOKEN}) and your JWT-SVID as actor_token ({TOKEN_TYPE_JWT}), as RFC 8693 §2.1 defines them"
            )))
        }
        (TOKEN_TYPE_ACCESS_TOKEN, None, None) => Err(OAuthError::invalid_request(format!(
            "a delegated exchange needs the caller's JWT-SVID as actor_token ({TOKEN_TYPE_JWT})"
        ))),
        (TOKEN_TYPE_JWT | TOKEN_TYPE_ACCESS_TOKEN, Some(_), Some(other)) => {
            Err(OAuthError::invalid_request(format!(
                "actor_token_type {other:?} is not supported; the actor token is the caller's JWT-SVID ({TOKEN_TYPE_JWT})"
            )))
        }
        (other, _, _) => Err(OAuthError::invalid_request(format!(
            "subject_token_type {other:?} is not supported; send the caller's JWT-SVID as {TOKEN_TYPE_JWT}, or a delegating access token as {TOKEN_TYPE_ACCESS_TOKEN}"
        ))),
    }
}

/// RFC 8693's token parameters, which only a token exchange takes.
const DELEGATION_PARAMS: [&str; 4] = [
    "subject_token",
    "subject_token_type",
    "actor_token",
    "actor_token_type",
];

fn refuse_params(form: &Form, grant: &str, names: &[&str]) -> Result<(), OAuthError> {
    match names
        .iter()
        .find(|n| form.all(n).iter().any(|v| !v.is_empty()))
    {
        Some(n) => Err(OAuthError::invalid_request(format!(
            "`{n}` is not a parameter of grant_type {grant}"
        ))),
        None => Ok(()),
    }
}

/// The JWT-SVID of a `client_credentials` request (RFC 7521 §4.2, RFC 7523
/// §2.2). A missing or unknown assertion type is a failed client
/// authentication (RFC 6749 §5.2: `invalid_client`).
fn client_assertion(form: &Form) -> Result<String, OAuthError> {
    let kind = form.single("client_assertion_type")?;
    let assertion = token_param(form, "client_assertion")?;
    let authenticate = format!(
        "authenticate with your JWT-SVID: client_assertion=<JWT-SVID> and client_assertion_type={CLIENT_ASSERTION_JWT_BEARER} (or {CLIENT_ASSERTION_JWT_SPIFFE})"
    );
    match (kind, assertion) {
        (Some(CLIENT_ASSERTION_JWT_BEARER | CLIENT_ASSERTION_JWT_SPIFFE), Some(a)) => Ok(a),
        (None, None) => Err(OAuthError::new(
            ErrorCode::InvalidClient,
            format!("no client authentication: {authenticate}"),
        )),
        (Some(CLIENT_ASSERTION_JWT_BEARER | CLIENT_ASSERTION_JWT_SPIFFE), None) => Err(
            OAuthError::new(ErrorCode::InvalidClient, "client_assertion is missing"),
        ),
        (None, Some(_)) => Err(OAuthError::new(
            ErrorCode::InvalidClient,
            format!("client_assertion_type is missing: {authenticate}"),
        )),
        (Some(other), _) => Err(OAuthError::new(
            ErrorCode::InvalidClient,
            format!("client_assertion_type {other:?} is not supported: {authenticate}"),
        )),
    }
}

fn token_param(form: &Form, name: &str) -> Result<Option<String>, OAuthError> {
    match form.single(name)? {
        None => Ok(None),
        Some(t) if t.len() > MAX_TOKEN_LEN => Err(OAuthError::invalid_request(format!(
            "`{name}` is longer than {MAX_TOKEN_LEN} bytes"
        ))),
        Some(t) => Ok(Some(t.to_string())),
    }
}

/// Exactly one `resource` or `audience`: an issued token has a single `aud`.
fn target(form: &Form) -> Result<Target, OAuthError> {
    let resources = form.all("resource");
    let audiences = form.all("audience");
    let target = match (resources, audiences) {
        ([r], []) => {
            check_resource_uri(r)?;
            Target::Resource(r.clone())
        }
        ([], [a]) => Target::Audience(a.clone()),
        ([], []) => {
            return Err(OAuthError::new(
                ErrorCode::InvalidTarget,
                "name the target with one `resource` (URI) or one `audience`",
            ));
        }
        _ => {
            return Err(OAuthError::new(
                ErrorCode::InvalidTarget,
                "a token has exactly one audience: send one `resource` or one `audience`",
            ));
        }
    };
    let t = target.as_str();
    if t.is_empty() || t.len() > MAX_TARGET_LEN || t.chars().any(char::is_control) {
        return Err(OAuthError::new(
            ErrorCode::InvalidTarget,
            format!("the target must be 1 to {MAX_TARGET_LEN} printable characters"),
        ));
    }
    Ok(target)
}

/// RFC 8707 §2: an absolute URI without a fragment.
fn check_resource_uri(uri: &str) -> Result<(), OAuthError> {
    let scheme_end = uri.find(':').unwrap_or(0);
    let scheme_ok = scheme_end > 0
        && uri[..scheme_end].chars().enumerate().all(|(i, c)| {
            c.is_ascii_alphabetic() || (i > 0 && (c.is_ascii_digit() || "+-.".contains(c)))
        });
    if !scheme_ok || uri.len() == scheme_end + 1 {
        return Err(OAuthError::new(
            ErrorCode::InvalidTarget,
            "resource must be an absolute URI such as https://mcp.example.com/mcp",
        ));
    }
    if uri.contains('#') {
        return Err(OAuthError::new(
            ErrorCode::InvalidTarget,
            "resource must not contain a fragment",
        ));
    }
    Ok(())
}

/// RFC 6749 §3.3 scope tokens, space-delimited, deduplicated.
pub fn parse_scopes(text: &str) -> Result<Vec<String>, OAuthError> {
    let mut scopes: Vec<String> = Vec::new();
    for s in text.split(' ').filter(|s| !s.is_empty()) {
        let valid = s.len() <= MAX_SCOPE_LEN
            && s.bytes()
                .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b));
        if !valid {
            return Err(OAuthError::new(
                ErrorCode::InvalidScope,
                format!("scope {s:?} is not a valid scope token"),
            ));
        }
        if !scopes.iter().any(|x| x == s) {
            // Stop at the first scope too many: checking for duplicates is
            // quadratic, and a 64 KiB body of distinct scopes used to cost
            // seconds of CPU before being refused.
            if scopes.len() == MAX_SCOPES {
                return Err(OAuthError::new(
                    ErrorCode::InvalidScope,
                    format!("at most {MAX_SCOPES} scopes per request"),
                ));
            }
            scopes.push(s.to_string());
        }
    }
    if scopes.len() > MAX_SCOPES {
        return Err(OAuthError::new(
            ErrorCode::InvalidScope,
            format!("at most {MAX_SCOPES} scopes per request"),
        ));
    }
    Ok(scopes)
}

/// Task and approval ids: printable ASCII without spaces, bounded.
pub fn check_id(name: &str, id: &str) -> Result<(), OAuthError> {
    if id.is_empty() || id.len() > MAX_ID_LEN || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(OAuthError::invalid_request(format!(
            "`{name}` must be 1 to {MAX_ID_LEN} printable ASCII characters without spaces"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(body: &str) -> Result<TokenRequest, OAuthError> {
        TokenRequest::from_form(&Form::parse(body.as_bytes()))
    }

    const BASE: &str = "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&subject_token=a.b.c&subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Ajwt";

    #[test]
    fn parses_a_full_request() {
        let r = req(&format!(
            "{BASE}&resource=https%3A%2F%2Fnotes.example%2Fmcp&scope=notes%3Aread+notes%3Awrite+notes%3Aread&task_id=t-1&requested_ttl=60&scope_mode=subset"
        ))
        .unwrap();
        assert_eq!(
            r.target,
            Target::Resource("https://notes.example/mcp".into())
        );
        assert_eq!(r.scopes, ["notes:read", "notes:write"]);
        assert_eq!(r.task_id.as_deref(), Some("t-1"));
        assert_eq!(r.requested_ttl, Some(Duration::from_secs(60)));
        assert!(r.allow_partial);
    }

    #[test]
    fn errors_name_the_problem() {
        let code = |body: &str| req(body).unwrap_err().code;
        assert_eq!(code("grant_type=password"), ErrorCode::UnsupportedGrantType);
        assert_eq!(code(&format!("{BASE}&scope=a")), ErrorCode::InvalidTarget);
        assert_eq!(
            code(&format!("{BASE}&audience=x&audience=y&scope=a")),
            ErrorCode::InvalidTarget
        );
        assert_eq!(
            code(&format!("{BASE}&resource=relative/path&scope=a")),
            ErrorCode::InvalidTarget
        );
        assert_eq!(
            code(&format!("{BASE}&resource=https://x/y%23frag&scope=a")),
            ErrorCode::InvalidTarget
        );
        assert_eq!(code(&format!("{BASE}&audience=x")), ErrorCode::InvalidScope);
        assert_eq!(
            code(&format!("{BASE}&audience=x&scope=a%22b")),
            ErrorCode::InvalidScope
        );
        assert_eq!(
            code(&format!("{BASE}&audience=x&scope=a&scope=b")),
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            code(&format!("{BASE}&audience=x&scope=a&actor_token=t")),
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            code(&format!("{BASE}&audience=x&scope=a&requested_ttl=-5")),
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            code(&format!("{BASE}&audience=x&scope=a&task_id=has%20space")),
            ErrorCode::InvalidRequest
        );
        let e = req("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange")
            .unwrap_err();
        assert!(e.description.contains("subject_token"), "{e}");
    }

    const JWT: &str = "urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Ajwt";
    const ACCESS: &str = "urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Aaccess_token";
    const GRANT: &str =
        "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&audience=x&scope=a";

    #[test]
    fn token_roles_follow_rfc_8693() {
        let direct = req(&format!(
            "{GRANT}&subject_token=svid&subject_token_type={JWT}"
        ))
        .unwrap();
        assert_eq!(direct.svid, "svid");
        assert_eq!(direct.delegating_token, None);

        let delegated = req(&format!(
            "{GRANT}&subject_token=parent&subject_token_type={ACCESS}&actor_token=svid&actor_token_type={JWT}"
        ))
        .unwrap();
        assert_eq!(delegated.svid, "svid");
        assert_eq!(delegated.delegating_token.as_deref(), Some("parent"));

        let reversed = req(&format!(
            "{GRANT}&subject_token=svid&subject_token_type={JWT}&actor_token=parent&actor_token_type={ACCESS}"
        ))
        .unwrap_err();
        assert_eq!(reversed.code, ErrorCode::InvalidRequest);
        assert!(reversed.description.contains("reversed"), "{reversed}");

        let no_actor = req(&format!(
            "{GRANT}&subject_token=parent&subject_token_type={ACCESS}"
        ))
        .unwrap_err();
        assert!(no_actor.description.contains("actor_token"), "{no_actor}");
    }

    #[test]
    fn may_act_must_be_a_spiffe_id() {
        let base = format!("{GRANT}&subject_token=svid&subject_token_type={JWT}");
        let ok = req(&format!("{base}&may_act=spiffe%3A%2F%2Fexample.org%2Fsub")).unwrap();
        assert_eq!(ok.may_act.as_deref(), Some("spiffe://example.org/sub"));
        for bad in [
            "https%3A%2F%2Fexample.org",
            "spiffe%3A%2F%2F",
            "spiffe%3A%2F%2Fexample.org%2Fa%2F%2Fb",
            "anyone",
        ] {
            let e = req(&format!("{base}&may_act={bad}")).unwrap_err();
            assert!(e.description.contains("may_act"), "{bad}: {e}");
        }
    }
}
