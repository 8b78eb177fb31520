//! The trainable LoRA path on a tiny random BERT: it equals the serving path, every trainable tensor gets
//! a gradient, and AdamW steps reduce the loss.

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

use super::lora::{cross_entropy, LoraTrainable};
use crate::model::adapter::{Adapter, Target};
use crate::model::bert::Deltas;
use crate::model::{tiny, BertConfig, CpuEncoder};

fn batch() -> (Vec<Vec<u32>>, Tensor, Tensor, Tensor) {
    let seqs: Vec<Vec<u32>> = vec![
        vec![1, 5, 9, 2],
        vec![1, 7, 2],
        vec![1, 33, 44, 55, 2],
        vec![1, 8, 8, 8, 8, 2],
    ];
    let longest = seqs.iter().map(Vec::len).max().unwrap();
    let mut ids = vec![0u32; seqs.len() * longest];
    let mut mask = vec![0u8; seqs.len() * longest];
    for (i, s) in seqs.iter().enumerate() {
        ids[i * longest..i * longest + s.len()].copy_from_slice(s);
        mask[i * longest..i * longest + s.len()]
            .iter_mut()
            .for_each(|m| *m = 1);
    }
    let ids_t = Tensor::from_vec(ids, (seqs.len(), longest), &Device::Cpu).unwrap();
    let mask_t = Tensor::from_vec(mask, (seqs.len(), longest), &Device::Cpu).unwrap();
    let targets = Tensor::new(&[0u32, 1, 2, 0], &Device::Cpu).unwrap();
    (seqs, ids_t, mask_t, targets)
}

fn trainable(config: &BertConfig) -> LoraTrainable {
    LoraTrainable::new(
        config,
        &[Target::Query, Target::Value, Target::Intermediate],
        4,
        8.0,
        3,
        42,
        &Device::Cpu,
    )
    .unwrap()
}

/// Gives B non-zero values so the deltas matter.
fn perturb(lora: &LoraTrainable) {
    for (i, v) in lora.vars().iter().enumerate() {
        let noise = (Tensor::randn(0f32, 0.1, v.shape(), &Device::Cpu).unwrap()
            * (1.0 + i as f64 * 0.01))
            .unwrap();
        v.set(&(v.as_tensor() + noise).unwrap()).unwrap();
    }
}

#[test]
fn the_training_path_computes_what_the_serving_path_serves() {
    let bert = tiny::bert(3);
    let lora = trainable(&bert.config);
    perturb(&lora);
    let (seqs, ids, mask, _) = batch();
    let trained = lora.logits(&bert, &ids, &mask).unwrap();
    assert_serves_what_it_trained(&bert, &lora, &seqs, &trained);
}

/// Exports `lora` and checks that the fused serving path's logits for `seqs` (each unpadded) equal `trained`,
/// the training path's on the padded batch, and that a warm start from the export reproduces it; returns it.
fn assert_serves_what_it_trained(
    bert: &crate::model::Bert,
    lora: &LoraTrainable,
    seqs: &[Vec<u32>],
    trained: &Tensor,
) -> Adapter {
    let layers = bert.config.num_hidden_layers;
    let adapter = lora.to_adapter(layers).unwrap();
    let cpu = CpuEncoder::from_bert(bert).unwrap();
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let choice = vec![Some(&adapter); refs.len()];
    let packed = cpu.forward_adapted(&refs, &choice).unwrap();
    let served = cpu.classify(&packed, &choice).unwrap();
    for (t, s) in trained.to_vec2::<f32>().unwrap().iter().zip(served) {
        let s = s.unwrap();
        let diff = t
            .iter()
            .zip(&s)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-4, "training path {t:?} vs serving path {s:?}");
    }
    let again = LoraTrainable::from_adapter(&adapter, &Device::Cpu).unwrap();
    assert_eq!(again.to_adapter(layers).unwrap(), adapter);
    adapter
}

#[test]
fn every_trainable_tensor_gets_a_non_zero_gradient() {
    let bert = tiny::bert(3);
    let lora = trainable(&bert.config);
    perturb(&lora);
    let (_, ids, mask, targets) = batch();
    let loss = cross_entropy(
        &lora.logits(&bert, &ids, &mask).unwrap(),
        &targets,
        0.1,
        None,
    )
    .unwrap();
    let grads = loss.backward().unwrap();
    let vars = lora.vars();
    assert_eq!(
        vars.len(),
        2 * 3 * 2 + 2,
        "A and B for 3 targets in 2 layers, plus the head"
    );
    assert_every_var_has_a_gradient(&vars, &grads);
}

/// bf16 autocast on a bf16 copy of the base: the f32 factors and head all get f32 gradients, the logits stay
/// near the f32 ones, and AdamW steps still lower the loss.
#[test]
fn under_bf16_autocast_the_f32_factors_get_gradients_and_learn() {
    let bert = tiny::bert(3);
    let half = bert.to_dtype(DType::BF16).unwrap();
    let lora = trainable(&bert.config);
    perturb(&lora);
    let (_, ids, mask, targets) = batch();
    let logits = lora.logits(&half, &ids, &mask).unwrap();
    assert_eq!(logits.dtype(), DType::F32);
    let gap = tiny::max_abs_diff(&logits, &lora.logits(&bert, &ids, &mask).unwrap());
    assert!(gap < 0.05, "bf16 logits are {gap} from f32");
    let vars = lora.vars();
    let loss = |lora: &LoraTrainable| {
        cross_entropy(
            &lora.logits(&half, &ids, &mask).unwrap(),
            &targets,
            0.0,
            None,
        )
        .unwrap()
    };
    let first = loss(&lora);
    assert_every_var_has_a_gradient(&vars, &first.backward().unwrap());
    let mut opt = super::optim::adamw(vars, 1e-2, 0.0).unwrap();
    for _ in 0..10 {
        opt.backward_step(&loss(&lora)).unwrap();
    }
    let (before, after) = (
        first.to_scalar::<f32>().unwrap(),
        loss(&lora).to_scalar::<f32>().unwrap(),
    );
    assert!(
        after < before,
        "bf16 training did not lower the loss: {before} -> {after}"
    );
}

/// The head reads only `[CLS]`, so the last layer computes only its row; the loss and every gradient
/// must be those of the whole sequence's pass, on a padded batch.
#[test]
fn computing_only_the_first_row_of_the_last_layer_changes_no_loss_and_no_gradient() {
    let bert = tiny::bert(3);
    let lora = trainable(&bert.config);
    perturb(&lora);
    let (_, ids, mask, targets) = batch();
    let vars = lora.vars();
    let (weight, bias) = (&vars[vars.len() - 2], &vars[vars.len() - 1]);
    let run = |hidden: Tensor| {
        let logits = super::lora::cls_head(&bert, &hidden, None, weight, bias).unwrap();
        let loss = cross_entropy(&logits, &targets, 0.1, None).unwrap();
        (logits, loss.backward().unwrap())
    };
    let (all, all_grads) = run(bert.forward_with(&ids, &mask, &lora).unwrap());
    let hidden = bert.forward_first_with(&ids, &mask, &lora).unwrap();
    assert_eq!(hidden.dims3().unwrap().1, 1);
    let (first, first_grads) = run(hidden);
    assert!(tiny::max_abs_diff(&all, &first) < 1e-5);
    for v in &vars {
        let (a, b) = (
            all_grads.get(v.as_tensor()).unwrap(),
            first_grads.get(v.as_tensor()).unwrap(),
        );
        assert!(tiny::max_abs_diff(a, b) < 1e-5, "a gradient differs");
    }
}

#[test]
fn with_dropout_the_factors_still_all_get_gradients_and_each_pass_differs() {
    let bert = tiny::bert(3);
    let plain = trainable(&bert.config);
    perturb(&plain);
    let (_, ids, mask, targets) = batch();
    let logits = |lora: &LoraTrainable| lora.logits(&bert, &ids, &mask).unwrap();
    let reference = logits(&plain);
    assert_eq!(
        crate::model::tiny::max_abs_diff(&reference, &logits(&plain)),
        0.0,
        "without dropout a pass is deterministic"
    );
    let lora = plain.with_dropout(0.3, 1);
    let (first, second) = (logits(&lora), logits(&lora));
    assert!(crate::model::tiny::max_abs_diff(&first, &second) > 0.0);
    assert!(crate::model::tiny::max_abs_diff(&first, &reference) > 0.0);
    let grads = cross_entropy(&first, &targets, 0.1, None)
        .unwrap()
        .backward()
        .unwrap();
    assert_every_var_has_a_gradient(&lora.vars(), &grads);
}

/// Hands the encoder only [`Deltas::delta`], so it takes the composed path (candle ops) for every delta.
struct Composed<'a>(&'a LoraTrainable);

impl Deltas for Composed<'_> {
    fn delta(
        &self,
        layer: usize,
        target: Target,
        x: &Tensor,
    ) -> crate::model::Result<Option<Tensor>> {
        self.0.delta(layer, target, x)
    }
}

#[test]
fn the_fused_cpu_ops_compute_what_the_composed_deltas_do_with_or_without_dropout() {
    let bert = tiny::bert(3);
    let (_, ids, mask, _) = batch();
    for p in [0.0, 0.3] {
        // Two copies of the same factors, whose dropout draws the same masks in the same order.
        let fused = trainable(&bert.config).with_dropout(p, 5);
        perturb(&fused);
        let composed = trainable(&bert.config).with_dropout(p, 5);
        for (from, to) in fused.vars().iter().zip(composed.vars()) {
            to.set(from.as_tensor()).unwrap();
        }
        let weights =
            Tensor::randn(0f32, 1.0, (4, 1, bert.config.hidden_size), &Device::Cpu).unwrap();
        let run = |deltas: &dyn Deltas| {
            let hidden = bert.forward_first_with(&ids, &mask, deltas).unwrap();
            let grads = (&hidden * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            (hidden, grads)
        };
        let (fused_hidden, fused_grads) = run(&fused);
        let (composed_hidden, composed_grads) = run(&Composed(&composed));
        let diff = tiny::max_abs_diff(&fused_hidden, &composed_hidden);
        assert!(diff < 1e-4, "p = {p}: hidden states differ by {diff}");
        // The factors (every variable but the head's two).
        let factors = fused.vars().len() - 2;
        for (i, (a, b)) in fused
            .vars()
            .iter()
            .zip(composed.vars())
            .take(factors)
            .enumerate()
        {
            let (ga, gb) = (
                fused_grads.get(a.as_tensor()).unwrap(),
                composed_grads.get(b.as_tensor()).unwrap(),
            );
            let diff = tiny::max_abs_diff(ga, gb);
            assert!(
                diff < 1e-3,
                "p = {p}: factor {i}'s gradients differ by {diff}"
            );
        }
    }
}

/// Fails unless every variable got a gradient with a non-zero norm (a fused op without a backward would
/// leave some at none or zero, silently training nothing).
pub(super) fn assert_every_var_has_a_gradient(
    vars: &[candle_core::Var],
    grads: &candle_core::backprop::GradStore,
) {
    for (i, v) in vars.iter().enumerate() {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("var {i} got no gradient"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "var {i} has a zero gradient");
    }
}

#[test]
fn adamw_steps_reduce_the_loss() {
    let bert = tiny::bert(3);
    let lora = trainable(&bert.config);
    let (_, ids, mask, targets) = batch();
    let params = ParamsAdamW {
        lr: 1e-2,
        weight_decay: 0.01,
        ..ParamsAdamW::default()
    };
    let mut opt = AdamW::new(lora.vars(), params).unwrap();
    let loss_of = |l: &LoraTrainable| {
        cross_entropy(&l.logits(&bert, &ids, &mask).unwrap(), &targets, 0.0, None).unwrap()
    };
    let first = loss_of(&lora).to_scalar::<f32>().unwrap();
    for _ in 0..30 {
        opt.backward_step(&loss_of(&lora)).unwrap();
    }
    let last = loss_of(&lora).to_scalar::<f32>().unwrap();
    assert!(last < first * 0.5, "loss went from {first} to {last}");
}

#[test]
fn a_warm_start_reproduces_the_adapter_it_started_from() {
    let bert = tiny::bert(3);
    let lora = trainable(&bert.config);
    perturb(&lora);
    let adapter = lora.to_adapter(bert.config.num_hidden_layers).unwrap();
    let again = LoraTrainable::from_adapter(&adapter, &Device::Cpu).unwrap();
    assert_eq!(
        again.to_adapter(bert.config.num_hidden_layers).unwrap(),
        adapter
    );
    assert_eq!(again.parameter_count(), adapter.parameter_count());
}

/// [`super::train::train_lora`] reporting nowhere and never cancelled.
fn fit(
    bert: &crate::model::bert::Bert,
    cpu: &CpuEncoder,
    labels: usize,
    train: &[super::data::Example],
    val: &[super::data::Example],
    config: &super::train::TrainConfig,
    warm: Option<&Adapter>,
) -> super::train::TrainReport<Adapter> {
    let cancel = std::sync::atomic::AtomicBool::new(false);
    super::train::train_lora(
        bert,
        cpu,
        labels,
        train,
        val,
        config,
        warm,
        &mut |_| {},
        &cancel,
    )
    .unwrap()
}

/// A separable toy task: `n` examples of each label, label 0 texts holding token 5 and label 1 texts token 9.
fn toy_task(n: usize) -> Vec<super::data::Example> {
    let make = |token: u32, label: usize| {
        (0..n).map(move |i| super::data::Example {
            ids: vec![1, 20 + (i % 7) as u32, token, 30 + (i % 5) as u32, 2],
            label,
        })
    };
    make(5, 0).chain(make(9, 1)).collect()
}

#[test]
fn train_lora_learns_a_separable_toy_task_and_keeps_the_best_epoch() {
    use super::train::{train_lora, TrainConfig};
    let bert = tiny::bert(11);
    let cpu = CpuEncoder::from_bert(&bert).unwrap();
    let (train, val) = (toy_task(24), toy_task(6));
    let config = TrainConfig {
        epochs: Some(6),
        batch_size: 8,
        grad_accumulation: 2,
        max_length: 16,
        learning_rate: Some(1e-2),
        ..TrainConfig::default()
    };
    let mut steps = 0;
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let report = train_lora(
        &bert,
        &cpu,
        2,
        &train,
        &val,
        &config,
        None,
        &mut |p| steps = p.step,
        &cancel,
    )
    .unwrap();
    let best = report.val.clone().expect("validated");
    assert_eq!(best.accuracy, 1.0, "{:?}", report.history);
    assert!(report
        .history
        .iter()
        .all(|h| h.val.as_ref().expect("validated").macro_f1 <= best.macro_f1));
    assert_eq!(steps, report.steps);
    assert_eq!(
        report.steps,
        3 * report.history.len(),
        "48 examples / (8 × 2) = 3 steps per epoch"
    );
    for h in &report.history {
        let norm = h.grad_norm.expect("clipping on measures the norm");
        assert!(norm.is_finite() && norm > 0.0, "{h:?}");
        assert!(h.clipped_steps <= 3, "{h:?}");
    }
    cancel.store(true, std::sync::atomic::Ordering::Relaxed);
    let cancelled = train_lora(
        &bert,
        &cpu,
        2,
        &train,
        &val,
        &config,
        None,
        &mut |_| {},
        &cancel,
    );
    assert!(matches!(
        cancelled,
        Err(super::train::TrainError::Cancelled)
    ));
    // Without a validation split (the small-data guard) every epoch runs and the last is kept.
    cancel.store(false, std::sync::atomic::Ordering::Relaxed);
    let config = TrainConfig {
        epochs: Some(3),
        patience: 1,
        max_grad_norm: 0.0,
        ..config
    };
    let run = fit(&bert, &cpu, 2, &train, &[], &config, None);
    assert_eq!((run.best_epoch, run.history.len(), run.steps), (3, 3, 9));
    assert!(run.val.is_none() && run.history.iter().all(|h| h.val.is_none()));
    // Clipping off reports no norm.
    assert!(run
        .history
        .iter()
        .all(|h| h.grad_norm.is_none() && h.clipped_steps == 0));
}

#[test]
fn a_warm_started_run_continues_from_the_given_adapter() {
    use super::data::Example;
    use super::train::TrainConfig;
    let bert = tiny::bert(11);
    let cpu = CpuEncoder::from_bert(&bert).unwrap();
    let start = trainable(&bert.config);
    perturb(&start);
    let warm = start.to_adapter(bert.config.num_hidden_layers).unwrap();
    let train: Vec<Example> = (0..16)
        .map(|i| Example {
            ids: vec![1, 5 + (i % 2) as u32, 2],
            label: i % 2,
        })
        .collect();
    let config = TrainConfig {
        epochs: Some(1),
        batch_size: 8,
        learning_rate: Some(1e-6),
        max_length: 16,
        ..TrainConfig::default()
    };
    let run = |w| fit(&bert, &cpu, 3, &train, &train, &config, w).result;
    let continued = run(Some(&warm));
    let fresh = run(None);
    let head = |a: &Adapter| a.head.clone().unwrap().classifier.weight;
    let diff = |x: &[f32], y: &[f32]| {
        x.iter()
            .zip(y)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    };
    assert!(
        diff(&head(&continued), &head(&warm)) < 1e-3,
        "a tiny learning rate barely moves a warm start"
    );
    assert!(
        diff(&head(&fresh), &head(&warm)) > 1e-2,
        "a fresh start is elsewhere"
    );
    assert_eq!(continued.deltas().count(), warm.deltas().count());
}

/// A tiny BERT, a perturbed adapter to warm-start from, and toy examples of two labels.
struct WarmStart {
    bert: crate::model::bert::Bert,
    cpu: CpuEncoder,
    parent: Adapter,
    train: Vec<super::data::Example>,
}

impl WarmStart {
    fn new(examples: usize) -> Self {
        let bert = tiny::bert(11);
        let cpu = CpuEncoder::from_bert(&bert).unwrap();
        let start = trainable(&bert.config);
        perturb(&start);
        let parent = start.to_adapter(bert.config.num_hidden_layers).unwrap();
        let train = (0..examples)
            .map(|i| super::data::Example {
                ids: vec![1, 5 + (i % 2) as u32, 20 + (i % 7) as u32, 2],
                label: i % 2,
            })
            .collect();
        Self {
            bert,
            cpu,
            parent,
            train,
        }
    }

    /// Trains from the parent on the examples (validating on them too).
    fn train(&self, config: &super::train::TrainConfig) -> super::train::TrainReport<Adapter> {
        fit(
            &self.bert,
            &self.cpu,
            3,
            &self.train,
            &self.train,
            config,
            Some(&self.parent),
        )
    }
}

fn classifier_weight(adapter: &Adapter) -> Vec<f32> {
    adapter.head.clone().unwrap().classifier.weight
}

#[test]
fn a_parent_pull_keeps_a_warm_start_closer_to_its_parent() {
    use super::train::TrainConfig;
    let fixture = WarmStart::new(32);
    let distance = |parent_pull: f64| {
        let child = fixture
            .train(&TrainConfig {
                epochs: Some(3),
                batch_size: 8,
                learning_rate: Some(1e-2),
                max_length: 16,
                lora_dropout: 0.0,
                parent_pull,
                ..TrainConfig::default()
            })
            .result;
        let (c, p) = (
            classifier_weight(&child),
            classifier_weight(&fixture.parent),
        );
        c.iter()
            .zip(&p)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f32>()
            .sqrt()
    };
    let (free, pulled) = (distance(0.0), distance(50.0));
    assert!(free > 0.0, "training moved the head");
    assert!(pulled < 0.5 * free, "pulled {pulled} vs free {free}");
}

/// `head_learning_rate`: one AdamW step moves each value by about its rate (the first step's update is
/// `lr · sign(g)`), so the classifier moves by the head's rate and the factors exactly as they do without it.
#[test]
fn a_head_learning_rate_moves_only_the_classifier_at_its_own_rate() {
    use super::train::TrainConfig;
    let fixture = WarmStart::new(8);
    let one_step = |head_learning_rate: Option<f64>| {
        let report = fixture.train(&TrainConfig {
            epochs: Some(1),
            batch_size: 8,
            learning_rate: Some(1e-3),
            head_learning_rate,
            warmup_ratio: 0.0,
            weight_decay: 0.0,
            max_length: 16,
            lora_dropout: 0.0,
            ..TrainConfig::default()
        });
        assert_eq!(report.steps, 1);
        report.result
    };
    let max_move = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    let factors = |a: &Adapter| {
        a.deltas()
            .flat_map(|(_, _, d)| d.a.iter().chain(&d.b).copied())
            .collect::<Vec<f32>>()
    };
    let parent = &fixture.parent;
    let (same, own) = (one_step(None), one_step(Some(1e-2)));
    let moved = |a| max_move(&classifier_weight(a), &classifier_weight(parent));
    assert!((moved(&same) - 1e-3).abs() < 1e-4, "{}", moved(&same));
    assert!((moved(&own) - 1e-2).abs() < 1e-3, "{}", moved(&own));
    assert_eq!(
        factors(&same),
        factors(&own),
        "the factors keep the shared rate"
    );
    assert!(max_move(&factors(&same), &factors(parent)) > 5e-4);
    assert!(TrainConfig {
        head_learning_rate: Some(1.5),
        ..TrainConfig::default()
    }
    .validate()
    .is_err());
}

#[test]
fn class_weights_weigh_each_example_by_its_label() {
    use super::data::Example;
    use super::train::{ClassWeights, WeightPreset};
    let logits = Tensor::new(&[[2.0f32, 0.0], [0.0, 1.0], [1.0, 1.0]], &Device::Cpu).unwrap();
    let targets = Tensor::new(&[0u32, 1, 1], &Device::Cpu).unwrap();
    let per_example: Vec<f32> = [[2.0f32, 0.0], [0.0, 1.0], [1.0, 1.0]]
        .iter()
        .zip([0usize, 1, 1])
        .map(|(l, t)| {
            let log_sum = l.iter().map(|x| x.exp()).sum::<f32>().ln();
            log_sum - l[t]
        })
        .collect();
    let weights = Tensor::new(&[1.0f32, 3.0], &Device::Cpu).unwrap();
    let got = cross_entropy(&logits, &targets, 0.0, Some(&weights))
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let want = (per_example[0] + 3.0 * per_example[1] + 3.0 * per_example[2]) / 7.0;
    assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    let plain = cross_entropy(&logits, &targets, 0.0, None)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((plain - per_example.iter().sum::<f32>() / 3.0).abs() < 1e-6);
    // With label smoothing too, PyTorch's figures (CrossEntropyLoss(weight, label_smoothing) on these
    // logits): the smoothed part weighs each class by its own weight.
    let logits = Tensor::new(&[[0.9f32.ln(), 0.1f32.ln()]], &Device::Cpu).unwrap();
    let targets = Tensor::new(&[0u32], &Device::Cpu).unwrap();
    let got = cross_entropy(&logits, &targets, 0.1, Some(&weights))
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((got - 0.445_480_3).abs() < 1e-5, "{got}");
    let logits = Tensor::new(
        &[
            [1.540_996_1f32, -0.293_428_9, -2.178_789_4],
            [0.568_431_3, -1.084_522_4, -1.398_595_5],
            [0.403_346_8, 0.838_026_3, -0.719_257_6],
            [-0.403_343_5, -0.596_635_3, 0.182_036_5],
            [-0.856_674_6, 1.100_604_2, -1.071_187_4],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let targets = Tensor::new(&[0u32, 2, 1, 2, 2], &Device::Cpu).unwrap();
    let weights = Tensor::new(&[0.5f32, 2.0, 1.5], &Device::Cpu).unwrap();
    let got = cross_entropy(&logits, &targets, 0.2, Some(&weights))
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        (got - 1.375_249_9).abs() < 1e-5,
        "{got} vs PyTorch's 1.3752499"
    );

    let train: Vec<Example> = [0usize, 0, 0, 1]
        .iter()
        .map(|&label| Example {
            ids: vec![1, 2],
            label,
        })
        .collect();
    let balanced = ClassWeights::Preset(WeightPreset::Balanced)
        .resolve(&train, 2)
        .unwrap()
        .unwrap();
    assert_eq!(balanced, vec![4.0 / 6.0, 2.0], "n / (labels · n_label)");
    assert!(ClassWeights::Preset(WeightPreset::None)
        .resolve(&train, 2)
        .unwrap()
        .is_none());
    assert!(ClassWeights::Explicit(vec![1.0])
        .resolve(&train, 2)
        .is_err());
    let parsed: ClassWeights = serde_json::from_str("\"balanced\"").unwrap();
    assert_eq!(parsed, ClassWeights::Preset(WeightPreset::Balanced));
    let parsed: ClassWeights = serde_json::from_str("[1, 2.5]").unwrap();
    assert_eq!(parsed, ClassWeights::Explicit(vec![1.0, 2.5]));
}

/// Perturbs `lora`, checks it has `vars` variables and that one backward pass over [`batch`] gives each a
/// non-zero gradient; returns the batch's sequences and the logits.
fn logits_with_every_gradient(
    bert: &crate::model::Bert,
    lora: &LoraTrainable,
    vars: usize,
) -> (Vec<Vec<u32>>, Tensor) {
    perturb(lora);
    let (seqs, ids, mask, targets) = batch();
    let logits = lora.logits(bert, &ids, &mask).unwrap();
    let grads = cross_entropy(&logits, &targets, 0.1, None)
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(lora.vars().len(), vars);
    assert_every_var_has_a_gradient(&lora.vars(), &grads);
    (seqs, logits)
}

/// A base checkpoint without a pooler (multilingual-e5-small's): the head trains a pooler of its own, every
/// variable gets a gradient, the exported adapter carries the pooler and serves what training computed, and
/// a warm start resumes it.
#[test]
fn a_base_without_a_pooler_trains_a_pooler_of_the_heads_own() {
    let mut bert = tiny::bert(3);
    bert.pooler = None;
    let h = bert.config.hidden_size;
    let lora = trainable(&bert.config)
        .with_own_pooler(h, 5, &Device::Cpu)
        .unwrap();
    let (seqs, logits) = logits_with_every_gradient(&bert, &lora, 2 * 3 * 2 + 2 + 2);

    let adapter = assert_serves_what_it_trained(&bert, &lora, &seqs, &logits);
    let pooler = adapter.head.as_ref().unwrap().pooler.as_ref().unwrap();
    assert_eq!((pooler.in_features, pooler.out_features), (h, h));
}

/// A mean-pooling head: every variable gets a gradient, padding does not count in the mean (the logits
/// equal the serving path's, which sees each sequence unpadded), the export says `Mean`, and a warm start
/// keeps it.
#[test]
fn a_mean_pooling_head_trains_and_serves_what_it_trained() {
    use crate::model::adapter::Pooling;
    let bert = tiny::bert(3);
    let lora = trainable(&bert.config).with_mean_pooling();
    let (seqs, logits) = logits_with_every_gradient(&bert, &lora, 2 * 3 * 2 + 2);

    let adapter = assert_serves_what_it_trained(&bert, &lora, &seqs, &logits);
    assert_eq!(adapter.head.as_ref().unwrap().pooling, Pooling::Mean);
    let again = LoraTrainable::from_adapter(&adapter, &Device::Cpu).unwrap();
    assert_eq!(again.pooling(), Pooling::Mean);
}

/// `train_pooler`: a `[CLS]` head on a base with a pooler trains a copy of it. The copy starts equal to the
/// base's (the logits before any step equal those of a head on the frozen pooler), every variable gets a
/// gradient, the base's pooler is untouched, and the adapter carries the copy and serves what trained.
#[test]
fn a_cls_head_can_train_a_copy_of_the_bases_pooler() {
    let bert = tiny::bert(3);
    let base = bert.pooler.clone().expect("the tiny BERT has a pooler");
    let frozen = trainable(&bert.config);
    let lora = trainable(&bert.config).with_pooler_from(&base).unwrap();
    let ids = Tensor::new(&[[1u32, 7, 9, 2]], &Device::Cpu).unwrap();
    let mask = Tensor::ones((1, 4), DType::U8, &Device::Cpu).unwrap();
    let before = |l: &LoraTrainable| -> Vec<f32> {
        l.logits(&bert, &ids, &mask)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    assert_eq!(before(&frozen), before(&lora));
    let (seqs, logits) = logits_with_every_gradient(&bert, &lora, 2 * 3 * 2 + 2 + 2);
    let adapter = assert_serves_what_it_trained(&bert, &lora, &seqs, &logits);
    let pooler = adapter.head.as_ref().unwrap().pooler.as_ref().unwrap();
    let base_weight: Vec<f32> = base.weight.flatten_all().unwrap().to_vec1().unwrap();
    assert_ne!(
        pooler.weight, base_weight,
        "the copy is a variable of its own"
    );
    let still: Vec<f32> = bert
        .pooler
        .as_ref()
        .unwrap()
        .weight
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(still, base_weight, "the base's pooler is untouched");
}

#[test]
fn a_run_that_diverges_rolls_back_at_half_the_rate_and_still_learns() {
    use super::train::TrainConfig;
    let bert = tiny::bert(11);
    let cpu = CpuEncoder::from_bert(&bert).unwrap();
    let (train, val) = (toy_task(96), toy_task(12));
    // A rate far too high for this model, unclipped: the loss climbs back above its best stretch.
    let run = |rollbacks: usize| {
        let config = TrainConfig {
            epochs: Some(6),
            batch_size: 8,
            max_length: 16,
            learning_rate: Some(0.3),
            max_grad_norm: 0.0,
            divergence_rollbacks: rollbacks,
            ..TrainConfig::default()
        };
        fit(&bert, &cpu, 2, &train, &val, &config, None)
    };
    let guarded = run(3);
    let total: usize = guarded.history.iter().map(|h| h.rollbacks).sum();
    assert!((1..=3).contains(&total), "{:?}", guarded.history);
    assert_eq!(
        guarded.val.as_ref().unwrap().accuracy,
        1.0,
        "{:?}",
        guarded.history
    );
    let unguarded = run(0);
    assert!(unguarded.history.iter().all(|h| h.rollbacks == 0));
}

#[test]
fn accumulated_micro_batches_take_the_gradient_one_big_batch_would() {
    use super::train::{ClassWeights, TrainConfig, WeightPreset};
    let bert = tiny::bert(11);
    let cpu = CpuEncoder::from_bert(&bert).unwrap();
    // Seven examples, four of one label and three of the other: one step of micro-batches of 3, 3 and 1
    // against one batch of 7, plain and with balanced class weights.
    let mut train = toy_task(4);
    train.truncate(7);
    let norm = |batch_size, grad_accumulation, class_weights: ClassWeights| {
        let config = TrainConfig {
            epochs: Some(1),
            batch_size,
            grad_accumulation,
            max_length: 16,
            lora_dropout: 0.0,
            class_weights,
            ..TrainConfig::default()
        };
        let run = fit(&bert, &cpu, 2, &train, &[], &config, None);
        assert_eq!(run.steps, 1);
        run.history[0].grad_norm.expect("measured before clipping")
    };
    for weights in [
        ClassWeights::default(),
        ClassWeights::Preset(WeightPreset::Balanced),
    ] {
        let (one, accumulated) = (norm(8, 1, weights.clone()), norm(3, 3, weights));
        assert!(
            (one - accumulated).abs() < 1e-5 * one,
            "one batch {one} vs accumulated {accumulated}"
        );
    }
}

/// A tiny BERT whose word embedding of `token` is NaN: every text holding it gets a NaN loss and gradient.
fn bert_with_nan_token(token: usize) -> crate::model::bert::Bert {
    let config = BertConfig::tiny();
    let mut tensors = crate::model::random::tensors(&config, 11, "", 0.5);
    let name = "embeddings.word_embeddings.weight";
    let mut rows = tensors[name].to_vec2::<f32>().unwrap();
    rows[token].iter_mut().for_each(|x| *x = f32::NAN);
    tensors.insert(name.into(), Tensor::new(rows, &Device::Cpu).unwrap());
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    crate::model::bert::Bert::load(vb, &config).unwrap()
}

#[test]
fn steps_with_a_nan_loss_are_skipped_and_a_run_with_nothing_else_fails() {
    use super::train::{train_lora, TrainConfig, TrainError};
    let config = TrainConfig {
        epochs: Some(3),
        batch_size: 4,
        max_length: 16,
        learning_rate: Some(1e-2),
        ..TrainConfig::default()
    };
    let run = |bert: &crate::model::bert::Bert, train: &[super::data::Example]| {
        let cpu = CpuEncoder::from_bert(bert).unwrap();
        let cancel = std::sync::atomic::AtomicBool::new(false);
        train_lora(
            bert,
            &cpu,
            2,
            train,
            &toy_task(6),
            &config,
            None,
            &mut |_| {},
            &cancel,
        )
    };
    // One text in 48 holds the poisoned token (99): the steps it falls in are skipped, the rest train,
    // and what is kept is finite and learned.
    let bert = bert_with_nan_token(99);
    let mut train = toy_task(24);
    train[3].ids[3] = 99;
    let report = run(&bert, &train).expect("the other steps train");
    let skipped: usize = report.history.iter().map(|h| h.skipped_steps).sum();
    assert_eq!(skipped, 3, "one step an epoch: {:?}", report.history);
    assert!(report.history.iter().all(|h| h.train_loss.is_finite()));
    let adapter = &report.result;
    let classifier = &adapter.head.as_ref().expect("a head").classifier;
    assert!(adapter
        .deltas()
        .flat_map(|(_, _, d)| d.a.iter().chain(&d.b))
        .chain(&classifier.weight)
        .all(|x| x.is_finite()));
    assert_eq!(report.val.expect("validated").accuracy, 1.0);
    // Poison in every text ([CLS], id 1): no step can train, and the job says why instead of publishing
    // NaN weights.
    let bert = bert_with_nan_token(1);
    match run(&bert, &toy_task(24)) {
        Err(TrainError::Invalid(m)) => assert!(m.contains("not finite"), "{m}"),
        Err(e) => panic!("{e}"),
        Ok(r) => panic!("trained: {:?}", r.history),
    }
}
