//! The coordinator's certificate authority: created on first start under the
//! data dir (or supplied by the operator), it signs the coordinator's serving
//! certificate and the short-lived client certificates that identify agents.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SerialNumber,
};
use rollwave_trust::{AGENT_SERVER_NAME, Fingerprint, PUBLIC_SERVER_NAME};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use rollwave_trust::files::{write_private, write_public};

/// The CA certificate outlives any fleet we plan for; rotate by replacing files.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// The serving certificate is made fresh at every start.
const SERVER_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Clocks on instances drift; accept certificates a little before issue time.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Certificate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("certificate signing request refused: {0}")]
    BadRequest(String),
    #[error(
        "{present} exists without {missing}, and {reason}; restore {missing} from a backup (replacing the CA would lock out every agent that trusts it), or supply both CA files"
    )]
    HalfPresent {
        present: PathBuf,
        missing: PathBuf,
        reason: String,
    },
}

/// What [`CertificateAuthority::load_or_create`] may do with a half-written CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// Nothing the CA issued is on record: replace it.
    NothingIssued,
    /// Refuse to start, saying why (what is on record, or that the operator supplied the files).
    Refuse(String),
}

/// Where the CA's files live.
#[derive(Debug, Clone)]
pub struct CaFiles {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

impl CaFiles {
    pub fn in_data_dir(data_dir: &Path) -> Self {
        Self {
            certificate: data_dir.join("ca.pem"),
            key: data_dir.join("ca.key"),
        }
    }
}

/// A certificate and its key, PEM-encoded.
#[derive(Clone)]
pub struct CertifiedKey {
    pub certificate_pem: String,
    pub key_pem: String,
}

/// A client certificate signed for an instance.
#[derive(Debug, Clone)]
pub struct SignedCertificate {
    pub pem: String,
    pub fingerprint: Fingerprint,
    pub not_after: OffsetDateTime,
    /// sha256 of the signed public key (the key of the CSR): the same for
    /// every certificate of one key, so a repeated join can be recognised.
    pub public_key: Fingerprint,
}

pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    certificate_pem: String,
    certificate_der: CertificateDer<'static>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Read {
        path: path.to_owned(),
        source,
    })
}

fn cert_error(what: &'static str) -> impl FnOnce(rcgen::Error) -> CaError {
    move |source| CaError::Certificate { what, source }
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    for byte in &mut bytes {
        *byte = fastrand::u8(..);
    }
    bytes[0] &= 0x7f; // keep the serial positive
    SerialNumber::from_slice(&bytes)
}

/// A signing-only leaf for `common_name`, valid from a little before `now`.
fn leaf_params(
    common_name: &str,
    usage: ExtendedKeyUsagePurpose,
    now: OffsetDateTime,
    validity: Duration,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.extended_key_usages = vec![usage];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = now - BACKDATE;
    params.not_after = now + validity;
    params.serial_number = Some(random_serial());
    params
}

impl CertificateAuthority {
    /// Loads the CA from `files`, creating it when neither file exists.
    /// Returns whether it was created.
    ///
    /// A first start that died while writing the CA leaves one file without the other. When
    /// `recovery` says nothing the CA issued is on record (no agent certificate, no join token),
    /// no one can trust that half-written CA yet, so the lone file is replaced by a new CA;
    /// otherwise starting is refused, since replacing the CA would lock out every agent.
    pub fn load_or_create(files: &CaFiles, now: OffsetDateTime, recovery: Recovery) -> Result<(Self, bool), CaError> {
        match (files.certificate.exists(), files.key.exists()) {
            (true, true) => Ok((Self::load(files)?, false)),
            (false, false) => Ok((Self::create_files(files, now)?, true)),
            (certificate_present, _) => {
                let (present, missing) = if certificate_present {
                    (&files.certificate, &files.key)
                } else {
                    (&files.key, &files.certificate)
                };
                match recovery {
                    Recovery::NothingIssued => {
                        tracing::warn!(
                            present = %present.display(),
                            missing = %missing.display(),
                            "a half-written CA (an earlier first start was cut short); nothing it issued is on record, so it is replaced by a new CA"
                        );
                        std::fs::remove_file(present).map_err(|source| CaError::Write {
                            path: present.clone(),
                            source,
                        })?;
                        Ok((Self::create_files(files, now)?, true))
                    }
                    Recovery::Refuse(reason) => Err(CaError::HalfPresent {
                        present: present.clone(),
                        missing: missing.clone(),
                        reason,
                    }),
                }
            }
        }
    }

    /// Creates a CA and writes it: the key first, the certificate last, so a complete pair is
    /// the only state in which the certificate (what agents pin) exists beside its key.
    fn create_files(files: &CaFiles, now: OffsetDateTime) -> Result<Self, CaError> {
        let ca = Self::create(now)?;
        write_private(&files.key, ca.issuer.key().serialize_pem().as_bytes()).map_err(|source| CaError::Write {
            path: files.key.clone(),
            source,
        })?;
        write_public(&files.certificate, ca.certificate_pem.as_bytes()).map_err(|source| CaError::Write {
            path: files.certificate.clone(),
            source,
        })?;
        Ok(ca)
    }

    fn load(files: &CaFiles) -> Result<Self, CaError> {
        let certificate_pem = read(&files.certificate)?;
        let key = KeyPair::from_pem(&read(&files.key)?).map_err(cert_error("parse CA key"))?;
        let certificate_der = rollwave_trust::parse_certificates("CA certificate", certificate_pem.as_bytes())
            .map_err(|error| CaError::BadRequest(error.to_string()))?
            .remove(0);
        let issuer = Issuer::from_ca_cert_der(&certificate_der, key).map_err(cert_error("parse CA certificate"))?;
        Ok(Self {
            issuer,
            certificate_pem,
            certificate_der,
        })
    }

    fn create(now: OffsetDateTime) -> Result<Self, CaError> {
        let key = KeyPair::generate().map_err(cert_error("generate CA key"))?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "Rollwave coordinator CA");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_VALIDITY;
        params.serial_number = Some(random_serial());
        let certificate = params.self_signed(&key).map_err(cert_error("sign CA certificate"))?;
        Ok(Self {
            certificate_pem: certificate.pem(),
            certificate_der: certificate.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    pub fn certificate_der(&self) -> &CertificateDer<'static> {
        &self.certificate_der
    }

    /// The pin join tokens carry.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of_der(&self.certificate_der)
    }

    /// A serving certificate for both TLS names (and `extra_names`, such as a
    /// DNS name operators use), with the CA certificate after the leaf.
    pub fn issue_server_certificate(
        &self,
        extra_names: &[String],
        now: OffsetDateTime,
    ) -> Result<CertifiedKey, CaError> {
        let key = KeyPair::generate().map_err(cert_error("generate server key"))?;
        let mut names = vec![PUBLIC_SERVER_NAME.to_owned(), AGENT_SERVER_NAME.to_owned()];
        names.extend(extra_names.iter().cloned());
        let mut params = leaf_params(
            PUBLIC_SERVER_NAME,
            ExtendedKeyUsagePurpose::ServerAuth,
            now,
            SERVER_VALIDITY,
        );
        params.subject_alt_names = CertificateParams::new(names)
            .map_err(cert_error("server certificate names"))?
            .subject_alt_names;
        let certificate = params
            .signed_by(&key, &self.issuer)
            .map_err(cert_error("sign server certificate"))?;
        Ok(CertifiedKey {
            certificate_pem: format!("{}{}", certificate.pem(), self.certificate_pem),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs the key in `csr_pem` as the client certificate of `instance_id`.
    /// The request's own names are ignored: the instance id is the identity.
    pub fn sign_instance_certificate(
        &self,
        csr_pem: &str,
        instance_id: &str,
        validity: Duration,
        now: OffsetDateTime,
    ) -> Result<SignedCertificate, CaError> {
        let request = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|error| CaError::BadRequest(error.to_string()))?;
        let params = leaf_params(instance_id, ExtendedKeyUsagePurpose::ClientAuth, now, validity);
        let certificate = params
            .signed_by(&request.public_key, &self.issuer)
            .map_err(cert_error("sign instance certificate"))?;
        Ok(SignedCertificate {
            fingerprint: Fingerprint::of_der(certificate.der()),
            pem: certificate.pem(),
            not_after: params.not_after,
            public_key: Fingerprint::of_der(request.public_key.der_bytes()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_ca_reloads_with_the_same_fingerprint() {
        let dir = tempfile::tempdir().expect("temp dir");
        let files = CaFiles::in_data_dir(dir.path());
        let now = OffsetDateTime::now_utc();
        let (created, was_created) =
            CertificateAuthority::load_or_create(&files, now, Recovery::NothingIssued).expect("create");
        assert!(was_created);
        let (loaded, was_created) = CertificateAuthority::load_or_create(&files, now, refuse()).expect("load");
        assert!(!was_created);
        assert_eq!(created.fingerprint(), loaded.fingerprint());
    }

    fn refuse() -> Recovery {
        Recovery::Refuse("the database holds 3 agent certificates issued under it".into())
    }

    #[test]
    fn a_missing_key_is_an_error_not_a_new_ca_when_agents_trust_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let files = CaFiles::in_data_dir(dir.path());
        let now = OffsetDateTime::now_utc();
        CertificateAuthority::load_or_create(&files, now, Recovery::NothingIssued).expect("create");
        let certificate = std::fs::read(&files.certificate).expect("read ca.pem");
        std::fs::remove_file(&files.key).expect("remove key");
        let error = CertificateAuthority::load_or_create(&files, now, refuse()).expect_err("refused");
        assert!(matches!(error, CaError::HalfPresent { .. }), "{error:?}");
        let message = error.to_string();
        assert!(
            message.contains("3 agent certificates") && message.contains("restore"),
            "{message}"
        );
        assert_eq!(
            std::fs::read(&files.certificate).expect("read ca.pem"),
            certificate,
            "a CA that agents trust is never replaced"
        );
    }

    #[test]
    fn first_start_cut_short_between_ca_pem_and_ca_key_blocked_every_later_start() {
        let now = OffsetDateTime::now_utc();
        // Either file alone: what a crash or a full disk leaves in the middle of the first start.
        for lone in ["ca.pem", "ca.key"] {
            let dir = tempfile::tempdir().expect("temp dir");
            let files = CaFiles::in_data_dir(dir.path());
            CertificateAuthority::load_or_create(&files, now, Recovery::NothingIssued).expect("create");
            let other = if lone == "ca.pem" {
                &files.key
            } else {
                &files.certificate
            };
            std::fs::remove_file(other).expect("remove the other file");
            let (recovered, created) =
                CertificateAuthority::load_or_create(&files, now, Recovery::NothingIssued).expect("recovered");
            assert!(created, "{lone}: a new CA replaces the half-written one");
            let (loaded, created) =
                CertificateAuthority::load_or_create(&files, now, refuse()).expect("the next start loads it");
            assert!(!created);
            assert_eq!(loaded.fingerprint(), recovered.fingerprint(), "{lone}");
        }
    }

    #[test]
    fn garbage_csr_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (ca, _) = CertificateAuthority::load_or_create(
            &CaFiles::in_data_dir(dir.path()),
            OffsetDateTime::now_utc(),
            Recovery::NothingIssued,
        )
        .expect("create");
        let result =
            ca.sign_instance_certificate("not a csr", "i-1", Duration::from_secs(60), OffsetDateTime::now_utc());
        assert!(matches!(result, Err(CaError::BadRequest(_))), "{result:?}");
    }
}
