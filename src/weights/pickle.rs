//! Reading PyTorch zip checkpoints (`torch.save`: `archive/data.pkl` plus one zip entry per
//! storage) without executing any pickle code, and without trusting any size the file states.
//!
//! The pickle program is run by a small stack machine that knows the opcodes `torch.save`
//! emits (protocols 2 to 5) and builds plain values; a call (`REDUCE`) of anything but the
//! tensor rebuilders and `OrderedDict` becomes an opaque object, so nothing is imported or run.
//! Every length is checked against the bytes actually there before anything is allocated, the
//! nesting depth and the work of copying memoised values are bounded (a few hundred bytes of
//! pickle cannot expand to gigabytes), and a tensor is read only once its size fits both its
//! storage and the bytes the archive really holds for that storage, and the memory available.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::io::{Read, Seek};
use std::path::Path;

/// Largest `data.pkl` read (bytes); a LlamaGen XL checkpoint with its optimiser state has a
/// few MB.
pub const MAX_PICKLE_BYTES: u64 = 256 << 20;
/// Deepest nesting of containers accepted.
const MAX_DEPTH: u32 = 200;
/// Most value nodes built, copies from the memo included, per byte of pickle (plus a constant).
const NODES_PER_BYTE: u64 = 16;

/// A value of the pickle program.
#[derive(Clone, Debug)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float,
    Str(String),
    Bytes(Vec<u8>),
    Global { module: String, name: String },
    /// Tuple or list (`list` tells which) with its node count and nesting depth.
    Seq { items: Vec<Value>, list: bool, size: u64, depth: u32 },
    Dict { items: Vec<(Value, Value)>, size: u64, depth: u32 },
    /// A persistent storage reference: `('storage', torch.<T>Storage, key, location, numel)`.
    Storage { key: String, dtype: DType, numel: u64 },
    Tensor(TensorRef),
    /// The result of calling something this reader does not run.
    Object { what: String, size: u64, depth: u32 },
    Mark,
}

/// Where a tensor's values are: a storage entry of the archive, an offset and a layout.
#[derive(Clone, Debug)]
struct TensorRef {
    storage: String,
    dtype: DType,
    storage_numel: u64,
    offset: u64,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

impl Value {
    fn size(&self) -> u64 {
        match self {
            Value::Str(s) => 1 + s.len() as u64 / 16,
            Value::Bytes(b) => 1 + b.len() as u64 / 16,
            Value::Seq { size, .. } | Value::Dict { size, .. } | Value::Object { size, .. } => *size,
            Value::Tensor(t) => 1 + t.shape.len() as u64,
            _ => 1,
        }
    }

    fn depth(&self) -> u32 {
        match self {
            Value::Seq { depth, .. } | Value::Dict { depth, .. } | Value::Object { depth, .. } => *depth,
            _ => 0,
        }
    }

    fn kind(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "a bool".into(),
            Value::Int(_) => "an int".into(),
            Value::Float => "a float".into(),
            Value::Str(_) => "a string".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::Global { module, name } => format!("the name {module}.{name}"),
            Value::Seq { list: true, items, .. } => format!("a list of {}", items.len()),
            Value::Seq { items, .. } => format!("a tuple of {}", items.len()),
            Value::Dict { items, .. } => format!("a dict of {} entries", items.len()),
            Value::Storage { .. } => "a storage".into(),
            Value::Tensor(_) => "a tensor".into(),
            Value::Object { what, .. } => format!("a {what} object"),
            Value::Mark => "a mark".into(),
        }
    }

    fn seq(items: Vec<Value>, list: bool) -> Result<Value, String> {
        let (size, depth) = sum_meta(items.iter())?;
        Ok(Value::Seq { items, list, size, depth })
    }

    fn dict(items: Vec<(Value, Value)>) -> Result<Value, String> {
        let (size, depth) = sum_meta(items.iter().flat_map(|(k, v)| [k, v]))?;
        Ok(Value::Dict { items, size, depth })
    }

    fn int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }
}

/// Node count and depth of a container holding `items`.
fn sum_meta<'a>(items: impl Iterator<Item = &'a Value>) -> Result<(u64, u32), String> {
    let (mut size, mut depth) = (1u64, 0u32);
    for v in items {
        size = size.saturating_add(v.size());
        depth = depth.max(v.depth());
    }
    let depth = depth + 1;
    if depth > MAX_DEPTH {
        return Err(format!("values nested deeper than {MAX_DEPTH} levels"));
    }
    Ok((size, depth))
}

/// The stack machine over the bytes of `data.pkl`.
struct Machine<'a> {
    bytes: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
    /// Nodes still allowed to be built (copies from the memo count).
    budget: u64,
}

impl<'a> Machine<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0, stack: Vec::new(), memo: HashMap::new(), budget: 4096 + bytes.len() as u64 * NODES_PER_BYTE }
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], String> {
        let left = (self.bytes.len() - self.pos) as u64;
        if n > left {
            return Err(format!("a length of {n} bytes at byte {} runs past the end ({left} bytes left)", self.pos));
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64)?);
        Ok(a)
    }

    fn line(&mut self) -> Result<String, String> {
        let rest = &self.bytes[self.pos..];
        let end = rest.iter().position(|&b| b == b'\n').ok_or("a line without its newline")?;
        let s = std::str::from_utf8(&rest[..end]).map_err(|_| "a name that is not UTF-8")?.to_string();
        self.pos += end + 1;
        Ok(s)
    }

    fn text(&mut self, n: u64) -> Result<String, String> {
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| "a string that is not UTF-8".to_string())
    }

    fn charge(&mut self, v: &Value) -> Result<(), String> {
        let s = v.size();
        if s > self.budget {
            return Err("the pickle expands to too many values (memoised values copied too often)".into());
        }
        self.budget -= s;
        Ok(())
    }

    /// Push a value made by one opcode: a new container counts as one node (its items were
    /// counted when they were made), a leaf as its size. Copies ([`Self::memo_get`], DUP)
    /// count in full.
    fn push(&mut self, v: Value) -> Result<(), String> {
        match v {
            Value::Seq { .. } | Value::Dict { .. } | Value::Object { .. } => self.charge(&Value::None)?,
            _ => self.charge(&v)?,
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> Result<Value, String> {
        match self.stack.pop() {
            Some(Value::Mark) => Err("a mark where a value was expected".into()),
            Some(v) => Ok(v),
            None => Err("the stack is empty".into()),
        }
    }

    fn top(&mut self) -> Result<&mut Value, String> {
        match self.stack.last_mut() {
            Some(Value::Mark) | None => Err("no value on the stack".into()),
            Some(v) => Ok(v),
        }
    }

    fn pop_to_mark(&mut self) -> Result<Vec<Value>, String> {
        let m = self.stack.iter().rposition(|v| matches!(v, Value::Mark)).ok_or("no mark on the stack")?;
        let items = self.stack.split_off(m + 1);
        self.stack.pop();
        Ok(items)
    }

    fn memo_put(&mut self, id: u32) -> Result<(), String> {
        let v = self.top()?.clone();
        self.charge(&v)?;
        self.memo.insert(id, v);
        Ok(())
    }

    fn memo_get(&mut self, id: u32) -> Result<(), String> {
        let v = self.memo.get(&id).cloned().ok_or_else(|| format!("memo entry {id} was never stored"))?;
        self.charge(&v)?;
        self.stack.push(v);
        Ok(())
    }

    /// Extend the dict (or opaque object) on top of the stack with `pairs`.
    fn set_items(&mut self, pairs: Vec<Value>) -> Result<(), String> {
        if pairs.len() % 2 != 0 {
            return Err("an odd number of values for dict items".into());
        }
        match self.top()? {
            Value::Dict { items, .. } => {
                let mut it = pairs.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    items.push((k, v));
                }
            }
            Value::Object { .. } => {}
            other => return Err(format!("dict items set on {}", other.kind())),
        }
        self.refresh_top()
    }

    /// Extend the list (or opaque object) on top of the stack with `values`.
    fn append(&mut self, values: Vec<Value>) -> Result<(), String> {
        match self.top()? {
            Value::Seq { items, list: true, .. } => items.extend(values),
            Value::Object { .. } => {}
            other => return Err(format!("items appended to {}", other.kind())),
        }
        self.refresh_top()
    }

    /// Recompute the size and depth of the container on top after it grew.
    fn refresh_top(&mut self) -> Result<(), String> {
        let v = self.stack.pop().ok_or("the stack is empty")?;
        let v = match v {
            Value::Dict { items, .. } => Value::dict(items)?,
            Value::Seq { items, list, .. } => Value::seq(items, list)?,
            v => v,
        };
        self.stack.push(v);
        Ok(())
    }

    fn run(mut self) -> Result<Value, String> {
        loop {
            let at = self.pos;
            let op = self.u8().map_err(|_| "the pickle ends without its STOP opcode".to_string())?;
            let step = self.step(op);
            match step {
                Ok(true) => return self.pop(),
                Ok(false) => {}
                Err(e) => return Err(format!("{e} (opcode 0x{op:02x} at byte {at})")),
            }
        }
    }

    /// One opcode; `Ok(true)` at STOP.
    fn step(&mut self, op: u8) -> Result<bool, String> {
        match op {
            0x80 => {
                let p = self.u8()?;
                if p > 5 {
                    return Err(format!("pickle protocol {p} is not supported (0 to 5)"));
                }
            }
            0x95 => {
                self.le::<8>()?;
            }
            b'.' => return Ok(true),
            b'(' => self.stack.push(Value::Mark),
            b'}' => self.push(Value::dict(Vec::new())?)?,
            b']' => self.push(Value::seq(Vec::new(), true)?)?,
            b')' => self.push(Value::seq(Vec::new(), false)?)?,
            b't' => {
                let items = self.pop_to_mark()?;
                self.push(Value::seq(items, false)?)?
            }
            b'l' => {
                let items = self.pop_to_mark()?;
                self.push(Value::seq(items, true)?)?
            }
            b'd' => {
                let items = self.pop_to_mark()?;
                self.push(Value::dict(Vec::new())?)?;
                self.set_items(items)?
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if self.stack.len() < n {
                    return Err("too few values for a tuple".into());
                }
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                items.reverse();
                self.push(Value::seq(items, false)?)?
            }
            b'N' => self.push(Value::None)?,
            0x88 => self.push(Value::Bool(true))?,
            0x89 => self.push(Value::Bool(false))?,
            b'J' => {
                let v = i32::from_le_bytes(self.le()?);
                self.push(Value::Int(v as i64))?
            }
            b'K' => {
                let v = self.u8()?;
                self.push(Value::Int(v as i64))?
            }
            b'M' => {
                let v = u16::from_le_bytes(self.le()?);
                self.push(Value::Int(v as i64))?
            }
            0x8a | 0x8b => {
                let n = if op == 0x8a { self.u8()? as u64 } else { u32::from_le_bytes(self.le()?) as u64 };
                if n > 8 {
                    return Err(format!("an integer of {n} bytes (at most 8 are supported)"));
                }
                let b = self.take(n)?;
                let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) { [0xFFu8; 8] } else { [0u8; 8] };
                buf[..b.len()].copy_from_slice(b);
                self.push(Value::Int(i64::from_le_bytes(buf)))?
            }
            b'G' => {
                // Floats (a learning rate, ...) are never part of a tensor's description.
                self.le::<8>()?;
                self.push(Value::Float)?
            }
            b'X' | 0x8c | 0x8d | b'T' | b'U' => {
                let n = match op {
                    b'X' => u32::from_le_bytes(self.le()?) as u64,
                    0x8d => u64::from_le_bytes(self.le()?),
                    b'T' => {
                        let n = i32::from_le_bytes(self.le()?);
                        u64::try_from(n).map_err(|_| format!("a negative string length {n}"))?
                    }
                    _ => self.u8()? as u64,
                };
                let s = self.text(n)?;
                self.push(Value::Str(s))?
            }
            b'B' | b'C' | 0x8e => {
                let n = match op {
                    b'B' => u32::from_le_bytes(self.le()?) as u64,
                    0x8e => u64::from_le_bytes(self.le()?),
                    _ => self.u8()? as u64,
                };
                let b = self.take(n)?.to_vec();
                self.push(Value::Bytes(b))?
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.push(Value::Global { module, name })?
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                match (module, name) {
                    (Value::Str(module), Value::Str(name)) => self.push(Value::Global { module, name })?,
                    _ => return Err("STACK_GLOBAL needs two strings".into()),
                }
            }
            b'q' => {
                let id = self.u8()? as u32;
                self.memo_put(id)?
            }
            b'r' => {
                let id = u32::from_le_bytes(self.le()?);
                self.memo_put(id)?
            }
            0x94 => {
                let id = self.memo.len() as u32;
                self.memo_put(id)?
            }
            b'h' => {
                let id = self.u8()? as u32;
                self.memo_get(id)?
            }
            b'j' => {
                let id = u32::from_le_bytes(self.le()?);
                self.memo_get(id)?
            }
            b'Q' => {
                let pid = self.pop()?;
                self.push(persistent_load(pid)?)?
            }
            b'R' | 0x81 => {
                let args = self.pop()?;
                let callable = self.pop()?;
                self.push(call(callable, args)?)?
            }
            b'b' => {
                // BUILD sets an object's state; state dicts carry only `_metadata` this way.
                self.pop()?;
                self.top()?;
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.set_items(vec![k, v])?
            }
            b'u' => {
                let items = self.pop_to_mark()?;
                self.set_items(items)?
            }
            b'a' => {
                let v = self.pop()?;
                self.append(vec![v])?
            }
            b'e' => {
                let items = self.pop_to_mark()?;
                self.append(items)?
            }
            b'0' => {
                self.stack.pop().ok_or("the stack is empty")?;
            }
            b'1' => {
                self.pop_to_mark()?;
            }
            b'2' => {
                let v = self.top()?.clone();
                self.charge(&v)?;
                self.stack.push(v)
            }
            other => return Err(format!("unsupported pickle opcode 0x{other:02x}")),
        }
        Ok(false)
    }
}

fn storage_dtype(name: &str) -> Option<DType> {
    Some(match name {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "ByteStorage" | "BoolStorage" => DType::U8,
        "ShortStorage" => DType::I16,
        "IntStorage" => DType::I32,
        "LongStorage" => DType::I64,
        _ => return None,
    })
}

fn persistent_load(pid: Value) -> Result<Value, String> {
    let Value::Seq { items, .. } = pid else {
        return Err(format!("a persistent id that is {}, not a storage tuple", pid.kind()));
    };
    match items.as_slice() {
        [Value::Str(tag), Value::Global { name, .. }, Value::Str(key), _location, numel] if tag == "storage" => {
            let dtype = storage_dtype(name).ok_or_else(|| format!("unsupported storage type {name}"))?;
            let numel = numel.int().and_then(|n| u64::try_from(n).ok()).ok_or("a storage size that is not a non-negative integer")?;
            Ok(Value::Storage { key: key.clone(), dtype, numel })
        }
        _ => Err("a persistent id that is not ('storage', type, key, location, size)".into()),
    }
}

fn usize_tuple(v: &Value, what: &str) -> Result<Vec<usize>, String> {
    match v {
        Value::Seq { items, .. } => items
            .iter()
            .map(|x| x.int().and_then(|i| usize::try_from(i).ok()).ok_or_else(|| format!("tensor {what} holds {}, not a size", x.kind())))
            .collect(),
        other => Err(format!("tensor {what} is {}, not a tuple", other.kind())),
    }
}

/// A `REDUCE` / `NEWOBJ`: tensor rebuilders and `OrderedDict` are understood; anything else
/// becomes an opaque object (nothing is run).
fn call(callable: Value, args: Value) -> Result<Value, String> {
    let Value::Global { module, name } = &callable else {
        return Err(format!("a call of {}, not of a name", callable.kind()));
    };
    let arg_items = match &args {
        Value::Seq { items, .. } => items.as_slice(),
        _ => &[],
    };
    match (module.as_str(), name.as_str()) {
        ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
            let [Value::Storage { key, dtype, numel }, offset, size, stride, ..] = arg_items else {
                return Err(format!("{module}.{name} called without (storage, offset, size, stride)"));
            };
            let offset = offset.int().and_then(|o| u64::try_from(o).ok()).ok_or("a tensor offset that is not a non-negative integer")?;
            let shape = usize_tuple(size, "size")?;
            let stride = usize_tuple(stride, "stride")?;
            if shape.len() != stride.len() {
                return Err(format!("tensor size {shape:?} and stride {stride:?} differ in length"));
            }
            Ok(Value::Tensor(TensorRef { storage: key.clone(), dtype: *dtype, storage_numel: *numel, offset, shape, stride }))
        }
        ("torch._utils", "_rebuild_parameter") | ("torch._utils", "_rebuild_parameter_with_state") => match arg_items.first() {
            Some(t @ Value::Tensor(_)) => Ok(t.clone()),
            _ => Err(format!("{module}.{name} called without a tensor")),
        },
        ("collections", "OrderedDict") => Value::dict(Vec::new()),
        _ => {
            let (size, depth) = sum_meta([&args].into_iter())?;
            Ok(Value::Object { what: format!("{module}.{name}"), size, depth })
        }
    }
}

/// Run a pickle program (the bytes of `data.pkl`) and describe what it builds.
pub fn describe_pickle(bytes: &[u8]) -> std::result::Result<String, String> {
    Machine::new(bytes).run().map(|v| v.kind())
}

/// The tensors of a torch zip archive held by `reader` (`total_len` bytes). The state dict is
/// looked for under `keys` in order, then at the top level. `label` names the source in
/// errors.
pub fn read_torch_zip<R: Read + Seek>(label: &Path, reader: R, total_len: u64, keys: &[&str], device: &Device) -> Result<HashMap<String, Tensor>> {
    let bad = |msg: String| Error::bad_file(label, msg);
    let mut zip = zip::ZipArchive::new(reader).map_err(|e| bad(format!("not a PyTorch checkpoint (a zip archive): {e}")))?;
    let mut pkl_name = None;
    for name in zip.file_names() {
        let name = name.map_err(|e| bad(format!("zip entry name: {e}")))?;
        if name == "data.pkl" || name.ends_with("/data.pkl") {
            pkl_name = Some(name.into_owned());
            break;
        }
    }
    let pkl_name = pkl_name.ok_or_else(|| bad("not a PyTorch checkpoint: the zip archive has no data.pkl".into()))?;
    let dir = pkl_name.strip_suffix("data.pkl").unwrap_or_default().to_string();
    let pkl = {
        let f = zip.by_name(&pkl_name).map_err(|e| bad(format!("{pkl_name}: {e}")))?;
        if f.size() > MAX_PICKLE_BYTES || f.size() > total_len {
            return Err(bad(format!("{pkl_name} declares {} bytes (at most {MAX_PICKLE_BYTES}, and the file has {total_len})", f.size())));
        }
        let mut buf = Vec::new();
        f.take(MAX_PICKLE_BYTES).read_to_end(&mut buf).map_err(|e| bad(format!("{pkl_name}: {e}")))?;
        buf
    };
    let root = Machine::new(&pkl).run().map_err(|e| bad(format!("{pkl_name} is not a readable checkpoint pickle: {e}")))?;
    let (where_, entries) = find_state_dict(&root, keys).ok_or_else(|| {
        bad(format!(
            "no tensors found: the checkpoint holds {} (looked for a state dict under {} and at the top level)",
            root.kind(),
            keys.join(", ")
        ))
    })?;
    // Check every tensor against its storage, the archive and the memory before reading any.
    let mut total: u64 = 0;
    let mut plan = Vec::with_capacity(entries.len());
    for (name, t) in entries {
        let (start, len) = extent(&name, t).map_err(|m| bad(format!("{where_}tensor `{name}`: {m}")))?;
        let entry = format!("{dir}data/{}", t.storage);
        let f = zip.by_name(&entry).map_err(|e| bad(format!("tensor `{name}`: storage `{entry}`: {e}")))?;
        // Entries are stored uncompressed (torch.save; this build reads no other method), so
        // the bytes held for a storage are its stored size, within the file's.
        let held = f.size().min(f.compressed_size()).min(total_len);
        let need = start.checked_add(len).ok_or_else(|| bad(format!("tensor `{name}`: size overflows")))?;
        if need > held {
            return Err(bad(format!(
                "tensor `{name}` {:?} needs {need} bytes of storage `{}` but the file holds {held} bytes for it",
                t.shape, t.storage
            )));
        }
        total = total.saturating_add(len);
        plan.push((name, t, entry, start, len));
    }
    crate::util::check_memory(&format!("{}: tensors", label.display()), total)?;
    let mut out = HashMap::with_capacity(plan.len());
    for (name, t, entry, start, len) in plan {
        let f = zip.by_name(&entry).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        let mut r = f.take(start + len);
        std::io::copy(&mut (&mut r).take(start), &mut std::io::sink()).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        let mut buf = vec![0u8; len as usize];
        r.read_exact(&mut buf).map_err(|e| bad(format!("tensor `{name}`: storage `{entry}` is cut short: {e}")))?;
        let fortran = !is_c_contiguous(&t.shape, &t.stride);
        let dims: Vec<usize> = if fortran { t.shape.iter().rev().copied().collect() } else { t.shape.clone() };
        let mut x = Tensor::from_raw_buffer(&buf, t.dtype, &dims, &Device::Cpu)?;
        drop(buf);
        if fortran && dims.len() > 1 {
            let rev: Vec<usize> = (0..dims.len()).rev().collect();
            x = x.permute(rev)?.contiguous()?;
        }
        out.insert(name, x.to_device(device)?);
    }
    Ok(out)
}

fn is_c_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expect = 1usize;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d > 1 && s != expect {
            return false;
        }
        expect = expect.saturating_mul(d);
    }
    true
}

fn is_f_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expect = 1usize;
    for (&d, &s) in shape.iter().zip(stride) {
        if d > 1 && s != expect {
            return false;
        }
        expect = expect.saturating_mul(d);
    }
    true
}

/// Byte offset and byte length of a tensor in its storage, checked against the storage's
/// declared size (no overflow, no reading past it).
fn extent(name: &str, t: &TensorRef) -> std::result::Result<(u64, u64), String> {
    let _ = name;
    if !is_c_contiguous(&t.shape, &t.stride) && !is_f_contiguous(&t.shape, &t.stride) {
        return Err(format!("size {:?} with stride {:?} is not contiguous (not supported)", t.shape, t.stride));
    }
    let numel = t.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64)).ok_or_else(|| format!("size {:?} overflows", t.shape))?;
    let end = t.offset.checked_add(numel).ok_or("offset + size overflows")?;
    if end > t.storage_numel {
        return Err(format!(
            "size {:?} at offset {} needs {end} values but its storage holds {}",
            t.shape, t.offset, t.storage_numel
        ));
    }
    let es = t.dtype.size_in_bytes() as u64;
    let start = t.offset.checked_mul(es).ok_or("offset overflows")?;
    let len = numel.checked_mul(es).ok_or("byte size overflows")?;
    if len > isize::MAX as u64 {
        return Err(format!("{len} bytes cannot be held in memory"));
    }
    Ok((start, len))
}

/// The tensors of the state dict: under the first of `keys` that holds tensors, else the top
/// level. Returns a label for errors ("under `model`: ") and the named tensors.
fn find_state_dict<'v>(root: &'v Value, keys: &[&str]) -> Option<(String, Vec<(String, &'v TensorRef)>)> {
    let tensors = |v: &'v Value| -> Vec<(String, &'v TensorRef)> {
        match v {
            Value::Dict { items, .. } => items
                .iter()
                .filter_map(|(k, v)| match (k, v) {
                    (Value::Str(k), Value::Tensor(t)) => Some((k.clone(), t)),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    };
    if let Value::Dict { items, .. } = root {
        for key in keys {
            if let Some((_, v)) = items.iter().find(|(k, _)| matches!(k, Value::Str(s) if s == key)) {
                let t = tensors(v);
                if !t.is_empty() {
                    return Some((format!("under `{key}`: "), t));
                }
            }
        }
    }
    let t = tensors(root);
    (!t.is_empty()).then(|| (String::new(), t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crafted_pickles_are_errors() {
        // Tuples nested deeper than allowed (each `(` ... `t` wraps the last).
        let mut deep = vec![0x80, 2, b'N'];
        for _ in 0..1000 {
            deep.extend_from_slice(&[0x85]);
        }
        deep.push(b'.');
        let e = describe_pickle(&deep).unwrap_err();
        assert!(e.contains("nested deeper"), "{e}");
        // A memoised list doubled again and again (a "billion laughs").
        let mut laughs = vec![0x80, 2, b']', b'q', 0];
        for _ in 0..64 {
            laughs.extend_from_slice(&[b'h', 0, b'h', 0, 0x86, b'q', 0, b'0']);
        }
        laughs.extend_from_slice(&[b'h', 0, b'.']);
        let e = describe_pickle(&laughs).unwrap_err();
        assert!(e.contains("too many values") || e.contains("nested deeper"), "{e}");
        // A string longer than the pickle, an empty stack, a missing STOP, an unknown opcode.
        for bad in [&b"\x80\x02X\xff\xff\xff\xff"[..], b"\x80\x02t.", b"\x80\x02N", b"\x80\x02\xff.", b"\x80\x02R."] {
            assert!(describe_pickle(bad).is_err(), "{bad:?}");
        }
        assert_eq!(describe_pickle(b"\x80\x02}q\x00(X\x01\x00\x00\x00aK\x01u.").unwrap(), "a dict of 1 entries");
    }

    #[test]
    fn extent_checks_the_storage() {
        let t = |shape: Vec<usize>, stride: Vec<usize>, offset, numel| TensorRef { storage: "0".into(), dtype: DType::F32, storage_numel: numel, offset, shape, stride };
        assert_eq!(extent("a", &t(vec![2, 3], vec![3, 1], 1, 7)).unwrap(), (4, 24));
        assert!(extent("a", &t(vec![2, 3], vec![3, 1], 2, 7)).unwrap_err().contains("storage holds 7"));
        assert!(extent("a", &t(vec![1 << 40, 1 << 40], vec![1 << 40, 1], 0, u64::MAX)).is_err());
        assert!(extent("a", &t(vec![2, 3], vec![1, 2], 0, 6)).is_ok(), "Fortran order");
        assert!(extent("a", &t(vec![2, 3], vec![6, 2], 0, 12)).unwrap_err().contains("contiguous"));
    }
}
