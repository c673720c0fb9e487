//! Tests of the sampler against a tiny fake model whose logits are a fixed pseudo-random
//! function of the row kind (cond / uncond), the previous two tokens and the position.

use super::*;
use crate::util::rng;
use candle_core::{Device, Tensor};

mod decode;
mod logits;

use crate::util::splitmix64 as mix;

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
    /// Positions fed in all (per row).
    fed_tokens: usize,
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
            fed_tokens: 0,
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
        let row = if self.cfg && opts.guides_at(hist.len()) {
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
        self.fed_tokens += t;
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
        cfg_interval: None,
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
