//! Access control: every request carries credentials (HTTP basic auth or a bearer token) that
//! the service configured; actions need the operator role; forms carry a CSRF token.

use std::sync::Arc;

use axum::extract::{OriginalUri, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::Inner;

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads every page; cannot replay or discard.
    Viewer,
    /// Reads every page, replays and discards dead letters.
    Operator,
}

impl Role {
    /// Its name, as shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
        }
    }
}

/// How a user proves who they are.
#[derive(Clone)]
pub(crate) enum Secret {
    /// HTTP basic auth: the password's SHA-256.
    Password([u8; 32]),
    /// `Authorization: Bearer`: the token's SHA-256.
    Token([u8; 32]),
}

#[derive(Clone)]
pub(crate) struct User {
    pub(crate) name: String,
    pub(crate) role: Role,
    pub(crate) secret: Secret,
}

/// The user a request was authenticated as, and where the dashboard is mounted.
#[derive(Debug, Clone)]
pub(crate) struct Principal {
    pub(crate) name: String,
    pub(crate) role: Role,
    /// The path the dashboard is mounted at ("" at the root), for links.
    pub(crate) base: String,
    /// The CSRF token this user's forms carry.
    pub(crate) csrf: String,
}

pub(crate) fn digest(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

/// Compares two digests in time independent of where they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff).ok()?);
        }
    }
    Some(out)
}

/// Finds the user the `Authorization` header names, if its secret is right.
pub(crate) fn authenticate<'a>(users: &'a [User], headers: &HeaderMap) -> Option<&'a User> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = String::from_utf8(decode_base64(rest.trim())?).ok()?;
        let (name, password) = decoded.split_once(':')?;
        let given = digest(password.as_bytes());
        // Every user is compared, so the time taken does not tell which names exist.
        let mut found = None;
        for u in users {
            if let Secret::Password(d) = &u.secret {
                if same(d, &given) && u.name == name {
                    found = Some(u);
                }
            }
        }
        found
    } else if scheme.eq_ignore_ascii_case("bearer") {
        let given = digest(rest.trim().as_bytes());
        let mut found = None;
        for u in users {
            if let Secret::Token(d) = &u.secret {
                if same(d, &given) {
                    found = Some(u);
                }
            }
        }
        found
    } else {
        None
    }
}

/// The CSRF token of `user`'s forms: a keyed digest that a page of another site cannot know.
pub(crate) fn csrf_token(key: &[u8; 32], user: &str) -> String {
    let mut h = Sha256::new();
    h.update(key);
    h.update(b"csrf:");
    h.update(user.as_bytes());
    txbus_core::inspect::hash_hex(&h.finalize().into())
}

/// Refuses a form that did not come from the dashboard's own pages: a wrong CSRF token, or a
/// browser saying the request comes from another site.
pub(crate) fn check_form(
    principal: &Principal,
    headers: &HeaderMap,
    token: Option<&str>,
) -> Result<(), crate::error::PageError> {
    let forbidden = |why: &str| {
        crate::error::PageError::forbidden(format!(
            "refused: {why}; submit the form from the dashboard's own page"
        ))
    };
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        if !matches!(site, "same-origin" | "none") {
            return Err(forbidden("the request comes from another site"));
        }
    }
    if let (Some(origin), Some(host)) = (
        headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
        headers.get(header::HOST).and_then(|v| v.to_str().ok()),
    ) {
        let origin_host = origin.split_once("://").map_or(origin, |(_, h)| h);
        if origin != "null" && origin_host != host {
            return Err(forbidden("the request comes from another origin"));
        }
    }
    let expected = principal.csrf.as_bytes();
    match token {
        Some(t) if t.len() == expected.len() && digest(t.as_bytes()) == digest(expected) => Ok(()),
        _ => Err(forbidden("the form's CSRF token is missing or wrong")),
    }
}

/// The middleware: no credentials or wrong ones → 401 with a basic-auth challenge.
pub(crate) async fn require(
    State(inner): State<Arc<Inner>>,
    OriginalUri(original): OriginalUri,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(user) = authenticate(&inner.users, req.headers()) else {
        tracing::debug!(path = %original.path(), "dashboard request without valid credentials refused");
        return (
            StatusCode::UNAUTHORIZED,
            [(
                header::WWW_AUTHENTICATE,
                "Basic realm=\"txbus dashboard\", charset=\"UTF-8\"",
            )],
            "credentials required: sign in with a dashboard user, or send a bearer token",
        )
            .into_response();
    };
    let inner_path = req.uri().path();
    let full = original.path();
    let base = match full.strip_suffix(inner_path) {
        Some(b) => b.to_owned(),
        None if inner_path == "/" => full.trim_end_matches('/').to_owned(),
        None => String::new(),
    };
    let principal = Principal {
        name: user.name.clone(),
        role: user.role,
        base,
        csrf: csrf_token(&inner.csrf_key, &user.name),
    };
    req.extensions_mut().insert(principal);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_as_browsers_encode() {
        assert_eq!(decode_base64("YWRhOnNlY3JldA==").unwrap(), b"ada:secret");
        assert_eq!(decode_base64("YQ").unwrap(), b"a");
        assert!(decode_base64("not base64!").is_none());
    }

    #[test]
    fn credentials_are_checked_by_name_and_secret() {
        let users = vec![
            User {
                name: "ada".into(),
                role: Role::Operator,
                secret: Secret::Password(digest(b"secret")),
            },
            User {
                name: "ci".into(),
                role: Role::Viewer,
                secret: Secret::Token(digest(b"tok-123")),
            },
        ];
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
            h
        };
        assert_eq!(
            authenticate(&users, &with("Basic YWRhOnNlY3JldA==")).map(|u| u.role),
            Some(Role::Operator)
        );
        // ada:wrong
        assert!(authenticate(&users, &with("Basic YWRhOndyb25n")).is_none());
        // bob:secret
        assert!(authenticate(&users, &with("Basic Ym9iOnNlY3JldA==")).is_none());
        assert_eq!(
            authenticate(&users, &with("Bearer tok-123")).map(|u| u.role),
            Some(Role::Viewer)
        );
        assert!(authenticate(&users, &with("Bearer nope")).is_none());
        assert!(authenticate(&users, &HeaderMap::new()).is_none());
    }
}
