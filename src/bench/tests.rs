use super::*;
use candle_core::Device;

#[test]
fn tiny_report_has_documented_fields_and_sane_values() {
    let cfg = bench_config("tiny", &Overrides { layers: Some(1), dim: Some(64), ..Default::default() }).unwrap();
    let (model, varmap) = crate::model::build(&cfg, &Device::Cpu, 0).unwrap();
    let o = BenchOptions { label: "tiny".into(), n_refs: 2, decode_steps: 4, train_batch: 1, repeat: 1, warmup: 0, ..Default::default() };
    let r = run(&model, &varmap, None, &o).unwrap();
    let j = serde_json::to_value(&r).unwrap();
    for k in [
        "model", "threads", "params", "prefix_len", "generated_len", "prefill", "decode", "itd", "exact_over_off", "train", "peak_mib",
        "loadavg_start", "loadavg_end", "acceptance_representative", "notes",
    ] {
        assert!(j.get(k).is_some(), "missing field {k}");
    }
    assert_eq!(j["prefill"]["rows"], 2);
    assert!(r.prefill.tokens_per_s > 0.0 && r.prefill.tokens_per_s.is_finite());
    assert_eq!(r.decode.steps, 4);
    assert!(r.decode.ms_per_step > 0.0);
    assert_eq!(r.itd.len(), 4);
    let hw = cfg.image_tokens();
    let by = |m: &str| r.itd.iter().find(|i| i.mode == m).unwrap();
    // off decodes the target only; naive every ITD position as well; forced writes the draft
    // in one pass.
    assert_eq!(by("off").forward_passes, hw - 1);
    assert_eq!(by("naive").forward_passes, 3 * hw - 1);
    assert_eq!(by("forced").forward_passes, hw);
    // off feeds every target position but the last; naive and forced also every ITD
    // position (one by one, or in one pass); exact at least as many (draft fed past a
    // rejection is fed again).
    assert_eq!(by("off").positions_fed, hw - 1);
    assert_eq!(by("naive").positions_fed, 3 * hw - 1);
    assert_eq!(by("forced").positions_fed, 3 * hw - 1);
    let e = by("exact");
    assert_eq!(e.draft_accepted + e.draft_rejected, 2 * hw);
    assert!(e.positions_fed >= 3 * hw - 1, "{e:?}");
    assert!(r.exact_over_off.unwrap() > 0.0);
    let t = r.train.as_ref().unwrap();
    assert_eq!(t.positions, r.prefix_len + r.generated_len - 1);
    assert!(t.tokens_per_s > 0.0 && t.forward_ms > 0.0 && t.backward_ms > 0.0);
    assert!(r.peak_mib > 0.0 && r.peak_mib >= r.peak_mib_inference);
    assert!(!r.acceptance_representative && !r.notes.is_empty());
    assert!(render_table(&r).contains("exact / off"));
}

#[test]
fn itd_modes_are_skipped_without_references_and_presets_validate() {
    let cfg = bench_config("anchor", &Overrides { layers: Some(1), dim: Some(32), heads: Some(2), vocab: Some(64), grid: Some((2, 2)), caption_len: Some(4), caption_dim: Some(8) }).unwrap();
    assert_eq!((cfg.n_layer, cfg.dim, cfg.vocab_size), (1, 32, 64));
    let (model, varmap) = crate::model::build(&cfg, &Device::Cpu, 0).unwrap();
    let o = BenchOptions { decode_steps: 100, train_batch: 0, repeat: 1, warmup: 0, ..Default::default() };
    let r = run(&model, &varmap, None, &o).unwrap();
    // Capped by the layout: 4 generated positions, 3 fed.
    assert_eq!(r.decode.steps, 3);
    assert!(r.train.is_none() && r.exact_over_off.is_none());
    assert!(r.itd.iter().filter(|i| i.mode != "off").all(|i| i.skipped.is_some()));
    assert!(bench_config("nope", &Overrides::default()).is_err());
    assert!(bench_config("anchor", &Overrides { heads: Some(3), ..Default::default() }).is_err());
}


#[test]
fn given_condition_codes_are_used_and_checked() {
    let cfg = bench_config("tiny", &Overrides { layers: Some(1), dim: Some(64), ..Default::default() }).unwrap();
    let (model, _) = crate::model::build(&cfg, &Device::Cpu, 0).unwrap();
    let hw = cfg.image_tokens();
    let codes = ConditionCodes { refs: vec![vec![1; hw], vec![2; hw]], background: vec![3; hw] };
    let mut rng = crate::util::rng(0);
    let inputs = bench_inputs(&model, 2, 3, Some(&codes), None, &mut rng).unwrap();
    assert_eq!(inputs.draft, [vec![1u32; hw], vec![2; hw]].concat());
    let refs = inputs.cond.refs.to_dtype(candle_core::DType::U32).unwrap().to_vec3::<u32>().unwrap();
    assert!(refs.iter().all(|r| r[0] == vec![1; hw] && r[1] == vec![2; hw]));
    assert!(inputs.cond.background.to_dtype(candle_core::DType::U32).unwrap().to_vec2::<u32>().unwrap().iter().all(|b| *b == vec![3; hw]));
    // A wrong reference count, grid size or code is an error naming the condition.
    let one_ref = ConditionCodes { refs: vec![vec![1; hw]], ..codes.clone() };
    let short = ConditionCodes { background: vec![3; hw - 1], ..codes.clone() };
    let big = ConditionCodes { background: vec![cfg.vocab_size as u32; hw], ..codes.clone() };
    for bad in [one_ref, short, big] {
        let e = bench_inputs(&model, 2, 1, Some(&bad), None, &mut rng).err().unwrap().to_string();
        assert!(e.contains("bench condition"), "{e}");
    }
    // A trained model with real codes: acceptance is representative and no note says otherwise.
    let (model, varmap) = crate::model::build(&cfg, &Device::Cpu, 0).unwrap();
    let o = BenchOptions { n_refs: 2, decode_steps: 2, train_batch: 0, repeat: 1, warmup: 0, trained: true, codes: Some(codes), itd_modes: vec![ItdMode::Forced], ..Default::default() };
    let r = run(&model, &varmap, None, &o).unwrap();
    assert!(r.acceptance_representative && r.notes.is_empty(), "{:?}", r.notes);
}

#[test]
fn pass_sizes_are_timed_and_checked_against_the_layout() {
    let cfg = bench_config("anchor", &Overrides { layers: Some(1), dim: Some(32), heads: Some(2), vocab: Some(64), grid: Some((2, 2)), caption_len: Some(4), caption_dim: Some(8) }).unwrap();
    let (model, varmap) = crate::model::build(&cfg, &Device::Cpu, 0).unwrap();
    let o = BenchOptions { decode_steps: 1, train_batch: 0, repeat: 1, warmup: 0, itd_modes: vec![ItdMode::Off], pass_sizes: vec![1, 4], ..Default::default() };
    let r = run(&model, &varmap, None, &o).unwrap();
    assert_eq!(r.passes.iter().map(|p| p.positions).collect::<Vec<_>>(), [1, 4]);
    for p in &r.passes {
        assert!(p.ms > 0.0 && (p.ms_per_position * p.positions as f64 - p.ms).abs() < 1e-9, "{p:?}");
    }
    assert!(render_table(&r).contains("pass of    4 positions"));
    // This layout generates 4 positions: a pass of 0 or 5 is refused by name.
    for n in [0, 5] {
        let e = run(&model, &varmap, None, &BenchOptions { pass_sizes: vec![n], ..o.clone() }).unwrap_err().to_string();
        assert!(e.contains("--pass-sizes") && e.contains(&format!("{n} positions")), "{e}");
    }
}

#[test]
fn references_are_padded_to_the_schemes_slots() {
    let mut cfg = bench_config("tiny", &Overrides { layers: Some(1), dim: Some(64), ..Default::default() }).unwrap();
    cfg.max_refs = 3;
    cfg.scheme = crate::layout::Scheme::Reference { pad_to: Some(3), quirk_index: true };
    let (model, _) = crate::model::build(&cfg, &Device::Cpu, 0).unwrap();
    let hw = cfg.image_tokens();
    let codes = ConditionCodes { refs: vec![vec![1; hw], vec![2; hw]], background: vec![3; hw] };
    let mut rng = crate::util::rng(0);
    let inputs = bench_inputs(&model, 2, 2, Some(&codes), None, &mut rng).unwrap();
    // Two given grids, the third slot the pad code; the draft holds the given grids only.
    assert_eq!(inputs.draft, [vec![1u32; hw], vec![2; hw]].concat());
    let refs = inputs.cond.refs.to_dtype(candle_core::DType::U32).unwrap().to_vec3::<u32>().unwrap();
    assert!(refs.iter().all(|r| r.len() == 3 && r[0] == vec![1; hw] && r[1] == vec![2; hw] && r[2] == vec![0; hw]), "{refs:?}");
    // Random codes likewise; the layout is the one of three slots.
    let inputs = bench_inputs(&model, 2, 1, None, None, &mut rng).unwrap();
    assert_eq!(inputs.cond.refs.dims(), [1, 3, hw]);
    assert_eq!(model.layout_for(&inputs.cond).unwrap().ref_slots(), 3);
}

#[test]
fn a_training_step_with_the_reference_counts_two_training_states() {
    let cfg = bench_config("XL", &Overrides::default()).unwrap();
    let one = memory_estimate(&cfg, 1);
    assert_eq!(memory_estimate_with(&cfg, 1, true), 2 * one);
    assert_eq!(memory_estimate_with(&cfg, 1, false), one);
    assert_eq!(memory_estimate_with(&cfg, 0, true), memory_estimate(&cfg, 0));
    // XL's training state alone is over 12 GB (weights, gradients, two AdamW moments).
    assert!(one > 12 * (1u64 << 30), "{one}");
}
