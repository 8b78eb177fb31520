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
    /// The special token the tokenizer closes a text with (`[SEP]`, `</s>`), if any.
    end: Option<u32>,
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
        let inner = Tokenizer::from_file(path).map_err(|e| ModelError::BadFile {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Self::new(inner, max_length)
    }

    fn new(mut inner: Tokenizer, max_length: usize) -> Result<Self> {
        inner
            .with_truncation(Some(TruncationParams {
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        inner.with_padding(None);
        let end = inner
            .encode("", true)
            .ok()
            .and_then(|e| e.get_ids().last().copied());
        Ok(Self {
            inner,
            max_length,
            end,
        })
    }

    /// The special token the tokenizer closes a text with (`[SEP]`, `</s>`), if it adds one.
    pub fn end_token(&self) -> Option<u32> {
        self.end
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

/// Cuts `ids` to `max_length`, keeping its final token (`[SEP]`, `</s>`), as the tokenizer's own truncation
/// keeps the special tokens it adds.
pub fn truncate(mut ids: Vec<u32>, max_length: usize) -> Vec<u32> {
    if ids.len() > max_length && max_length >= 2 {
        let last = ids[ids.len() - 1];
        ids.truncate(max_length - 1);
        ids.push(last);
    }
    ids
}

#[cfg(test)]
impl TextTokenizer {
    /// A vocabulary-less tokenizer for tests that feed token ids directly.
    pub(crate) fn for_tests() -> Self {
        Self {
            inner: Tokenizer::new(tokenizers::models::wordpiece::WordPiece::default()),
            max_length: 64,
            end: None,
        }
    }

    /// A lower-casing, whitespace-splitting tokenizer whose vocabulary is `[PAD]`, `[UNK]`, `[CLS]`,
    /// `[SEP]` (ids 0–3), then `words` from id 4, with BERT's `[CLS] … [SEP]` around every text.
    pub(crate) fn for_words(words: &[&str], max_length: usize) -> Self {
        let specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"];
        let vocab: serde_json::Map<String, serde_json::Value> = specials
            .iter()
            .chain(words)
            .enumerate()
            .map(|(id, w)| (w.to_string(), serde_json::json!(id)))
            .collect();
        let added: Vec<_> = specials
            .iter()
            .enumerate()
            .map(|(id, w)| {
                serde_json::json!({"id": id, "content": w, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let special =
            |name: &str, id: u32| serde_json::json!({"id": name, "ids": [id], "tokens": [name]});
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "Lowercase"},
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"[CLS]": special("[CLS]", 2), "[SEP]": special("[SEP]", 3)}
            },
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
        });
        let inner: Tokenizer = json.to_string().parse().expect("a valid tokenizer.json");
        Self::new(inner, max_length).expect("truncation applies")
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
    fn the_word_tokenizer_for_tests_wraps_known_words_and_truncates() {
        let t = TextTokenizer::for_words(&["win", "cash"], 4);
        assert_eq!(t.encode("Win CASH").unwrap(), vec![2, 4, 5, 3]);
        assert_eq!(t.encode("win cash win cash").unwrap(), vec![2, 4, 5, 3]);
        assert_eq!(t.encode("hello").unwrap(), vec![2, 1, 3]);
    }

    #[test]
    fn the_tokenizer_cannot_be_deep_copied_only_shared() {
        <TextTokenizer as AmbiguousIfClone<_>>::check();
        let shared = std::sync::Arc::new(TextTokenizer::for_tests());
        let handle = shared.clone();
        assert!(std::sync::Arc::ptr_eq(&shared, &handle));
    }
}
