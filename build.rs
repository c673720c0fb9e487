// Embeds the built-in model (assets/builtin/*.safetensors) into the binary when the files are
// present, so `tokenar generate` works without downloads, also after `cargo install`.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(tokenar_builtin)");
    println!("cargo::rustc-check-cfg=cfg(tokenar_builtin_sampling)");
    println!("cargo:rerun-if-changed=assets/builtin");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/builtin");
    for f in ["tokenizer.safetensors", "model.safetensors", "text.safetensors", "sampling.toml"] {
        println!("cargo:rerun-if-changed=assets/builtin/{f}");
    }
    if dir.join("tokenizer.safetensors").exists() && dir.join("model.safetensors").exists() {
        println!("cargo:rustc-cfg=tokenar_builtin");
        // The sampling settings the built-in model is meant to be used with (optional).
        if dir.join("sampling.toml").exists() {
            println!("cargo:rustc-cfg=tokenar_builtin_sampling");
        }
    }
}
