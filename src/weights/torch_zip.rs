//! Writing minimal PyTorch zip checkpoints (`torch.save` format, pickle protocol 2).
//!
//! The project never writes `.pt` for its own use (safetensors only). This writer exists so
//! that tests and fixtures can produce files with the exact layout of the public LlamaGen,
//! EditAR and TokenAR checkpoints: `{"model": OrderedDict(key -> tensor)}` whose tensors are
//! rebuilt by `torch._utils._rebuild_tensor_v2` from persistent storages in `archive/data/`.

use crate::error::{Error, Result};
use candle_core::{DType, Tensor};
use safetensors::tensor::View;
use std::io::Write;
use std::path::Path;

struct Pickler {
    out: Vec<u8>,
}

impl Pickler {
    fn op(&mut self, b: u8) {
        self.out.push(b);
    }
    fn unicode(&mut self, s: &str) {
        self.op(b'X');
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }
    fn int(&mut self, v: usize) {
        self.op(b'J');
        self.out.extend_from_slice(&(v as i32).to_le_bytes());
    }
    fn global(&mut self, module: &str, name: &str) {
        self.op(b'c');
        self.out.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }
    fn int_tuple(&mut self, v: &[usize]) {
        self.op(b'(');
        for &x in v {
            self.int(x);
        }
        self.op(b't');
    }
    fn ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.op(b')');
        self.op(b'R');
    }
}

fn storage_name(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "FloatStorage",
        DType::F64 => "DoubleStorage",
        DType::F16 => "HalfStorage",
        DType::BF16 => "BFloat16Storage",
        DType::U8 => "ByteStorage",
        DType::I64 => "LongStorage",
        other => return Err(Error::invalid("tensor dtype", format!("{other:?} cannot be written to a .pt file"))),
    })
}

/// Write `tensors` as a torch zip checkpoint. With `outer_key = Some("model")` the state dict
/// is nested as `{"model": state_dict}` like LlamaGen's training checkpoints.
pub fn write_checkpoint(path: impl AsRef<Path>, outer_key: Option<&str>, tensors: &[(&str, &Tensor)]) -> Result<()> {
    let path = path.as_ref();
    let mut p = Pickler { out: vec![0x80, 2] };
    if let Some(k) = outer_key {
        p.op(b'}');
        p.unicode(k);
    }
    p.ordered_dict();
    p.op(b'(');
    let mut storages = Vec::with_capacity(tensors.len());
    for (i, (name, t)) in tensors.iter().enumerate() {
        let t = t.to_device(&candle_core::Device::Cpu)?.contiguous()?;
        let dims = t.dims().to_vec();
        let mut stride = vec![1usize; dims.len()];
        for d in (0..dims.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * dims[d + 1];
        }
        p.unicode(name);
        p.global("torch._utils", "_rebuild_tensor_v2");
        p.op(b'(');
        // persistent id: ('storage', torch.<Type>Storage, key, 'cpu', numel)
        p.op(b'(');
        p.unicode("storage");
        p.global("torch", storage_name(t.dtype())?);
        p.unicode(&i.to_string());
        p.unicode("cpu");
        p.int(t.elem_count());
        p.op(b't');
        p.op(b'Q');
        p.int(0);
        p.int_tuple(&dims);
        p.int_tuple(&stride);
        p.op(0x89); // requires_grad = False
        p.ordered_dict(); // backward hooks
        p.op(b't');
        p.op(b'R');
        storages.push((i.to_string(), (&t).data().into_owned()));
    }
    p.op(b'u');
    if outer_key.is_some() {
        p.op(b's');
    }
    p.op(b'.');

    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut zip = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        let zerr = |e: zip::result::ZipError| Error::bad_file(path, format!("zip: {e}"));
        zip.start_file("archive/data.pkl", opts).map_err(zerr)?;
        zip.write_all(&p.out).map_err(|e| Error::io(path, e))?;
        for (key, bytes) in &storages {
            zip.start_file(format!("archive/data/{key}"), opts).map_err(zerr)?;
            zip.write_all(bytes).map_err(|e| Error::io(path, e))?;
        }
        zip.start_file("archive/version", opts).map_err(zerr)?;
        zip.write_all(b"3\n").map_err(|e| Error::io(path, e))?;
        zip.finish().map_err(zerr)?;
    }
    crate::util::atomic_write(path, &buf.into_inner())
}
