//! The join token: one line an operator hands to a new instance.
//!
//! `rwt1.<id>.<secret>.<ca fingerprint>`: the id finds the token's record,
//! the secret proves possession (the coordinator stores only its sha256), and
//! the fingerprint lets the agent check the coordinator's CA before it sends
//! the secret anywhere.

use std::fmt;
use std::str::FromStr;

use crate::{Error, Fingerprint};

const PREFIX: &str = "rwt1";

#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub id: String,
    pub secret: String,
    pub ca: Fingerprint,
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}.{}.{}.{}", self.id, self.secret, self.ca)
    }
}

// Never print the secret by accident in logs.
impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

impl FromStr for JoinToken {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = text.trim().split('.').collect();
        let [prefix, id, secret, ca] = parts.as_slice() else {
            return Err(Error::Token(
                "expected rwt1.<id>.<secret>.<ca fingerprint>; copy the whole line that `rollwave token create` printed".into(),
            ));
        };
        if *prefix != PREFIX {
            return Err(Error::Token(format!(
                "unknown token format {prefix:?} (expected {PREFIX})"
            )));
        }
        let is_token_part =
            |part: &str| !part.is_empty() && part.len() <= 64 && part.bytes().all(|b| b.is_ascii_alphanumeric());
        if !is_token_part(id) || !is_token_part(secret) {
            return Err(Error::Token("id and secret must be short alphanumeric strings".into()));
        }
        Ok(Self {
            id: (*id).to_owned(),
            secret: (*secret).to_owned(),
            ca: ca.parse()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> JoinToken {
        JoinToken {
            id: "k3x9".into(),
            secret: "s3cr3t".into(),
            ca: Fingerprint::of_der(b"ca"),
        }
    }

    #[test]
    fn round_trips() {
        let token = sample();
        assert_eq!(token.to_string().parse::<JoinToken>().expect("parses"), token);
    }

    #[test]
    fn debug_hides_the_secret() {
        assert!(!format!("{:?}", sample()).contains("s3cr3t"));
    }

    #[test]
    fn rejects_malformed_tokens() {
        let ca = Fingerprint::of_der(b"ca");
        for bad in [
            String::new(),
            "rwt1.a.b".to_owned(),
            format!("rwt2.a.b.{ca}"),
            format!("rwt1..b.{ca}"),
            format!("rwt1.a/b.c.{ca}"),
            "rwt1.a.b.notafingerprint".to_owned(),
        ] {
            assert!(bad.parse::<JoinToken>().is_err(), "{bad:?} should be refused");
        }
    }
}
