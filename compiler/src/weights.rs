//! Initializer data, never copied on import: bytes inside the model proto (themselves a slice
//! of the memory-mapped model file), a slice of a memory-mapped external-data file, new data a
//! pass produced, or data derived from another tensor's (converted, permuted) that is computed
//! only when it is written.
mod derived;

pub use derived::{Derived, Scratch, Transform};

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use memmap2::Mmap;

use crate::error::{Error, IoContext, Result};
use crate::onnx::{
    self, DataType, StringStringEntryProto, TensorProto, tensor_proto::DataLocation,
};

/// A memory-mapped external-data file.
#[derive(Debug)]
pub struct DataFile {
    /// The `location` string the model used for it (relative to the model's folder).
    pub location: String,
    /// Where it is on disk.
    pub path: PathBuf,
    map: Option<Mmap>,
}

impl DataFile {
    fn open(location: &str, path: PathBuf) -> Result<Self> {
        let file = crate::files::open_regular(&path)?;
        let len = file.metadata().at(&path)?.len();
        // SAFETY: the map is read-only; attune never writes to a file it has mapped (outputs
        // are written to fresh temp files and renamed into place).
        let map = if len == 0 {
            None
        } else {
            Some(unsafe { Mmap::map(&file) }.at(&path)?)
        };
        Ok(DataFile {
            location: location.to_string(),
            path,
            map,
        })
    }

    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// Drops the pages of `offset..offset+len` from this process's resident memory (they
    /// stay in the page cache and fault back in if read again), so reading many weights
    /// once does not hold them all.
    pub fn release(&self, offset: usize, len: usize) {
        let Some(map) = &self.map else { return };
        const PAGE: usize = 4096;
        let start = offset.next_multiple_of(PAGE);
        let end = (offset + len) / PAGE * PAGE;
        if end > start {
            // SAFETY: the map is a read-only, file-backed private mapping: dropping its pages
            // only makes later reads fault them in again from the file.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }
}

/// The data of one tensor.
#[derive(Clone, Debug)]
pub enum TensorData {
    /// In the proto itself (`raw_data` or the typed fields).
    Inline,
    /// A slice of an external-data file.
    External {
        file: Arc<DataFile>,
        offset: usize,
        len: usize,
    },
    /// Produced by a pass (or otherwise not backed by the input files).
    Owned(Bytes),
    /// Computed from another tensor's data when it is written (or read): see
    /// [`Tensor::transformed`].
    Derived(Arc<Derived>),
}

/// An initializer (or any tensor constant): its proto header and where its bytes are.
/// For `External` and `Owned` data the proto carries no data fields.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub proto: TensorProto,
    pub data: TensorData,
}

impl Tensor {
    /// A new tensor holding `data` (little-endian, packed as ONNX stores it).
    pub fn new(name: impl Into<String>, data_type: DataType, dims: Vec<i64>, data: Bytes) -> Self {
        let proto = TensorProto {
            name: name.into(),
            data_type: data_type as i32,
            dims,
            ..Default::default()
        };
        Tensor {
            proto,
            data: TensorData::Owned(data),
        }
    }

    /// The same tensor (name, dims, type, doc, metadata) holding new data.
    pub fn with_data(&self, data: Bytes) -> Tensor {
        let mut proto = self.proto.clone();
        clear_data_fields(&mut proto);
        Tensor {
            proto,
            data: TensorData::Owned(data),
        }
    }

    pub fn name(&self) -> &str {
        &self.proto.name
    }

    pub fn dims(&self) -> &[i64] {
        &self.proto.dims
    }

    pub fn data_type(&self) -> i32 {
        self.proto.data_type
    }

    pub fn element_count(&self) -> Option<u64> {
        onnx::element_count(&self.proto.dims)
    }

    /// The byte length its dims and type call for (`None` for strings).
    pub fn expected_len(&self) -> Option<u64> {
        onnx::byte_len(self.proto.data_type, self.element_count()?)
    }

    /// The tensor's bytes, little-endian, as `raw_data` would hold them.
    pub fn bytes(&self) -> Result<Cow<'_, [u8]>> {
        match &self.data {
            TensorData::External { file, offset, len } => {
                Ok(Cow::Borrowed(&file.bytes()[*offset..*offset + *len]))
            }
            TensorData::Owned(b) => Ok(Cow::Borrowed(b)),
            TensorData::Inline if !self.proto.raw_data.is_empty() => {
                Ok(Cow::Borrowed(&self.proto.raw_data))
            }
            TensorData::Inline => typed_field_bytes(&self.proto).map(Cow::Owned),
            TensorData::Derived(d) => d.compute().map(|(b, _)| Cow::Owned(b)),
        }
    }

    /// This tensor's data after `step`, same name and metadata, with the dims and type the
    /// step gives it. Where the data is memory-mapped or inline (or derived from such), the
    /// result is [`TensorData::Derived`]: nothing is computed now, the export computes it in
    /// blocks as it writes (and counts the fp16 clamps then), so the count returned is 0.
    /// Where it is owned (made by a pass, already in memory) it is computed now, since holding
    /// fp32 bytes until the export would take more memory than the result; the count is then
    /// how many values were clamped to the fp16 range.
    pub fn transformed(&self, step: Transform) -> Result<(Tensor, u64)> {
        if let Transform::Convert(to) = step
            && to as i32 == self.data_type()
            && derived::float_type(self.data_type()).is_some()
        {
            return Ok((self.clone(), 0)); // already of that type
        }
        let mut proto = self.proto.clone();
        clear_data_fields(&mut proto);
        if step == Transform::ChannelsLast
            && let [o, i, h, w] = self.dims()[..]
        {
            proto.dims = vec![o, h, w, i];
        }
        let lazy = match &self.data {
            TensorData::Owned(_) => None,
            _ => Derived::new(self, step)?,
        };
        if let Some(d) = lazy {
            proto.data_type = d.data_type() as i32;
            let data = TensorData::Derived(Arc::new(d));
            return Ok((Tensor { proto, data }, 0));
        }
        // Computed now: owned data, or a step that cannot follow the others lazily.
        let owned = match &self.data {
            TensorData::Owned(_) => self.clone(),
            _ => self.with_data(Bytes::from(self.bytes()?.into_owned())),
        };
        let d = Derived::new(&owned, step)?
            .ok_or_else(|| Error::tensor(self.name(), "cannot take that step"))?;
        let (bytes, clamped) = d.compute()?;
        proto.data_type = d.data_type() as i32;
        let data = TensorData::Owned(bytes.into());
        Ok((Tensor { proto, data }, clamped))
    }

    /// Lets go of the resident pages of a memory-mapped tensor (see [`DataFile::release`]).
    pub fn release(&self) {
        match &self.data {
            TensorData::External { file, offset, len } => file.release(*offset, *len),
            TensorData::Derived(d) => d.source().release(),
            _ => {}
        }
    }

    /// Length in bytes of the data as stored, without materialising typed fields.
    pub fn stored_len(&self) -> u64 {
        match &self.data {
            TensorData::External { len, .. } => *len as u64,
            TensorData::Owned(b) => b.len() as u64,
            TensorData::Derived(d) => d.len() as u64,
            TensorData::Inline => self.expected_len().unwrap_or(0),
        }
    }

    /// Checks that the stored bytes match what dims and type call for.
    pub fn check_len(&self) -> Result<()> {
        if onnx::element_bits(self.proto.data_type).is_none() {
            return Ok(()); // strings: no fixed size
        }
        let Some(expected) = self.expected_len() else {
            return Err(Error::tensor(
                &self.proto.name,
                format!("dims {:?} are negative or too large", self.proto.dims),
            ));
        };
        let actual = match &self.data {
            TensorData::Inline if self.proto.raw_data.is_empty() => {
                match typed_field_bytes(&self.proto) {
                    Ok(b) => b.len() as u64,
                    Err(e) => return Err(e),
                }
            }
            TensorData::Inline => self.proto.raw_data.len() as u64,
            _ => self.stored_len(),
        };
        if actual != expected {
            return Err(Error::tensor(
                &self.proto.name,
                format!(
                    "holds {actual} bytes but dims {:?} of {} need {expected}",
                    self.proto.dims,
                    onnx::type_name(self.proto.data_type)
                ),
            ));
        }
        Ok(())
    }
}

/// Empties every field of a proto that holds or locates data.
pub fn clear_data_fields(p: &mut TensorProto) {
    p.raw_data = Bytes::new();
    p.float_data.clear();
    p.int32_data.clear();
    p.int64_data.clear();
    p.double_data.clear();
    p.uint64_data.clear();
    p.external_data.clear();
    p.data_location = DataLocation::Default as i32;
}

/// Converts the typed repeated fields (`float_data`, `int32_data`, ...) to raw little-endian bytes.
pub fn typed_field_bytes(t: &TensorProto) -> Result<Vec<u8>> {
    use DataType::*;
    let dt = DataType::try_from(t.data_type)
        .map_err(|_| Error::tensor(&t.name, format!("unknown data type {}", t.data_type)))?;
    let out = match dt {
        Float | Complex64 => t.float_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Double | Complex128 => t.double_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Int64 => t.int64_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Uint64 => t.uint64_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Uint32 => t
            .uint64_data
            .iter()
            .flat_map(|v| (*v as u32).to_le_bytes())
            .collect(),
        Int32 => t.int32_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Int16 | Uint16 | Float16 | Bfloat16 => t
            .int32_data
            .iter()
            .flat_map(|v| (*v as u16).to_le_bytes())
            .collect(),
        // 8-bit types, and sub-byte types whose int32 entries each hold one packed byte.
        Int8 | Uint8 | Bool | Float8e4m3fn | Float8e4m3fnuz | Float8e5m2 | Float8e5m2fnuz
        | Float8e8m0 | Int4 | Uint4 | Float4e2m1 | Int2 | Uint2 | Float6e2m3 | Float6e3m2 => {
            t.int32_data.iter().map(|v| *v as u8).collect()
        }
        String | Undefined => {
            return Err(Error::tensor(
                &t.name,
                format!(
                    "{} tensors have no byte representation",
                    onnx::type_name(t.data_type)
                ),
            ));
        }
    };
    Ok(out)
}

/// Resolves external-data references of one model, opening each data file once.
pub struct ExternalData {
    base_dir: PathBuf,
    canonical_base: Option<PathBuf>,
    files: HashMap<String, Arc<DataFile>>,
}

impl ExternalData {
    pub fn new(base_dir: &Path) -> Self {
        ExternalData {
            base_dir: base_dir.to_path_buf(),
            canonical_base: base_dir.canonicalize().ok(),
            files: HashMap::new(),
        }
    }

    /// The data files opened so far.
    pub fn files(&self) -> impl Iterator<Item = &Arc<DataFile>> {
        self.files.values()
    }

    /// Turns a proto with `data_location: EXTERNAL` into a tensor whose data is a mapped slice.
    pub fn resolve(&mut self, mut proto: TensorProto) -> Result<Tensor> {
        if proto.data_location != DataLocation::External as i32 {
            return Ok(Tensor {
                proto,
                data: TensorData::Inline,
            });
        }
        let name = proto.name.clone();
        let entry = |key: &str| onnx::metadata(&proto.external_data, key).map(str::to_string);
        let location = entry("location")
            .filter(|l| !l.is_empty())
            .ok_or_else(|| Error::tensor(&name, "external data has no 'location'"))?;
        let offset = parse_u64(&name, "offset", entry("offset"))?.unwrap_or(0);
        let length = parse_u64(&name, "length", entry("length"))?;
        let file = self.open(&name, &location)?;
        let file_len = file.bytes().len() as u64;
        let len = match length {
            Some(l) => l,
            None => file_len.saturating_sub(offset),
        };
        if offset.checked_add(len).is_none_or(|end| end > file_len) {
            return Err(Error::tensor(
                &name,
                format!(
                    "external data offset {offset} + length {len} runs past the end of '{location}' ({file_len} bytes)"
                ),
            ));
        }
        proto.external_data.clear();
        proto.data_location = DataLocation::Default as i32;
        let tensor = Tensor {
            proto,
            data: TensorData::External {
                file,
                offset: offset as usize,
                len: len as usize,
            },
        };
        tensor.check_len()?;
        Ok(tensor)
    }

    fn open(&mut self, tensor: &str, location: &str) -> Result<Arc<DataFile>> {
        if let Some(f) = self.files.get(location) {
            return Ok(f.clone());
        }
        let path = safe_join(&self.base_dir, location).map_err(|why| {
            Error::tensor(tensor, format!("external data location '{location}' {why}"))
        })?;
        match std::fs::metadata(&path) {
            Err(_) => {
                return Err(Error::tensor(
                    tensor,
                    format!("external data file '{}' not found", path.display()),
                ));
            }
            Ok(m) => {
                if let Some(what) = crate::files::kind(m.file_type()) {
                    return Err(Error::tensor(
                        tensor,
                        format!(
                            "external data location '{location}' is {what}, not a regular file"
                        ),
                    ));
                }
            }
        }
        // A symbolic link may still lead outside the model's folder.
        if let (Some(base), Ok(real)) = (&self.canonical_base, path.canonicalize())
            && !real.starts_with(base)
        {
            return Err(Error::tensor(
                tensor,
                format!(
                    "external data location '{location}' resolves outside the model's folder ({})",
                    real.display()
                ),
            ));
        }
        let file = Arc::new(DataFile::open(location, path)?);
        self.files.insert(location.to_string(), file.clone());
        Ok(file)
    }
}

fn parse_u64(tensor: &str, key: &str, value: Option<String>) -> Result<Option<u64>> {
    value
        .map(|v| {
            v.trim().parse::<u64>().map_err(|_| {
                Error::tensor(
                    tensor,
                    format!("external data {key} '{v}' is not a byte count"),
                )
            })
        })
        .transpose()
}

/// Joins a relative location to the model's folder, refusing absolute paths and `..`.
pub fn safe_join(base: &Path, location: &str) -> std::result::Result<PathBuf, &'static str> {
    let rel = Path::new(location);
    if rel.is_absolute() || location.starts_with('\\') || location.get(1..2) == Some(":") {
        return Err("is absolute; only paths inside the model's folder are allowed");
    }
    for c in rel.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => {
                return Err("contains '..'; only paths inside the model's folder are allowed");
            }
            _ => return Err("is not a plain relative path"),
        }
    }
    Ok(base.join(rel))
}

/// External-data entries for a tensor stored at `offset..offset+len` of `location`.
pub fn external_entries(location: &str, offset: u64, len: u64) -> Vec<StringStringEntryProto> {
    [
        ("location", location.to_string()),
        ("offset", offset.to_string()),
        ("length", len.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| StringStringEntryProto {
        key: k.into(),
        value: v,
    })
    .collect()
}

impl ExternalData {
    /// Makes a tensor nested in a node attribute or subgraph self-contained: its external
    /// bytes are read into `raw_data` (such tensors are small, and their location would not
    /// resolve once the model is written elsewhere).
    pub fn inline_nested(&mut self, t: &mut TensorProto) -> Result<()> {
        if t.data_location != DataLocation::External as i32 {
            return Ok(());
        }
        let tensor = self.resolve(std::mem::take(t))?;
        let bytes = Bytes::copy_from_slice(&tensor.bytes()?);
        *t = tensor.proto;
        t.raw_data = bytes;
        Ok(())
    }

    /// [`ExternalData::inline_nested`] for every tensor inside an attribute, recursively.
    pub fn inline_attribute(&mut self, a: &mut onnx::AttributeProto) -> Result<()> {
        for t in a.t.iter_mut().chain(a.tensors.iter_mut()) {
            self.inline_nested(t)?;
        }
        for s in a
            .sparse_tensor
            .iter_mut()
            .chain(a.sparse_tensors.iter_mut())
        {
            for t in s.values.iter_mut().chain(s.indices.iter_mut()) {
                self.inline_nested(t)?;
            }
        }
        for g in a.g.iter_mut().chain(a.graphs.iter_mut()) {
            for t in &mut g.initializer {
                self.inline_nested(t)?;
            }
            for s in &mut g.sparse_initializer {
                for t in s.values.iter_mut().chain(s.indices.iter_mut()) {
                    self.inline_nested(t)?;
                }
            }
            for n in &mut g.node {
                for a in &mut n.attribute {
                    self.inline_attribute(a)?;
                }
            }
        }
        Ok(())
    }
}
