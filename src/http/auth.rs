//! API keys: admin endpoints need an admin key when admin keys are configured and answer only loopback
//! clients when none are; inference endpoints need an API key (or an admin key) when API keys are configured.
//! Keys are compared through their SHA-256 digests in constant time and never logged.

use std::future::{ready, Ready};
use std::marker::PhantomData;

use actix_web::dev::Payload;
use actix_web::http::{header, StatusCode};
use actix_web::{web, FromRequest, HttpRequest};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::AppState;
use crate::config::AuthConfig;

/// The key of an `Authorization: Bearer <key>` header (the scheme's name is case-insensitive).
fn presented(req: &HttpRequest) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

fn matches(key: &str, configured: &[String]) -> bool {
    let digest = Sha256::digest(key.as_bytes());
    // Every configured key is compared, and each comparison touches every byte, so timing reveals nothing.
    configured.iter().fold(false, |found, k| {
        let other = Sha256::digest(k.as_bytes());
        let diff = digest
            .iter()
            .zip(other.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        found | (diff == 0)
    })
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

/// Admits a caller of an admin endpoint.
pub fn admin(req: &HttpRequest, auth: &AuthConfig) -> Result<(), ApiError> {
    if auth.admin_keys.is_empty() {
        // A dual-stack listener (`--host ::`) sees IPv4 clients as ::ffff:a.b.c.d.
        let loopback = req
            .peer_addr()
            .is_some_and(|a| a.ip().to_canonical().is_loopback());
        return if loopback {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "admin endpoints answer loopback clients only while no admin keys are configured",
            ))
        };
    }
    match presented(req) {
        None => Err(unauthorized(
            "this endpoint needs Authorization: Bearer <admin key>",
        )),
        Some(k) if matches(k, &auth.admin_keys) => Ok(()),
        Some(k) if matches(k, &auth.api_keys) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this key may not use admin endpoints",
        )),
        Some(_) => Err(unauthorized("the key is not valid")),
    }
}

/// Admits a caller of an inference or feedback endpoint.
pub fn caller(req: &HttpRequest, auth: &AuthConfig) -> Result<(), ApiError> {
    if auth.api_keys.is_empty() {
        return Ok(());
    }
    match presented(req) {
        None => Err(unauthorized(
            "this endpoint needs Authorization: Bearer <API key>",
        )),
        Some(k) if matches(k, &auth.api_keys) || matches(k, &auth.admin_keys) => Ok(()),
        Some(_) => Err(unauthorized("the key is not valid")),
    }
}

/// Who may call an endpoint: [`Inference`] or [`AdminOnly`].
pub trait Scope {
    /// Admits or refuses the request.
    fn admit(req: &HttpRequest, auth: &AuthConfig) -> Result<(), ApiError>;
}

/// Inference and feedback endpoints ([`caller`]).
pub struct Inference;
/// Admin endpoints ([`admin`]).
pub struct AdminOnly;

impl Scope for Inference {
    fn admit(req: &HttpRequest, auth: &AuthConfig) -> Result<(), ApiError> {
        caller(req, auth)
    }
}

impl Scope for AdminOnly {
    fn admit(req: &HttpRequest, auth: &AuthConfig) -> Result<(), ApiError> {
        admin(req, auth)
    }
}

/// The key check of scope `S` as an extractor. Listed as a handler's first argument, it refuses a request
/// without a valid key before the body is read or parsed: a caller without a key learns nothing of the
/// schema and costs no parsing. `E` is the error's shape (`ApiError`, or OpenAI's on its routes).
pub struct Keyed<S, E>(PhantomData<(S, E)>);

/// An inference or feedback caller's key, checked before the body is read.
pub type Caller<E = ApiError> = Keyed<Inference, E>;
/// An admin's key, checked before the body is read.
pub type Admin<E = ApiError> = Keyed<AdminOnly, E>;

impl<S: Scope, E: From<ApiError> + Into<actix_web::Error>> FromRequest for Keyed<S, E> {
    type Error = E;
    type Future = Ready<Result<Self, E>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let admitted = req
            .app_data::<web::Data<AppState>>()
            .ok_or_else(|| ApiError::internal("the server's state is missing; this is a bug"))
            .and_then(|state| S::admit(req, &state.config.auth));
        ready(admitted.map(|()| Self(PhantomData)).map_err(E::from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    fn auth(admin: &[&str], api: &[&str]) -> AuthConfig {
        AuthConfig {
            admin_keys: admin.iter().map(|s| s.to_string()).collect(),
            api_keys: api.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn without_admin_keys_only_loopback_clients_are_admins() {
        let local = TestRequest::default()
            .peer_addr("127.0.0.1:5000".parse().unwrap())
            .to_http_request();
        let remote = TestRequest::default()
            .peer_addr("192.0.2.7:5000".parse().unwrap())
            .to_http_request();
        assert!(admin(&local, &auth(&[], &[])).is_ok());
        // An IPv4 client of a dual-stack listener.
        let mapped = TestRequest::default()
            .peer_addr("[::ffff:127.0.0.1]:5000".parse().unwrap())
            .to_http_request();
        assert!(admin(&mapped, &auth(&[], &[])).is_ok());
        assert_eq!(
            admin(&remote, &auth(&[], &[])).unwrap_err().status,
            StatusCode::FORBIDDEN
        );
    }

    #[test]
    fn keys_are_checked_by_scope() {
        let keys = auth(&["root-key"], &["user-key"]);
        let with = |k: &str| {
            TestRequest::default()
                .insert_header(("authorization", format!("Bearer {k}")))
                .to_http_request()
        };
        assert!(admin(&with("root-key"), &keys).is_ok());
        assert_eq!(
            admin(&with("user-key"), &keys).unwrap_err().status,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            admin(&with("wrong"), &keys).unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            admin(&TestRequest::default().to_http_request(), &keys)
                .unwrap_err()
                .status,
            StatusCode::UNAUTHORIZED
        );
        assert!(caller(&with("user-key"), &keys).is_ok());
        assert!(caller(&with("root-key"), &keys).is_ok());
        let lower = TestRequest::default()
            .insert_header(("authorization", "bearer  user-key"))
            .to_http_request();
        assert!(caller(&lower, &keys).is_ok());
        assert_eq!(
            caller(&with("nope"), &keys).unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
        assert!(caller(
            &TestRequest::default().to_http_request(),
            &auth(&["root-key"], &[])
        )
        .is_ok());
    }
}
