//! Writing a model: the `.onnx` and its external data, atomically.
//!
//! Everything is written to temp files in the output folder and renamed into place only
//! when all of it succeeded, and a failure while renaming puts back what was there: no
//! half-written output, and no input file is ever written to (a model is never exported
//! over one of its own input files, nor over any other file the command reads).
use std::borrow::Cow;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};

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
    /// Keep the unchanged original data files as they are; only new or changed tensors are
    /// written, to a second data file. An original data file in the output's folder is
    /// referred to where it is; elsewhere it is cloned (a reflink: a separate file sharing the
    /// blocks) into the output folder, or copied where the filesystem cannot clone. Never a
    /// hard or symbolic link: onnx (>= 1.18) refuses external data that is either, and with a
    /// hard link it would refuse the original model too.
    Link,
}

/// How link mode put an original data file in the output folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placed {
    /// The output is in its folder and refers to it where it is: nothing was written.
    InPlace,
    /// A reflink clone: a file of its own sharing the original's blocks (nothing copied).
    Reflinked,
    /// A copy (the filesystem cannot clone, or the output is on another filesystem).
    Copied,
}

impl std::fmt::Display for Placed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Placed::InPlace => "referenced",
            Placed::Reflinked => "reflinked",
            Placed::Copied => "copied",
        })
    }
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
    /// Original data files the output refers to (link mode): (path, how it got there).
    pub linked: Vec<(PathBuf, Placed)>,
    /// Weight values beyond fp16's range clamped to ±65504 as converted weights were
    /// written (a conversion a pass decided is computed only here).
    pub clamped: u64,
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
    write_guarded(model, out, opts, &Guard::default(), progress)
}

/// What else a command reads and writes around the model it exports.
#[derive(Clone, Copy, Debug, Default)]
pub struct Guard<'a> {
    /// More files the command reads (LoRAs, a recipe, input tensors): no output replaces one.
    pub inputs: &'a [PathBuf],
    /// Files written with the model, all or nothing (path, bytes), e.g. a LoRA adapter.
    pub companions: &'a [(PathBuf, Vec<u8>)],
}

/// [`write_with_progress`], also protecting `guard.inputs` and placing `guard.companions`.
/// Either every output file is in place, or none changed (earlier outputs stay as they were).
pub fn write_guarded(
    model: &Model,
    out: &Path,
    opts: &ExportOptions,
    guard: &Guard,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ExportReport> {
    let inputs: Vec<PathBuf> = model
        .path
        .iter()
        .cloned()
        .chain(model.data_files.iter().map(|f| f.path.clone()))
        .chain(guard.inputs.iter().cloned())
        .collect();
    check_output(out, &inputs)?;
    let out_dir = folder_of(out).to_path_buf();
    let file_name = out
        .file_name()
        .ok_or_else(|| Error::Output {
            path: out.into(),
            msg: "is not a file path".into(),
        })?
        .to_string_lossy()
        .into_owned();
    // Every target, to keep two outputs off one path.
    let mut targets: Vec<PathBuf> = vec![out.to_path_buf()];
    for (path, _) in guard.companions {
        check_output(path, &inputs)?;
        claim(&mut targets, path)?;
    }
    let link_locations = link_locations(model, opts, &out_dir, &file_name, &inputs, &targets);
    for (file, location) in &link_locations {
        let target = out_dir.join(location);
        if !same_file(&target, &file.path) {
            claim(&mut targets, &target)?;
        }
    }
    let data_location = new_data_location(&file_name, &link_locations);
    let data_target = out_dir.join(&data_location);
    check_output(&data_target, &inputs)?;
    claim(&mut targets, &data_target)?;

    let mut created = create_dir_all_tracked(&out_dir)?;
    let result = write_checked(
        model,
        out,
        opts,
        guard,
        progress,
        (&out_dir, data_location, &link_locations),
        &mut created,
    );
    if result.is_err() {
        // Folders this call made, if it left them empty.
        for dir in created.iter().rev() {
            let _ = fs::remove_dir(dir);
        }
    }
    result
}

type Plan<'p> = (&'p Path, String, &'p [(Arc<DataFile>, String)]);

/// Where a tensor's bytes come from, to write bytes two tensors share once.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum Source {
    /// (data file, offset, length): the file by its `Arc`'s address.
    File(usize, usize, usize),
    /// (address, length) of owned bytes (clones of one `Bytes` share them).
    Owned(usize, usize),
    /// The address of derived data (clones of one derived tensor share it).
    Derived(usize),
}

impl Source {
    fn of(tensor: &Tensor) -> Option<Source> {
        match &tensor.data {
            TensorData::External { file, offset, len } => {
                Some(Source::File(Arc::as_ptr(file) as usize, *offset, *len))
            }
            TensorData::Owned(b) if !b.is_empty() => {
                Some(Source::Owned(b.as_ptr() as usize, b.len()))
            }
            TensorData::Derived(d) => Some(Source::Derived(Arc::as_ptr(d) as usize)),
            _ => None,
        }
    }
}

/// `created` gets the folders this call makes (to remove them again on failure).
fn write_checked(
    model: &Model,
    out: &Path,
    opts: &ExportOptions,
    guard: &Guard,
    progress: &mut dyn FnMut(u64, u64),
    (out_dir, data_location, link_locations): Plan,
    created: &mut Vec<PathBuf>,
) -> Result<ExportReport> {
    let mut data = DataWriter::new(out_dir, data_location);
    let kept = |t: &Tensor| match &t.data {
        TensorData::Inline => !opts.inline,
        TensorData::External { .. } => opts.weights == WeightsMode::Link && !opts.inline,
        TensorData::Owned(_) | TensorData::Derived(_) => false,
    };
    let location_of = |file: &Arc<DataFile>| {
        link_locations
            .iter()
            .find(|(f, _)| Arc::ptr_eq(f, file))
            .map_or_else(|| file.location.clone(), |(_, l)| l.clone())
    };
    // The original data files the output refers to, in first use.
    let mut links: Vec<(Arc<DataFile>, String)> = Vec::new();
    for (_, t) in model.graph.initializers() {
        if let TensorData::External { file, .. } = &t.data
            && kept(t)
            && !links.iter().any(|(l, _)| Arc::ptr_eq(l, file))
        {
            links.push((file.clone(), location_of(file)));
        }
    }

    // Each goes in the output folder under a temp name: referred to where it is, cloned, or
    // (where cloning fails) copied below, with the weights.
    let mut report = ExportReport {
        model: out.to_path_buf(),
        ..Default::default()
    };
    let mut staged: Vec<(PathBuf, tempfile::TempPath)> = Vec::new();
    let mut to_copy: Vec<(Arc<DataFile>, PathBuf, NamedTempFile)> = Vec::new();
    for (file, location) in &links {
        let target = out_dir.join(location);
        if same_file(&target, &file.path) {
            // The output is in its folder (link_locations checked onnx would accept it).
            report.linked.push((target, Placed::InPlace));
            continue;
        }
        let dir = folder_of(&target);
        created.extend(create_dir_all_tracked(dir)?);
        let tmp = temp_in(dir)?;
        if clone_file(&file.path, &tmp)? {
            report.linked.push((target.clone(), Placed::Reflinked));
            staged.push((target, tmp.into_temp_path()));
        } else {
            report.linked.push((target.clone(), Placed::Copied));
            to_copy.push((file.clone(), target, tmp));
        }
    }

    let total: u64 = model
        .graph
        .initializers()
        .filter(|(_, t)| !kept(t))
        .map(|(_, t)| t.stored_len())
        .sum::<u64>()
        + to_copy
            .iter()
            .map(|(f, _, _)| f.bytes().len() as u64)
            .sum::<u64>();
    let mut done = 0;
    // Bytes already in the new data file: a slice two tensors share is written once.
    let mut written: std::collections::HashMap<Source, (u64, u64)> = Default::default();
    // Where each tensor goes is decided first (the proto is complete before any weight is
    // written); the data file is then written in one stream.
    let proto = to_proto(model, |tensor| {
        let mut proto = tensor.proto.clone();
        match &tensor.data {
            TensorData::Inline if kept(tensor) => return Ok(proto),
            TensorData::External { file, offset, len } if kept(tensor) => {
                proto.data_location = DataLocation::External as i32;
                proto.external_data =
                    weights::external_entries(&location_of(file), *offset as u64, *len as u64);
                return Ok(proto);
            }
            _ => {}
        }
        let source = Source::of(tensor);
        let stays_inline = opts.inline
            || (matches!(tensor.data, TensorData::Owned(_) | TensorData::Derived(_))
                && tensor.stored_len() < INLINE_BELOW as u64);
        if stays_inline {
            let bytes = match &tensor.data {
                TensorData::Derived(d) => {
                    let (bytes, clamped) = d.compute()?;
                    report.clamped += clamped;
                    bytes
                }
                _ => tensor.bytes()?.into_owned(),
            };
            weights::clear_data_fields(&mut proto);
            proto.raw_data = bytes.into();
        } else {
            let (offset, len) = match source.and_then(|s| written.get(&s)) {
                Some(&at) => at,
                None => {
                    let at = data.reserve(tensor);
                    if let Some(s) = source {
                        written.insert(s, at);
                    }
                    // Counted as written below.
                    return Ok(external(proto, &data.location, at));
                }
            };
            proto = external(proto, &data.location, (offset, len));
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
    let mut model_tmp = temp_in(out_dir)?;
    model_tmp.write_all(&encoded).at(model_tmp.path())?;
    report.clamped += data.write(&mut |n| {
        done += n;
        progress(done, total);
    })?;

    // Every file is complete in a temp file; the copies of original data files too.
    for (file, target, mut tmp) in to_copy {
        copy_file(&file, &target, &mut tmp, &mut |n| {
            done += n;
            progress(done, total);
        })?;
        staged.push((target, tmp.into_temp_path()));
    }
    if let Some((tmp, size)) = data.finish()? {
        let target = out_dir.join(&data.location);
        report.data_file = Some((target.clone(), size));
        staged.push((target, tmp));
    }
    for (path, bytes) in guard.companions {
        let dir = folder_of(path);
        created.extend(create_dir_all_tracked(dir)?);
        let mut tmp = temp_in(dir)?;
        tmp.write_all(bytes).at(tmp.path())?;
        staged.push((path.clone(), tmp.into_temp_path()));
    }
    staged.push((out.to_path_buf(), model_tmp.into_temp_path()));

    // Now put it all in place, the model last; on any failure, put back what was there.
    let mut placement = Placement::default();
    for (target, tmp) in staged {
        if let Err(e) = placement.place(&target, tmp) {
            placement.undo();
            return Err(e);
        }
    }
    placement.commit();
    Ok(report)
}

/// Refuses an output path that is a folder (or ends in '/'), an existing file that is not a
/// regular file (a device, a FIFO), or one of `inputs` (same file, by device and inode).
pub fn check_output(target: &Path, inputs: &[PathBuf]) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let refuse = |msg: String| {
        Err(Error::Output {
            path: target.into(),
            msg,
        })
    };
    let text = target.as_os_str().as_bytes();
    if text.ends_with(b"/") || target.file_name().is_none() {
        return refuse("is a folder path; give a file path".into());
    }
    match fs::metadata(target) {
        Ok(m) if m.is_dir() => return refuse("is a folder; give a file path".into()),
        Ok(m) if !m.is_file() => {
            return refuse("exists and is not a regular file; choose another output path".into());
        }
        _ => {}
    }
    refuse_overwriting_inputs(target, inputs)
}

/// Adds `target` to the output paths, refusing one already taken by another output.
fn claim(targets: &mut Vec<PathBuf>, target: &Path) -> Result<()> {
    let key = path_key(target);
    if let Some(other) = targets.iter().find(|t| path_key(t) == key) {
        return Err(Error::Output {
            path: target.into(),
            msg: format!(
                "is also where '{}' would be written; choose another output path",
                other.display()
            ),
        });
    }
    targets.push(target.to_path_buf());
    Ok(())
}

/// A path compared as (its folder, resolved where it exists; its file name).
fn path_key(p: &Path) -> (PathBuf, Option<std::ffi::OsString>) {
    let dir = folder_of(p);
    let dir = fs::canonicalize(dir)
        .or_else(|_| std::path::absolute(dir))
        .unwrap_or_else(|_| dir.to_path_buf());
    (dir, p.file_name().map(|n| n.to_os_string()))
}

/// Where the output of link mode refers to each original data file: where it is, if the
/// output is in its folder (see [`in_place_location`]); else a clone or copy in the output
/// folder under its own name, unless a file of that name is there that is not named after
/// this output (another model's weights, an input): then `<output>.link<K>.data`. Nothing of
/// another model is ever replaced.
fn link_locations(
    model: &Model,
    opts: &ExportOptions,
    out_dir: &Path,
    file_name: &str,
    inputs: &[PathBuf],
    targets: &[PathBuf],
) -> Vec<(Arc<DataFile>, String)> {
    if opts.weights != WeightsMode::Link || opts.inline {
        return Vec::new();
    }
    let ours = |l: &str| {
        l.strip_prefix(file_name)
            .is_some_and(|r| r.starts_with('.'))
    };
    let taken_by_output = |target: &Path, chosen: &[(Arc<DataFile>, String)]| {
        let key = path_key(target);
        targets.iter().any(|t| path_key(t) == key)
            || chosen
                .iter()
                .any(|(_, l)| path_key(&out_dir.join(l)) == key)
    };
    // Free for a copy of `file`: no other output's and either absent or a regular file named
    // after this output that no input is.
    let usable = |location: &str, chosen: &[(Arc<DataFile>, String)]| {
        let target = out_dir.join(location);
        !taken_by_output(&target, chosen)
            && match fs::symlink_metadata(&target) {
                Err(_) => true,
                Ok(m) => {
                    ours(location) && m.is_file() && !inputs.iter().any(|i| same_file(&target, i))
                }
            }
    };
    let mut chosen: Vec<(Arc<DataFile>, String)> = Vec::new();
    let mut k = 0;
    for file in &model.data_files {
        if let Some(location) = in_place_location(file, out_dir) {
            chosen.push((file.clone(), location));
            continue;
        }
        let mut location = file.location.clone();
        while !usable(&location, &chosen) {
            k += 1;
            location = format!("{file_name}.link{k}.data");
        }
        chosen.push((file.clone(), location));
    }
    chosen
}

/// Where the output can refer to `file` as it is, relative to `out_dir` (the output is in
/// its folder, or a folder above): its own location, or its path below `out_dir`. Only a
/// regular file with one link (onnx refuses symbolic and hard links) and a plain relative
/// path; `None` otherwise (it is then cloned or copied).
fn in_place_location(file: &DataFile, out_dir: &Path) -> Option<String> {
    let acceptable = |location: &str| {
        let target = out_dir.join(location);
        weights::safe_join(out_dir, location).is_ok()
            && same_file(&target, &file.path)
            && fs::symlink_metadata(&target).is_ok_and(|m| m.is_file() && m.nlink() == 1)
    };
    if acceptable(&file.location) {
        return Some(file.location.clone());
    }
    let dir = fs::canonicalize(out_dir).ok()?;
    let real = fs::canonicalize(&file.path).ok()?;
    let below = real.strip_prefix(&dir).ok()?;
    let location = below
        .components()
        .map(|c| match c {
            std::path::Component::Normal(n) => n.to_str(),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?
        .join("/");
    acceptable(&location).then_some(location)
}

/// The model as a proto, each initializer written by `place`.
pub fn to_proto<'m>(
    model: &'m Model,
    mut place: impl FnMut(&'m Tensor) -> Result<TensorProto>,
) -> Result<ModelProto> {
    let mut proto = model.proto.clone();
    proto.graph = Some(graph_to_proto(&model.graph, &mut place)?);
    Ok(proto)
}

fn graph_to_proto<'m>(
    g: &'m Graph,
    place: &mut impl FnMut(&'m Tensor) -> Result<TensorProto>,
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
fn new_data_location(file_name: &str, links: &[(Arc<DataFile>, String)]) -> String {
    let taken = |l: &str| links.iter().any(|(_, location)| location == l);
    let mut location = format!("{file_name}.data");
    let mut k = 0;
    while taken(&location) {
        k += 1;
        location = format!("{file_name}.changed{k}.data");
    }
    location
}

/// `proto` (data fields cleared) referring to `(offset, length)` of `location`.
fn external(mut proto: TensorProto, location: &str, (offset, len): (u64, u64)) -> TensorProto {
    weights::clear_data_fields(&mut proto);
    proto.data_location = DataLocation::External as i32;
    proto.external_data = weights::external_entries(location, offset, len);
    proto
}

/// The new data file: each tensor's place is reserved first, then all are written in one
/// stream ([`DataWriter::write`]).
struct DataWriter<'m> {
    dir: PathBuf,
    location: String,
    /// (offset, tensor), in increasing offsets.
    jobs: Vec<(u64, &'m Tensor)>,
    file: Option<NamedTempFile>,
    len: u64,
}

/// Output bytes computed at a time from derived data (cached while computed, then written).
const BLOCK: usize = 1 << 20;
/// The page size [`DataFile::release`] rounds to.
const PAGE: usize = 4096;
/// Blocks computed ahead of the writer.
const AHEAD: usize = 4;
/// Written bytes after which their writeback is started, so that the disk works while the
/// rest is computed and the final sync has little left.
const WRITEBACK_EVERY: u64 = 32 << 20;

/// What the writer writes next, in file order.
enum Piece<'m> {
    /// `len` bytes of a buffer computed from derived data (the buffer goes back to the pool).
    Block { at: u64, buf: Vec<u8>, len: usize },
    /// Bytes in memory (owned data, inline data).
    Bytes { at: u64, bytes: Cow<'m, [u8]> },
    /// A slice of an original data file, copied kernel side (copy_file_range): its bytes
    /// never pass through this process's memory.
    Copy {
        at: u64,
        tensor: &'m Tensor,
        file: &'m DataFile,
        offset: usize,
        len: usize,
    },
}

impl<'m> DataWriter<'m> {
    fn new(dir: &Path, location: String) -> Self {
        DataWriter {
            dir: dir.to_path_buf(),
            location,
            jobs: Vec::new(),
            file: None,
            len: 0,
        }
    }

    /// Reserves a tensor's place, aligned so runtimes can map large tensors; returns
    /// (offset, length).
    fn reserve(&mut self, tensor: &'m Tensor) -> (u64, u64) {
        let size = tensor.stored_len();
        let align = if size >= 1 << 20 { 4096 } else { 64 };
        let offset = self.len.next_multiple_of(align);
        self.jobs.push((offset, tensor));
        self.len = offset + size;
        (offset, size)
    }

    /// Writes every reserved tensor to a new temp file, calling `progress(bytes)` as it goes;
    /// returns how many values were clamped to fp16's range. Derived data is computed on a
    /// second thread, a few blocks ahead of this one writing them, and the source's mapped
    /// pages are let go as it is read.
    fn write(&mut self, progress: &mut dyn FnMut(u64)) -> Result<u64> {
        if self.jobs.is_empty() {
            return Ok(0);
        }
        let mut tmp = temp_in(&self.dir)?;
        let path = tmp.path().to_path_buf();
        let file = tmp.as_file_mut();
        let jobs = &self.jobs;
        let clamped = std::thread::scope(|scope| -> Result<u64> {
            let (pieces, received) = mpsc::sync_channel::<Result<Piece>>(AHEAD);
            let (give_back, pool) = mpsc::channel::<Vec<u8>>();
            for _ in 0..AHEAD + 2 {
                give_back.send(vec![0; BLOCK]).expect("pool open");
            }
            let producer = scope.spawn(move || produce(jobs, &pieces, &pool));
            let written = write_pieces(file, &path, received, give_back, progress);
            // The producer stops once the channel is closed (a failed write drops it).
            let clamped = producer
                .join()
                .expect("the weight conversion thread panicked");
            written.map(|()| clamped)
        })?;
        self.file = Some(tmp);
        Ok(clamped)
    }

    /// The complete data file, still under its temp name, with its size (synced).
    fn finish(&mut self) -> Result<Option<(tempfile::TempPath, u64)>> {
        let Some(tmp) = self.file.take() else {
            return Ok(None);
        };
        tmp.as_file().sync_all().at(tmp.path())?;
        Ok(Some((tmp.into_temp_path(), self.len)))
    }
}

/// Sends each job's pieces, in order, computing derived data into buffers from `pool`;
/// returns the fp16 clamps. Stops at an error (sent on) or when the writer has gone (it failed).
fn produce<'m>(
    jobs: &[(u64, &'m Tensor)],
    pieces: &mpsc::SyncSender<Result<Piece<'m>>>,
    pool: &mpsc::Receiver<Vec<u8>>,
) -> u64 {
    let mut clamped = 0;
    let mut scratch = weights::Scratch::default();
    for &(at, tensor) in jobs {
        match produce_one(at, tensor, pieces, pool, &mut scratch, &mut clamped) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                let _ = pieces.send(Err(e));
                break;
            }
        }
    }
    clamped
}

/// The pieces of one tensor (see [`produce`]); `false` when the writer has gone.
fn produce_one<'m>(
    at: u64,
    tensor: &'m Tensor,
    pieces: &mpsc::SyncSender<Result<Piece<'m>>>,
    pool: &mpsc::Receiver<Vec<u8>>,
    scratch: &mut weights::Scratch,
    clamped: &mut u64,
) -> Result<bool> {
    let piece = match &tensor.data {
        TensorData::External { file, offset, len } => Piece::Copy {
            at,
            tensor,
            file,
            offset: *offset,
            len: *len,
        },
        TensorData::Derived(d) => {
            let source = d.source_bytes()?;
            // The source's mapped pages, let go block by block (those a block shares with
            // the next one with it).
            let mapped = match &d.source().data {
                TensorData::External { file, offset, .. } => Some((file, *offset)),
                _ => None,
            };
            let mut released = mapped.map_or(0, |(_, o)| o);
            let mut pos = at;
            for range in d.blocks(BLOCK) {
                let Ok(mut buf) = pool.recv() else {
                    return Ok(false);
                };
                let len = d.block_len(&range);
                if buf.len() < len {
                    buf.resize(len, 0);
                }
                let read_to = d.source_offset(range.end);
                *clamped += d.compute_block(&source, range, &mut buf[..len], scratch);
                if let Some((file, offset)) = mapped {
                    let end = offset + read_to;
                    file.release(released, end - released);
                    released = released.max(end / PAGE * PAGE);
                }
                if pieces.send(Ok(Piece::Block { at: pos, buf, len })).is_err() {
                    return Ok(false);
                }
                pos += len as u64;
            }
            return Ok(true);
        }
        _ => {
            let bytes = tensor.bytes()?;
            let expected = tensor.stored_len();
            if bytes.len() as u64 != expected {
                let msg = format!(
                    "holds {} bytes, not the {expected} its dims and type call for",
                    bytes.len()
                );
                return Err(Error::tensor(tensor.name(), msg));
            }
            Piece::Bytes { at, bytes }
        }
    };
    Ok(pieces.send(Ok(piece)).is_ok())
}

/// Writes the pieces to `file` in order (zeros between them for alignment), returning each
/// block's buffer to the pool, and starts the writeback of what is written as it goes.
fn write_pieces(
    file: &mut File,
    path: &Path,
    pieces: mpsc::Receiver<Result<Piece>>,
    pool: mpsc::Sender<Vec<u8>>,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    const ZEROS: [u8; 4096] = [0; 4096];
    let mut pos = 0u64;
    let mut flushed = 0u64;
    for piece in pieces {
        let piece = piece?;
        let (Piece::Block { at, .. } | Piece::Bytes { at, .. } | Piece::Copy { at, .. }) = piece;
        debug_assert!(at >= pos && at - pos < 4096, "pieces come in file order");
        file.write_all(&ZEROS[..(at - pos) as usize]).at(path)?;
        let len = match piece {
            Piece::Block { buf, len, .. } => {
                file.write_all(&buf[..len]).at(path)?;
                let _ = pool.send(buf);
                len as u64
            }
            Piece::Bytes { bytes, .. } => {
                file.write_all(&bytes).at(path)?;
                bytes.len() as u64
            }
            Piece::Copy {
                tensor,
                file: src,
                offset,
                len,
                ..
            } => {
                let mut reader = File::open(&src.path).at(&src.path)?;
                reader.seek(SeekFrom::Start(offset as u64)).at(&src.path)?;
                let copied = io::copy(&mut (&reader).take(len as u64), file).at(path)?;
                if copied != len as u64 {
                    return Err(Error::tensor(
                        tensor.name(),
                        format!(
                            "'{}' ended early (changed while reading?)",
                            src.path.display()
                        ),
                    ));
                }
                copied
            }
        };
        pos = at + len;
        progress(len);
        if pos - flushed >= WRITEBACK_EVERY {
            start_writeback(file, flushed, pos - flushed);
            flushed = pos;
        }
    }
    Ok(())
}

/// Starts writing `offset..offset+len` of `file` to disk without waiting for it (the final
/// fsync waits), so the disk is busy while the rest is computed. Only a hint: failures are
/// left to that fsync.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on an open descriptor; it touches no memory of this process.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File, _offset: u64, _len: u64) {}

/// Writes one file atomically: a temp file in the same folder, renamed into place.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = temp_in(folder_of(path))?;
    tmp.write_all(bytes).at(tmp.path())?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
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

/// Makes `dest` (a new, empty temp file) a reflink clone of `src`: a file of its own (one
/// link, as onnx requires) sharing the original's blocks, so nothing is copied. `false` where
/// the filesystem cannot clone (or `dest` is on another filesystem): copy it then.
fn clone_file(src: &Path, dest: &NamedTempFile) -> Result<bool> {
    let reader = File::open(src).at(src)?;
    Ok(reflink(&reader, dest.as_file()).is_ok())
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn reflink(src: &File, dest: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: FICLONE takes the source descriptor as its argument; both files are open.
    let r = unsafe { libc::ioctl(dest.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn reflink(_src: &File, _dest: &File) -> io::Result<()> {
    Err(io::ErrorKind::Unsupported.into())
}

/// Copies the data file `src` into `dest` (a temp file that will become `target`), kernel
/// side (copy_file_range), calling `progress(bytes)` as it goes.
fn copy_file(
    src: &DataFile,
    target: &Path,
    dest: &mut NamedTempFile,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    const CHUNK: u64 = 64 << 20;
    let cannot = |what: String| Error::Output {
        path: target.into(),
        msg: format!(
            "cannot copy the data file '{}' here: {what}",
            src.path.display()
        ),
    };
    let reader = File::open(&src.path).at(&src.path)?;
    let expected = src.bytes().len() as u64;
    let dest_path = dest.path().to_path_buf();
    let file = dest.as_file_mut();
    // Whatever a failed clone may have left.
    file.set_len(0).at(&dest_path)?;
    file.seek(SeekFrom::Start(0)).at(&dest_path)?;
    let mut copied = 0;
    loop {
        let n = io::copy(&mut (&reader).take(CHUNK), file).map_err(|e| cannot(e.to_string()))?;
        if n == 0 {
            break;
        }
        copied += n;
        progress(n);
    }
    if copied != expected {
        return Err(cannot(format!(
            "read {copied} bytes of {expected} (changed while reading?)"
        )));
    }
    file.sync_all().at(&dest_path)?;
    Ok(())
}

/// Files renamed into place, each with a hard link to what it replaced, so that a failure
/// part way puts every earlier output back.
#[derive(Default)]
struct Placement {
    done: Vec<(PathBuf, Option<tempfile::TempPath>)>,
}

impl Placement {
    fn place(&mut self, target: &Path, tmp: tempfile::TempPath) -> Result<()> {
        let backup = match fs::symlink_metadata(target) {
            Ok(m) if m.is_file() => {
                let dir = folder_of(target);
                let backup = temp_in(dir)?.into_temp_path();
                fs::remove_file(&backup).at(&*backup)?;
                // Without hard links (some filesystems), a failure cannot put it back.
                fs::hard_link(target, &backup).ok().map(|()| backup)
            }
            _ => None,
        };
        tmp.persist(target)
            .map_err(|e| Error::io(target, e.error))?;
        self.done.push((target.to_path_buf(), backup));
        Ok(())
    }

    /// Puts back what was there before (or removes what was not).
    fn undo(self) {
        for (target, backup) in self.done.into_iter().rev() {
            match backup {
                Some(b) => {
                    let _ = b.persist(&target);
                }
                None => {
                    let _ = fs::remove_file(&target);
                }
            }
        }
    }

    /// Drops the backups.
    fn commit(self) {
        drop(self.done);
    }
}

/// `fs::create_dir_all`, returning the folders it created (outermost first).
fn create_dir_all_tracked(dir: &Path) -> Result<Vec<PathBuf>> {
    let missing: Vec<PathBuf> = dir
        .ancestors()
        .filter(|a| !a.as_os_str().is_empty())
        .take_while(|a| fs::symlink_metadata(a).is_err())
        .map(Path::to_path_buf)
        .collect();
    fs::create_dir_all(dir).at(dir)?;
    Ok(missing.into_iter().rev().collect())
}

/// The folder `path` is in (`.` for a bare file name).
fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Are `a` and `b` the same file (device and inode: links and other spellings of one path
/// included)? `false` where either does not exist.
pub fn same_file(a: &Path, b: &Path) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A failure part way through placing puts back every earlier output.
    #[test]
    fn placement_undo_restores_what_was_there() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old.data");
        let fresh = dir.path().join("fresh.data");
        fs::write(&old, b"previous").unwrap();
        let staged = |bytes: &[u8]| {
            let mut t = temp_in(dir.path()).unwrap();
            t.write_all(bytes).unwrap();
            t.into_temp_path()
        };
        let mut placement = Placement::default();
        placement.place(&old, staged(b"new")).unwrap();
        placement.place(&fresh, staged(b"new")).unwrap();
        assert_eq!(fs::read(&old).unwrap(), b"new");
        // The model cannot go where a folder is.
        let blocked = dir.path().join("m.onnx");
        fs::create_dir(&blocked).unwrap();
        assert!(placement.place(&blocked, staged(b"model")).is_err());
        placement.undo();
        assert_eq!(fs::read(&old).unwrap(), b"previous");
        assert!(!fresh.exists());
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["m.onnx", "old.data"], "no temp file left");
    }
}
