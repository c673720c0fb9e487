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
    let e = by("exact");
    assert_eq!(e.draft_accepted + e.draft_rejected, 2 * hw);
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

