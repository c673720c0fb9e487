//! Decoding strategies: Off, Naive, Forced, Exact.

use super::*;

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

/// LlamaGen's `cfg_interval` and guidance rule, token for token under greedy decoding: the
/// tokens after the interval follow the conditional logits alone, in every ITD mode.
#[test]
fn cfg_interval_turns_guidance_off_after_the_interval() {
    let known = vec![vec![1, 5, 2, 7], vec![0, 3, 3, 6]];
    // The fake's logits depend on the history only, so both samples follow one greedy path.
    let greedy_by_hand = |o: &SampleOptions| -> Vec<u32> {
        let fake = Fake::new(8, 2, true, 2.0);
        let mut hist: Vec<u32> = Vec::new();
        for _ in 0..10 {
            let p = fake.probs(o, &hist);
            let best = (0..p.len()).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap();
            hist.push(best as u32);
        }
        hist
    };
    let mut o = opts(4.0, 1.0, 1, 1.0);
    let always = greedy_by_hand(&o);
    o.cfg_interval = Some(2);
    let interval = greedy_by_hand(&o);
    assert_ne!(always, interval, "the interval must change some greedy token in this fake");
    assert_eq!(always[..4], interval[..4], "tokens 0..=3 are guided in both");
    for (mode, seed) in [(ItdMode::Off, 1), (ItdMode::Naive, 2)] {
        let p = if mode == ItdMode::Off { plan(vec![vec![]; 2], 10, mode) } else { plan(known.clone(), 6, mode) };
        let g = run(&mut Fake::new(8, 2, true, 2.0), &p, &o, seed);
        for s in 0..2 {
            let mut all = g.prefix[s].clone();
            all.extend(&g.target[s]);
            assert_eq!(all, interval, "{mode}");
        }
    }
    // Exact verification passes cross the interval's end inside one pass.
    let draft = vec![interval[..4].to_vec(); 2];
    let g = run(&mut Fake::new(8, 2, true, 2.0), &plan(draft, 6, ItdMode::Exact), &o, 3);
    assert_eq!([g.prefix[0].clone(), g.target[0].clone()].concat(), interval);
    assert_eq!(g.stats.draft_rejected, 0);
    // A scale of 1 or less guides nothing (LlamaGen runs no unconditional row then).
    let weak = opts(0.5, 1.0, 1, 1.0);
    assert!(!weak.guides() && !weak.guides_at(0));
    let plain = greedy_by_hand(&opts(1.0, 1.0, 1, 1.0));
    assert_eq!(greedy_by_hand(&weak), plain);
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
fn exact_costs_about_naive_when_every_draft_token_is_rejected() {
    // A draft the model never produces (bonus -30 on every draft token): each position is
    // rejected. The verification window shrinks after each rejection, so exact feeds O(L)
    // positions in all, not O(L^2) (re-feeding the rest of the draft after every rejection).
    let l = 64;
    let draft: Vec<u32> = (0..l).map(|i| (i % 8) as u32).collect();
    let mut f = Fake::new(8, 1, true, 1.0);
    f.favour = Some((draft.clone(), -30.0));
    let out = run(&mut f, &plan(vec![draft], 4, ItdMode::Exact), &opts(1.0, 1.0, 0, 1.0), 3);
    assert_eq!(out.stats.draft_rejected, l);
    assert!(f.fed_tokens <= 4 * (l + 4), "fed {} positions for {} decided", f.fed_tokens, l + 4);
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
        // Windows of 8, 16, 16 and the remaining 8 when everything is accepted (at most
        // MAX_WINDOW each); each rejection adds a pass and shrinks the window; with these
        // seeds it costs at most two passes.
        assert!(
            exact.stats.forward_passes <= 3 + 2 * exact.stats.draft_rejected + 3,
            "{:?}",
            exact.stats
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
/// must never appear). Samples are drawn in batches of 100 so the batched verification
/// (earliest rejection over samples) is what is tested.
///
/// Power: N = 60,000 sequences per mode. A "5% shift" moves 0.05 of probability between two
/// outcomes a and b; its non-centrality is lambda = N * 0.05^2 * (1/p_a + 1/p_b) >=
/// N * 0.0025 * 4 = 600 (since p_a + p_b <= 1). With at most 80 degrees of freedom the
/// critical value is 124.8, which the non-central chi-square(80, 600) exceeds with probability
/// 1 - 1e-30 or so; fewer cells only raise the power. Even a relative 5% shift (0.015 moved
/// between two outcomes of probability 0.3) has lambda = 67.5 and is detected with
/// probability 0.98 (scipy.stats.ncx2.sf(124.84, 80, 67.5)).
/// (Sanity: accepting with probability 0.9 p(x) instead of p(x) gives a statistic near 900 at df 68.)
#[test]
fn exact_matches_naive_in_distribution() {
    let (vocab, samples, calls, l) = (4usize, 100usize, 600usize, 3usize);
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
