//! `tokenar generate`: place the subjects of reference images into a scene.

use anyhow::Context;
use clap::Args;
use std::path::PathBuf;
use tokenar::pipeline::{generate, GenerateRequest};

/// One request's scene: the references, the background with its mask, and the prompt (the
/// flags of `generate`, also taken by `attention`).
#[derive(Args)]
pub struct SceneArgs {
    /// A reference image of one subject (repeat for each subject, in order): 1 to the model's
    /// maximum (`tokenar info` shows it; a request with more is refused naming the maximum).
    #[arg(long = "ref", value_name = "IMAGE")]
    pub refs: Vec<PathBuf>,
    /// The scene, any size (resized to the model's image size; `tokenar info` shows it).
    /// Without --mask the background is given to the model unchanged: it counts as already
    /// blacked out where the subjects go (black pixels, as in InstructAR's data), and nothing
    /// is pasted back. Without --background the subjects are drawn on an empty canvas.
    #[arg(long)]
    pub background: Option<PathBuf>,
    /// White where the subjects go: the background is blacked out there before the model sees
    /// it. Needs --background; of its size, or at least its aspect ratio (it is resized with
    /// the background).
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// What the image shows. The built-in text encoder knows a small word list: unknown words
    /// are listed in a warning.
    #[arg(long)]
    pub prompt: String,
}

impl SceneArgs {
    /// Read the reference, background and mask files (errors name the file).
    pub fn load(&self) -> tokenar::Result<ConditionImages> {
        load_condition_images(&self.refs, self.background.as_ref(), self.mask.as_ref())
    }
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    scene: SceneArgs,
    /// Output image; the extension picks the format (.png, .jpg, .jpeg or .webp). With
    /// --num-samples > 1, `_<i>` is added before the extension.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    model: super::ModelArgs,
    #[command(flatten)]
    sampling: super::SamplingArgs,
    /// Images to generate (one batch; 1 to 64, and their cache must fit the memory available).
    #[arg(long, default_value_t = 1)]
    num_samples: usize,
    /// Also write the references the model reproduced (ITD) next to the output.
    #[arg(long)]
    save_itd: bool,
}

fn numbered(path: &std::path::Path, i: usize, n: usize) -> PathBuf {
    if n == 1 {
        return path.to_path_buf();
    }
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let ext = path.extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or_else(|| "png".into());
    path.with_file_name(format!("{stem}_{i}.{ext}"))
}

/// The condition images of a request: references, background and mask, read from their files.
pub(crate) type ConditionImages = (Vec<image::RgbImage>, Option<image::RgbImage>, Option<image::GrayImage>);

/// Read the reference, background and mask files (errors name the file).
pub(crate) fn load_condition_images(refs: &[PathBuf], background: Option<&PathBuf>, mask: Option<&PathBuf>) -> tokenar::Result<ConditionImages> {
    Ok((
        refs.iter().map(|p| tokenar::imageio::load_rgb(p, None)).collect::<tokenar::Result<Vec<_>>>()?,
        background.map(|p| tokenar::imageio::load_rgb(p, None)).transpose()?,
        mask.map(|p| tokenar::imageio::load_mask(p, None)).transpose()?,
    ))
}

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    // Refuse an output format that cannot be written before any work is done.
    tokenar::imageio::output_format(&a.out)?;
    // Read every input before loading the model, so a bad file is reported at once.
    let (refs, background, mask) = a.scene.load()?;
    let mut req = GenerateRequest {
        refs,
        background,
        mask,
        prompt: a.scene.prompt.clone(),
        // Flags without a model's defaults, checked now; the model's fill in below.
        options: a.sampling.options(&Default::default(), 0),
        itd: a.sampling.itd,
        num_samples: a.num_samples,
        paste_back: a.sampling.paste_back,
        decode_itd: a.save_itd,
    };
    req.validate()?;
    let bundle = a.model.load()?;
    req.options = a.sampling.options(&bundle.sampling, 0);
    req.validate()?;
    for w in tokenar::pipeline::generate::warnings(&bundle, &req) {
        eprintln!("warning: {w}");
    }
    let bar = super::progress_bar(0, "decoding {bar:40} {pos}/{len} tokens [{elapsed_precise}<{eta_precise}]");
    let t0 = std::time::Instant::now();
    let out = generate(&bundle, &req, Some(&super::bar_progress(&bar)))?;
    bar.finish_and_clear();
    let n = out.images.len();
    for (i, img) in out.images.iter().enumerate() {
        let p = numbered(&a.out, i, n);
        tokenar::imageio::save_rgb(&p, img).with_context(|| format!("writing {}", p.display()))?;
        eprintln!("wrote {}", p.display());
        if a.save_itd {
            for (j, r) in out.itd_refs.get(i).into_iter().flatten().enumerate() {
                let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                let ext = p.extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or_else(|| "png".into());
                let q = p.with_file_name(format!("{stem}_itd{j}.{ext}"));
                tokenar::imageio::save_rgb(&q, r)?;
            }
        }
    }
    eprintln!(
        "{} image(s) in {:.2} s (ITD {}, {} forward passes, draft accepted {}, rejected {})",
        n,
        t0.elapsed().as_secs_f64(),
        out.itd,
        out.stats.forward_passes,
        out.stats.draft_accepted,
        out.stats.draft_rejected
    );
    Ok(())
}
