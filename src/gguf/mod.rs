//! GGUF v3, the file format of llama.cpp (ggml's `docs/gguf.md`), write
//! side: a header (magic `GGUF`, version 3, tensor and key counts), typed
//! key/value metadata, one info record per tensor (name, dimensions
//! innermost first, ggml type, offset into the data section), then the
//! tensor data, each tensor starting on an [`ALIGNMENT`]-byte boundary.
//! Everything little-endian.
//!
//! [`export`] maps a checkpoint onto llama.cpp's `gpt2` architecture with
//! the quantized blocks this crate serves, so llama.cpp runs the very
//! numbers `gpt-serve serve` does.

pub mod export;

use std::path::Path;

/// `GGUF` read as a little-endian u32.
pub const MAGIC: &[u8; 4] = b"GGUF";
pub const VERSION: u32 = 3;
/// Data alignment (GGUF's default; written as `general.alignment` too).
pub const ALIGNMENT: usize = 32;

/// ggml tensor types this crate writes (`enum ggml_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q8_0 = 8,
}

/// A metadata value (`enum gguf_type`'s cases this crate writes).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    I32s(Vec<i32>),
    Strs(Vec<String>),
}

/// `enum gguf_type` codes.
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STR: u32 = 8;
const T_ARRAY: u32 = 9;

impl Value {
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Value::U32(v) => put(out, T_U32, &v.to_le_bytes()),
            Value::F32(v) => put(out, T_F32, &v.to_le_bytes()),
            Value::Bool(v) => put(out, T_BOOL, &[*v as u8]),
            Value::Str(s) => {
                out.extend(T_STR.to_le_bytes());
                string(out, s);
            }
            Value::I32s(v) => {
                array_head(out, T_I32, v.len());
                v.iter().for_each(|x| out.extend(x.to_le_bytes()));
            }
            Value::Strs(v) => {
                array_head(out, T_STR, v.len());
                v.iter().for_each(|s| string(out, s));
            }
        }
    }
}

fn put(out: &mut Vec<u8>, ty: u32, bytes: &[u8]) {
    out.extend(ty.to_le_bytes());
    out.extend(bytes);
}

fn array_head(out: &mut Vec<u8>, ty: u32, len: usize) {
    out.extend(T_ARRAY.to_le_bytes());
    out.extend(ty.to_le_bytes());
    out.extend((len as u64).to_le_bytes());
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// One tensor: `dims` innermost first (ggml's `ne`: an (out, in) matrix is
/// `[in, out]`), `data` in `ty`'s on-disk layout.
#[derive(Debug, Clone)]
pub struct TensorData {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    pub data: Vec<u8>,
}

/// A GGUF file being assembled: metadata in insertion order, then tensors.
#[derive(Debug, Default)]
pub struct Gguf {
    pub kv: Vec<(String, Value)>,
    pub tensors: Vec<TensorData>,
}

fn pad(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
}

impl Gguf {
    pub fn set(&mut self, key: &str, v: Value) {
        self.kv.push((key.to_string(), v));
    }

    /// The whole file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(MAGIC);
        out.extend(VERSION.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            string(&mut out, k);
            v.write(&mut out);
        }
        let mut offset = 0usize;
        for t in &self.tensors {
            string(&mut out, &t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            t.dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
            out.extend((t.ty as u32).to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offset = (offset + t.data.len()).next_multiple_of(ALIGNMENT);
        }
        pad(&mut out);
        for t in &self.tensors {
            out.extend(&t.data);
            pad(&mut out);
        }
        out
    }

    /// Writes the file atomically (temp file and rename).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        crate::atomic_file::write(path, &self.to_bytes())
    }
}
