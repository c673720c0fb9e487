//! Logit processing and draws.

use super::*;
use rand::Rng as _;

#[test]
fn cfg_scale_one_is_the_conditional_logits() {
    let cond = Tensor::new(&[[1.0f32, -2.0, 0.5], [0.25, 3.0, -1.0]], &Device::Cpu).unwrap();
    let uncond = Tensor::new(&[[0.3f32, 0.7, -0.1], [2.0, -1.5, 0.0]], &Device::Cpu).unwrap();
    let both = Tensor::cat(&[&cond, &uncond], 0).unwrap();
    let g1 = cfg_combine(&both, 1.0).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(g1, cond.to_vec2::<f32>().unwrap());
    let g2 = cfg_combine(&both, 2.5).unwrap().to_vec2::<f32>().unwrap();
    let (c, u) = (
        cond.to_vec2::<f32>().unwrap(),
        uncond.to_vec2::<f32>().unwrap(),
    );
    for i in 0..2 {
        for j in 0..3 {
            let want = u[i][j] + (c[i][j] - u[i][j]) * 2.5;
            assert!(
                (g2[i][j] - want).abs() < 1e-6,
                "{i} {j}: {} vs {want}",
                g2[i][j]
            );
        }
    }
    assert!(cfg_combine(
        &Tensor::zeros((3, 4), candle_core::DType::F32, &Device::Cpu).unwrap(),
        2.0
    )
    .is_err());
}

#[test]
fn top_k_one_is_argmax() {
    let logits = [0.1f32, 2.0, -1.0, 1.9, 0.0];
    let p = opts(1.0, 1.0, 1, 1.0).probs(&logits);
    assert_eq!(p, vec![0.0, 1.0, 0.0, 0.0, 0.0]);
    let mut r = rng(3);
    for _ in 0..20 {
        assert_eq!(draw(&p, &mut r).unwrap(), 1);
    }
    // Temperature 0 is (nearly) greedy too.
    let p0 = opts(1.0, 0.0, 0, 1.0).probs(&logits);
    assert!(p0[1] > 0.999_999, "{p0:?}");
}

#[test]
fn top_k_keeps_k_and_temperature_scales() {
    let logits = [0.0f32, 1.0, 2.0, 3.0];
    let p = opts(1.0, 2.0, 2, 1.0).probs(&logits);
    let z = (1.0f32).exp() + (1.5f32).exp();
    let want = [0.0, 0.0, (1.0f32).exp() / z, (1.5f32).exp() / z];
    for (a, b) in p.iter().zip(want) {
        assert!((a - b).abs() < 1e-6, "{p:?} vs {want:?}");
    }
}

#[test]
fn top_k_keeps_exactly_the_values_from_the_kth_on() {
    // Rows with many ties and -inf entries; every k around the one-pass selection's limit and
    // its 16-value blocks, against a full sort.
    let mut r = rng(11);
    for len in [7usize, 40, 300] {
        for trial in 0..4 {
            let row: Vec<f32> = (0..len)
                .map(|_| {
                    let u: f32 = r.random::<f32>();
                    if trial == 3 && u < 0.1 { f32::NEG_INFINITY } else { (u * 12.0).round() - 6.0 }
                })
                .collect();
            let mut sorted = row.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            for k in [1usize, 2, 5, 16, 17, 31, 32, 33, 100, 299] {
                if k >= len {
                    continue;
                }
                let p = opts(1.0, 1.0, k, 1.0).probs(&row);
                let kth = sorted[k - 1];
                for (i, (&l, &q)) in row.iter().zip(&p).enumerate() {
                    let kept = l >= kth && l > f32::NEG_INFINITY;
                    assert_eq!(q > 0.0, kept, "len {len} k {k} index {i}: logit {l}, k-th {kth}, p {q}");
                }
                let total: f32 = p.iter().sum();
                assert!((total - 1.0).abs() < 1e-5, "len {len} k {k}: sum {total}");
            }
        }
    }
}

#[test]
fn top_k_keeps_ties_with_the_kth() {
    let p = opts(1.0, 1.0, 2, 1.0).probs(&[1.0, 0.0, 1.0, 1.0]);
    assert_eq!(p.iter().filter(|&&q| q > 0.0).count(), 3, "{p:?}");
}

#[test]
fn top_p_keeps_the_smallest_set_reaching_p() {
    let probs = [0.15f32, 0.5, 0.05, 0.3];
    let logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
    let kept = |top_p: f32| -> Vec<usize> {
        let p = opts(1.0, 1.0, 0, top_p).probs(&logits);
        let s: f32 = p.iter().sum();
        assert!((s - 1.0).abs() < 1e-6);
        (0..4).filter(|&i| p[i] > 0.0).collect()
    };
    assert_eq!(kept(0.4), vec![1]);
    assert_eq!(kept(0.75), vec![1, 3]);
    assert_eq!(kept(0.9), vec![0, 1, 3]);
    assert_eq!(kept(0.97), vec![0, 1, 2, 3]);
    assert_eq!(kept(1.0), vec![0, 1, 2, 3]);
    // Renormalised over the kept set.
    let p = opts(1.0, 1.0, 0, 0.75).probs(&logits);
    assert!(
        (p[1] - 0.625).abs() < 1e-6 && (p[3] - 0.375).abs() < 1e-6,
        "{p:?}"
    );
    // Top-k applies before top-p: with k = 2 and p = 0.9 the third token is never considered.
    let p = opts(1.0, 1.0, 2, 0.9).probs(&logits);
    assert_eq!(
        (0..4).filter(|&i| p[i] > 0.0).collect::<Vec<_>>(),
        vec![1, 3]
    );
}

#[test]
fn draw_residual_and_bad_logits() {
    let p = [0.0f32, 0.5, 0.0, 0.5];
    let mut r = rng(1);
    let mut seen = [0usize; 4];
    for _ in 0..400 {
        seen[draw(&p, &mut r).unwrap() as usize] += 1;
    }
    assert_eq!((seen[0], seen[2]), (0, 0));
    assert!(seen[1] > 150 && seen[3] > 150, "{seen:?}");
    for _ in 0..50 {
        assert_eq!(draw(&residual(&p, 1), &mut r).unwrap(), 3);
    }
    let nan = opts(1.0, 1.0, 0, 1.0).probs(&[f32::NAN, f32::NEG_INFINITY]);
    assert!(matches!(
        draw(&nan, &mut r),
        Err(crate::Error::Numerical(_))
    ));
}

#[test]
fn options_and_modes_validate() {
    assert!(SampleOptions::default().validate().is_ok());
    for bad in [
        opts(f32::NAN, 1.0, 0, 1.0),
        opts(f32::INFINITY, 1.0, 0, 1.0),
        opts(1.0, -0.1, 0, 1.0),
        opts(1.0, f32::NAN, 0, 1.0),
        opts(1.0, 1.0, 0, 0.0),
        opts(1.0, 1.0, 0, 1.5),
        opts(1.0, 1.0, 0, f32::NAN),
    ] {
        assert!(
            matches!(bad.validate(), Err(crate::Error::Invalid { .. })),
            "{bad:?}"
        );
    }
    for m in ItdMode::ALL {
        assert_eq!(m.to_string().parse::<ItdMode>().unwrap(), m);
    }
    assert_eq!(" Exact ".parse::<ItdMode>().unwrap(), ItdMode::Exact);
    assert!("speculative".parse::<ItdMode>().is_err());
    assert_eq!(serde_json::to_string(&ItdMode::Exact).unwrap(), "\"exact\"");
    let o: SampleOptions = serde_json::from_str(
        r#"{"cfg_scale": 3.0, "temperature": 1.0, "top_k": 1000, "top_p": 1.0, "seed": 0}"#,
    )
    .unwrap();
    assert_eq!(o, SampleOptions::default());
}
