//! LoRA on the fused CPU path, checked on a tiny random BERT.

use super::adapter::Target;
use super::cpu_encoder::CpuEncoder;
use super::hf_config::BertConfig;
use super::tiny::{self, max_diff};

const SEQS: [&[u32]; 4] = [
    &[1, 5, 9, 2],
    &[1, 2],
    &[1, 33, 44, 55, 66, 77, 88, 2],
    &[1, 7, 7, 2],
];

#[test]
fn an_adapter_whose_b_is_zero_equals_the_base_model() {
    let config = BertConfig::tiny();
    let cpu = CpuEncoder::from_bert(&tiny::bert(2)).unwrap();
    let adapter = tiny::adapter(&config, 4, &Target::ALL, 4, true);
    let base = cpu.forward(&SEQS).unwrap();
    let adapted = cpu.forward_adapted(&SEQS, &[Some(&adapter); 4]).unwrap();
    assert!(max_diff(&base.hidden, &adapted.hidden) < 1e-6);
}

#[test]
fn merged_weights_equal_the_unmerged_forward() {
    let config = BertConfig::tiny();
    let cpu = CpuEncoder::from_bert(&tiny::bert(2)).unwrap();
    for targets in [&[Target::Query, Target::Value][..], &Target::ALL[..]] {
        let adapter = tiny::adapter(&config, 9, targets, 4, false);
        let unmerged = cpu.forward_adapted(&SEQS, &[Some(&adapter); 4]).unwrap();
        let merged = cpu.merged(&adapter).unwrap().forward(&SEQS).unwrap();
        let base = cpu.forward(&SEQS).unwrap();
        assert!(
            max_diff(&unmerged.hidden, &merged.hidden) < 1e-4,
            "targets {targets:?}"
        );
        assert!(
            max_diff(&unmerged.hidden, &base.hidden) > 1e-2,
            "the adapter changes the output"
        );
    }
}

#[test]
fn a_batch_mixing_three_adapters_and_base_rows_equals_each_row_alone() {
    let config = BertConfig::tiny();
    let cpu = CpuEncoder::from_bert(&tiny::bert(6)).unwrap();
    let a = tiny::adapter(&config, 1, &[Target::Query, Target::Value], 4, false);
    let b = tiny::adapter(&config, 2, &Target::ALL, 2, false);
    let c = tiny::adapter(
        &config,
        3,
        &[Target::Intermediate, Target::Output, Target::Key],
        8,
        false,
    );
    let seqs: Vec<&[u32]> = SEQS.iter().chain(SEQS.iter()).copied().collect();
    let choice = [
        Some(&a),
        Some(&a),
        None,
        Some(&b),
        Some(&c),
        None,
        Some(&b),
        Some(&a),
    ];
    let batch = cpu.forward_adapted(&seqs, &choice).unwrap();
    let logits = cpu.classify(&batch, &choice).unwrap();
    for (i, (seq, adapter)) in seqs.iter().zip(choice).enumerate() {
        let alone = cpu.forward_adapted(&[seq], &[adapter]).unwrap();
        assert!(
            max_diff(batch.sequence(i), alone.sequence(0)) < 1e-5,
            "row {i}"
        );
        let alone_logits = cpu.classify(&alone, &[adapter]).unwrap().remove(0);
        match (&logits[i], alone_logits) {
            (Some(x), Some(y)) => assert!(max_diff(x, &y) < 1e-5),
            (None, None) => assert!(adapter.is_none()),
            _ => panic!("row {i}: a head in one run and not the other"),
        }
    }
}

#[test]
fn adapters_of_the_wrong_shape_are_refused() {
    let config = BertConfig::tiny();
    let mut bad = tiny::adapter(&config, 1, &[Target::Query], 4, false);
    let mut wrong = bad.delta(0, Target::Query).unwrap().clone();
    wrong.a.pop();
    bad.set(0, Target::Query, wrong).unwrap();
    assert!(bad.validate(&config).is_err());
    let deeper = super::adapter::Adapter::empty(config.num_hidden_layers + 1);
    assert!(deeper.validate(&config).is_err());
    let cpu = CpuEncoder::from_bert(&tiny::bert(1)).unwrap();
    assert!(cpu.forward_adapted(&SEQS[..1], &[Some(&deeper)]).is_err());
}

#[test]
fn a_mean_pooling_head_classifies_the_token_mean() {
    let config = BertConfig::tiny();
    let cpu = CpuEncoder::from_bert(&tiny::bert(6)).unwrap();
    let mut adapter = tiny::adapter(&config, 1, &[Target::Value], 4, false);
    adapter.head.as_mut().unwrap().pooling = super::adapter::Pooling::Mean;
    let packed = cpu
        .forward_adapted(&SEQS[..2], &[Some(&adapter); 2])
        .unwrap();
    let logits = cpu.classify(&packed, &[Some(&adapter); 2]).unwrap();
    let head = &adapter.head.as_ref().unwrap().classifier;
    for (i, l) in logits.iter().enumerate() {
        let mean = super::pooling::mean_of_rows(packed.sequence(i), 32);
        assert!(max_diff(l.as_ref().unwrap(), &head.run(&mean, 1)) < 1e-6);
    }
}

/// `‖a − b‖ / ‖b‖`.
fn relative_error(a: &[f32], b: &[f32]) -> f32 {
    let diff: f32 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    (diff / b.iter().map(|y| y * y).sum::<f32>()).sqrt()
}

/// int8 serving keeps the LoRA deltas in f32 on top of the int8 products: adapted outputs stay close to the
/// f32 path's, and an adapter merged into the int8 weights (requantised) gives what the unmerged one does.
#[test]
fn int8_serving_applies_and_merges_adapters_like_f32() {
    let config = BertConfig::tiny();
    let cpu = CpuEncoder::from_bert(&tiny::bert(3)).unwrap();
    let int8 = cpu.clone().quantized(&Target::ALL, &SEQS).unwrap();
    assert_eq!(int8.int8_targets(), Target::ALL);
    let adapter = tiny::adapter(&config, 12, &Target::ALL, 4, false);
    let want = cpu.forward_adapted(&SEQS, &[Some(&adapter); 4]).unwrap();
    let got = int8.forward_adapted(&SEQS, &[Some(&adapter); 4]).unwrap();
    let error = relative_error(&got.hidden, &want.hidden);
    assert!(error < 0.05, "int8 adapted output {error} from f32");
    assert!(error > 0.0, "the int8 path ran");
    let merged = int8.merged(&adapter).unwrap().forward(&SEQS).unwrap();
    let error = relative_error(&merged.hidden, &got.hidden);
    assert!(error < 0.05, "merged int8 output {error} from unmerged");
}
