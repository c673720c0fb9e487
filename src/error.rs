//! The library's error type. Every variant names the file, key or value that is wrong, so a
//! message can be shown to a user as it is.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written. The I/O error is part of the message and not also
    /// reported as the error's source, so that a printed chain names it once.
    #[error("{}: {cause}", path.display())]
    Io { path: PathBuf, cause: std::io::Error },
    /// A file exists but its content is not what was expected (bad image, bad checkpoint, ...).
    #[error("{}: {msg}", path.display())]
    BadFile { path: PathBuf, msg: String },
    /// A checkpoint key the model needs is absent.
    #[error("{}: missing key `{key}` (the model expects shape {expected:?})", path.display())]
    MissingKey {
        path: PathBuf,
        key: String,
        expected: Vec<usize>,
    },
    /// A checkpoint tensor has another shape than the model's parameter.
    #[error("{}: key `{key}` has shape {found:?} but the model expects {expected:?}", path.display())]
    ShapeMismatch {
        path: PathBuf,
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A checkpoint holds keys the model does not know (strict loading).
    #[error("{}: unexpected keys not used by the model: {}", path.display(), keys.join(", "))]
    UnexpectedKeys { path: PathBuf, keys: Vec<String> },
    /// A value given by the caller (flag, config field, argument) is not acceptable.
    #[error("invalid {what}: {msg}")]
    Invalid { what: String, msg: String },
    /// A numerical failure a caller can act on (NaN loss, ...).
    #[error("{0}")]
    Numerical(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            cause: source,
        }
    }

    pub fn bad_file(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::BadFile {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }

    pub fn invalid(what: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Invalid {
            what: what.into(),
            msg: msg.into(),
        }
    }
}

/// Attach a path to an `io::Result`.
pub trait IoContext<T> {
    fn with_path(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn with_path(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_error_names_file_and_cause_once() {
        let e = Error::io("missing.png", std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"));
        // The command line prints the whole chain (`{:#}`): the cause must appear once.
        let shown = format!("{:#}", anyhow::Error::from(e));
        assert_eq!(shown, "missing.png: no such file");
    }
}
