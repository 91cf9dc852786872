//! PEM decoding with errors that say which file or field was wrong.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::Error;

/// Every certificate in `pem`, in order; at least one.
pub fn parse_certificates(what: &'static str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| Error::Pem {
            what,
            detail: error.to_string(),
        })?;
    if certificates.is_empty() {
        return Err(Error::Pem {
            what,
            detail: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certificates)
}

/// The first private key in `pem` (PKCS#8, SEC1 or PKCS#1).
pub fn parse_private_key(what: &'static str, pem: &[u8]) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|error| Error::Pem {
        what,
        detail: error.to_string(),
    })
}
