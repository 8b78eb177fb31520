//! Offline training (`flywheel train`): labelled JSONL in, a PEFT adapter directory (LoRA) or a
//! `BertForSequenceClassification` checkpoint (full) out, with the same loop, defaults and metrics the
//! server's jobs use, and an optional held-out test set scored at the end.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use serde::Serialize;

use super::data::{last_per_key, truncate, validation_split, Example, Split};
use super::eval::{evaluate, Evaluation};
use super::full::{write_checkpoint, FullTrainable};
use super::reference::drift_reference;
use super::train::{predict, train_full, train_lora, Method, Progress, TrainConfig, TrainError};
use crate::adapters::peft;
use crate::adapters::reference::REFERENCE_FILE;
use crate::adapters::registry::{Sidecar, SIDECAR_FILE};
use crate::model::adapter::Pooling;
use crate::model::Model;

/// One labelled line of the input files: `{"text": "…", "label": "…"}` (other fields are ignored).
#[derive(Debug, serde::Deserialize)]
struct Line {
    text: String,
    label: String,
}

/// What an offline run needs.
pub struct OfflineJob {
    /// Task name, recorded in the output's metadata.
    pub task: String,
    /// JSONL files to train (and validate) on.
    pub data: Vec<PathBuf>,
    /// JSONL files held out for a final test, if any.
    pub test: Vec<PathBuf>,
    /// Label order; `None` takes the sorted distinct labels of `data`.
    pub labels: Option<Vec<String>>,
    /// Hyperparameters (the method included).
    pub config: TrainConfig,
    /// Output directory; must not exist yet.
    pub out: PathBuf,
    /// The base model's directory (full fine-tuning copies its config and tokenizer).
    pub model_dir: PathBuf,
    /// Where training runs (the model itself stays where it was loaded, for tokenizing and scoring).
    pub device: candle_core::Device,
}

/// The run's figures, also written to `<out>/flywheel.json` (`metrics`).
#[derive(Debug, Clone, Serialize)]
pub struct OfflineReport {
    /// `lora` or `full`.
    pub method: Method,
    /// Label order of the head.
    pub labels: Vec<String>,
    /// Examples trained on.
    pub train_examples: usize,
    /// Lines of the data left out because a later line has the same text (its label is the one learned):
    /// a repeated text would otherwise land on both sides of the validation split.
    pub repeated_texts: usize,
    /// Examples validated on (early stopping, epoch choice).
    pub val_examples: usize,
    /// The chosen epoch's validation scores; `null` when validation was skipped.
    pub val: Option<Evaluation>,
    /// Why validation was skipped (the small-data guard), when it was.
    pub validation_note: Option<String>,
    /// Scores on the held-out test files, when given.
    pub test: Option<Evaluation>,
    /// Examples in the test files.
    pub test_examples: usize,
    /// Values trained.
    pub trainable_params: usize,
    /// Values in the base encoder.
    pub base_params: usize,
    /// The chosen epoch.
    pub best_epoch: usize,
    /// Every epoch's training loss and validation scores, in order.
    pub history: Vec<super::train::EpochReport>,
    /// Optimizer steps taken.
    pub steps: usize,
    /// Training wall time (the test scoring excluded).
    pub wall_seconds: f64,
}

fn read_lines(files: &[PathBuf]) -> Result<Vec<Line>, TrainError> {
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file)
            .map_err(|e| TrainError::Invalid(format!("reading {}: {e}", file.display())))?;
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            out.push(serde_json::from_str(line).map_err(|e| {
                TrainError::Invalid(format!("{} line {}: {e}", file.display(), n + 1))
            })?);
        }
    }
    Ok(out)
}

/// The last line of each text, in the order of those lines; and how many lines that left out.
fn last_line_per_text(lines: Vec<Line>) -> (Vec<Line>, usize) {
    last_per_key(lines, |l| l.text.clone())
}

/// Each line as an example cut at `max_length`, with its token ids as serving makes them.
fn examples(
    model: &Model,
    lines: &[Line],
    labels: &[String],
    max_length: usize,
) -> Result<Vec<(Example, Vec<u32>)>, TrainError> {
    lines
        .iter()
        .map(|l| {
            let label = labels.iter().position(|x| *x == l.label).ok_or_else(|| {
                TrainError::Invalid(format!("label {:?} is not one of {labels:?}", l.label))
            })?;
            let ids = model
                .tokenizer
                .encode(&l.text)
                .map_err(|e| TrainError::Invalid(e.to_string()))?;
            Ok((
                Example {
                    ids: truncate(ids.clone(), max_length),
                    label,
                },
                ids,
            ))
        })
        .collect()
}

/// Trains on `job.data`, writes the result into `job.out` and returns the figures.
pub fn run(
    model: &Model,
    job: &OfflineJob,
    progress: &mut dyn FnMut(&Progress),
) -> Result<OfflineReport, TrainError> {
    if job.out.exists() {
        return Err(TrainError::Invalid(format!(
            "{} exists already; choose a new output directory",
            job.out.display()
        )));
    }
    let config = &job.config;
    let (lines, repeated_texts) = last_line_per_text(read_lines(&job.data)?);
    let labels = match &job.labels {
        Some(l) => l.clone(),
        None => {
            let mut l: Vec<String> = lines.iter().map(|l| l.label.clone()).collect();
            l.sort();
            l.dedup();
            l
        }
    };
    if labels.len() < 2 {
        return Err(TrainError::Invalid(format!(
            "the data has the labels {labels:?}; a classifier needs at least 2"
        )));
    }
    let all = examples(model, &lines, &labels, config.max_length)?;
    let Split {
        train,
        val,
        skipped,
    } = validation_split(
        all,
        |(e, _)| e.label,
        labels.len(),
        config.val_fraction,
        config.min_val_per_label,
        config.seed,
    );
    let validation_note = skipped.map(|s| s.describe(&labels, config.epochs()));
    let (train, train_ids): (Vec<Example>, Vec<Vec<u32>>) = train.into_iter().unzip();
    let (val, val_ids): (Vec<Example>, Vec<Vec<u32>>) = val.into_iter().unzip();
    let cancel = AtomicBool::new(false);
    let cpu = model.cpu().ok_or_else(|| {
        TrainError::Invalid("training runs on the CPU path only for now".to_owned())
    })?;
    let test: Vec<Example> = examples(model, &read_lines(&job.test)?, &labels, config.max_length)?
        .into_iter()
        .map(|(e, _)| e)
        .collect();
    let truth: Vec<usize> = test.iter().map(|e| e.label).collect();
    let base_params = model
        .bert
        .clone()
        .tensors_mut()
        .iter()
        .map(|(_, t)| t.elem_count())
        .sum();
    let bert = model.bert.to_device(&job.device)?;
    let io = |e: &dyn std::fmt::Display| TrainError::Invalid(format!("writing the result: {e}"));
    std::fs::create_dir_all(&job.out).map_err(|e| io(&e))?;
    let mut pooling = Pooling::Cls;
    let (run, probs) = match config.method {
        Method::Lora => {
            let (adapter, run) = train_lora(
                &bert,
                cpu,
                labels.len(),
                &train,
                &val,
                config,
                None,
                progress,
                &cancel,
            )?
            .split();
            pooling = adapter.head.as_ref().map_or(pooling, |h| h.pooling);
            peft::write_dir(&job.out, &adapter, config.alpha, &model.name).map_err(|e| io(&e))?;
            // The drift reference a server compares this generation's traffic with.
            let size = crate::config::DriftConfig::default().reference_size;
            let reference =
                drift_reference(cpu, &adapter, &train_ids, &val_ids, size, config.seed)?;
            let bytes = reference.to_bytes().map_err(|e| io(&e))?;
            std::fs::write(job.out.join(REFERENCE_FILE), bytes).map_err(|e| io(&e))?;
            let probs = (!test.is_empty())
                .then(|| predict(cpu, &adapter, &test))
                .transpose()?;
            (run, probs)
        }
        Method::Full => {
            let (weights, run) =
                train_full(&bert, labels.len(), &train, &val, config, progress, &cancel)?.split();
            write_checkpoint(&job.out, &weights, &labels, &job.model_dir).map_err(|e| io(&e))?;
            let probs = (!test.is_empty())
                .then(|| FullTrainable::from_weights(&bert, &weights)?.predict(&test))
                .transpose()?;
            (run, probs)
        }
    };
    let report = OfflineReport {
        method: config.method,
        labels: labels.clone(),
        train_examples: train.len(),
        repeated_texts,
        val_examples: val.len(),
        val: run.val,
        validation_note,
        test: probs.map(|p| evaluate(&p, &truth, labels.len())),
        test_examples: test.len(),
        trainable_params: run.trainable_params,
        base_params,
        best_epoch: run.best_epoch,
        history: run.history,
        steps: run.steps,
        wall_seconds: run.wall_seconds,
    };
    let sidecar = Sidecar {
        task: Some(job.task.clone()),
        labels: Some(labels),
        head: Some(pooling),
        parent: None,
        metrics: serde_json::json!({"offline": report, "hyperparameters": config})
            .as_object()
            .cloned()
            .unwrap_or_default(),
    };
    let bytes = serde_json::to_vec_pretty(&sidecar).map_err(|e| io(&e))?;
    std::fs::write(job.out.join(SIDECAR_FILE), bytes).map_err(|e| io(&e))?;
    Ok(report)
}

/// Reads a JSON object of [`TrainConfig`] overrides from a string (the `--params` flag).
pub fn parse_params(json: &str, method: Method) -> Result<TrainConfig, TrainError> {
    let mut value: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| TrainError::Invalid(format!("--params is not JSON: {e}")))?;
    // The --method flag decides the method.
    if let Some(map) = value.as_object_mut() {
        map.insert(
            "method".to_owned(),
            serde_json::to_value(method).unwrap_or_default(),
        );
    }
    let config: TrainConfig = serde_json::from_value(value)
        .map_err(|e| TrainError::Invalid(format!("invalid hyperparameters: {e}")))?;
    config.validate()?;
    Ok(config)
}

/// Default output directory for a run: `out/<method>-<unix seconds>`.
pub fn default_out(method: Method) -> PathBuf {
    let secs = crate::clock::unix_seconds();
    Path::new("out").join(format!(
        "{}-{secs}",
        serde_json::to_value(method)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_text_is_kept_once_with_its_last_label() {
        let line = |text: &str, label: &str| Line {
            text: text.into(),
            label: label.into(),
        };
        let lines = vec![
            line("a", "x"),
            line("b", "x"),
            line("a", "y"),
            line("b", "x"),
        ];
        let (kept, repeated) = last_line_per_text(lines);
        let kept: Vec<(&str, &str)> = kept
            .iter()
            .map(|l| (l.text.as_str(), l.label.as_str()))
            .collect();
        assert_eq!(kept, [("a", "y"), ("b", "x")]);
        assert_eq!(repeated, 2);
    }
}
