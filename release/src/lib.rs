//! The release archive format: names, the bundle manifest, deterministic
//! building and safe unpacking (in progress).
