//! Errors of the model layer.

use std::path::PathBuf;

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file the model directory must contain is absent.
    #[error("model directory {dir} has no {file}")]
    MissingFile {
        /// The directory searched.
        dir: PathBuf,
        /// The missing file's name.
        file: &'static str,
    },
    /// A file exists but could not be read or parsed.
    #[error("cannot read {path}: {reason}")]
    BadFile {
        /// The offending file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The configuration asks for something this encoder does not implement.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// A tensor is missing or has the wrong shape.
    #[error("weights: {0}")]
    Weights(String),
    /// Tokenization failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An input the model cannot run (e.g. an empty sequence or an unknown token id).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The tensor library failed.
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Result of the model layer.
pub type Result<T> = std::result::Result<T, ModelError>;
