//! Named prompts a sentence-transformers model defines in `config_sentence_transformers.json` (e5's
//! `"query: "` and `"passage: "`): text put before each input, chosen per request by name.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::error::{ModelError, Result};

/// The file sentence-transformers keeps a model's prompts in.
pub const PROMPTS_FILE: &str = "config_sentence_transformers.json";

/// A model's prompts; empty when its directory names none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Prompts {
    /// Prompt text by name.
    #[serde(default)]
    prompts: BTreeMap<String, String>,
    /// The prompt applied when a request names none.
    #[serde(default)]
    default_prompt_name: Option<String>,
}

impl Prompts {
    /// Reads `dir/config_sentence_transformers.json`; a directory without one has no prompts.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(PROMPTS_FILE);
        let Some(text) = super::st_modules::read_optional(&path)? else {
            return Ok(Self::default());
        };
        let bad = |reason: String| ModelError::BadFile {
            path: path.clone(),
            reason,
        };
        let prompts: Self = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        match &prompts.default_prompt_name {
            Some(name) if !prompts.prompts.contains_key(name) => Err(bad(format!(
                "default_prompt_name {name:?} is not one of its prompts"
            ))),
            _ => Ok(prompts),
        }
    }

    /// The prompt names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.prompts.keys().map(String::as_str)
    }

    /// The text to put before inputs: the prompt `name`s, or the default one when no name is given (none
    /// when the model has no default). An unknown name is an error that lists the known ones.
    pub fn resolve(&self, name: Option<&str>) -> std::result::Result<Option<&str>, String> {
        let Some(name) = name.or(self.default_prompt_name.as_deref()) else {
            return Ok(None);
        };
        match self.prompts.get(name) {
            Some(prompt) => Ok(Some(prompt)),
            None if self.prompts.is_empty() => {
                Err(format!("prompt_name {name:?}: this model has no prompts"))
            }
            None => Err(format!(
                "prompt_name {name:?} is not one of this model's prompts ({})",
                self.names().collect::<Vec<_>>().join(", ")
            )),
        }
    }

    /// `texts` with the prompt `name` resolves to put before each (unchanged when it resolves to none).
    pub fn apply(
        &self,
        name: Option<&str>,
        texts: Vec<String>,
    ) -> std::result::Result<Vec<String>, String> {
        Ok(match self.resolve(name)? {
            Some(prompt) => texts.into_iter().map(|t| format!("{prompt}{t}")).collect(),
            None => texts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, json: &str) {
        std::fs::write(dir.join(PROMPTS_FILE), json).unwrap();
    }

    #[test]
    fn e5_prompts_are_put_before_the_inputs_by_name() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            r#"{"prompts": {"query": "query: ", "passage": "passage: "}, "default_prompt_name": null}"#,
        );
        let prompts = Prompts::load(dir.path()).unwrap();
        assert_eq!(prompts.names().collect::<Vec<_>>(), ["passage", "query"]);
        let texts = vec!["你好".to_owned(), "hi".to_owned()];
        assert_eq!(
            prompts.apply(Some("query"), texts.clone()).unwrap(),
            ["query: 你好", "query: hi"]
        );
        assert_eq!(prompts.apply(None, texts.clone()).unwrap(), texts);
        let err = prompts.apply(Some("doc"), texts).unwrap_err();
        assert!(err.contains("passage, query"), "{err}");
    }

    #[test]
    fn a_default_prompt_applies_when_none_is_named_and_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            r#"{"prompts": {"query": "q: "}, "default_prompt_name": "query"}"#,
        );
        let prompts = Prompts::load(dir.path()).unwrap();
        assert_eq!(prompts.resolve(None).unwrap(), Some("q: "));
        write(
            dir.path(),
            r#"{"prompts": {"query": "q: "}, "default_prompt_name": "doc"}"#,
        );
        let err = Prompts::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("\"doc\""), "{err}");
    }

    #[test]
    fn a_model_without_the_file_has_no_prompts() {
        let dir = tempfile::tempdir().unwrap();
        let prompts = Prompts::load(dir.path()).unwrap();
        assert_eq!(prompts, Prompts::default());
        assert_eq!(prompts.resolve(None).unwrap(), None);
        let err = prompts.resolve(Some("query")).unwrap_err();
        assert!(err.contains("has no prompts"), "{err}");
    }
}
