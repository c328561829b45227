//! Writing a model: the `.onnx` and its external data, atomically.
//!
//! Everything is written to temp files in the output folder and renamed into place only
//! when all of it succeeded: no half-written output, and no input file is ever written to
//! (a model is never exported over one of its own input files).
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use prost::Message;
use tempfile::NamedTempFile;

use crate::error::{Error, IoContext, Result};
use crate::ir::{Graph, Model};
use crate::onnx::{GraphProto, ModelProto, TensorProto, tensor_proto::DataLocation};
use crate::weights::{self, DataFile, Tensor, TensorData};

/// How weights travel to the output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightsMode {
    /// One self-contained data file next to the model.
    #[default]
    Copy,
    /// Hard-link the unchanged original data files into the output folder; only new or
    /// changed tensors are written, to a second data file. Copies across filesystems.
    Link,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct ExportOptions {
    pub weights: WeightsMode,
    /// Everything inside the `.onnx` (only for models under protobuf's 2 GB limit).
    pub inline: bool,
}

/// What was written.
#[derive(Debug, Default)]
pub struct ExportReport {
    pub model: PathBuf,
    /// New data file written, with its size.
    pub data_file: Option<(PathBuf, u64)>,
    /// Original data files placed in the output folder: (path, hard-linked (else copied)).
    pub linked: Vec<(PathBuf, bool)>,
}

/// Tensors below this size stay inside the `.onnx` (as onnx's own writer does).
const INLINE_BELOW: usize = 1024;
const PROTOBUF_LIMIT: usize = 2 << 30;

/// Writes `model` to `out` (+ data files next to it).
pub fn write(model: &Model, out: &Path, opts: &ExportOptions) -> Result<ExportReport> {
    write_with_progress(model, out, opts, &mut |_, _| {})
}

/// [`write`], calling `progress(bytes written, bytes to write)` as weights are written.
pub fn write_with_progress(
    model: &Model,
    out: &Path,
    opts: &ExportOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ExportReport> {
    let out_dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&out_dir).at(&out_dir)?;
    let file_name = out.file_name().ok_or_else(|| Error::Output {
        path: out.into(),
        msg: "is not a file path".into(),
    })?;
    let data_location = new_data_location(&file_name.to_string_lossy(), model, opts);
    let inputs: Vec<PathBuf> = model
        .path
        .iter()
        .cloned()
        .chain(model.data_files.iter().map(|f| f.path.clone()))
        .collect();
    refuse_overwriting_inputs(out, &inputs)?;
    refuse_overwriting_inputs(&out_dir.join(&data_location), &inputs)?;

    let mut data = DataWriter::new(&out_dir, data_location);
    let mut links: Vec<Arc<DataFile>> = Vec::new();
    let kept = |t: &Tensor| match &t.data {
        TensorData::Inline => !opts.inline,
        TensorData::External { .. } => opts.weights == WeightsMode::Link && !opts.inline,
        TensorData::Owned(_) => false,
    };
    let total: u64 = model
        .graph
        .initializers()
        .filter(|(_, t)| !kept(t))
        .map(|(_, t)| t.stored_len())
        .sum();
    let mut done = 0;
    let proto = to_proto(model, |tensor| {
        let mut proto = tensor.proto.clone();
        match &tensor.data {
            TensorData::Inline if kept(tensor) => return Ok(proto),
            TensorData::External { file, offset, len } if kept(tensor) => {
                if !links.iter().any(|l| Arc::ptr_eq(l, file)) {
                    links.push(file.clone());
                }
                proto.data_location = DataLocation::External as i32;
                proto.external_data =
                    weights::external_entries(&file.location, *offset as u64, *len as u64);
                return Ok(proto);
            }
            _ => {}
        }
        let bytes = tensor.bytes()?;
        let stays_inline = opts.inline
            || (matches!(tensor.data, TensorData::Owned(_)) && bytes.len() < INLINE_BELOW);
        if stays_inline {
            weights::clear_data_fields(&mut proto);
            proto.raw_data = bytes.into_owned().into();
        } else {
            let (offset, len) = data.append(tensor)?;
            proto.data_location = DataLocation::External as i32;
            proto.external_data = weights::external_entries(&data.location, offset, len);
        }
        done += tensor.stored_len();
        progress(done, total);
        Ok(proto)
    })?;
    let encoded = proto.encode_to_vec();
    if encoded.len() >= PROTOBUF_LIMIT {
        return Err(Error::Output {
            path: out.into(),
            msg: format!(
                "the model is {} bytes, over protobuf's 2 GB limit: write it with external data (without --inline)",
                encoded.len()
            ),
        });
    }
    let mut model_tmp = temp_in(&out_dir)?;
    model_tmp.write_all(&encoded).at(model_tmp.path())?;

    // Everything is written; now put it in place: data first, the model last.
    let mut report = ExportReport {
        model: out.to_path_buf(),
        ..Default::default()
    };
    for file in &links {
        let target = out_dir.join(&file.location);
        if same_file(&target, &file.path) {
            continue; // exporting into the model's own folder: the data file is already there
        }
        refuse_overwriting_inputs(&target, &inputs)?;
        report
            .linked
            .push((target.clone(), link_or_copy(&file.path, &target)?));
    }
    if let Some((path, size)) = data.finish()? {
        report.data_file = Some((path, size));
    }
    model_tmp
        .persist(out)
        .map_err(|e| Error::io(out, e.error))?;
    Ok(report)
}

/// The model as a proto, each initializer written by `place`.
pub fn to_proto(
    model: &Model,
    mut place: impl FnMut(&Tensor) -> Result<TensorProto>,
) -> Result<ModelProto> {
    let mut proto = model.proto.clone();
    proto.graph = Some(graph_to_proto(&model.graph, &mut place)?);
    Ok(proto)
}

fn graph_to_proto(
    g: &Graph,
    place: &mut impl FnMut(&Tensor) -> Result<TensorProto>,
) -> Result<GraphProto> {
    let mut proto = g.proto.clone();
    proto.node = g
        .topo_order()?
        .into_iter()
        .map(|n| g.node_to_proto(n))
        .collect();
    let io = |ios: &[crate::ir::Io]| {
        ios.iter()
            .map(|io| {
                let mut info = io.info.clone();
                info.name = g.value(io.value).name.clone();
                info
            })
            .collect()
    };
    proto.input = io(&g.inputs);
    proto.output = io(&g.outputs);
    proto.initializer = g
        .initializers()
        .map(|(_, t)| place(t))
        .collect::<Result<_>>()?;
    proto.sparse_initializer = g.sparse_initializers().cloned().collect();
    proto.value_info = g.value_infos().cloned().collect();
    Ok(proto)
}

/// `<model file>.data`, unless link mode keeps an original data file of that name.
fn new_data_location(file_name: &str, model: &Model, opts: &ExportOptions) -> String {
    let taken = |l: &str| {
        opts.weights == WeightsMode::Link && model.data_files.iter().any(|f| f.location == l)
    };
    let mut location = format!("{file_name}.data");
    let mut k = 0;
    while taken(&location) {
        k += 1;
        location = format!("{file_name}.changed{k}.data");
    }
    location
}

/// The new data file, created on first use.
struct DataWriter {
    dir: PathBuf,
    location: String,
    file: Option<NamedTempFile>,
    len: u64,
}

impl DataWriter {
    fn new(dir: &Path, location: String) -> Self {
        DataWriter {
            dir: dir.to_path_buf(),
            location,
            file: None,
            len: 0,
        }
    }

    /// Appends a tensor's bytes, aligned so runtimes can map large tensors; returns (offset, length).
    fn append(&mut self, tensor: &Tensor) -> Result<(u64, u64)> {
        if self.file.is_none() {
            self.file = Some(temp_in(&self.dir)?);
        }
        let tmp = self.file.as_mut().expect("created above");
        let path = tmp.path().to_path_buf();
        let file = tmp.as_file_mut();
        let size = tensor.stored_len();
        let align = if size >= 1 << 20 { 4096 } else { 64 };
        let offset = self.len.next_multiple_of(align);
        file.write_all(&vec![0u8; (offset - self.len) as usize])
            .at(&path)?;
        match &tensor.data {
            // Kernel-side copy (copy_file_range): weights never pass through this process's memory.
            TensorData::External {
                file: src,
                offset: at,
                len,
            } => {
                let mut reader = File::open(&src.path).at(&src.path)?;
                reader.seek(SeekFrom::Start(*at as u64)).at(&src.path)?;
                let copied = io::copy(&mut (&reader).take(*len as u64), file).at(&path)?;
                if copied != *len as u64 {
                    return Err(Error::tensor(
                        tensor.name(),
                        format!(
                            "'{}' ended early (changed while reading?)",
                            src.path.display()
                        ),
                    ));
                }
            }
            _ => file.write_all(&tensor.bytes()?).at(&path)?,
        }
        self.len = offset + size;
        Ok((offset, size))
    }

    fn finish(self) -> Result<Option<(PathBuf, u64)>> {
        let Some(tmp) = self.file else {
            return Ok(None);
        };
        let target = self.dir.join(&self.location);
        tmp.as_file().sync_all().at(tmp.path())?;
        tmp.persist(&target)
            .map_err(|e| Error::io(&target, e.error))?;
        Ok(Some((target, self.len)))
    }
}

fn temp_in(dir: &Path) -> Result<NamedTempFile> {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .prefix(".attune-")
        .suffix(".tmp")
        .permissions(fs::Permissions::from_mode(0o644))
        .tempfile_in(dir)
        .at(dir)
}

/// Puts `src` at `target` as a hard link, or a copy where links cannot cross filesystems.
/// Returns whether it is a hard link.
fn link_or_copy(src: &Path, target: &Path) -> Result<bool> {
    let dir = target.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).at(dir)?;
    let tmp = temp_in(dir)?.into_temp_path();
    let tmp_path = tmp.to_path_buf();
    fs::remove_file(&tmp_path).at(&tmp_path)?;
    let linked = match fs::hard_link(src, &tmp_path) {
        Ok(()) => true,
        Err(_) => {
            fs::copy(src, &tmp_path).at(&tmp_path)?;
            false
        }
    };
    tmp.persist(target)
        .map_err(|e| Error::io(target, e.error))?;
    Ok(linked)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn refuse_overwriting_inputs(target: &Path, inputs: &[PathBuf]) -> Result<()> {
    if let Some(input) = inputs.iter().find(|i| same_file(target, i)) {
        return Err(Error::Output {
            path: target.into(),
            msg: format!(
                "would overwrite the input file '{}'; choose another output path",
                input.display()
            ),
        });
    }
    Ok(())
}
