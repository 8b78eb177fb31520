//! The Hugging Face `config.json` of a BERT-family encoder.

use serde::Deserialize;

/// The fields of a BERT `config.json` that shape the network; unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BertConfig {
    /// Tokens in the vocabulary (rows of the word embedding).
    pub vocab_size: usize,
    /// Width of every hidden state.
    pub hidden_size: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer; `hidden_size` must divide evenly among them.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Activation of the feed-forward layer; only the exact (erf) `gelu` is supported.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// Longest sequence the position embedding covers.
    pub max_position_embeddings: usize,
    /// Rows of the token-type embedding.
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    /// Epsilon of every LayerNorm.
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Id of the padding token.
    #[serde(default)]
    pub pad_token_id: u32,
    /// Only `absolute` position embeddings are supported.
    #[serde(default = "default_position_embedding_type")]
    pub position_embedding_type: String,
    /// `bert` for the models this encoder serves (checked before parsing: [`check_architecture`]).
    #[serde(default)]
    pub model_type: Option<String>,
}

fn default_hidden_act() -> String {
    "gelu".to_owned()
}
fn default_type_vocab_size() -> usize {
    2
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_position_embedding_type() -> String {
    "absolute".to_owned()
}

impl BertConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Checks the combinations this encoder can run, naming the first unsupported one.
    pub fn validate(&self) -> Result<(), String> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.hidden_act != "gelu" {
            return Err(format!(
                "hidden_act {:?} is not supported (only \"gelu\")",
                self.hidden_act
            ));
        }
        if self.position_embedding_type != "absolute" {
            return Err(format!(
                "position_embedding_type {:?} is not supported (only \"absolute\")",
                self.position_embedding_type
            ));
        }
        Ok(())
    }

    /// A tiny configuration for unit tests: 2 layers, hidden 32, 4 heads.
    pub fn tiny() -> Self {
        Self {
            vocab_size: 100,
            hidden_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 64,
            hidden_act: default_hidden_act(),
            max_position_embeddings: 64,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
            position_embedding_type: default_position_embedding_type(),
            model_type: Some("bert".to_owned()),
        }
    }
}
/// Refuses a `config.json` whose `model_type` or `architectures` name something other than BERT.
pub fn check_architecture(config: &str) -> std::result::Result<(), String> {
    let Ok(raw) = serde_json::from_str::<serde_json::Value>(config) else {
        return Ok(()); // the typed parse that follows names the syntax error
    };
    if let Some(kind) = raw.get("model_type").and_then(serde_json::Value::as_str) {
        if kind != "bert" {
            return Err(format!("model_type {kind:?} is not a BERT encoder"));
        }
    }
    let architectures = raw
        .get("architectures")
        .and_then(serde_json::Value::as_array);
    for name in architectures
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_str)
    {
        if !name.starts_with("Bert") {
            return Err(format!("architecture {name:?} is not a BERT encoder"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_of_another_architecture_is_named_as_such() {
        let distilbert = r#"{"model_type": "distilbert", "dim": 768, "n_layers": 6}"#;
        assert!(check_architecture(distilbert)
            .unwrap_err()
            .contains("\"distilbert\""));
        let gpt2 = r#"{"architectures": ["GPT2LMHeadModel"], "n_embd": 768}"#;
        assert!(check_architecture(gpt2)
            .unwrap_err()
            .contains("GPT2LMHeadModel"));
        let bert = r#"{"model_type": "bert", "architectures": ["BertForSequenceClassification"]}"#;
        assert!(check_architecture(bert).is_ok());
        assert!(
            check_architecture("{}").is_ok(),
            "older configs name neither"
        );
    }
}
