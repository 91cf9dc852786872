//! SHA-256 as Rollwave uses it: a validated hex newtype for release identities and a streaming
//! hasher, so an archive is hashed while it is written or read instead of in a second pass.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use sha2::Digest as _;

/// Read buffer for [`hash_file`]: large enough that the hash, not the syscalls, dominates.
const HASH_BUFFER_BYTES: usize = 256 * 1024;

/// Number of hex digits in a SHA-256 digest.
const SHA256_HEX_LEN: usize = 64;

/// Errors from parsing digests and hashing files.
#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    /// The text is not 64 lowercase hex digits.
    #[error("sha256 {input:?} is invalid: expected 64 lowercase hex digits ({reason})")]
    ParseSha256 {
        /// The rejected text.
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Reading the file to hash failed.
    #[error("hash file {path}: {source}")]
    HashFile {
        /// The file being hashed.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },
}

/// A SHA-256 digest, displayed and parsed as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256([u8; 32]);

impl Sha256 {
    /// Wraps raw digest bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The digest as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(sha2::Sha256::digest(bytes).into())
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "Sha256({})", self.to_hex())
    }
}

impl FromStr for Sha256 {
    type Err = DigestError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let reject = |reason| DigestError::ParseSha256 {
            input: input.to_owned(),
            reason,
        };
        if input.len() != SHA256_HEX_LEN {
            return Err(reject("wrong length"));
        }
        // Uppercase is refused so that one digest has exactly one spelling (keys, logs, S3 tags).
        if !input.bytes().all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(reject("not lowercase hex"));
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(input, &mut bytes).map_err(|_| reject("not lowercase hex"))?;
        Ok(Self(bytes))
    }
}

impl serde::Serialize for Sha256 {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for Sha256 {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A writer that hashes and counts every byte on its way to `inner`.
#[derive(Debug)]
pub struct Sha256Writer<W> {
    inner: W,
    hasher: sha2::Sha256,
    bytes_written: u64,
}

impl<W: Write> Sha256Writer<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: sha2::Sha256::new(),
            bytes_written: 0,
        }
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// The inner writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// Returns the inner writer, the digest and the byte count.
    pub fn finish(self) -> (W, Sha256, u64) {
        (self.inner, Sha256(self.hasher.finalize().into()), self.bytes_written)
    }
}

impl<W: Write> Write for Sha256Writer<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.hasher.update(&buf[..written]);
        self.bytes_written += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Hashes a file, returning its digest and size in bytes.
pub fn hash_file(path: &Path) -> Result<(Sha256, u64), DigestError> {
    let wrap = |source| DigestError::HashFile {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(wrap)?;
    hash_reader(&mut file).map_err(wrap)
}

/// Hashes everything `reader` yields, returning the digest and the byte count.
pub fn hash_reader(reader: &mut impl Read) -> io::Result<(Sha256, u64)> {
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0u8; HASH_BUFFER_BYTES];
    let mut size = 0u64;
    loop {
        let read = match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        hasher.update(&buffer[..read]);
        size += read as u64;
    }
    Ok((Sha256(hasher.finalize().into()), size))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_and_displays_lowercase_hex() {
        let digest: Sha256 = EMPTY.parse().expect("valid digest");
        assert_eq!(digest.to_string(), EMPTY);
        assert_eq!(digest, Sha256::of(b""));
    }

    #[test]
    fn rejects_bad_digests() {
        for bad in [
            "",
            "abc",
            &EMPTY.to_uppercase(),
            &format!("{}0", EMPTY),
            &EMPTY.replacen('e', "g", 1),
            &EMPTY.replacen('e', " ", 1),
        ] {
            let error = bad.parse::<Sha256>().expect_err(bad);
            assert!(error.to_string().contains("64 lowercase hex digits"), "{error}");
        }
    }

    #[test]
    fn writer_and_file_hash_agree() {
        let data = vec![7u8; 1_000_003];
        let mut writer = Sha256Writer::new(Vec::new());
        writer.write_all(&data).expect("write to vec");
        let (inner, digest, size) = writer.finish();
        assert_eq!(inner, data);
        assert_eq!(size, data.len() as u64);
        assert_eq!(digest, Sha256::of(&data));

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("blob");
        std::fs::write(&path, &data).expect("write blob");
        assert_eq!(hash_file(&path).expect("hash"), (digest, size));
        let missing = hash_file(&dir.path().join("missing")).expect_err("missing file");
        assert!(missing.to_string().starts_with("hash file "), "{missing}");
    }
}
