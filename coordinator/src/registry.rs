//! The rule for registering a release: a version names one archive forever.
//! Registering the same bytes again is a no-op; other bytes under a registered
//! version, or a bundle changing kind, are refused. Pure: the store reads what
//! is registered, asks [`decide`], and writes what it says.

use rollwave_release::Sha256;

use crate::model::{BundleKind, Release};

/// What to do with a registration that the rule accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Record the release (and its bundle, when this is the bundle's first release).
    Insert { create_bundle: bool },
    /// The same bytes at the same place are registered already: change nothing.
    AlreadyRegistered,
}

/// Why a registration is refused. `release` is `bundle@version`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistrationRefused {
    #[error(
        "bundle {bundle:?} has kind {registered}, not {requested}: a bundle's kind is fixed by its first release; \
         push with --kind {registered}, or use another bundle name"
    )]
    ChangeKind {
        bundle: String,
        registered: BundleKind,
        requested: BundleKind,
    },
    #[error(
        "release {release} is already registered with sha256 {registered_sha256} ({registered_size} bytes); \
         refusing different content with sha256 {requested_sha256} ({requested_size} bytes): \
         a version names one archive forever, so push this archive as a new version"
    )]
    ChangeContent {
        release: String,
        registered_sha256: Sha256,
        registered_size: u64,
        requested_sha256: Sha256,
        requested_size: u64,
    },
    #[error(
        "release {release} is already registered at {registered}; refusing the same archive at {requested}: \
         a release has one home"
    )]
    ChangeLocation {
        release: String,
        /// `s3://bucket/key`
        registered: String,
        requested: String,
    },
}

/// Decides a registration of `requested`, given the kind of its bundle if the
/// bundle exists and the release registered under the same version if any.
///
/// The object version is deliberately not compared: the same sha256 and size
/// at the same key are the same archive, whichever upload stored it.
pub fn decide(
    registered_kind: Option<BundleKind>,
    registered: Option<&Release>,
    requested: &Release,
) -> Result<Decision, RegistrationRefused> {
    if let Some(kind) = registered_kind
        && kind != requested.kind
    {
        return Err(RegistrationRefused::ChangeKind {
            bundle: requested.bundle.clone(),
            registered: kind,
            requested: requested.kind,
        });
    }
    let Some(registered) = registered else {
        return Ok(Decision::Insert {
            create_bundle: registered_kind.is_none(),
        });
    };
    if registered.sha256 != requested.sha256 || registered.size != requested.size {
        return Err(RegistrationRefused::ChangeContent {
            release: requested.name(),
            registered_sha256: registered.sha256,
            registered_size: registered.size,
            requested_sha256: requested.sha256,
            requested_size: requested.size,
        });
    }
    if registered.bucket != requested.bucket || registered.key != requested.key {
        return Err(RegistrationRefused::ChangeLocation {
            release: requested.name(),
            registered: format!("s3://{}/{}", registered.bucket, registered.key),
            requested: format!("s3://{}/{}", requested.bucket, requested.key),
        });
    }
    Ok(Decision::AlreadyRegistered)
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};

    use super::*;

    fn release(kind: BundleKind, content: &[u8], bucket: &str, object_version: Option<&str>) -> Release {
        Release {
            bundle: "web".into(),
            kind,
            version: "1.4.2".into(),
            bucket: bucket.into(),
            key: "releases/web/1.4.2.zip".into(),
            object_version: object_version.map(str::to_owned),
            sha256: Sha256::of(content),
            size: content.len() as u64,
            pushed_by: "admin".into(),
            pushed_at_ms: 1,
        }
    }

    fn check(registered_kind: Option<BundleKind>, registered: Option<&Release>, requested: &Release, expected: Expect) {
        let actual = match decide(registered_kind, registered, requested) {
            Ok(decision) => format!("{decision:?}"),
            Err(refused) => format!("refused: {refused}"),
        };
        expected.assert_eq(&actual);
    }

    #[test]
    fn registration_rule() {
        use BundleKind::{App, Cookbook};
        let registered = release(App, b"one", "bucket", Some("v1"));

        // A new bundle, a new version of a known bundle.
        check(None, None, &registered, expect!["Insert { create_bundle: true }"]);
        check(Some(App), None, &registered, expect!["Insert { create_bundle: false }"]);

        // The same bytes again, whichever upload's object version: nothing to do.
        check(Some(App), Some(&registered), &registered, expect!["AlreadyRegistered"]);
        check(
            Some(App),
            Some(&registered),
            &release(App, b"one", "bucket", Some("v2")),
            expect!["AlreadyRegistered"],
        );

        // Other bytes under the same version: refused, naming both digests.
        check(
            Some(App),
            Some(&registered),
            &release(App, b"two", "bucket", Some("v2")),
            expect![
                "refused: release web@1.4.2 is already registered with sha256 7692c3ad3540bb803c020b3aee66cd8887123234ea0c6e7143c0add73ff431ed (3 bytes); refusing different content with sha256 3fc4ccfe745870e2c0d99f71f30ff0656c8dedd41cc1d7d3d376b0dbe685e2f3 (3 bytes): a version names one archive forever, so push this archive as a new version"
            ],
        );

        // The same bytes somewhere else: a release has one home.
        check(
            Some(App),
            Some(&registered),
            &release(App, b"one", "other-bucket", Some("v1")),
            expect![
                "refused: release web@1.4.2 is already registered at s3://bucket/releases/web/1.4.2.zip; refusing the same archive at s3://other-bucket/releases/web/1.4.2.zip: a release has one home"
            ],
        );

        // A bundle keeps the kind of its first release, for new versions too.
        check(
            Some(App),
            None,
            &release(Cookbook, b"one", "bucket", Some("v1")),
            expect![
                "refused: bundle \"web\" has kind app, not cookbook: a bundle's kind is fixed by its first release; push with --kind app, or use another bundle name"
            ],
        );
    }
}
