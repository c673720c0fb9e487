//! GPTs for inference with their linear layers in a reduced dtype, built without ever holding
//! all of their f32 weights.
//!
//! Converting a loaded model (`TokenAr::convert_weights`) first holds every weight in f32:
//! GPT-XL's 3.1 GB, whatever the target, and the allocator keeps what it freed for reuse, so
//! the process stays at the f32 size. Here the model is built with stand-ins for its linear
//! weights (a broadcast scalar: no memory) and each one is then produced in f32 alone (drawn,
//! or read from a checkpoint), converted at once, and its f32 copy freed before the next:
//! the peak is the converted model plus the largest single weight in f32.

use crate::error::{Error, Result};
use crate::model::{GptConfig, TokenAr};
use crate::nn::{Weight, WeightDtype};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use std::collections::HashMap;

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

    #[test]
    fn a_source_of_the_wrong_shape_is_an_error() {
        let (mut m, _) = build_with_stand_ins(&cfg(), &Device::Cpu).expect("build");
        let e = set_linear_weights(&mut m, WeightDtype::Q8_0, |_, _| Ok(Tensor::zeros((3, 64), DType::F32, &Device::Cpu)?)).expect_err("shape");
        assert!(e.to_string().contains("the model needs"), "{e}");
    }
}
