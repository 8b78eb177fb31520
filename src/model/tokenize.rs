//! Tokenization with the model's `tokenizer.json`, truncation set by Flywheel rather than the file.

use std::path::Path;

use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use super::error::{ModelError, Result};

/// A text tokenizer that truncates at a configured length and never pads (batches are packed).
///
/// Deliberately not `Clone`: a `tokenizers::Tokenizer` copy is its whole vocabulary in hash maps (11.7 ms of
/// CPU for all-MiniLM-L6-v2), so one loaded tokenizer is shared behind an `Arc` by every request.
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

    /// The truncation length in tokens, special tokens included.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Token ids of `text` with `[CLS]`/`[SEP]`, truncated to `max_length`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Whether `text` holds more tokens than `max_length` (truncation would cut it).
    pub fn overflows(&self, text: &str) -> Result<bool> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(!encoding.get_overflowing().is_empty())
    }

    /// The tokens of `text` with their vocabulary entries and the byte ranges of `text` they cover (none
    /// for special tokens), with or without `[CLS]`/`[SEP]`, truncated like [`Self::encode`].
    pub fn tokens(&self, text: &str, add_special_tokens: bool) -> Result<Vec<Token>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(encoding
            .get_ids()
            .iter()
            .zip(encoding.get_tokens())
            .zip(encoding.get_offsets())
            .zip(encoding.get_special_tokens_mask())
            .map(|(((&id, token), &(start, stop)), &special)| {
                let span = (special == 0)
                    .then(|| text.get(start..stop).map(|t| (start, stop, t)))
                    .flatten();
                Token {
                    id,
                    text: span.map_or_else(|| token.clone(), |(_, _, t)| t.to_owned()),
                    special: special != 0,
                    span: span.map(|(start, stop, _)| (start, stop)),
                }
            })
            .collect())
    }
}

/// One token of a text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// Its id in the vocabulary.
    pub id: u32,
    /// The text it covers, or its vocabulary entry for a special token.
    pub text: String,
    /// Whether the tokenizer added it (`[CLS]`, `[SEP]`).
    pub special: bool,
    /// The byte range of the input it covers (start, stop); none for special tokens.
    pub span: Option<(usize, usize)>,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Resolves to one item for every type, and to a second one as well for `Clone` types, which makes the
    /// path below ambiguous (a compile error) if `TextTokenizer` ever becomes `Clone`.
    trait AmbiguousIfClone<A> {
        fn check() {}
    }
    impl<T: ?Sized> AmbiguousIfClone<()> for T {}
    impl<T: Clone> AmbiguousIfClone<u8> for T {}

    #[test]
    fn the_tokenizer_cannot_be_deep_copied_only_shared() {
        <TextTokenizer as AmbiguousIfClone<_>>::check();
        let shared = std::sync::Arc::new(TextTokenizer::for_tests());
        let handle = shared.clone();
        assert!(std::sync::Arc::ptr_eq(&shared, &handle));
    }
}
