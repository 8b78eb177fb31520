//! What a sentence-transformers model directory says about its own pipeline (`modules.json` and the
//! Pooling module's `config.json`), checked against what Flywheel computes: mean pooling over the tokens.
//! A model that pools otherwise (`[CLS]`, like the BGE and Arctic embedders, or max) is refused at load,
//! since its embeddings here would not be the model's.

use std::path::Path;

use serde::Deserialize;

use super::error::{ModelError, Result};

/// sentence-transformers' list of a model's modules.
const MODULES_FILE: &str = "modules.json";
/// Where the Pooling module lives when `modules.json` does not say.
const DEFAULT_POOLING_DIR: &str = "1_Pooling";

#[derive(Deserialize)]
struct Module {
    #[serde(default)]
    path: String,
    #[serde(rename = "type", default)]
    kind: String,
}

/// The Pooling module's settings (the modes sentence-transformers knows; absent ones are off).
#[derive(Deserialize, Default)]
#[serde(default)]
struct Pooling {
    pooling_mode_cls_token: bool,
    pooling_mode_mean_tokens: bool,
    pooling_mode_max_tokens: bool,
    pooling_mode_mean_sqrt_len_tokens: bool,
    pooling_mode_weightedmean_tokens: bool,
    pooling_mode_lasttoken: bool,
}

/// Refuses a model directory whose Pooling module pools other than by the mean of the tokens. A directory
/// without sentence-transformers files (a plain Transformers checkpoint) is mean-pooled, as Transformers'
/// feature-extraction users do.
pub fn check_pooling(dir: &Path) -> Result<()> {
    let modules_path = dir.join(MODULES_FILE);
    let pooling_dir = match read_optional(&modules_path)? {
        Some(text) => {
            let modules: Vec<Module> =
                serde_json::from_str(&text).map_err(|e| ModelError::BadFile {
                    path: modules_path.clone(),
                    reason: e.to_string(),
                })?;
            match modules.iter().find(|m| m.kind.ends_with(".Pooling")) {
                Some(m) => m.path.clone(),
                None => return Ok(()),
            }
        }
        None => DEFAULT_POOLING_DIR.to_owned(),
    };
    let path = dir.join(pooling_dir).join("config.json");
    let Some(text) = read_optional(&path)? else {
        return Ok(());
    };
    let pooling: Pooling = serde_json::from_str(&text).map_err(|e| ModelError::BadFile {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let others = [
        ("cls_token", pooling.pooling_mode_cls_token),
        ("max_tokens", pooling.pooling_mode_max_tokens),
        (
            "mean_sqrt_len_tokens",
            pooling.pooling_mode_mean_sqrt_len_tokens,
        ),
        (
            "weightedmean_tokens",
            pooling.pooling_mode_weightedmean_tokens,
        ),
        ("lasttoken", pooling.pooling_mode_lasttoken),
    ];
    let on: Vec<&str> = others
        .iter()
        .filter(|(_, on)| *on)
        .map(|(n, _)| *n)
        .collect();
    if !pooling.pooling_mode_mean_tokens || !on.is_empty() {
        return Err(ModelError::Unsupported(format!(
            "{} pools by {} (pooling_mode_…); Flywheel embeds by the mean of the tokens only, so its \
             embeddings would not be this model's",
            path.display(),
            if on.is_empty() { "no mode".to_owned() } else { on.join(" and ") }
        )));
    }
    Ok(())
}

/// A file's text; `None` when there is no such file (the files sentence-transformers adds are optional).
pub(super) fn read_optional(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ModelError::BadFile {
            path: path.to_owned(),
            reason: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn mean_pooling_loads_and_cls_or_max_pooling_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            check_pooling(dir.path()).is_ok(),
            "a plain Transformers checkpoint"
        );
        let mean = r#"{"word_embedding_dimension": 384, "pooling_mode_cls_token": false,
            "pooling_mode_mean_tokens": true, "pooling_mode_max_tokens": false}"#;
        write(dir.path(), "1_Pooling/config.json", mean);
        assert!(check_pooling(dir.path()).is_ok());
        let cls = r#"{"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}"#;
        write(dir.path(), "1_Pooling/config.json", cls);
        let refused = check_pooling(dir.path()).unwrap_err().to_string();
        assert!(refused.contains("cls_token"), "{refused}");
        // modules.json names where the Pooling module is.
        write(
            dir.path(),
            "modules.json",
            r#"[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "pool", "type": "sentence_transformers.models.Pooling"}]"#,
        );
        assert!(
            check_pooling(dir.path()).is_ok(),
            "1_Pooling is not the module"
        );
        write(
            dir.path(),
            "pool/config.json",
            r#"{"pooling_mode_mean_tokens": true, "pooling_mode_max_tokens": true}"#,
        );
        let refused = check_pooling(dir.path()).unwrap_err().to_string();
        assert!(refused.contains("max_tokens"), "{refused}");
    }

    #[test]
    fn the_shipped_models_pool_by_the_mean() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        for model in ["all-MiniLM-L6-v2", "multilingual-e5-small"] {
            let dir = root.join(model);
            if dir.join("modules.json").is_file() {
                check_pooling(&dir).unwrap();
            }
        }
    }
}
