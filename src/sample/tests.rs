//! Tests of the sampler against a tiny fake model whose logits are a fixed pseudo-random
//! function of the row kind (cond / uncond), the previous two tokens and the position.

use super::*;
use crate::util::rng;
use candle_core::{Device, Tensor};

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A fake model session: `samples` samples, `[cond; uncond]` rows when `cfg`.
struct Fake {
    vocab: usize,
    samples: usize,
    cfg: bool,
    /// Logits lie in [-sharp, sharp].
    sharp: f32,
    /// Optional favoured token per position and its logit bonus (a model that reproduces a
    /// known sequence well).
    favour: Option<(Vec<u32>, f32)>,
    hist: Vec<Vec<u32>>,
    feeds: usize,
}

impl Fake {
    fn new(vocab: usize, samples: usize, cfg: bool, sharp: f32) -> Self {
        let rows = if cfg { 2 * samples } else { samples };
        Fake {
            vocab,
            samples,
            cfg,
            sharp,
            favour: None,
            hist: vec![Vec::new(); rows],
            feeds: 0,
        }
    }

    /// Logits predicting the token after `hist` in a row of the given kind.
    fn logits(&self, uncond: bool, hist: &[u32]) -> Vec<f32> {
        let n = hist.len();
        let p1 = hist.last().map_or(99, |&t| t as u64);
        let p2 = if n >= 2 { hist[n - 2] as u64 } else { 98 };
        let key = (((uncond as u64 * 131 + p1) * 131 + p2) * 131 + n as u64) * 131;
        (0..self.vocab)
            .map(|v| {
                let h = mix(key + v as u64);
                let u = (h >> 40) as f32 / (1u64 << 24) as f32;
                let mut l = (2.0 * u - 1.0) * self.sharp;
                if let Some((fav, bonus)) = &self.favour {
                    if fav.get(n) == Some(&(v as u32)) {
                        l += bonus;
                    }
                }
                l
            })
            .collect()
    }

    fn first_logits(&self) -> Tensor {
        let rows = self.hist.len();
        let flat: Vec<f32> = (0..rows)
            .flat_map(|r| self.logits(r >= self.samples, &[]))
            .collect();
        Tensor::from_vec(flat, (rows, self.vocab), &Device::Cpu).unwrap()
    }

    /// The processed distribution of one sample after `hist` (what the sampler should use).
    fn probs(&self, opts: &SampleOptions, hist: &[u32]) -> Vec<f32> {
        let c = self.logits(false, hist);
        let row = if self.cfg && opts.cfg_scale != 1.0 {
            let u = self.logits(true, hist);
            u.iter()
                .zip(&c)
                .map(|(u, c)| u + (c - u) * opts.cfg_scale)
                .collect()
        } else {
            c
        };
        opts.probs(&row)
    }
}

impl TokenModel for Fake {
    fn rows(&self) -> usize {
        self.hist.len()
    }
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn generated_len(&self) -> usize {
        self.hist[0].len()
    }
    fn feed(&mut self, tokens: &Tensor) -> crate::Result<Tensor> {
        self.feeds += 1;
        let tokens = tokens.to_vec2::<u32>()?;
        let t = tokens[0].len();
        let mut flat = Vec::new();
        for (r, row) in tokens.iter().enumerate() {
            for &tok in row {
                self.hist[r].push(tok);
                flat.extend(self.logits(r >= self.samples, &self.hist[r]));
            }
        }
        Ok(Tensor::from_vec(
            flat,
            (tokens.len(), t, self.vocab),
            &Device::Cpu,
        )?)
    }
    fn truncate(&mut self, len: usize) -> crate::Result<()> {
        for h in self.hist.iter_mut() {
            assert!(len <= h.len(), "truncate beyond the fed length");
            h.truncate(len);
        }
        Ok(())
    }
}

fn opts(cfg_scale: f32, temperature: f32, top_k: usize, top_p: f32) -> SampleOptions {
    SampleOptions {
        cfg_scale,
        temperature,
        top_k,
        top_p,
        seed: 0,
    }
}

fn run(fake: &mut Fake, plan: &DecodePlan, o: &SampleOptions, seed: u64) -> Generated {
    let first = fake.first_logits();
    generate(fake, &first, plan, o, &mut rng(seed), None).unwrap()
}

fn plan(known: Vec<Vec<u32>>, n_target: usize, itd: ItdMode) -> DecodePlan {
    DecodePlan {
        known,
        n_target,
        itd,
    }
}

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
fn top_k_keeps_ties_with_the_kth() {
    let p = opts(1.0, 1.0, 2, 1.0).probs(&[1.0, 0.0, 1.0, 1.0]);
    assert_eq!(p.iter().filter(|&&q| q > 0.0).count(), 3, "{p:?}");
}

#[test]
fn edge_lengths_in_every_mode() {
    // Every combination of draft and target length, with drafts that are often rejected
    // (also at the last position): lengths, fed history and pass counts stay consistent.
    for itd in ItdMode::ALL {
        for l in [0usize, 1, 3] {
            for n_target in [0usize, 1, 2] {
                for seed in 0..6u64 {
                    let known: Vec<Vec<u32>> = (0..2)
                        .map(|s| {
                            (0..l)
                                .map(|i| ((i + s + seed as usize) % 4) as u32)
                                .collect()
                        })
                        .collect();
                    let p = plan(known.clone(), n_target, itd);
                    let mut fake = Fake::new(4, 2, true, 3.0);
                    let g = run(&mut fake, &p, &opts(2.0, 1.0, 0, 1.0), seed);
                    let ctx = format!("{itd} l={l} n_target={n_target} seed={seed}");
                    assert_eq!(g.stats.forward_passes, fake.feeds, "{ctx}");
                    for s in 0..2 {
                        assert_eq!(g.target[s].len(), n_target, "{ctx}");
                        assert_eq!(g.prefix[s].len(), p.known_len(), "{ctx}");
                        let mut all = g.prefix[s].clone();
                        all.extend(&g.target[s]);
                        all.pop();
                        if itd == ItdMode::Forced && n_target == 0 {
                            all.clear(); // nothing follows the known tokens: nothing is fed
                        }
                        assert_eq!(fake.hist[s], all, "{ctx}");
                        assert_eq!(fake.hist[2 + s], all, "{ctx}");
                    }
                }
            }
        }
    }
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
}

#[test]
fn bad_plans_are_errors_not_panics() {
    let o = opts(2.0, 1.0, 0, 1.0);
    let cases: Vec<(Fake, DecodePlan, SampleOptions)> = vec![
        // known lengths differ across samples
        (
            Fake::new(4, 2, true, 1.0),
            plan(vec![vec![1, 2], vec![1]], 2, ItdMode::Exact),
            o,
        ),
        (
            Fake::new(4, 2, true, 1.0),
            plan(vec![vec![1, 2], vec![1]], 2, ItdMode::Naive),
            o,
        ),
        // a known token outside the vocabulary
        (
            Fake::new(4, 1, true, 1.0),
            plan(vec![vec![1, 4]], 2, ItdMode::Forced),
            o,
        ),
        // no samples
        (Fake::new(4, 1, true, 1.0), plan(vec![], 2, ItdMode::Off), o),
        // rows do not match the samples
        (
            Fake::new(4, 3, false, 1.0),
            DecodePlan::off(2, 2),
            opts(1.0, 1.0, 0, 1.0),
        ),
        // guidance asked for but no uncond rows
        (Fake::new(4, 2, false, 1.0), DecodePlan::off(2, 2), o),
        // bad options
        (
            Fake::new(4, 1, true, 1.0),
            DecodePlan::off(1, 2),
            opts(1.0, 1.0, 0, 0.0),
        ),
    ];
    for (mut fake, p, o) in cases {
        let first = fake.first_logits();
        let r = generate(&mut fake, &first, &p, &o, &mut rng(0), None);
        assert!(
            matches!(r, Err(crate::Error::Invalid { .. })),
            "{p:?} {o:?}: {r:?}"
        );
    }
    // Off ignores the content of `known`; unequal lengths are fine there.
    let mut fake = Fake::new(4, 2, true, 1.0);
    let g = run(
        &mut fake,
        &plan(vec![vec![1, 2], vec![]], 3, ItdMode::Off),
        &o,
        0,
    );
    assert_eq!(
        g.target.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![3, 3]
    );
    // First logits of the wrong width.
    let mut fake = Fake::new(4, 1, true, 1.0);
    let first = Tensor::zeros((2, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(generate(
        &mut fake,
        &first,
        &DecodePlan::off(1, 2),
        &o,
        &mut rng(0),
        None
    )
    .is_err());
}

#[test]
fn same_seed_same_tokens_and_guidance_rows_agree() {
    let known = vec![vec![1, 5, 2, 7], vec![0, 3, 3, 6], vec![4, 4, 1, 2]];
    for itd in ItdMode::ALL {
        let p = plan(known.clone(), 6, itd);
        let o = opts(3.0, 1.0, 5, 0.9);
        let mut f1 = Fake::new(8, 3, true, 2.0);
        let mut f2 = Fake::new(8, 3, true, 2.0);
        let calls = std::cell::Cell::new(0usize);
        let last = std::cell::Cell::new((0usize, 0usize));
        let progress = |d: usize, t: usize| {
            calls.set(calls.get() + 1);
            last.set((d, t));
        };
        let first = f1.first_logits();
        let a = generate(&mut f1, &first, &p, &o, &mut rng(11), Some(&progress)).unwrap();
        let b = run(&mut f2, &p, &o, 11);
        assert_eq!(a, b, "{itd}");
        let total = p.known_len() + 6;
        assert_eq!(last.get(), (total, total), "{itd}");
        assert!(calls.get() >= 1);
        let c = run(&mut Fake::new(8, 3, true, 2.0), &p, &o, 12);
        assert_ne!(
            a.target, c.target,
            "{itd}: another seed gave the same tokens"
        );
        // Both guidance rows of a sample were fed the same tokens, and they are the output.
        for s in 0..3 {
            assert_eq!(f1.hist[s], f1.hist[3 + s], "{itd}");
            let mut all = a.prefix[s].clone();
            all.extend(&a.target[s]);
            all.pop(); // the last token is never fed
            assert_eq!(f1.hist[s], all, "{itd}");
        }
        assert_eq!(
            a.target.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![6; 3]
        );
        assert_eq!(a.prefix[0].len(), p.known_len());
        assert_eq!(a.stats.forward_passes, f1.feeds);
    }
}

#[test]
fn greedy_exact_equals_naive() {
    let known = vec![vec![1, 5, 2, 7, 0, 0], vec![0, 3, 3, 6, 6, 1]];
    let o = opts(2.0, 1.0, 1, 1.0);
    let naive = run(
        &mut Fake::new(8, 2, true, 2.0),
        &plan(known.clone(), 5, ItdMode::Naive),
        &o,
        1,
    );
    let exact = run(
        &mut Fake::new(8, 2, true, 2.0),
        &plan(known.clone(), 5, ItdMode::Exact),
        &o,
        2,
    );
    assert_eq!(naive.prefix, exact.prefix);
    assert_eq!(naive.target, exact.target);
    assert!(
        exact.stats.draft_rejected > 0,
        "the draft should differ from the greedy path"
    );
    // With the greedy path itself as the draft everything is accepted in one pass.
    let greedy = plan(naive.prefix.clone(), 5, ItdMode::Exact);
    let mut fake = Fake::new(8, 2, true, 2.0);
    let g = run(&mut fake, &greedy, &o, 3);
    assert_eq!(g.target, naive.target);
    assert_eq!(g.stats.draft_rejected, 0);
    assert_eq!(g.stats.draft_accepted, 12);
    assert_eq!(g.stats.forward_passes, 1 + 4);
}

#[test]
fn forced_writes_exactly_the_known_tokens() {
    let known = vec![vec![1, 5, 2, 7], vec![0, 3, 3, 6]];
    let mut fake = Fake::new(8, 2, true, 2.0);
    let g = run(
        &mut fake,
        &plan(known.clone(), 3, ItdMode::Forced),
        &opts(3.0, 1.0, 0, 1.0),
        5,
    );
    assert_eq!(g.prefix, known);
    for r in 0..4 {
        assert_eq!(fake.hist[r][..4], known[r % 2][..], "row {r}");
        assert_eq!(fake.hist[r][4..], g.target[r % 2][..2], "row {r}");
    }
    assert_eq!(g.stats.forward_passes, 1 + 2);
    assert_eq!((g.stats.draft_accepted, g.stats.draft_rejected), (0, 0));
}

#[test]
fn exact_needs_far_fewer_passes_when_the_draft_is_likely() {
    let l = 48;
    let known: Vec<Vec<u32>> = (0..2)
        .map(|s| (0..l).map(|i| ((i * 5 + s * 3) % 8) as u32).collect())
        .collect();
    let o = opts(1.0, 1.0, 0, 1.0);
    let model = |fav: &Vec<u32>| {
        let mut f = Fake::new(8, 1, true, 1.0);
        f.favour = Some((fav.clone(), 9.0));
        f
    };
    // One sample per session so that each has its own favoured (reference) sequence.
    for k in &known {
        let naive = run(
            &mut model(k),
            &plan(vec![k.clone()], 4, ItdMode::Naive),
            &o,
            7,
        );
        let exact = run(
            &mut model(k),
            &plan(vec![k.clone()], 4, ItdMode::Exact),
            &o,
            7,
        );
        assert_eq!(naive.stats.forward_passes, l + 3);
        assert!(
            exact.stats.forward_passes * 5 < naive.stats.forward_passes,
            "exact {:?} vs naive {:?}",
            exact.stats,
            naive.stats
        );
        assert_eq!(exact.stats.draft_accepted + exact.stats.draft_rejected, l);
        assert_eq!(
            exact.stats.forward_passes,
            1 + exact.stats.draft_rejected + 3
        );
    }
}

/// Critical value of the chi-square distribution at significance 1e-3 (Wilson-Hilferty).
fn chi2_critical_1e3(df: usize) -> f64 {
    let k = df as f64;
    let z = 3.090_232; // the standard normal 1 - 1e-3 quantile
    k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
}

/// Exact decoding has Naive's output distribution, checked by sampling.
///
/// Both modes are compared with the true distribution of the whole sequence (3 ITD positions
/// + 1 target token, vocabulary 4, top-k 3: at most 81 outcomes with non-zero probability),
/// computed by enumeration from the fake model, with a chi-square goodness-of-fit test at
/// significance 1e-3 (cells with an expected count below 5 pooled; an outcome of probability 0
/// must never appear). Samples are drawn in batches of 60 so the batched verification (earliest
/// rejection over samples) is what is tested.
///
/// Power: N = 12,000 sequences per mode. A "5% shift" moves 0.05 of probability between two
/// outcomes a and b; its non-centrality is lambda = N * 0.05^2 * (1/p_a + 1/p_b) >=
/// N * 0.0025 * 4 = 120 (since p_a + p_b <= 1). With at most 80 degrees of freedom the
/// critical value is 124.8 and the non-central chi-square(80, 120) exceeds it with
/// probability 0.9996 (scipy.stats.ncx2.sf(124.84, 80, 120)); fewer cells only raise the power.
/// (Sanity: accepting with probability 0.9 p(x) instead of p(x) gives a statistic near 300.)
#[test]
fn exact_matches_naive_in_distribution() {
    let (vocab, samples, calls, l) = (4usize, 60usize, 200usize, 3usize);
    let n_total = samples * calls;
    let o = opts(1.5, 1.0, 3, 0.95);
    let draft = vec![vec![2u32, 0, 3]; samples];
    let fake = Fake::new(vocab, samples, true, 1.5);
    // True probability of each full sequence (prefix + target), indexed base `vocab`.
    let cells = vocab.pow(l as u32 + 1);
    let truth: Vec<f64> = (0..cells)
        .map(|c| {
            let seq: Vec<u32> = (0..=l)
                .map(|i| ((c / vocab.pow((l - i) as u32)) % vocab) as u32)
                .collect();
            (0..=l)
                .map(|i| fake.probs(&o, &seq[..i])[seq[i] as usize] as f64)
                .product()
        })
        .collect();
    assert!((truth.iter().sum::<f64>() - 1.0).abs() < 1e-5);
    let mut rejected = 0;
    for itd in [ItdMode::Naive, ItdMode::Exact] {
        let mut counts = vec![0usize; cells];
        for call in 0..calls {
            let mut f = Fake::new(vocab, samples, true, 1.5);
            let g = run(&mut f, &plan(draft.clone(), 1, itd), &o, 1000 + call as u64);
            rejected += g.stats.draft_rejected;
            for s in 0..samples {
                let c = g.prefix[s]
                    .iter()
                    .chain(&g.target[s])
                    .fold(0, |a, &t| a * vocab + t as usize);
                counts[c] += 1;
            }
        }
        let (mut stat, mut df) = (0.0f64, 0usize);
        let (mut pool_e, mut pool_o) = (0.0f64, 0usize);
        for (c, &p) in truth.iter().enumerate() {
            let e = p * n_total as f64;
            if p == 0.0 {
                assert_eq!(
                    counts[c], 0,
                    "{itd}: outcome {c} of probability 0 was drawn"
                );
            } else if e < 5.0 {
                pool_e += e;
                pool_o += counts[c];
            } else {
                stat += (counts[c] as f64 - e).powi(2) / e;
                df += 1;
            }
        }
        if pool_e > 0.0 {
            stat += (pool_o as f64 - pool_e).powi(2) / pool_e;
            df += 1;
        }
        let df = df - 1;
        assert!(df >= 20 && df <= 80, "{df}");
        let crit = chi2_critical_1e3(df);
        assert!(
            stat < crit,
            "{itd}: chi-square {stat:.1} >= {crit:.1} (df {df})"
        );
    }
    assert!(
        rejected > n_total / 2,
        "the residual path must be exercised: {rejected} rejections"
    );
}
