//! The public storage error: what kind of failure, where (path, operation, offset), and the
//! underlying cause.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// What went wrong, coarsely: enough for a caller to decide what to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageErrorKind {
    /// The disk spec is malformed or contradictory.
    InvalidSpec,
    /// The image or device could not be opened.
    Open,
    /// The image exists but its contents or size are not usable.
    InvalidImage,
    /// An I/O engine could not be set up.
    Engine,
    /// An I/O operation failed.
    Io,
    /// The node cannot do what was asked (resize a tier, say).
    Unsupported,
    /// The request itself is wrong (a size that is not whole sectors, a shrink).
    InvalidArgument,
    /// The caller asked the operation to stop, and what it had done was undone.
    Cancelled,
    /// What the request names does not exist (a snapshot).
    NotFound,
    /// Another program (or another disk of this one) uses the image in a way ours
    /// conflicts with: its lock bytes say so ([`crate::disk::lock`]).
    InUse,
}

/// A storage error with context.
#[derive(Debug, thiserror::Error)]
pub struct StorageError {
    kind: StorageErrorKind,
    context: String,
    path: Option<PathBuf>,
    #[source]
    source: Option<io::Error>,
}

impl StorageError {
    /// An error of `kind` described by `context`.
    pub fn new(kind: StorageErrorKind, context: impl Into<String>) -> Self {
        StorageError {
            kind,
            context: context.into(),
            path: None,
            source: None,
        }
    }

    /// Attach the path the error concerns.
    pub fn with_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.path = Some(path.into());
        self
    }

    /// Attach the underlying OS error.
    pub fn with_source(mut self, source: io::Error) -> Self {
        self.source = Some(source);
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> StorageErrorKind {
        self.kind
    }
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(path) = &self.path {
            write!(f, "{}: ", path.display())?;
        }
        f.write_str(&self.context)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}
