use candle_core::{Device, Tensor};
use std::time::Instant;
fn t(name: &str, f: impl Fn() -> Tensor) {
    let _ = f();
    let n = 20;
    let t0 = Instant::now();
    for _ in 0..n { let _ = f(); }
    println!("{name}: {:.3} ms", t0.elapsed().as_secs_f64() * 1e3 / n as f64);
}
fn main() {
    let d = Device::Cpu;
    for m in [2usize, 240] {
    let x = Tensor::randn(0f32, 1.0, (m, 256), &d).unwrap();
    let w = Tensor::randn(0f32, 1.0, (16384, 256), &d).unwrap();
    let wt = w.t().unwrap().contiguous().unwrap();
    t(&format!("m={m} out w.t()"), || x.matmul(&w.t().unwrap()).unwrap());
    t(&format!("m={m} out pre-transposed"), || x.matmul(&wt).unwrap());
    t(&format!("m={m} w@x^T then t"), || w.matmul(&x.t().unwrap()).unwrap().t().unwrap().contiguous().unwrap());
    let w2 = Tensor::randn(0f32, 1.0, (768, 256), &d).unwrap();
    let w2t = w2.t().unwrap().contiguous().unwrap();
    t(&format!("m={m} qkv w.t()"), || x.matmul(&w2.t().unwrap()).unwrap());
    t(&format!("m={m} qkv pre"), || x.matmul(&w2t).unwrap());
    t(&format!("m={m} qkv w@x^T"), || w2.matmul(&x.t().unwrap()).unwrap().t().unwrap().contiguous().unwrap());
    }
}
