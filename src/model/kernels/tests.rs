//! The kernels against plain loops and finite differences, at tile edges and on one and several threads.

mod numerics {
    use super::super::*;
    use crate::model::tiny::max_diff;

    #[test]
    fn gelu_with_its_derivative_agrees_with_gelu_and_its_backward_pass() {
        let n = 2 * PARALLEL_ELEMENTS + 5;
        let x = crate::rng::Rng::new(3).uniform(n, 6.0);
        let (mut out, mut derivative) = (x.clone(), vec![0f32; n]);
        gelu_with_derivative(&mut out, &mut derivative);
        let mut gelu = x.clone();
        gelu_inplace(&mut gelu);
        assert_eq!(out, gelu);
        let mut ones = vec![1f32; n];
        gelu_backward(&x, &mut ones);
        let diff = max_diff(&ones, &derivative);
        assert!(diff < 1e-6, "derivatives differ by {diff}");
        let g = crate::rng::Rng::new(4).uniform(n, 1.0);
        let mut product = g.clone();
        mul_inplace(&mut product, &derivative);
        let mut backward = g;
        gelu_backward(&x, &mut backward);
        let diff = max_diff(&product, &backward);
        assert!(diff < 1e-6, "gradients differ by {diff}");
    }

    #[test]
    fn row_and_elementwise_kernels_split_across_threads_agree_with_one_pass() {
        let width = 48;
        let n = width * (2 * PARALLEL_ELEMENTS / width + 3);
        let x = crate::rng::Rng::new(9).uniform(n, 3.0);
        let g = crate::rng::Rng::new(10).uniform(n, 1.0);
        let mut whole = x.clone();
        softmax_inplace(&mut whole, width);
        let mut serial = x.clone();
        softmax_rows(&mut serial, width);
        assert_eq!(whole, serial, "softmax");
        let (mut whole_g, mut serial_g) = (g.clone(), g.clone());
        softmax_backward(&whole, &mut whole_g, width);
        softmax_backward_rows(&serial, &mut serial_g, width);
        assert_eq!(whole_g, serial_g, "softmax backward");
        let (mut whole_g, mut serial_g) = (g.clone(), g);
        gelu_backward(&x, &mut whole_g);
        gelu_backward_chunk(&x, &mut serial_g);
        assert_eq!(whole_g, serial_g, "gelu backward");
    }

    #[test]
    fn fast_exp_matches_libm_to_two_ulps_in_relative_terms() {
        for i in -8000..8000 {
            let x = i as f32 / 100.0;
            // The reference in f64, rounded once: f32's own exp may be a few ulps off (Miri makes it so).
            let want = (x as f64).exp() as f32;
            let got = fast_exp(x);
            assert!(
                ((got - want) / want).abs() < 4e-7,
                "exp({x}) = {got}, want {want}"
            );
        }
    }

    #[test]
    fn fast_erf_is_within_three_tenths_of_a_millionth() {
        for i in -600..600 {
            let x = i as f32 / 100.0;
            let want = libm_erf(x as f64) as f32;
            assert!(
                (fast_erf(x) - want).abs() < 3e-7,
                "erf({x}): {} vs {want}",
                fast_erf(x)
            );
        }
    }

    // A series evaluation of erf in f64, independent of the approximation under test.
    fn libm_erf(x: f64) -> f64 {
        if x.abs() > 5.0 {
            return x.signum();
        }
        let mut sum = 0.0f64;
        let mut term = x;
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs().max(1e-300) || n < 5.0 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
            if n > 200.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn linear_with_bias_matches_the_naive_triple_loop() {
        let (rows, k, n) = (5, 7, 3);
        let x: Vec<f32> = (0..rows * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let b = [0.5, -1.0, 2.0];
        let mut out = vec![f32::NAN; rows * n];
        linear(&x, rows, k, &w, Some(&b), n, &mut out);
        for r in 0..rows {
            for j in 0..n {
                let want: f32 = (0..k).map(|i| x[r * k + i] * w[j * k + i]).sum::<f32>() + b[j];
                assert!((out[r * n + j] - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn padded_attention_equals_packed_attention_and_its_backward_leaves_padding_alone() {
        let (heads, head_dim, seq, lengths) = (2, 2, 3, [3usize, 2]);
        let hidden = heads * head_dim;
        let qkv = crate::rng::Rng::new(5).uniform(lengths.len() * seq * 3 * hidden, 1.0);
        let shape = Padded {
            seq,
            heads,
            head_dim,
            lengths: &lengths,
        };
        let mut padded = vec![0.0; lengths.len() * seq * hidden];
        attention_padded(&shape, &qkv, &mut padded);
        let (mut q, mut k, mut v, mut rows) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (b, &len) in lengths.iter().enumerate() {
            for pos in 0..len {
                let row = &qkv[(b * seq + pos) * 3 * hidden..][..3 * hidden];
                q.extend_from_slice(&row[..hidden]);
                k.extend_from_slice(&row[hidden..2 * hidden]);
                v.extend_from_slice(&row[2 * hidden..]);
                rows.push(b * seq + pos);
            }
        }
        let mut packed = vec![0.0; q.len()];
        attention(&q, &k, &v, &[0, 3, 5], heads, head_dim, &mut packed);
        for (t, &row) in rows.iter().enumerate() {
            let diff = max_diff(
                &padded[row * hidden..][..hidden],
                &packed[t * hidden..][..hidden],
            );
            assert!(diff < 1e-6, "row {row} differs by {diff}");
        }
        assert!(
            padded[5 * hidden..].iter().all(|&x| x == 0.0),
            "padding stays zero"
        );
        let grad = vec![1.0; padded.len()];
        let mut d_qkv = vec![0.0; qkv.len()];
        attention_padded_backward(&shape, &qkv, &grad, &mut d_qkv);
        assert!(d_qkv.iter().all(|g| g.is_finite()));
        assert!(
            d_qkv[5 * 3 * hidden..].iter().all(|&g| g == 0.0),
            "padding gets no gradient"
        );
    }

    #[test]
    fn attention_of_a_single_token_returns_its_value() {
        let (heads, dim) = (2, 3);
        let q = vec![0.3; heads * dim];
        let k = vec![-0.2; heads * dim];
        let v: Vec<f32> = (0..heads * dim).map(|i| i as f32).collect();
        let mut out = vec![0.0; heads * dim];
        attention(&q, &k, &v, &[0, 1], heads, dim, &mut out);
        assert_eq!(out, v);
    }

    #[test]
    fn layer_norm_rows_have_zero_mean_and_unit_variance() {
        let mut x: Vec<f32> = (0..40).map(|i| (i * i) as f32 * 0.1).collect();
        add_layer_norm_inplace(&mut x, None, &[1.0; 8], &[0.0; 8], 1e-12);
        for row in x.chunks(8) {
            let mean: f32 = row.iter().sum::<f32>() / 8.0;
            let var: f32 = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / 8.0;
            assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-3);
        }
    }

    #[test]
    fn a_packed_weight_gives_the_product_with_its_transpose_and_takes_a_merged_delta() {
        // 200 outputs: six full panels and a zero-padded seventh; 40 rows of 150: enough work to split the
        // columns across threads, the last task's masked. Under Miri, 70 outputs (a padded third panel).
        let (n, k, m) = if cfg!(miri) {
            (70, 5, 3)
        } else {
            (200, 150, 40)
        };
        let w = crate::rng::Rng::new(1).uniform(n * k, 1.0);
        let Some(mut packed) = PackedWeight::new(&w, n, k) else {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        };
        let x = crate::rng::Rng::new(2).uniform(m * k, 1.0);
        let delta = crate::rng::Rng::new(3).uniform(n * k, 0.1);
        packed.add(&delta);
        assert_eq!(packed.dims(), (n, k));
        let merged: Vec<f32> = w.iter().zip(&delta).map(|(w, d)| w + d).collect();
        let mut out = vec![1f32; m * n];
        add_packed_linear(&x, m, &packed, &mut out);
        for i in 0..m {
            for j in 0..n {
                let dot: f32 = (0..k).map(|p| x[i * k + p] * merged[j * k + p]).sum();
                let got = out[i * n + j];
                assert!(
                    (got - 1.0 - dot).abs() < 1e-3,
                    "({i}, {j}): {got} vs {}",
                    1.0 + dot
                );
            }
        }
    }
}

mod guards {
    use super::super::*;

    #[test]
    #[should_panic(expected = "offsets")]
    fn attention_refuses_decreasing_offsets() {
        let mut out = vec![0.0; 2];
        attention(&[0.0; 2], &[0.0; 2], &[0.0; 2], &[0, 2, 1], 1, 2, &mut out);
    }

    #[test]
    #[should_panic(expected = "overflows")]
    fn linear_refuses_sizes_that_overflow() {
        linear(&[], 1 << 62, 4, &[], None, 4, &mut []);
    }
}

mod pool {
    use super::super::on_pool;

    /// Work handed over from outside rayon's pool runs on one of its threads; from inside a pool it stays on
    /// the calling thread.
    #[test]
    fn work_runs_on_a_thread_of_the_pool() {
        std::thread::spawn(|| {
            assert!(rayon::current_thread_index().is_none());
            assert!(on_pool(rayon::current_thread_index).is_some());
        })
        .join()
        .unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let (caller, worker) = pool.install(|| {
            let caller = std::thread::current().id();
            (caller, on_pool(|| std::thread::current().id()))
        });
        assert_eq!(caller, worker);
    }
}
