//! Tokenization with the model's `tokenizer.json`, truncation set by Flywheel rather than the file.

use std::path::Path;

use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use super::error::{ModelError, Result};

/// A text tokenizer that truncates at a configured length and never pads (batches are packed).
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    max_length: usize,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("max_length", &self.max_length)
            .finish_non_exhaustive()
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json`, overriding its truncation (all-MiniLM-L6-v2's file says 128 where
    /// sentence-transformers uses 256) and removing its padding.
    pub fn from_file(path: &Path, max_length: usize) -> Result<Self> {
        let mut inner = Tokenizer::from_file(path).map_err(|e| ModelError::BadFile {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        inner
            .with_truncation(Some(TruncationParams {
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        inner.with_padding(None);
        Ok(Self { inner, max_length })
    }

    /// Token ids of `text` with `[CLS]`/`[SEP]`, truncated to `max_length`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }
}

#[cfg(test)]
impl TextTokenizer {
    /// A vocabulary-less tokenizer for tests that feed token ids directly.
    pub(crate) fn for_tests() -> Self {
        Self {
            inner: Tokenizer::new(tokenizers::models::wordpiece::WordPiece::default()),
            max_length: 64,
        }
    }
}
