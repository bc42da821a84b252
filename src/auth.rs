//! Access tokens: a JWT says who may join (`sub`), where (`room`), what they may do there
//! (`grants`) and until when (`exp`). Signed with `auth.secret` (HS256) or by another service
//! whose public key is `auth.public_key_file` (RS256 for RSA, EdDSA for Ed25519).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// One thing a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Grant {
    /// Send audio and video (a publisher offer with media).
    Publish,
    /// Receive the room's audio and video.
    Subscribe,
    /// Send data-channel messages (a publisher offer with a data section).
    PublishData,
    /// Start and stop the recording of the token's room through the HTTP API.
    Record,
    /// Use the whole HTTP API.
    Admin,
}

impl Grant {
    /// What a token without a `grants` claim allows: what a member of a meeting does.
    pub const MEMBER: [Grant; 3] = [Grant::Publish, Grant::Subscribe, Grant::PublishData];
}

/// What a connection may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grants {
    pub publish: bool,
    pub subscribe: bool,
    pub publish_data: bool,
    pub record: bool,
    pub admin: bool,
}

impl Grants {
    /// With auth off, as in the original server: everyone may do everything.
    pub const EVERYTHING: Grants = Grants {
        publish: true,
        subscribe: true,
        publish_data: true,
        record: true,
        admin: true,
    };

    pub fn of(list: &[Grant]) -> Grants {
        let has = |g| list.contains(&g);
        Grants {
            publish: has(Grant::Publish),
            subscribe: has(Grant::Subscribe),
            publish_data: has(Grant::PublishData),
            record: has(Grant::Record),
            admin: has(Grant::Admin),
        }
    }
}

/// The token's payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The userId.
    pub sub: String,
    /// The roomId; absent: the holder joins no room.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    /// Absent: [`Grant::MEMBER`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grants: Option<Vec<Grant>>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
}

impl Claims {
    /// Claims for `user` in `room`, valid for `ttl` from now.
    pub fn new(user: &str, room: Option<&str>, grants: Option<Vec<Grant>>, ttl: Duration) -> Self {
        let now = unix_now();
        Claims {
            sub: user.to_owned(),
            room: room.map(str::to_owned),
            grants,
            exp: now + ttl.as_secs(),
            iat: Some(now),
        }
    }

    pub fn grants(&self) -> Grants {
        Grants::of(self.grants.as_deref().unwrap_or(&Grant::MEMBER))
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A token signed with `secret` (HS256), as `switchboard token` prints it.
pub fn mint(secret: &str, claims: &Claims) -> Result<String, AuthError> {
    let cannot = |e: jsonwebtoken::errors::Error| AuthError::Config(format!("cannot sign: {e}"));
    let key = EncodingKey::from_secret(secret.as_bytes()).map_err(cannot)?;
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &key).map_err(cannot)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The configuration cannot verify tokens (a bad key file).
    #[error("{0}")]
    Config(String),
    /// A token refused: the text is the `connect_error` message.
    #[error("{0}")]
    Refused(String),
}

/// Checks tokens against the configured keys.
pub struct Verifier {
    secret: Option<DecodingKey>,
    public: Option<(Algorithm, DecodingKey)>,
}

impl Verifier {
    /// `None` when neither a secret nor a public key is configured: auth is off.
    pub fn new(secret: &str, public_key_pem: Option<&[u8]>) -> Result<Option<Self>, AuthError> {
        let secret = (!secret.is_empty())
            .then(|| DecodingKey::from_secret(secret.as_bytes()))
            .transpose()
            .map_err(|e| AuthError::Config(format!("auth.secret: {e}")))?;
        let public = public_key_pem.map(public_key).transpose()?;
        if secret.is_none() && public.is_none() {
            return Ok(None);
        }
        Ok(Some(Verifier { secret, public }))
    }

    /// The connection's grants if `token` is valid now for `user` in `room`; else why not.
    pub fn verify(&self, token: &str, user: &str, room: Option<&str>) -> Result<Grants, AuthError> {
        let refused = |why: String| AuthError::Refused(why);
        let claims = self.claims(token)?;
        if claims.sub != user {
            return Err(refused(format!(
                "the token is for user {:?}, not {user:?}",
                claims.sub
            )));
        }
        if claims.room.as_deref() != room {
            let named = |r: Option<&str>| r.map_or("no room".to_owned(), |r| format!("room {r:?}"));
            return Err(refused(format!(
                "the token is for {}, not {}",
                named(claims.room.as_deref()),
                named(room)
            )));
        }
        Ok(claims.grants())
    }

    /// The claims of a token signed by a configured key and valid now.
    pub fn claims(&self, token: &str) -> Result<Claims, AuthError> {
        let refused = |why: String| AuthError::Refused(why);
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| refused(format!("the token is malformed: {e}")))?;
        let key = match header.alg {
            Algorithm::HS256 => self.secret.as_ref(),
            alg => self
                .public
                .as_ref()
                .filter(|(accepted, _)| *accepted == alg)
                .map(|(_, key)| key),
        }
        .ok_or_else(|| {
            refused(format!(
                "tokens signed with {:?} are not accepted here",
                header.alg
            ))
        })?;
        let mut validation = Validation::new(header.alg);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_aud = false;
        jsonwebtoken::decode::<Claims>(token, key, &validation)
            .map(|data| data.claims)
            .map_err(|e| refused(token_error(e.kind())))
    }
}

fn token_error(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::ExpiredSignature => "the token has expired".into(),
        ErrorKind::ImmatureSignature => "the token is not valid yet".into(),
        ErrorKind::InvalidSignature => "the token's signature is invalid (wrong key?)".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("the token has no {claim} claim"),
        other => format!("the token is malformed: {other:?}"),
    }
}

/// An RSA key verifies RS256 tokens, an Ed25519 key EdDSA tokens.
fn public_key(pem: &[u8]) -> Result<(Algorithm, DecodingKey), AuthError> {
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        return Ok((Algorithm::RS256, key));
    }
    if let Ok(key) = DecodingKey::from_ed_pem(pem) {
        return Ok((Algorithm::EdDSA, key));
    }
    Err(AuthError::Config(
        "auth.public_key_file holds neither an RSA nor an Ed25519 public key (PEM)".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn verifier() -> Verifier {
        Verifier::new("s3cret", None).unwrap().unwrap()
    }

    fn refusal(result: Result<Grants, AuthError>) -> String {
        match result {
            Err(AuthError::Refused(why)) => why,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn no_secret_and_no_key_is_auth_off() {
        assert!(Verifier::new("", None).unwrap().is_none());
    }

    #[test]
    fn a_valid_token_gives_its_grants() {
        let member = mint("s3cret", &Claims::new("ann", Some("r1"), None, HOUR)).unwrap();
        let grants = verifier().verify(&member, "ann", Some("r1")).unwrap();
        assert_eq!(grants, Grants::of(&Grant::MEMBER));
        assert!(!grants.record && !grants.admin);
        let viewer = Claims::new("bob", Some("r1"), Some(vec![Grant::Subscribe]), HOUR);
        let grants = verifier()
            .verify(&mint("s3cret", &viewer).unwrap(), "bob", Some("r1"))
            .unwrap();
        assert!(grants.subscribe && !grants.publish && !grants.publish_data);
    }

    #[test]
    fn refuses_what_the_token_does_not_say() {
        let token = mint("s3cret", &Claims::new("ann", Some("r1"), None, HOUR)).unwrap();
        let v = verifier();
        assert!(refusal(v.verify(&token, "bob", Some("r1"))).contains("user \"ann\""));
        assert!(refusal(v.verify(&token, "ann", Some("r2"))).contains("room \"r1\""));
        assert!(refusal(v.verify(&token, "ann", None)).contains("not no room"));
        let wrong_key = mint("other", &Claims::new("ann", Some("r1"), None, HOUR)).unwrap();
        assert!(refusal(v.verify(&wrong_key, "ann", Some("r1"))).contains("signature"));
        let mut old = Claims::new("ann", Some("r1"), None, HOUR);
        old.exp = unix_now() - 3600;
        let expired = mint("s3cret", &old).unwrap();
        assert!(refusal(v.verify(&expired, "ann", Some("r1"))).contains("expired"));
        assert!(refusal(v.verify("garbage", "ann", Some("r1"))).contains("malformed"));
    }

    #[test]
    fn a_public_key_file_must_hold_a_key() {
        assert!(Verifier::new("", Some(b"not a key")).is_err());
    }
}
