//! Which client certificates identify which instances.
//!
//! The coordinator recognises an agent by the fingerprint of the certificate
//! it presented, looked up here; nothing the agent writes in a message can
//! change who it is. The same table backs the handshake check, so the
//! certificate of a removed instance fails at the TLS handshake.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rollwave_trust::Fingerprint;
use rustls::DistinguishedName;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::store::CertificateRecord;

#[derive(Debug, Clone)]
struct Holder {
    instance_id: String,
}

/// In-memory copy of the `certificates` table, kept in step by its writers.
#[derive(Debug, Default)]
pub struct IssuedCertificates {
    by_fingerprint: RwLock<HashMap<Fingerprint, Holder>>,
}

impl IssuedCertificates {
    pub fn from_records(records: &[CertificateRecord]) -> Self {
        let map = records
            .iter()
            .filter_map(|record| {
                let fingerprint = record.fingerprint.parse().ok()?;
                Some((
                    fingerprint,
                    Holder {
                        instance_id: record.instance_id.clone(),
                    },
                ))
            })
            .collect();
        Self {
            by_fingerprint: RwLock::new(map),
        }
    }

    pub fn insert(&self, fingerprint: Fingerprint, instance_id: &str) {
        self.write().insert(
            fingerprint,
            Holder {
                instance_id: instance_id.to_owned(),
            },
        );
    }

    /// Forgets every certificate of `instance_id`.
    pub fn remove_instance(&self, instance_id: &str) {
        self.write().retain(|_, holder| holder.instance_id != instance_id);
    }

    pub fn instance_for(&self, fingerprint: &Fingerprint) -> Option<String> {
        self.by_fingerprint
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(fingerprint)
            .map(|holder| holder.instance_id.clone())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<Fingerprint, Holder>> {
        self.by_fingerprint
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The agent face's client verifier: a chain to our CA (checked by webpki,
/// expiry included) and a certificate we still recognise.
#[derive(Debug)]
pub struct AgentCertificateVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    issued: Arc<IssuedCertificates>,
}

impl AgentCertificateVerifier {
    pub fn new(chain: Arc<dyn ClientCertVerifier>, issued: Arc<IssuedCertificates>) -> Self {
        Self { chain, issued }
    }
}

impl ClientCertVerifier for AgentCertificateVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.chain.verify_client_cert(end_entity, intermediates, now)?;
        if self.issued.instance_for(&Fingerprint::of_der(end_entity)).is_none() {
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removing_an_instance_forgets_all_its_certificates() {
        let issued = IssuedCertificates::default();
        let (a1, a2, b) = (
            Fingerprint::of_der(b"a1"),
            Fingerprint::of_der(b"a2"),
            Fingerprint::of_der(b"b"),
        );
        issued.insert(a1, "a");
        issued.insert(a2, "a");
        issued.insert(b, "b");
        issued.remove_instance("a");
        assert_eq!(issued.instance_for(&a1), None);
        assert_eq!(issued.instance_for(&a2), None);
        assert_eq!(issued.instance_for(&b).as_deref(), Some("b"));
    }
}
