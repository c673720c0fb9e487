//! Training batches from the code cache: the samples a run trains on, grouped by their number
//! of references, and the condition and target tensors of a batch of them.

use super::cache::{CacheReader, CachedSample};
use crate::error::{Error, Result};
use crate::model::Condition;
use crate::text::TextEncoder;
use candle_core::{Device, Tensor};
use std::path::Path;

/// The samples of a complete code cache that have a target (an error naming the cache when it
/// is incomplete or holds none).
pub fn load_training_samples(path: &Path) -> Result<Vec<CachedSample>> {
    let reader = CacheReader::open(path)?;
    if !reader.is_complete() {
        return Err(Error::bad_file(path, "the code cache is incomplete; finish `tokenar data encode` first"));
    }
    let mut out = Vec::with_capacity(reader.len());
    for i in 0..reader.len() {
        let s = reader.get(i)?;
        if !s.target.is_empty() {
            out.push(s);
        }
    }
    if out.is_empty() {
        return Err(Error::bad_file(path, "the code cache holds no sample with a target"));
    }
    Ok(out)
}

/// Sample indices grouped by their number of references (`buckets[k]`: the samples with `k`
/// references; a batch shares one count), for a model supporting `max_refs`. Every sample must
/// have the first sample's code grids and at most `max_refs` references.
pub fn buckets_by_refs(samples: &[CachedSample], max_refs: usize) -> Result<Vec<Vec<usize>>> {
    let Some((grid, ref_grid)) = samples.first().map(|s| (s.grid, s.ref_grid)) else { return Ok(vec![Vec::new(); max_refs + 1]) };
    let most = samples.iter().map(|s| s.refs.len()).max().unwrap_or(0);
    if most > max_refs {
        return Err(Error::invalid("model.max_refs", format!("the data has samples with {most} references but the model supports {max_refs}")));
    }
    let mut buckets = vec![Vec::new(); max_refs + 1];
    for (i, s) in samples.iter().enumerate() {
        if s.grid != grid {
            return Err(Error::invalid("cache", format!("sample {} has grid {:?}, others {:?}", s.id, s.grid, grid)));
        }
        if s.ref_grid != ref_grid {
            return Err(Error::invalid("cache", format!("sample {} has reference grid {:?}, others {:?}", s.id, s.ref_grid, ref_grid)));
        }
        buckets[s.refs.len()].push(i);
    }
    Ok(buckets)
}

/// Condition and target tensors of the samples `idx` (which share one number of references),
/// with their prompts through `text`, whose `max_len` is the model's caption length.
pub fn batch(samples: &[CachedSample], idx: &[usize], text: &dyn TextEncoder, device: &Device) -> Result<(Condition, Tensor)> {
    let Some(&first) = idx.first() else { return Err(Error::invalid("batch", "no samples")) };
    let b = idx.len();
    let nr = samples[first].refs.len();
    let hw = samples[first].background.len();
    let rhw = samples[first].ref_grid.map_or(hw, |(h, w)| h * w);
    let refs: Vec<u32> = idx.iter().flat_map(|&i| samples[i].refs.iter().flatten().copied()).collect();
    let bg: Vec<u32> = idx.iter().flat_map(|&i| samples[i].background.iter().copied()).collect();
    let tg: Vec<u32> = idx.iter().flat_map(|&i| samples[i].target.iter().copied()).collect();
    let prompts: Vec<String> = idx.iter().map(|&i| samples[i].prompt.clone()).collect();
    let (features, mask) = text.encode(&prompts)?;
    let cond = Condition::new(
        Tensor::from_vec(refs, (b, nr, rhw), device)?,
        Tensor::from_vec(bg, (b, hw), device)?,
        features,
        Some(mask),
    );
    Ok((cond, Tensor::from_vec(tg, (b, hw), device)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two zero feature rows of width 3 for any prompt.
    struct ZeroText;
    impl TextEncoder for ZeroText {
        fn dim(&self) -> usize {
            3
        }
        fn max_len(&self) -> usize {
            2
        }
        fn encode(&self, prompts: &[String]) -> Result<(Tensor, Tensor)> {
            let b = prompts.len();
            Ok((Tensor::zeros((b, 2, 3), candle_core::DType::F32, &Device::Cpu)?, Tensor::ones((b, 2), candle_core::DType::U8, &Device::Cpu)?))
        }
    }

    fn sample(id: &str, refs: usize, grid: (usize, usize)) -> CachedSample {
        let hw = grid.0 * grid.1;
        CachedSample {
            id: id.into(),
            refs: (0..refs).map(|r| vec![r as u32; hw]).collect(),
            background: vec![7; hw],
            target: vec![9; hw],
            grid,
            ref_grid: None,
            prompt: format!("prompt {id}"),
            text: None,
            owners: None,
            distill: None,
        }
    }

    #[test]
    fn buckets_group_by_reference_count_and_check_the_data() {
        let s = [sample("a", 2, (2, 2)), sample("b", 1, (2, 2)), sample("c", 2, (2, 2))];
        assert_eq!(buckets_by_refs(&s, 3).unwrap(), vec![vec![], vec![1], vec![0, 2], vec![]]);
        let e = buckets_by_refs(&s, 1).unwrap_err().to_string();
        assert!(e.contains("max_refs") && e.contains("2 references"), "{e}");
        let mixed = [sample("a", 1, (2, 2)), sample("odd", 1, (2, 3))];
        let e = buckets_by_refs(&mixed, 2).unwrap_err().to_string();
        assert!(e.contains("odd") && e.contains("(2, 3)"), "{e}");
        let apart = CachedSample { ref_grid: Some((1, 1)), refs: vec![vec![3]], ..sample("apart", 1, (2, 2)) };
        let e = buckets_by_refs(&[sample("a", 1, (2, 2)), apart.clone()], 2).unwrap_err().to_string();
        assert!(e.contains("apart") && e.contains("reference grid"), "{e}");
        // References on their own grid make a (B, n, rh*rw) reference tensor.
        let (cond, target) = batch(&[apart.clone(), apart], &[0, 1], &ZeroText, &Device::Cpu).unwrap();
        assert_eq!((cond.refs.dims(), target.dims()), (&[2, 1, 1][..], &[2, 4][..]));
    }
}
