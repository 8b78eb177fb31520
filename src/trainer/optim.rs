//! AdamW with decoupled weight decay (Loshchilov & Hutter), the update PyTorch's `torch.optim.AdamW` and
//! candle's `AdamW` make, in one pass over each variable on the CPU.
//!
//! candle's optimizer composes about a dozen tensor ops per variable, each a fresh allocation and a pass over
//! memory; for full fine-tuning's 22.7 M weights that is ~1 GB of short-lived buffers a step, most of it above
//! the allocator's mmap threshold and so faulted in anew each time. Here the moments live in plain vectors and
//! the weight is updated in place. Variables the fused pass can't reach (another device, another dtype, a
//! strided layout) step through candle's `AdamW`, so every device trains. Each variable may take its own
//! share of the learning rate (layer-wise learning-rate decay), and fused variables may be pulled towards
//! an anchor (a warm start's parent) as weight decay pulls them towards zero. Biases and LayerNorm
//! parameters (every variable of one dimension) are not decayed, as Hugging Face's Trainer groups them.

use std::cell::RefCell;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Layout, Result, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use rayon::prelude::*;

use crate::model::kernels::{ELEMENTS_PER_TASK, PARALLEL_ELEMENTS};

/// AdamW whose CPU f32 variables update in one fused pass; a drop-in [`Optimizer`].
pub struct FusedAdamW {
    fused: Vec<Moments>,
    /// The variables stepped by candle's own `AdamW` (none on a CPU-only run), one optimizer per share of
    /// the learning rate and per decay.
    composed: Vec<(candle_nn::AdamW, f64)>,
    /// Each of `composed`'s groups of variables and whether it decays, to start them afresh
    /// ([`FusedAdamW::reset`]).
    groups: Vec<(Vec<Var>, bool)>,
    params: ParamsAdamW,
    /// How hard anchored variables are pulled towards their anchors (0: not at all).
    pull: f64,
    step: i32,
}

/// A fused variable, its share of the learning rate, its anchor, and its first and second moments.
struct Moments {
    var: Var,
    scale: f64,
    /// Whether weight decay applies (not to biases and LayerNorm parameters).
    decays: bool,
    /// Values each step pulls the variable towards (see [`FusedAdamW::anchor_here`]).
    anchor: Option<Vec<f32>>,
    m: Vec<f32>,
    v: Vec<f32>,
}

/// One step's coefficients, shared by every variable.
#[derive(Clone, Copy)]
struct Coefficients {
    lr: f32,
    /// `1 − lr · weight_decay`: the decoupled decay applied to the weight before the Adam update.
    decay: f32,
    beta1: f32,
    beta2: f32,
    /// Bias corrections `1 / (1 − βᵗ)`.
    scale_m: f32,
    scale_v: f32,
    eps: f32,
}

impl Optimizer for FusedAdamW {
    type Config = ParamsAdamW;

    fn new(vars: Vec<Var>, params: ParamsAdamW) -> Result<Self> {
        let scales = vec![1.0; vars.len()];
        Self::with_scales(vars, &scales, params)
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let p = &self.params;
        for moments in &mut self.fused {
            let Some(grad) = grads.get(moments.var.as_tensor()) else {
                continue;
            };
            let lr = p.lr * moments.scale;
            let coefficients = Coefficients {
                lr: lr as f32,
                decay: if moments.decays {
                    (1.0 - lr * p.weight_decay) as f32
                } else {
                    1.0
                },
                beta1: p.beta1 as f32,
                beta2: p.beta2 as f32,
                scale_m: (1.0 / (1.0 - p.beta1.powi(self.step))) as f32,
                scale_v: (1.0 / (1.0 - p.beta2.powi(self.step))) as f32,
                eps: p.eps as f32,
            };
            let grad = grad.contiguous()?;
            let op = UpdateOp {
                m: RefCell::new(&mut moments.m),
                v: RefCell::new(&mut moments.v),
                anchor: moments.anchor.as_deref(),
                pull: (lr * self.pull).min(1.0) as f32,
                coefficients,
            };
            moments.var.as_tensor().inplace_op2(&grad, &op)?;
        }
        for (composed, _) in &mut self.composed {
            composed.step(grads)?;
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
        for (composed, scale) in &mut self.composed {
            composed.set_learning_rate(lr * *scale);
        }
    }
}

impl FusedAdamW {
    /// An optimizer in which `vars[i]` steps with `scales[i]` times the learning rate (its weight decay
    /// scaled alike, as PyTorch's parameter groups do).
    pub fn with_scales(vars: Vec<Var>, scales: &[f64], params: ParamsAdamW) -> Result<Self> {
        if scales.len() != vars.len() {
            candle_core::bail!(
                "{} learning-rate scales for {} variables",
                scales.len(),
                vars.len()
            );
        }
        let mut fused = Vec::new();
        let mut composed: Vec<(Vec<Var>, f64, bool)> = Vec::new();
        for (var, &scale) in vars.into_iter().zip(scales) {
            let decays = var.rank() > 1;
            if var.device().is_cpu() && var.dtype() == DType::F32 && var.as_tensor().is_contiguous()
            {
                let n = var.elem_count();
                fused.push(Moments {
                    var,
                    scale,
                    decays,
                    anchor: None,
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                });
            } else if let Some(group) = composed
                .iter_mut()
                .find(|(_, s, d)| *s == scale && *d == decays)
            {
                group.0.push(var);
            } else {
                composed.push((vec![var], scale, decays));
            }
        }
        let groups: Vec<(Vec<Var>, bool)> = composed
            .iter()
            .map(|(vars, _, decays)| (vars.clone(), *decays))
            .collect();
        let mut optimizer = Self {
            fused,
            composed: Vec::new(),
            groups,
            params,
            pull: 0.0,
            step: 0,
        };
        optimizer.composed = optimizer.fresh_composed(composed.iter().map(|(_, s, _)| *s))?;
        Ok(optimizer)
    }

    /// candle's `AdamW` for each group of `groups`, with no moments yet, at the current rate times `scales`.
    fn fresh_composed(
        &self,
        scales: impl Iterator<Item = f64>,
    ) -> Result<Vec<(candle_nn::AdamW, f64)>> {
        self.groups
            .iter()
            .zip(scales)
            .map(|((vars, decays), scale)| {
                let params = ParamsAdamW {
                    lr: self.params.lr * scale,
                    weight_decay: if *decays {
                        self.params.weight_decay
                    } else {
                        0.0
                    },
                    ..self.params.clone()
                };
                Ok((candle_nn::AdamW::new(vars.clone(), params)?, scale))
            })
            .collect()
    }

    /// Forgets the moments and the step count, as if no step had been taken from the variables' current
    /// values; anchors stay. After a rollback, moments gathered on the way to a divergence would push the
    /// restored variables the same way again.
    pub fn reset(&mut self) -> Result<()> {
        for moments in &mut self.fused {
            moments.m.fill(0.0);
            moments.v.fill(0.0);
        }
        self.step = 0;
        let scales: Vec<f64> = self.composed.iter().map(|(_, s)| *s).collect();
        self.composed = self.fresh_composed(scales.into_iter())?;
        Ok(())
    }

    /// Anchors every variable at its current values: from now on each step also moves it a share
    /// `lr × pull` (at most all) of the way back to them, decoupled from the gradient like AdamW's weight
    /// decay (an L2 pull towards a starting point, as L2-SP does for fine-tuning). Only the fused CPU path
    /// anchors; variables on another device are an error.
    pub fn anchor_here(&mut self, pull: f64) -> Result<()> {
        if !self.composed.is_empty() {
            candle_core::bail!("anchoring needs every variable on the CPU in f32");
        }
        for moments in &mut self.fused {
            let values = moments.var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            moments.anchor = Some(values);
        }
        self.pull = pull;
        Ok(())
    }
}

/// The in-place update of one weight from its gradient, borrowing the weight's moments.
struct UpdateOp<'a> {
    m: RefCell<&'a mut Vec<f32>>,
    v: RefCell<&'a mut Vec<f32>>,
    /// The weight's anchor and the share of the way back to it each step takes.
    anchor: Option<&'a [f32]>,
    pull: f32,
    coefficients: Coefficients,
}

impl candle_core::InplaceOp2 for UpdateOp<'_> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(
        &self,
        theta: &mut CpuStorage,
        theta_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> Result<()> {
        let (CpuStorage::F32(theta), CpuStorage::F32(grad)) = (theta, grad) else {
            candle_core::bail!("fused-adamw: f32 only");
        };
        let (Some((t0, t1)), Some((g0, g1))) = (
            theta_layout.contiguous_offsets(),
            grad_layout.contiguous_offsets(),
        ) else {
            candle_core::bail!("fused-adamw: contiguous tensors only");
        };
        let (mut m, mut v) = (self.m.borrow_mut(), self.v.borrow_mut());
        update(
            &mut theta[t0..t1],
            &grad[g0..g1],
            &mut m,
            &mut v,
            &self.coefficients,
        );
        if let Some(anchor) = self.anchor {
            for (theta, &a) in theta[t0..t1].iter_mut().zip(anchor) {
                *theta -= self.pull * (*theta - a);
            }
        }
        Ok(())
    }
}

/// `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`, `θ ← θ(1 − lr·λ) − lr · m̂ / (√v̂ + ε)`, elementwise.
fn update(theta: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], c: &Coefficients) {
    assert!(
        theta.len() == grad.len() && m.len() == theta.len() && v.len() == theta.len(),
        "fused-adamw: shapes differ"
    );
    if theta.len() >= PARALLEL_ELEMENTS {
        theta
            .par_chunks_mut(ELEMENTS_PER_TASK)
            .zip(grad.par_chunks(ELEMENTS_PER_TASK))
            .zip(m.par_chunks_mut(ELEMENTS_PER_TASK))
            .zip(v.par_chunks_mut(ELEMENTS_PER_TASK))
            .for_each(|(((theta, grad), m), v)| update_chunk(theta, grad, m, v, c));
    } else {
        update_chunk(theta, grad, m, v, c);
    }
}

fn update_chunk(theta: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], c: &Coefficients) {
    for (((theta, &g), m), v) in theta.iter_mut().zip(grad).zip(m).zip(v) {
        *m = c.beta1 * *m + (1.0 - c.beta1) * g;
        *v = c.beta2 * *v + (1.0 - c.beta2) * g * g;
        let adjusted = (*m * c.scale_m) / ((*v * c.scale_v).sqrt() + c.eps);
        *theta = *theta * c.decay - c.lr * adjusted;
    }
}

/// A [`FusedAdamW`] with `lr` and `weight_decay`, the other parameters at PyTorch's defaults.
pub fn adamw(vars: Vec<Var>, lr: f64, weight_decay: f64) -> Result<FusedAdamW> {
    FusedAdamW::new(
        vars,
        ParamsAdamW {
            lr,
            weight_decay,
            ..ParamsAdamW::default()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn var(values: Vec<f32>, shape: (usize, usize)) -> Var {
        Var::from_tensor(&Tensor::from_vec(values, shape, &Device::Cpu).unwrap()).unwrap()
    }

    fn random(n: usize, seed: u64) -> Vec<f32> {
        crate::rng::Rng::new(seed).uniform(n, 1.0)
    }

    /// Steps the fused optimizer and candle's side by side on identical weights, with a loss whose gradients
    /// differ per element and per step, over a large variable (the parallel split), a small one, and a
    /// transposed use (a strided gradient).
    #[test]
    fn the_fused_step_matches_candles_adamw() {
        let shapes = [(300, 400), (3, 5)];
        let make = || -> Vec<Var> {
            shapes
                .iter()
                .enumerate()
                .map(|(i, &(r, c))| var(random(r * c, i as u64), (r, c)))
                .collect()
        };
        let (ours, theirs) = (make(), make());
        let initial: Vec<Vec<f32>> = ours
            .iter()
            .map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        let params = ParamsAdamW {
            lr: 1e-2,
            weight_decay: 0.01,
            ..ParamsAdamW::default()
        };
        let mut fused = FusedAdamW::new(ours.clone(), params.clone()).unwrap();
        let mut reference = candle_nn::AdamW::new(theirs.clone(), params).unwrap();
        let loss = |vars: &[Var], step: usize| -> Tensor {
            let target = Tensor::from_vec(
                random(300 * 400, 100 + step as u64),
                (300, 400),
                &Device::Cpu,
            )
            .unwrap();
            let big = (vars[0].as_tensor() - target)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            let small = vars[1]
                .as_tensor()
                .t()
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            (big + small).unwrap()
        };
        for step in 0..4 {
            fused.set_learning_rate(1e-2 / (step + 1) as f64);
            reference.set_learning_rate(1e-2 / (step + 1) as f64);
            fused.backward_step(&loss(&ours, step)).unwrap();
            reference.backward_step(&loss(&theirs, step)).unwrap();
        }
        for ((a, b), initial) in ours.iter().zip(&theirs).zip(&initial) {
            let (a, b) = (
                a.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
                b.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            );
            let worst = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "fused AdamW drifts from candle's by {worst}");
            let moved = a.iter().zip(initial).all(|(x, y)| (x - y).abs() > 1e-4);
            assert!(moved, "a weight did not move");
        }
    }

    #[test]
    fn each_variable_steps_with_its_share_of_the_learning_rate() {
        // Adam's first step moves every weight by about the learning rate, whatever the gradient's size.
        let (a, b) = (var(vec![0.0; 4], (2, 2)), var(vec![0.0; 4], (2, 2)));
        let loss = ((a.as_tensor() * 3.0).unwrap() + b.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let params = ParamsAdamW {
            lr: 0.01,
            weight_decay: 0.0,
            ..ParamsAdamW::default()
        };
        let mut opt =
            FusedAdamW::with_scales(vec![a.clone(), b.clone()], &[1.0, 0.25], params).unwrap();
        opt.step(&grads).unwrap();
        let moved = |v: &Var| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert!(
            moved(&a).iter().all(|x| (x + 0.01).abs() < 1e-6),
            "{:?}",
            moved(&a)
        );
        assert!(
            moved(&b).iter().all(|x| (x + 0.0025).abs() < 1e-6),
            "{:?}",
            moved(&b)
        );
        assert!(FusedAdamW::with_scales(vec![a], &[], ParamsAdamW::default()).is_err());
    }

    #[test]
    fn an_anchored_variable_is_pulled_back_towards_its_anchor() {
        let a = var(vec![1.0, -2.0], (1, 2));
        let params = ParamsAdamW {
            lr: 0.1,
            weight_decay: 0.0,
            ..ParamsAdamW::default()
        };
        let mut opt = FusedAdamW::with_scales(vec![a.clone()], &[1.0], params).unwrap();
        opt.anchor_here(2.0).unwrap();
        a.set(&Tensor::new(&[[2.0f32, 0.0]], &Device::Cpu).unwrap())
            .unwrap();
        // Adam's first step moves each value by the learning rate against its gradient (1 here): 1.9 and
        // -0.1; the pull then takes each 0.1 × 2 of the way back to 1 and -2.
        let grads = a.as_tensor().sum_all().unwrap().backward().unwrap();
        opt.step(&grads).unwrap();
        let got = a
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            (got[0] - 1.72).abs() < 1e-5 && (got[1] + 0.48).abs() < 1e-5,
            "{got:?}"
        );
    }

    #[test]
    fn variables_without_a_gradient_stay_put() {
        let (used, unused) = (var(random(6, 1), (2, 3)), var(random(6, 2), (2, 3)));
        let before = unused.as_tensor().to_vec2::<f32>().unwrap();
        let mut opt = adamw(vec![used.clone(), unused.clone()], 0.1, 0.01).unwrap();
        opt.backward_step(&used.as_tensor().sqr().unwrap().sum_all().unwrap())
            .unwrap();
        assert_eq!(unused.as_tensor().to_vec2::<f32>().unwrap(), before);
    }

    #[test]
    fn biases_and_layer_norms_are_not_decayed() {
        for dtype in [DType::F32, DType::F64] {
            let matrix =
                Var::from_tensor(&Tensor::ones((2, 3), dtype, &Device::Cpu).unwrap()).unwrap();
            let bias = Var::from_tensor(&Tensor::ones(3, dtype, &Device::Cpu).unwrap()).unwrap();
            let mut opt = adamw(vec![matrix.clone(), bias.clone()], 0.1, 0.5).unwrap();
            // Adam's first step moves every value by the rate against its gradient (1 here); the decay
            // takes the matrix a share 0.1 × 0.5 towards 0 before it.
            let loss = (matrix.as_tensor().sum_all().unwrap()
                + bias.as_tensor().sum_all().unwrap())
            .unwrap();
            opt.backward_step(&loss).unwrap();
            let values = |v: &Var| -> Vec<f64> {
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            assert!(
                values(&matrix).iter().all(|x| (x - 0.85).abs() < 1e-6),
                "{dtype:?}: 1 × (1 − 0.1 × 0.5) − 0.1, {:?}",
                values(&matrix)
            );
            assert!(
                values(&bias).iter().all(|x| (x - 0.9).abs() < 1e-6),
                "{dtype:?}: 1 − 0.1, {:?}",
                values(&bias)
            );
        }
    }
}
