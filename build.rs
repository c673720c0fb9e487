// Embeds the built-in model (assets/builtin/*.safetensors) into the binary when the files are
// present, so `tokenar generate` works without downloads, also after `cargo install`.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(tokenar_builtin)");
    println!("cargo::rustc-check-cfg=cfg(tokenar_builtin_sampling)");
    println!("cargo:rerun-if-changed=assets/builtin");
    // Read at run time: `env!` would bake in the folder the build script was first compiled in,
    // and a target folder shared between checkouts would then look in the wrong one.
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| ".".into());
    let dir = std::path::Path::new(&manifest).join("assets/builtin");
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
