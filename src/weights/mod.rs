//! Checkpoint files: reading `.safetensors` and PyTorch `.pt`/`.pth`/`.bin` (the zip-pickle
//! format, read without executing any pickle code), writing safetensors atomically with
//! metadata, and loading a tensor map into a model's `VarMap` with clear errors.
//!
//! Every model in this crate is built once against a `VarMap` whose variable names are the
//! reference checkpoint keys; loading a checkpoint is then "set each variable from the file",
//! which is where missing keys, shape mismatches and unknown keys are reported.

pub mod builders;
pub mod convert;
pub mod pickle;
pub mod torch_zip;

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The tensors of one checkpoint file plus its string metadata (safetensors header
/// `__metadata__`; empty for `.pt`).
#[derive(Debug, Clone)]
pub struct TensorFile {
    pub path: PathBuf,
    pub tensors: HashMap<String, Tensor>,
    pub metadata: BTreeMap<String, String>,
}

/// The entries under which training scripts commonly nest the state dict of a `.pt` file,
/// tried in this order before the top level.
pub const PT_STATE_KEYS: [&str; 4] = ["model", "module", "state_dict", "ema"];

impl TensorFile {
    /// Read a checkpoint by extension: `.safetensors`, or a torch zip file (`.pt`, `.pth`,
    /// `.bin`, `.ckpt`). For torch files the state dict is looked for under
    /// [`PT_STATE_KEYS`], then at the top level.
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(Error::bad_file(path, "checkpoint file not found"));
        }
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        match ext.as_str() {
            "safetensors" => Self::load_safetensors(path, device),
            "pt" | "pth" | "bin" | "ckpt" => Self::load_torch(path, device),
            other => Err(Error::bad_file(
                path,
                format!("unknown checkpoint extension `{other}` (expected .safetensors, .pt, .pth, .bin or .ckpt)"),
            )),
        }
    }

    fn load_safetensors(path: &Path, device: &Device) -> Result<Self> {
        // Mapped rather than read: the tensors are copied out of the file once, with no
        // second copy of a multi-gigabyte checkpoint in memory meanwhile.
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        if file.metadata().map_err(|e| Error::io(path, e))?.len() == 0 {
            // An empty file cannot be mapped; the parser reports it (header too small).
            return Self::from_safetensors_bytes(path, &[], device);
        }
        // SAFETY: the map is only read, and dropped once the tensors are copied out of it; a
        // checkpoint rewritten meanwhile is replaced by rename (atomic writes), not in place.
        let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::from_safetensors_bytes(path, &bytes, device)
    }

    /// Read safetensors content held in memory; `label` names it in errors.
    pub fn from_safetensors_bytes(label: impl AsRef<Path>, bytes: &[u8], device: &Device) -> Result<Self> {
        let path = label.as_ref();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| Error::bad_file(path, format!("not a valid safetensors file: {e}")))?;
        let metadata = meta
            .metadata()
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        let tensors = candle_core::safetensors::load_buffer(bytes, device)
            .map_err(|e| Error::bad_file(path, format!("cannot read tensors: {e}")))?;
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
            metadata,
        })
    }

    fn load_torch(path: &Path, device: &Device) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let tensors = pickle::read_torch_zip(path, std::io::BufReader::new(file), len, &PT_STATE_KEYS, device)?;
        Ok(Self { path: path.to_path_buf(), tensors, metadata: BTreeMap::new() })
    }

    /// Read a PyTorch zip checkpoint held in memory; `label` names it in errors.
    pub fn from_torch_bytes(label: impl AsRef<Path>, bytes: &[u8], device: &Device) -> Result<Self> {
        let path = label.as_ref();
        let tensors = pickle::read_torch_zip(path, std::io::Cursor::new(bytes), bytes.len() as u64, &PT_STATE_KEYS, device)?;
        Ok(Self { path: path.to_path_buf(), tensors, metadata: BTreeMap::new() })
    }

    /// A tensor that must exist with the given shape (buffers, extra parameters).
    pub fn get(&self, key: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.tensors.get(key).ok_or_else(|| Error::MissingKey {
            path: self.path.clone(),
            key: key.to_string(),
            expected: shape.to_vec(),
        })?;
        if t.dims() != shape {
            return Err(Error::ShapeMismatch {
                path: self.path.clone(),
                key: key.to_string(),
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(t.clone())
    }

    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    /// Keep only the keys starting with `prefix`, with the prefix removed.
    pub fn strip_prefix(&self, prefix: &str) -> Self {
        Self {
            path: self.path.clone(),
            tensors: self
                .tensors
                .iter()
                .filter_map(|(k, v)| k.strip_prefix(prefix).map(|s| (s.to_string(), v.clone())))
                .collect(),
            metadata: self.metadata.clone(),
        }
    }
}

/// Write tensors and string metadata to a safetensors file, atomically.
pub fn save_safetensors(
    path: impl AsRef<Path>,
    tensors: &HashMap<String, Tensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let path = path.as_ref();
    // safetensors wants contiguous CPU data.
    let mut cpu: Vec<(String, Tensor)> = Vec::with_capacity(tensors.len());
    for (k, t) in tensors {
        cpu.push((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?));
    }
    cpu.sort_by(|a, b| a.0.cmp(&b.0));
    let meta: HashMap<String, String> = metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let bytes = safetensors::tensor::serialize(
        cpu.iter().map(|(k, t)| (k.as_str(), t)),
        Some(meta),
    )
    .map_err(|e| Error::bad_file(path, format!("cannot serialise tensors: {e}")))?;
    crate::util::atomic_write(path, &bytes)
}

/// The tensors of a `VarMap` by name.
pub fn varmap_tensors(varmap: &VarMap) -> HashMap<String, Tensor> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    data.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect()
}

/// How strictly [`load_into_varmap`] treats differences between file and model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Model variables that may be absent from the file: they keep their fresh initialisation
    /// and are reported in [`LoadReport::fresh`]. An entry matches a name equal to it or
    /// starting with it (a prefix).
    pub allow_missing: Vec<String>,
    /// File keys that are expected and ignored (buffers such as `quantize.codebook_used`);
    /// same matching as `allow_missing`.
    pub ignore: Vec<String>,
    /// Fail on file keys the model does not use (after `ignore`).
    pub strict_unexpected: bool,
}

/// What [`load_into_varmap`] did.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub loaded: Vec<String>,
    /// Variables absent from the file, left freshly initialised.
    pub fresh: Vec<String>,
    /// File keys the model did not use (non-strict mode).
    pub unused: Vec<String>,
}

fn matches_any(name: &str, patterns: &[String]) -> bool {
    patterns.iter().any(|p| name == p || name.starts_with(p.as_str()))
}

/// Set every variable of `varmap` from `file`, converting dtype and device. A missing key
/// (not allowed by `opts`) or a shape mismatch is an error naming the key and both shapes,
/// and leaves both untouched. Each loaded tensor is taken out of `file` once copied, so that
/// it is freed at once: loading holds about one copy of the weights, not two (the file's and
/// the model's). The unused tensors stay in `file`.
pub fn load_into_varmap(varmap: &VarMap, file: &mut TensorFile, opts: &LoadOptions) -> Result<LoadReport> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut report = LoadReport::default();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    // Check everything first so that a failed load leaves the model untouched.
    for name in &names {
        let var = &data[*name];
        match file.tensors.get(*name) {
            None if matches_any(name, &opts.allow_missing) => {}
            None => {
                return Err(Error::MissingKey {
                    path: file.path.clone(),
                    key: (*name).clone(),
                    expected: var.dims().to_vec(),
                })
            }
            Some(t) if t.dims() != var.dims() => {
                return Err(Error::ShapeMismatch {
                    path: file.path.clone(),
                    key: (*name).clone(),
                    expected: var.dims().to_vec(),
                    found: t.dims().to_vec(),
                })
            }
            Some(_) => {}
        }
    }
    let mut unused: Vec<String> = file
        .tensors
        .keys()
        .filter(|k| !data.contains_key(*k) && !matches_any(k, &opts.ignore))
        .cloned()
        .collect();
    unused.sort();
    if opts.strict_unexpected && !unused.is_empty() {
        return Err(Error::UnexpectedKeys {
            path: file.path.clone(),
            keys: unused,
        });
    }
    for name in names {
        let var = &data[name];
        match file.tensors.remove(name) {
            Some(t) => {
                let t = t.to_dtype(var.dtype())?.to_device(var.device())?;
                var.set(&t)?;
                report.loaded.push(name.clone());
            }
            None => report.fresh.push(name.clone()),
        }
    }
    report.unused = unused;
    Ok(report)
}

/// Convert every tensor to `dtype` (e.g. to f32 on CPU after reading a bf16 checkpoint).
pub fn to_dtype(tensors: &HashMap<String, Tensor>, dtype: DType) -> Result<HashMap<String, Tensor>> {
    tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_dtype(dtype)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarBuilder;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tokenar-weights-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn model(vm: &VarMap) {
        let vb = VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu);
        vb.get((2, 3), "a.weight").unwrap();
        vb.get(4, "b.bias").unwrap();
    }

    #[test]
    fn safetensors_round_trip_with_metadata() {
        let d = tmpdir("st");
        let p = d.join("x.safetensors");
        let mut t = HashMap::new();
        t.insert("a.weight".to_string(), Tensor::arange(0f32, 6., &Device::Cpu).unwrap().reshape((2, 3)).unwrap());
        let mut m = BTreeMap::new();
        m.insert("family".to_string(), "tokenar".to_string());
        save_safetensors(&p, &t, &m).unwrap();
        let f = TensorFile::load(&p, &Device::Cpu).unwrap();
        assert_eq!(f.metadata, m);
        assert_eq!(f.get("a.weight", &[2, 3]).unwrap().to_vec2::<f32>().unwrap()[1], vec![3., 4., 5.]);
        let e = f.get("a.weight", &[3, 2]).unwrap_err().to_string();
        assert!(e.contains("a.weight") && e.contains("[2, 3]") && e.contains("[3, 2]"), "{e}");
        // Empty, truncated and missing files are errors naming the file.
        let bytes = std::fs::read(&p).unwrap();
        for (name, content) in [("empty", &bytes[..0]), ("cut", &bytes[..bytes.len() - 5])] {
            let q = d.join(format!("{name}.safetensors"));
            std::fs::write(&q, content).unwrap();
            let e = TensorFile::load(&q, &Device::Cpu).err().unwrap().to_string();
            assert!(e.contains(&format!("{name}.safetensors")), "{e}");
        }
        let e = TensorFile::load(&d.join("none.safetensors"), &Device::Cpu).err().unwrap().to_string();
        assert!(e.contains("none.safetensors"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn torch_zip_file_loads_under_model_key() {
        let d = tmpdir("pt");
        let p = d.join("x.pt");
        let a = Tensor::arange(0f32, 6., &Device::Cpu).unwrap().reshape((2, 3)).unwrap();
        let b = Tensor::new(&[1f32, 2., 3., 4.], &Device::Cpu).unwrap();
        torch_zip::write_checkpoint(&p, Some("model"), &[("a.weight", &a), ("b.bias", &b)]).unwrap();
        let f = TensorFile::load(&p, &Device::Cpu).unwrap();
        assert_eq!(f.tensors.len(), 2);
        assert_eq!(f.tensors["a.weight"].to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());

        let vm = VarMap::new();
        model(&vm);
        let r = load_into_varmap(&vm, &mut f.clone(), &LoadOptions::default()).unwrap();
        assert_eq!(r.loaded.len(), 2);
        let got = varmap_tensors(&vm)["b.bias"].to_vec1::<f32>().unwrap();
        assert_eq!(got, vec![1., 2., 3., 4.]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn load_errors_name_key_and_shapes() {
        let d = tmpdir("err");
        let p = d.join("bad.safetensors");
        let mut t = HashMap::new();
        t.insert("a.weight".to_string(), Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap());
        t.insert("b.bias".to_string(), Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap());
        t.insert("extra".to_string(), Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap());
        save_safetensors(&p, &t, &BTreeMap::new()).unwrap();
        let f = TensorFile::load(&p, &Device::Cpu).unwrap();
        let vm = VarMap::new();
        model(&vm);
        let e = load_into_varmap(&vm, &mut f.clone(), &LoadOptions::default()).unwrap_err().to_string();
        assert!(e.contains("a.weight") && e.contains("[3, 2]") && e.contains("[2, 3]"), "{e}");

        let mut good = f.clone();
        good.tensors.insert("a.weight".into(), Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap());
        let strict = LoadOptions { strict_unexpected: true, ..Default::default() };
        let e = load_into_varmap(&vm, &mut good, &strict).unwrap_err().to_string();
        assert!(e.contains("extra"), "{e}");
        assert_eq!(good.tensors.len(), 3, "a failed load takes nothing");
        let ok = LoadOptions { strict_unexpected: true, ignore: vec!["extra".into()], ..Default::default() };
        let mut taken = good.clone();
        load_into_varmap(&vm, &mut taken, &ok).unwrap();
        // The loaded tensors are taken out (freed once copied); the unused one stays.
        assert_eq!(taken.tensors.keys().collect::<Vec<_>>(), ["extra"]);

        good.tensors.remove("b.bias");
        let e = load_into_varmap(&vm, &mut good, &LoadOptions::default()).unwrap_err().to_string();
        assert!(e.contains("missing key `b.bias`"), "{e}");
        let lenient = LoadOptions { allow_missing: vec!["b.".into()], ..Default::default() };
        let r = load_into_varmap(&vm, &mut good, &lenient).unwrap();
        assert_eq!(r.fresh, vec!["b.bias".to_string()]);
        assert_eq!(r.unused, vec!["extra".to_string()]);

        let missing = TensorFile::load(d.join("nope.pt"), &Device::Cpu).unwrap_err().to_string();
        assert!(missing.contains("nope.pt"), "{missing}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A pickle string (BINUNICODE).
    fn pstr(out: &mut Vec<u8>, s: &str) {
        out.push(b'X');
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    /// `{"model": {"w": tensor of `dims` over a FloatStorage of `numel` values}}` with `stored`
    /// bytes in the storage entry: a crafted `.pt` of a few hundred bytes.
    fn crafted_pt(dims: &[u64], numel: u64, stored: usize) -> Vec<u8> {
        zip_pt(&crafted_pkl(dims, numel, "model"), stored)
    }

    fn crafted_pkl(dims: &[u64], numel: u64, key: &str) -> Vec<u8> {
        let mut p = vec![0x80, 2, b'}'];
        pstr(&mut p, key);
        p.extend_from_slice(b"ccollections\nOrderedDict\n)R(");
        pstr(&mut p, "w");
        p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n((");
        pstr(&mut p, "storage");
        p.extend_from_slice(b"ctorch\nFloatStorage\n");
        pstr(&mut p, "0");
        pstr(&mut p, "cpu");
        let long = |p: &mut Vec<u8>, v: u64| {
            p.extend_from_slice(&[0x8a, 8]);
            p.extend_from_slice(&v.to_le_bytes());
        };
        long(&mut p, numel);
        p.extend_from_slice(b"tQK\x00(");
        for &d in dims {
            long(&mut p, d);
        }
        p.push(b't');
        p.push(b'(');
        let mut stride = 1u64;
        let mut strides = vec![0u64; dims.len()];
        for (i, &d) in dims.iter().enumerate().rev() {
            strides[i] = stride;
            stride = stride.wrapping_mul(d);
        }
        for s in strides {
            long(&mut p, s);
        }
        p.extend_from_slice(b"t\x89ccollections\nOrderedDict\n)RtRus.");
        p
    }

    /// A torch zip archive of `pkl` and one storage entry of `stored` zero bytes.
    fn zip_pt(p: &[u8], stored: usize) -> Vec<u8> {
        let mut buf = std::io::Cursor::new(Vec::new());
        {
            use std::io::Write;
            let mut zip = zip::ZipWriter::new(&mut buf);
            let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
            zip.start_file("archive/data.pkl", opts).unwrap();
            zip.write_all(p).unwrap();
            zip.start_file("archive/data/0", opts).unwrap();
            zip.write_all(&vec![0u8; stored]).unwrap();
            zip.finish().unwrap();
        }
        buf.into_inner()
    }

    #[test]
    fn crafted_torch_files_are_errors_not_aborts() {
        let d = tmpdir("crafted");
        // A tensor of 2^20 x 2^20 floats (4 TiB) declared by a file of a few hundred bytes.
        let p = d.join("bomb.pt");
        let bytes = crafted_pt(&[1 << 20, 1 << 20], 1 << 40, 16);
        assert!(bytes.len() < 1024, "{}", bytes.len());
        std::fs::write(&p, &bytes).unwrap();
        let e = TensorFile::load(&p, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("bomb.pt") && e.contains("tensor `w`") && e.contains("the file holds 16 bytes"), "{e}");
        // The storage itself is smaller than the tensor.
        let e = TensorFile::from_torch_bytes("small.pt", &crafted_pt(&[4, 4], 8, 64), &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("storage holds 8"), "{e}");
        // Sizes whose product overflows.
        let e = TensorFile::from_torch_bytes("big.pt", &crafted_pt(&[1 << 40, 1 << 40], 1 << 62, 64), &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("overflow"), "{e}");
        // A good one of the same making reads.
        let f = TensorFile::from_torch_bytes("ok.pt", &crafted_pt(&[2, 2], 4, 16), &Device::Cpu).unwrap();
        assert_eq!(f.tensors["w"].dims(), &[2, 2]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn torch_file_errors_say_what_is_wrong() {
        // Not a zip at all.
        let e = TensorFile::from_torch_bytes("a.pt", b"hello", &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("a.pt") && e.contains("not a PyTorch checkpoint"), "{e}");
        // A zip without data.pkl.
        let mut buf = std::io::Cursor::new(Vec::new());
        {
            let mut zip = zip::ZipWriter::new(&mut buf);
            zip.start_file("x.txt", zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored)).unwrap();
            zip.finish().unwrap();
        }
        let e = TensorFile::from_torch_bytes("b.pt", buf.get_ref(), &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("no data.pkl"), "{e}");
        // A valid pickle holding no tensors says what it holds instead of a missing key.
        let pt = zip_pt(&crafted_pkl(&[2, 2], 4, "other"), 16);
        let e = TensorFile::from_torch_bytes("c.pt", &pt, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("no tensors found") && e.contains("a dict of 1 entries") && !e.contains("key ema not found"), "{e}");
        // A broken pickle names the opcode and its position.
        let mut pkl = crafted_pkl(&[2, 2], 4, "model");
        let at = pkl.windows(5).position(|w| w == b"model").unwrap();
        pkl[at - 5] = 0xff;
        let e = TensorFile::from_torch_bytes("d.pt", &zip_pt(&pkl, 16), &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("d.pt") && e.contains("opcode"), "{e}");
    }
}
