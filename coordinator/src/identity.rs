//! Which client certificates identify which instances.
//!
//! The coordinator recognises an agent by the fingerprint of the certificate
//! it presented, looked up here; nothing the agent writes in a message can
//! change who it is. The same table backs the handshake check, so the
//! certificate of a removed instance fails at the TLS handshake.
//!
//! The table is a copy of the store's `certificates` table, and the store is
//! the one truth: every change of that table goes through
//! [`IssuedCertificates`] (join, renew, remove), one change at a time, and
//! afterwards the copy of the changed instance is read back from the store.
//! A certificate the store dropped can therefore never keep opening sessions.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rollwave_trust::Fingerprint;
use rustls::DistinguishedName;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::enrollment::JoinDecision;
use crate::store::{CertificateRecord, IssuedCertificate, NewJoin, Store, StoreError};

#[derive(Debug, Clone)]
struct Holder {
    instance_id: String,
}

/// In-memory copy of the `certificates` table, and the only writer of that table.
#[derive(Debug, Default)]
pub struct IssuedCertificates {
    by_fingerprint: RwLock<HashMap<Fingerprint, Holder>>,
    /// Held across a store change and the copy's update, so two changes of
    /// one instance (a renewal racing a removal) cannot apply in one order to
    /// the store and in the other to the copy.
    changing: tokio::sync::Mutex<()>,
}

fn entries(records: &[CertificateRecord]) -> impl Iterator<Item = (Fingerprint, Holder)> + '_ {
    records.iter().filter_map(|record| {
        let fingerprint = record.fingerprint.parse().ok()?;
        Some((
            fingerprint,
            Holder {
                instance_id: record.instance_id.clone(),
            },
        ))
    })
}

impl IssuedCertificates {
    pub fn from_records(records: &[CertificateRecord]) -> Self {
        Self {
            by_fingerprint: RwLock::new(entries(records).collect()),
            changing: tokio::sync::Mutex::new(()),
        }
    }

    /// Carries out a join ([`Store::join_instance`]) and recognises the new certificate.
    pub async fn join(&self, store: &Store, join: &NewJoin<'_>) -> Result<JoinDecision, StoreError> {
        let _changing = self.changing.lock().await;
        let outcome = store.join_instance(join).await;
        self.reload_instance(store, &join.attempt.instance_id).await;
        outcome
    }

    /// Records a renewed certificate of `instance_id` ([`Store::add_certificate`]).
    pub async fn renew(
        &self,
        store: &Store,
        instance_id: &str,
        certificate: &IssuedCertificate,
    ) -> Result<(), StoreError> {
        let _changing = self.changing.lock().await;
        let outcome = store.add_certificate(instance_id, certificate).await;
        self.reload_instance(store, instance_id).await;
        outcome
    }

    /// Forgets `instance_id` and every certificate it was issued ([`Store::remove_instance`]).
    pub async fn remove_instance(&self, store: &Store, instance_id: &str) -> Result<(), StoreError> {
        let _changing = self.changing.lock().await;
        let outcome = store.remove_instance(instance_id).await;
        self.reload_instance(store, instance_id).await;
        outcome
    }

    /// Makes the copy of `instance_id`'s certificates what the store holds,
    /// whether the change committed or not. If the store cannot be read, the
    /// instance's certificates are forgotten: an agent locked out until the
    /// next start is better than a revoked certificate that still works.
    async fn reload_instance(&self, store: &Store, instance_id: &str) {
        let records = match store.certificates_of(instance_id).await {
            Ok(records) => records,
            Err(error) => {
                tracing::error!(instance = %instance_id, %error, "cannot read back certificates; forgetting them until restart");
                Vec::new()
            }
        };
        let mut table = self.write();
        table.retain(|_, holder| holder.instance_id != instance_id);
        table.extend(entries(&records));
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
    use crate::enrollment::JoinAttempt;
    use crate::store::tests::open_with_token;

    fn fingerprint(name: &str) -> String {
        Fingerprint::of_der(name.as_bytes()).to_string()
    }

    fn renewal(name: &str) -> IssuedCertificate {
        IssuedCertificate {
            fingerprint: fingerprint(name),
            issued_at_ms: 20,
            not_after_ms: 2_000,
        }
    }

    /// The copy in memory, as (fingerprint, instance) pairs.
    fn copy(issued: &IssuedCertificates) -> Vec<(String, String)> {
        let mut pairs: Vec<(String, String)> = issued
            .by_fingerprint
            .read()
            .expect("not poisoned")
            .iter()
            .map(|(fingerprint, holder)| (fingerprint.to_string(), holder.instance_id.clone()))
            .collect();
        pairs.sort();
        pairs
    }

    /// What a restart would load: the store's table.
    async fn stored(store: &Store) -> Vec<(String, String)> {
        let records = store.list_certificates().await.expect("certificates");
        copy(&IssuedCertificates::from_records(&records))
    }

    async fn join_through(
        issued: &IssuedCertificates,
        store: &Store,
        request: &str,
        instance: &str,
        name: &str,
    ) -> Result<JoinDecision, StoreError> {
        let attempt = JoinAttempt {
            request_id: request.into(),
            public_key_sha256: request.into(),
            stack: "web".into(),
            instance_id: instance.into(),
        };
        let certificate = IssuedCertificate {
            fingerprint: fingerprint(name),
            issued_at_ms: 10,
            not_after_ms: 1_000,
        };
        let join = NewJoin {
            attempt: &attempt,
            token_id: "tok1",
            facts: &crate::model::InstanceFacts::default(),
            certificate: &certificate,
            certificate_pem: "PEM",
            now_ms: 5,
        };
        issued.join(store, &join).await
    }

    #[tokio::test]
    async fn memory_and_store_agree_after_every_change_of_the_certificates_table() {
        let (_dir, store) = open_with_token(3).await;
        let issued = IssuedCertificates::default();
        join_through(&issued, &store, "r1", "a", "a1").await.expect("join");
        join_through(&issued, &store, "r2", "b", "b1").await.expect("join");
        assert_eq!(copy(&issued), stored(&store).await);
        issued.renew(&store, "a", &renewal("a2")).await.expect("renew");
        assert_eq!(copy(&issued), stored(&store).await);
        assert_eq!(copy(&issued).len(), 3);
        // A refused join for an existing instance changes neither.
        let hijack = join_through(&issued, &store, "r3", "a", "a3").await;
        assert!(hijack.is_err(), "{hijack:?}");
        assert_eq!(copy(&issued), stored(&store).await);
        issued.remove_instance(&store, "a").await.expect("remove");
        assert_eq!(copy(&issued), stored(&store).await);
        assert_eq!(
            copy(&issued),
            [(fingerprint("b1"), "b".to_owned())],
            "every certificate of the removed instance is forgotten"
        );
    }

    #[tokio::test]
    async fn a_renewal_racing_a_removal_leaves_no_certificate_behind() {
        for _ in 0..20 {
            let (_dir, store) = open_with_token(1).await;
            let issued = IssuedCertificates::default();
            join_through(&issued, &store, "r1", "a", "a1").await.expect("join");
            let certificate = renewal("a2");
            let (renewed, removed) = tokio::join!(
                issued.renew(&store, "a", &certificate),
                issued.remove_instance(&store, "a"),
            );
            removed.expect("remove");
            let _ = renewed; // Either order is fine; both must end with nothing.
            assert_eq!(copy(&issued), stored(&store).await);
            assert!(copy(&issued).is_empty(), "{:?}", copy(&issued));
        }
    }

    /// Tidy: outside the store itself, only this module changes the certificates
    /// table, so no path can change the store without the copy (issue 10, item 4).
    #[test]
    fn only_identity_writes_the_certificates_table() {
        const WRITERS: [&str; 3] = [
            "store.join_instance(",
            "store.add_certificate(",
            "store.remove_instance(",
        ];
        let source_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut pending = vec![source_dir.clone()];
        let mut offenders = Vec::new();
        while let Some(dir) = pending.pop() {
            for entry in std::fs::read_dir(&dir).expect("read source dir") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    pending.push(path);
                    continue;
                }
                let relative = path
                    .strip_prefix(&source_dir)
                    .expect("under src")
                    .to_string_lossy()
                    .into_owned();
                if relative == "identity.rs" || relative == "store.rs" || relative.starts_with("store/") {
                    continue;
                }
                let text: String = std::fs::read_to_string(&path)
                    .unwrap_or_default()
                    .chars()
                    .filter(|c| !c.is_whitespace())
                    .collect();
                offenders.extend(
                    WRITERS
                        .iter()
                        .filter(|writer| text.contains(*writer))
                        .map(|writer| format!("{relative}: {writer}")),
                );
            }
        }
        assert!(
            offenders.is_empty(),
            "change certificates through identity::IssuedCertificates: {offenders:?}"
        );
    }

    #[tokio::test]
    async fn a_failed_renewal_of_a_removed_instance_is_not_recognised() {
        let (_dir, store) = open_with_token(1).await;
        let issued = IssuedCertificates::default();
        join_through(&issued, &store, "r1", "a", "a1").await.expect("join");
        issued.remove_instance(&store, "a").await.expect("remove");
        let renewed = issued.renew(&store, "a", &renewal("a2")).await;
        assert!(renewed.is_err(), "a removed instance cannot renew: {renewed:?}");
        assert!(copy(&issued).is_empty());
        assert!(stored(&store).await.is_empty());
    }
}
