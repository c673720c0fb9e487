//! GPTs for inference with their linear layers in a reduced dtype, built without ever holding
//! all of their f32 weights.
//!
//! Converting a loaded model (`TokenAr::convert_weights`) first holds every weight in f32:
//! GPT-XL's 3.1 GB, whatever the target, and the allocator keeps what it freed for reuse, so
//! the process stays at the f32 size. Here the model is built with stand-ins for its linear
//! weights (a broadcast scalar: no memory) and each one is then produced in f32 alone (drawn,
//! or read from a checkpoint), converted at once, and its f32 copy freed before the next:
//! the peak is the converted model plus the largest single weight in f32.

use super::{LoadOptions, LoadReport, TensorFile};
use crate::error::{Error, Result};
use crate::model::{GptConfig, TokenAr, CONFIG_KEY};
use crate::nn::{Weight, WeightDtype};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// A `VarBuilder` backend for [`build_with_stand_ins`]: the linear weights are broadcast
/// zeros kept out of the map; every other variable is a zero variable in the map, handed out
/// detached (inference records no graph).
struct StandIns {
    map: VarMap,
}

impl candle_nn::var_builder::SimpleBackend for StandIns {
    fn get(&self, s: candle_core::Shape, name: &str, _h: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if TokenAr::is_linear_weight(name) {
            return Tensor::zeros((), dtype, dev)?.broadcast_as(s);
        }
        let mut data = self.map.data().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!("variable {name}: shape {:?} asked for, {:?} exists", s.dims(), v.shape().dims());
            }
            return Ok(v.as_detached_tensor());
        }
        let var = candle_core::Var::from_tensor(&Tensor::zeros(s, dtype, dev)?)?;
        let t = var.as_detached_tensor();
        data.insert(name.to_string(), var);
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("variable {name}: a new variable needs its shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        TokenAr::is_linear_weight(name) || self.map.data().lock().unwrap_or_else(|e| e.into_inner()).contains_key(name)
    }
}

/// The model of `cfg` with zero variables (in the returned map) for everything but its linear
/// weights, which are memory-less stand-ins until [`set_linear_weights`] sets them.
pub fn build_with_stand_ins(cfg: &GptConfig, device: &Device) -> Result<(TokenAr, VarMap)> {
    let map = VarMap::new();
    let vb = VarBuilder::from_backend(Box::new(StandIns { map: map.clone() }), DType::F32, device.clone());
    Ok((TokenAr::new(cfg, vb)?, map))
}

/// Set every linear weight of `model` from `source(name, dims)` (f32 or any float dtype,
/// `(out, in)`), stored as `dtype`; one weight at a time, each source tensor dropped once
/// converted. A source of the wrong shape is an error naming the weight.
pub fn set_linear_weights(model: &mut TokenAr, dtype: WeightDtype, mut source: impl FnMut(&str, &[usize]) -> Result<Tensor>) -> Result<()> {
    for (name, w) in model.linear_weights_mut() {
        let (out, inp) = w.dims()?;
        let t = source(&name, &[out, inp])?;
        if t.dims() != [out, inp] {
            return Err(Error::invalid("weights", format!("`{name}`: shape {:?}, the model needs [{out}, {inp}]", t.dims())));
        }
        *w = Weight::from_f32(&t, dtype)?;
    }
    Ok(())
}

/// A model of `cfg` with LlamaGen's seeded initialisation (the values of
/// [`crate::model::build`] with the same seed: one RNG over every variable in name order) and
/// its linear weights stored as `dtype`, drawn and converted one at a time. For inference
/// only (the map holds the other variables).
pub fn build_seeded(cfg: &GptConfig, device: &Device, seed: u64, dtype: WeightDtype) -> Result<(TokenAr, VarMap)> {
    let (mut model, map) = build_with_stand_ins(cfg, device)?;
    let vars: HashMap<String, candle_core::Var> = crate::nn::named_vars(&map).into_iter().collect();
    let mut names: Vec<(String, Vec<usize>)> = vars.iter().map(|(n, v)| (n.clone(), v.dims().to_vec())).collect();
    for (name, w) in model.linear_weights_mut() {
        let (out, inp) = w.dims()?;
        names.push((name, vec![out, inp]));
    }
    names.sort();
    let mut rng = crate::util::rng(seed);
    let mut drawn: HashMap<String, Tensor> = HashMap::new();
    // Non-linear variables are set as they come; a linear weight is drawn in its turn (so
    // that the stream of draws is the f32 build's) and converted before the next is drawn.
    for (name, dims) in &names {
        let values = crate::model::load::llamagen_init(name, dims, &mut rng);
        let t = Tensor::from_vec(values, dims.as_slice(), device)?;
        match vars.get(name) {
            Some(v) => v.set(&t)?,
            None => {
                drawn.insert(name.clone(), t);
                set_linear_weights_some(&mut model, dtype, &mut drawn)?;
            }
        }
    }
    if !drawn.is_empty() {
        return Err(Error::invalid("weights", format!("{} linear weights drawn but not set", drawn.len())));
    }
    release_freed_memory();
    Ok((model, map))
}

/// Set the linear weights of `model` whose f32 values are in `drawn` (taken out of it).
fn set_linear_weights_some(model: &mut TokenAr, dtype: WeightDtype, drawn: &mut HashMap<String, Tensor>) -> Result<()> {
    for (name, w) in model.linear_weights_mut() {
        if let Some(t) = drawn.remove(&name) {
            *w = Weight::from_f32(&t, dtype)?;
        }
    }
    Ok(())
}

/// Load a GPT checkpoint (as [`crate::model::load_with_hints`]: this project's safetensors with
/// their config, or a reference checkpoint whose shapes give the architecture) with its linear
/// weights stored as `dtype`. A safetensors file is mapped and each linear weight read from
/// the map, converted and its pages of the map dropped before the next; the other tensors
/// (embeddings, norms: a few percent) load as usual. Missing keys, shape mismatches and
/// unknown keys are the same errors as there. A `.pt` file is read whole (its tensors come out
/// of a zip archive), then converted one weight at a time. f32 is the plain load.
pub fn load_converted(path: &Path, preset: Option<&str>, grid: Option<usize>, dtype: WeightDtype, device: &Device) -> Result<(TokenAr, VarMap, LoadReport)> {
    if dtype == WeightDtype::F32 {
        return crate::model::load_with_hints(path, preset, grid, device);
    }
    let is_safetensors = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if !is_safetensors || len == 0 || !device.is_cpu() {
        // Read whole (an empty or missing file is reported by the reader).
        let mut file = TensorFile::load(path, device)?;
        let linear_names: Vec<String> = file.tensors.keys().filter(|k| TokenAr::is_linear_weight(k)).cloned().collect();
        let mut linear: HashMap<String, Tensor> = linear_names.into_iter().filter_map(|k| file.tensors.remove(&k).map(|t| (k, t))).collect();
        let shapes = file.tensors.iter().chain(linear.iter()).map(|(k, t)| (k.clone(), t.dims().to_vec())).collect();
        let total = file.tensors.values().chain(linear.values()).map(|t| t.elem_count()).sum();
        return finish_load(&mut file, total, &shapes, preset, grid, dtype, device, |name| Ok(linear.remove(name)));
    }
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is only read, and dropped before this returns; checkpoints are replaced
    // by rename (atomic writes), not rewritten in place.
    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
    let bad = |e: safetensors::SafeTensorError| Error::bad_file(path, format!("not a valid safetensors file: {e}"));
    let st = safetensors::SafeTensors::deserialize(&map).map_err(bad)?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&map).map_err(bad)?;
    let metadata = meta.metadata().as_ref().map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default();
    let mut shapes = BTreeMap::new();
    let mut total = 0usize;
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        total += view.shape().iter().product::<usize>();
        shapes.insert(name.clone(), view.shape().to_vec());
        if !TokenAr::is_linear_weight(&name) {
            let t = candle_core::safetensors::Load::load(&view, device).map_err(|e| Error::bad_file(path, format!("cannot read `{name}`: {e}")))?;
            tensors.insert(name, t);
        }
    }
    let mut file = TensorFile { path: path.to_path_buf(), tensors, metadata };
    let base = map.as_ptr() as usize;
    finish_load(&mut file, total, &shapes, preset, grid, dtype, device, |name| {
        let Ok(view) = st.tensor(name) else { return Ok(None) };
        let t = candle_core::safetensors::Load::load(&view, device).map_err(|e| Error::bad_file(path, format!("cannot read `{name}`: {e}")))?;
        // The copy is made: the pages of the map it was read from leave this process's
        // resident memory (they stay in the page cache). Failing to is harmless.
        let data = view.data();
        // SAFETY: the range lies in the map (the view's data is a slice of it); the map is
        // private and read-only, so dropping its pages loses nothing: they read back from the
        // file if touched again.
        let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, data.as_ptr() as usize - base, data.len()) };
        Ok(Some(t))
    })
}

/// The common part of [`load_converted`]: `file` holds every tensor but the linear weights,
/// which `linear(name)` yields one at a time (`None`: absent); `total` counts the values of
/// all of them, `shapes` their shapes.
#[allow(clippy::too_many_arguments)]
fn finish_load(
    file: &mut TensorFile,
    total: usize,
    shapes: &BTreeMap<String, Vec<usize>>,
    preset: Option<&str>,
    grid: Option<usize>,
    dtype: WeightDtype,
    device: &Device,
    mut linear: impl FnMut(&str) -> Result<Option<Tensor>>,
) -> Result<(TokenAr, VarMap, LoadReport)> {
    let path = file.path.clone();
    let cfg = match file.metadata.get(CONFIG_KEY) {
        Some(json) => {
            let cfg: GptConfig = serde_json::from_str(json).map_err(|e| Error::bad_file(&path, format!("bad model config in metadata: {e}")))?;
            cfg.validate().map_err(|e| Error::bad_file(&path, e.to_string()))?;
            cfg.check_fits_values(total).map_err(|e| Error::bad_file(&path, e.to_string()))?;
            cfg
        }
        None => GptConfig::infer_from_tensors(shapes, &path, preset, grid)?,
    };
    let (mut model, map) = build_with_stand_ins(&cfg, device)?;
    let opts = LoadOptions {
        allow_missing: crate::model::ADDITIONS.iter().map(|s| s.to_string()).collect(),
        ignore: crate::model::load::IGNORED.iter().map(|s| s.to_string()).collect(),
        strict_unexpected: true,
    };
    let mut report = super::load_into_varmap(&map, file, &opts)?;
    // What the file lacks is initialised as the plain load does (LlamaGen's rules, seed 0,
    // over the fresh variables in name order; linear weights are never among them).
    let mut rng = crate::util::rng(0);
    for (name, var) in crate::nn::named_vars(&map) {
        if report.fresh.contains(&name) {
            let v = crate::model::load::llamagen_init(&name, var.dims(), &mut rng);
            var.set(&Tensor::from_vec(v, var.dims(), var.device())?)?;
        }
    }
    set_linear_weights(&mut model, dtype, |name, dims| match linear(name)? {
        Some(t) if t.dims() != dims => Err(Error::ShapeMismatch { path: path.clone(), key: name.to_string(), expected: dims.to_vec(), found: t.dims().to_vec() }),
        Some(t) => Ok(t.to_dtype(DType::F32)?),
        None => Err(Error::MissingKey { path: path.clone(), key: name.to_string(), expected: dims.to_vec() }),
    })?;
    report.loaded.extend(model.linear_weights_mut().into_iter().map(|(n, _)| n));
    report.loaded.sort();
    release_freed_memory();
    Ok((model, map, report))
}

/// Give the memory the allocator holds free back to the system. The binaries' allocator
/// (mimalloc) is set never to return freed memory (`util::tune_allocator`: a training step
/// reuses it); after a conversion, what it holds is the f32 copies, freed and not needed
/// again. Purging is turned on for one collection and off again.
pub fn release_freed_memory() {
    extern "C" {
        fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
        fn mi_option_get(option: std::ffi::c_int) -> std::ffi::c_long;
        fn mi_collect(force: bool);
    }
    // `mi_option_purge_delay` (see `util::tune_allocator`).
    const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;
    // SAFETY: mimalloc is linked (a dependency of this crate); options may be read and set,
    // and a collection run, at any time from any thread.
    unsafe {
        let before = mi_option_get(MI_OPTION_PURGE_DELAY);
        mi_option_set(MI_OPTION_PURGE_DELAY, 0);
        mi_collect(true);
        mi_option_set(MI_OPTION_PURGE_DELAY, before);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> GptConfig {
        GptConfig { n_layer: 2, n_head: 2, dim: 64, vocab_size: 96, caption_dim: 32, caption_len: 4, grid: (4, 4), ..GptConfig::preset("tiny").expect("tiny") }
    }

    /// The streamed build has the f32 build's values: converted to f32 it gives the same
    /// logits, and to Q8_0 the logits of the f32 build converted afterwards.
    #[test]
    fn seeded_build_matches_the_f32_build() {
        let cfg = cfg();
        let dev = Device::Cpu;
        let (mut full, vm) = crate::model::build(&cfg, &dev, 7).expect("build");
        // A non-zero head (LlamaGen's is zero), the same in both builds.
        let head: Vec<f32> = (0..cfg.vocab_size * cfg.dim).map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3).collect();
        let head = Tensor::from_vec(head, (cfg.vocab_size, cfg.dim), &dev).expect("head");
        vm.data().lock().expect("map")["output.weight"].set(&head).expect("set");
        let mut rng = crate::util::rng(1);
        let cond = crate::bench::bench_inputs(&full, 2.min(cfg.max_refs), 1, None, None, &mut rng).expect("inputs").cond;
        let logits = |m: &TokenAr| m.start(&cond, true).expect("start").1.to_vec2::<f32>().expect("logits");
        for dtype in [WeightDtype::F32, WeightDtype::Q8_0] {
            full.convert_weights(dtype).expect("convert");
            let (mut streamed, map) = build_seeded(&cfg, &dev, 7, dtype).expect("streamed");
            for (name, w) in streamed.linear_weights_mut() {
                if name == "output.weight" {
                    *w = Weight::from_f32(&head, dtype).expect("head");
                }
            }
            assert_eq!(streamed.weight_dtype(), dtype);
            assert_eq!(logits(&streamed), logits(&full), "{dtype}");
            // The streamed map holds no linear weight.
            assert!(crate::nn::named_vars(&map).iter().all(|(n, _)| !TokenAr::is_linear_weight(n)));
        }
    }

    /// A checkpoint loaded with its linear weights converted on the way in gives the logits of
    /// the plain load converted afterwards (safetensors in f32 and with bf16 linear weights,
    /// and a model without the TokenAR additions, initialised as the plain load does); a
    /// linear weight of the wrong shape is an error naming it.
    #[test]
    fn converted_load_matches_load_then_convert() {
        let cfg = cfg();
        let dev = Device::Cpu;
        let (model, vm) = crate::model::build(&cfg, &dev, 3).expect("build");
        vm.data().lock().expect("map")["output.weight"].set(&Tensor::randn(0f32, 0.5, (cfg.vocab_size, cfg.dim), &dev).expect("head")).expect("set");
        let dir = std::env::temp_dir().join(format!("tokenar-convert-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("model.safetensors");
        crate::model::save(&path, &model, &vm).expect("save");
        let mut tensors = crate::weights::varmap_tensors(&vm);
        let mut meta = BTreeMap::new();
        meta.insert(CONFIG_KEY.to_string(), serde_json::to_string(&cfg).expect("json"));
        for t in tensors.iter_mut().filter(|(n, _)| TokenAr::is_linear_weight(n)).map(|(_, t)| t) {
            *t = t.to_dtype(DType::BF16).expect("bf16");
        }
        let half = dir.join("half.safetensors");
        crate::weights::save_safetensors(&half, &tensors, &meta).expect("save");
        // Without the TokenAR additions (fresh on load) and with a linear weight missing.
        tensors.retain(|n, _| !crate::model::ADDITIONS.iter().any(|a| n.starts_with(a)));
        let bare = dir.join("bare.safetensors");
        crate::weights::save_safetensors(&bare, &tensors, &meta).expect("save");
        let w2 = "layers.1.feed_forward.w2.weight";
        let t = tensors[w2].t().expect("t").contiguous().expect("c");
        tensors.insert(w2.to_string(), t);
        let transposed = dir.join("transposed.safetensors");
        crate::weights::save_safetensors(&transposed, &tensors, &meta).expect("save");
        let mut rng = crate::util::rng(1);
        let cond = crate::bench::bench_inputs(&model, 2.min(cfg.max_refs), 1, None, None, &mut rng).expect("inputs").cond;
        let logits = |m: &TokenAr| m.start(&cond, true).expect("start").1.to_vec2::<f32>().expect("logits");
        for file in [&path, &half, &bare] {
            for dtype in [WeightDtype::Bf16, WeightDtype::Q8_0] {
                let (mut plain, _, plain_report) = crate::model::load(file, None, &dev).expect("load");
                plain.convert_weights(dtype).expect("convert");
                let (conv, map, report) = load_converted(file, None, None, dtype, &dev).expect("converted load");
                assert_eq!(logits(&conv), logits(&plain), "{} {dtype}", file.display());
                assert_eq!(report.fresh, plain_report.fresh);
                assert_eq!(report.loaded, plain_report.loaded);
                assert!(crate::nn::named_vars(&map).iter().all(|(n, _)| !TokenAr::is_linear_weight(n)));
            }
        }
        let e = load_converted(&transposed, None, None, WeightDtype::Q8_0, &dev).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains(w2) && e.contains("transposed.safetensors") && e.contains("shape"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_source_of_the_wrong_shape_is_an_error() {
        let (mut m, _) = build_with_stand_ins(&cfg(), &Device::Cpu).expect("build");
        let e = set_linear_weights(&mut m, WeightDtype::Q8_0, |_, _| Ok(Tensor::zeros((3, 64), DType::F32, &Device::Cpu)?)).expect_err("shape");
        assert!(e.to_string().contains("the model needs"), "{e}");
    }
}
