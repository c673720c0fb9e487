//! The shipped model (assets/builtin/, compiled in by build.rs): it generates the README's demo
//! scene at the model's size and keeps the given background outside the mask, which the same
//! network with random weights does not.

use candle_core::Device;
use tokenar::eval::pixel::{psnr, Planar, Region};
use tokenar::imageio::{load_mask, load_rgb};
use tokenar::pipeline::{generate, Bundle, GenerateRequest};
use tokenar::sample::SampleOptions;

/// Background PSNR (dB, outside the mask) the shipped model must reach on the demo scene; the
/// test split's mean is in the README.
const MIN_BACKGROUND_PSNR: f64 = 20.0;

fn demo_request() -> GenerateRequest {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/demo");
    GenerateRequest {
        refs: vec![load_rgb(dir.join("ref0.png"), None).unwrap(), load_rgb(dir.join("ref1.png"), None).unwrap()],
        background: Some(load_rgb(dir.join("background.png"), None).unwrap()),
        mask: Some(load_mask(dir.join("mask.png"), None).unwrap()),
        prompt: "a heart above a square".into(),
        options: SampleOptions { seed: 0, ..Default::default() },
        itd: None,
        num_samples: 1,
        paste_back: false,
        decode_itd: false,
    }
}

fn background_psnr(bundle: &Bundle, req: &GenerateRequest) -> f64 {
    let out = generate(bundle, req, None).unwrap();
    let img = &out.images[0];
    let size = bundle.image_size() as u32;
    assert_eq!(img.dimensions(), (size, size));
    let bg = image::imageops::resize(req.background.as_ref().unwrap(), size, size, image::imageops::FilterType::Triangle);
    let mask = image::imageops::resize(req.mask.as_ref().unwrap(), size, size, image::imageops::FilterType::Nearest);
    psnr(&Planar::from_rgb(img), &Planar::from_rgb(&bg), Region::Outside(&mask)).unwrap().unwrap()
}

#[test]
fn shipped_model_keeps_the_background() {
    assert!(
        tokenar::pipeline::bundle::has_builtin(),
        "this build carries no built-in model: assets/builtin/ must hold tokenizer, model and text safetensors"
    );
    let bundle = Bundle::builtin(&Device::Cpu).unwrap();
    assert_eq!(bundle.image_size(), 64);
    // Sampled as `tokenar generate` samples it: the model's own settings (sampling.toml).
    let req = GenerateRequest { options: bundle.sampling.options(0), ..demo_request() };
    let trained = background_psnr(&bundle, &req);
    eprintln!("trained: background PSNR {trained:.2} dB");
    assert!(trained >= MIN_BACKGROUND_PSNR, "background PSNR {trained:.2} dB < {MIN_BACKGROUND_PSNR} dB");

    // The same network with random weights (LlamaGen initialisation) fails the check.
    tokenar::model::init_weights(&bundle.gpt_vars, 1).unwrap();
    let random = background_psnr(&bundle, &req);
    eprintln!("random weights: background PSNR {random:.2} dB");
    assert!(random < MIN_BACKGROUND_PSNR, "random weights reach {random:.2} dB");
}

/// The shipped 4x tokenizer (assets/vq-small-f4.safetensors): the vq-small-f4 preset, 16 x 16
/// codes for a 64 px image, and reconstructions of the demo images (26.4 dB on average; the
/// built-in 8 x 8 tokenizer reaches 20.7 dB on them).
#[test]
fn shipped_f4_tokenizer_reconstructs_the_demo_images() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let (vq, _) = tokenar::tokenizer::load(&root.join("assets/vq-small-f4.safetensors"), None, &Device::Cpu).unwrap();
    assert_eq!(vq.config(), &tokenar::tokenizer::VqConfig::preset("vq-small-f4").unwrap());
    let mut total = 0.0;
    let names = ["background.png", "real.png", "ref0.png", "ref1.png"];
    for name in names {
        let img = load_rgb(root.join("tests/fixtures/demo").join(name), Some(64)).unwrap();
        let x = tokenar::imageio::rgb_to_tensor(&img, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let codes = vq.encode(&x).unwrap();
        assert_eq!(codes.dims(), &[1, 16, 16]);
        let db = tokenar::tokenizer::psnr(&vq.decode(&codes).unwrap(), &x).unwrap()[0];
        eprintln!("{name}: {db:.2} dB");
        total += db;
    }
    let mean = total / names.len() as f64;
    assert!(mean >= 25.0, "mean reconstruction PSNR {mean:.2} dB < 25 dB");
}
