//! LoRA training on the real model and real mail (SpamAssassin spam-1 vs easy-ham-1, fetched by
//! datasets/fetch-spamassassin.sh): a few epochs on a small sample must classify held-out mail well.

mod common;

use std::sync::atomic::AtomicBool;

use common::mails;
use flywheel::trainer::data::{stratified_split, truncate, Example};
use flywheel::trainer::eval::evaluate;
use flywheel::trainer::train::{predict, train_lora, TrainConfig};

#[test]
fn lora_learns_spam_from_a_small_real_sample() {
    let model = common::load_model();
    let config = TrainConfig {
        epochs: Some(4),
        max_length: 48,
        learning_rate: Some(3e-3),
        ..TrainConfig::default()
    };
    let examples = |texts: &[String], label: usize| -> Vec<Example> {
        texts
            .iter()
            .map(|t| Example {
                ids: truncate(model.tokenizer.encode(t).unwrap(), config.max_length),
                label,
            })
            .collect()
    };
    let (ham, spam) = (mails("easy-ham-1"), mails("spam-1"));
    // 60 mails of each class spread over the corpus for training, a disjoint 60 + 60 for the held-out test.
    let pick = |v: &[String], offset: usize, step: usize| -> Vec<String> {
        v.iter()
            .skip(offset)
            .step_by(step)
            .take(60)
            .cloned()
            .collect()
    };
    let sample: Vec<Example> = examples(&pick(&ham, 0, 10), 0)
        .into_iter()
        .chain(examples(&pick(&spam, 0, 5), 1))
        .collect();
    let held_out: Vec<Example> = examples(&pick(&ham, 5, 10), 0)
        .into_iter()
        .chain(examples(&pick(&spam, 2, 5), 1))
        .collect();
    let (train, val) = stratified_split(sample, 2, config.val_fraction, config.seed);
    let cpu = model.cpu().unwrap();
    let report = train_lora(
        &model.bert,
        cpu,
        2,
        &train,
        &val,
        &config,
        None,
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .unwrap();
    let truth: Vec<usize> = held_out.iter().map(|e| e.label).collect();
    let test = evaluate(&predict(cpu, &report.result, &held_out).unwrap(), &truth, 2);
    for h in &report.history {
        eprintln!(
            "epoch {}: loss {:.3}, val macro-F1 {:.3}",
            h.epoch,
            h.train_loss,
            h.val.as_ref().map_or(f64::NAN, |v| v.macro_f1)
        );
    }
    eprintln!(
        "trained on {} mails in {:.1} s ({} steps, {} trainable values): held-out accuracy {:.3}, macro-F1 {:.3}, AUC {:.3}",
        train.len(),
        report.wall_seconds,
        report.steps,
        report.trainable_params,
        test.accuracy,
        test.macro_f1,
        test.auc.unwrap_or(f64::NAN)
    );
    assert!(test.macro_f1 >= 0.8 && test.auc.unwrap() >= 0.9, "{test:?}");
}
