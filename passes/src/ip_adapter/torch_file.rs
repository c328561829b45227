//! The tensors of a `torch.save` file (the zip format torch has written since 1.6: the pickled
//! object in `*/data.pkl`, each storage in `*/data/<key>`), as the published IP-Adapter `.bin`
//! files are: a dict of dicts of tensors, flattened here to `outer.inner` names. A pickle
//! machine for what `torch.save` writes of such a dict (protocol 2: dicts, OrderedDicts,
//! tuples, strings, ints, `torch._utils._rebuild_tensor_v2` over persistent storages) and
//! nothing else: any other object is an error naming it. Nothing is executed.
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use super::file::Weight;

#[derive(Clone, Debug)]
enum Value {
    None,
    /// A bool or float (read past: no tensor metadata attune needs is one).
    Number,
    Int(i64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String, String),
    /// A storage: its element type (torch's class name) and its file key.
    Storage(String, String),
    Tensor {
        storage: Box<Value>,
        offset: i64,
        shape: Vec<i64>,
        stride: Vec<i64>,
    },
    Mark,
}

fn name(v: &Value) -> String {
    match v {
        Value::Global(m, n) => format!("{m}.{n}"),
        other => format!("{other:?}").chars().take(60).collect(),
    }
}

/// Runs the pickle in `bytes`; the object it builds.
fn unpickle(bytes: &[u8]) -> Result<Value, String> {
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: HashMap<u32, Value> = HashMap::new();
    let mut at = 0usize;
    let take = |at: &mut usize, n: usize| -> Result<&[u8], String> {
        let s = bytes.get(*at..*at + n).ok_or("truncated pickle")?;
        *at += n;
        Ok(s)
    };
    let u32le = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
    let pop = |stack: &mut Vec<Value>| {
        stack
            .pop()
            .ok_or_else(|| "pickle stack underflow".to_string())
    };
    let since_mark = |stack: &mut Vec<Value>| -> Result<Vec<Value>, String> {
        let m = stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or("pickle: no mark")?;
        let items = stack.split_off(m + 1);
        stack.pop();
        Ok(items)
    };
    loop {
        let op = *take(&mut at, 1)?.first().expect("one byte");
        match op {
            0x80 => {
                take(&mut at, 1)?;
            }
            0x95 => {
                take(&mut at, 8)?;
            }
            b'.' => return pop(&mut stack),
            b'}' => stack.push(Value::Dict(Vec::new())),
            b']' => stack.push(Value::List(Vec::new())),
            b')' => stack.push(Value::Tuple(Vec::new())),
            b'(' => stack.push(Value::Mark),
            b'N' => stack.push(Value::None),
            0x88 | 0x89 => stack.push(Value::Number),
            b'J' => {
                let b = take(&mut at, 4)?;
                stack.push(Value::Int(i64::from(i32::from_le_bytes(
                    b.try_into().expect("4"),
                ))));
            }
            b'K' => stack.push(Value::Int(i64::from(take(&mut at, 1)?[0]))),
            b'M' => {
                let b = take(&mut at, 2)?;
                stack.push(Value::Int(i64::from(u16::from_le_bytes([b[0], b[1]]))));
            }
            0x8a => {
                let n = take(&mut at, 1)?[0] as usize;
                let b = take(&mut at, n)?;
                if n > 8 {
                    return Err("pickle: an integer over 64 bits".into());
                }
                let mut v: i64 = 0;
                for (i, byte) in b.iter().enumerate() {
                    v |= i64::from(*byte) << (8 * i);
                }
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                stack.push(Value::Int(v));
            }
            b'G' => {
                take(&mut at, 8)?;
                stack.push(Value::Number);
            }
            b'X' | b'T' | b'U' | 0x8c => {
                let n = match op {
                    b'X' | b'T' => u32le(take(&mut at, 4)?) as usize,
                    _ => take(&mut at, 1)?[0] as usize,
                };
                let s = take(&mut at, n)?;
                stack.push(Value::Str(String::from_utf8_lossy(s).into_owned()));
            }
            b'q' => {
                let k = u32::from(take(&mut at, 1)?[0]);
                memo.insert(
                    k,
                    stack.last().cloned().ok_or("pickle: nothing to memoize")?,
                );
            }
            b'r' => {
                let k = u32le(take(&mut at, 4)?);
                memo.insert(
                    k,
                    stack.last().cloned().ok_or("pickle: nothing to memoize")?,
                );
            }
            0x94 => {
                let k = memo.len() as u32;
                memo.insert(
                    k,
                    stack.last().cloned().ok_or("pickle: nothing to memoize")?,
                );
            }
            b'h' | b'j' => {
                let k = if op == b'h' {
                    u32::from(take(&mut at, 1)?[0])
                } else {
                    u32le(take(&mut at, 4)?)
                };
                stack.push(memo.get(&k).cloned().ok_or("pickle: unknown memo key")?);
            }
            b'c' => {
                let line = |at: &mut usize| -> Result<String, String> {
                    let end = bytes[*at..]
                        .iter()
                        .position(|b| *b == b'\n')
                        .ok_or("pickle: bad GLOBAL")?;
                    let s = String::from_utf8_lossy(&bytes[*at..*at + end]).into_owned();
                    *at += end + 1;
                    Ok(s)
                };
                let (m, n) = (line(&mut at)?, line(&mut at)?);
                stack.push(Value::Global(m, n));
            }
            0x93 => {
                let n = pop(&mut stack)?;
                let m = pop(&mut stack)?;
                match (m, n) {
                    (Value::Str(m), Value::Str(n)) => stack.push(Value::Global(m, n)),
                    _ => return Err("pickle: bad STACK_GLOBAL".into()),
                }
            }
            b't' => {
                let items = since_mark(&mut stack)?;
                stack.push(Value::Tuple(items));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let items =
                    stack.split_off(stack.len().checked_sub(n).ok_or("pickle stack underflow")?);
                stack.push(Value::Tuple(items));
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                let Value::Tuple(t) = &pid else {
                    return Err("pickle: a persistent id that is not a tuple".into());
                };
                match &t[..] {
                    [
                        Value::Str(kind),
                        Value::Global(_, class),
                        Value::Str(key),
                        ..,
                    ] if kind == "storage" => {
                        stack.push(Value::Storage(class.clone(), key.clone()))
                    }
                    _ => {
                        return Err(format!(
                            "pickle: persistent id {} is not a torch storage",
                            name(&pid)
                        ));
                    }
                }
            }
            b'R' | 0x81 => {
                let args = pop(&mut stack)?;
                let f = pop(&mut stack)?;
                let Value::Tuple(args) = args else {
                    return Err("pickle: call arguments are not a tuple".into());
                };
                let built = match &f {
                    Value::Global(m, n) if m == "collections" && n == "OrderedDict" => {
                        Value::Dict(Vec::new())
                    }
                    Value::Global(m, n) if m == "torch._utils" && n == "_rebuild_tensor_v2" => {
                        let ints = |v: &Value| -> Result<Vec<i64>, String> {
                            match v {
                                Value::Tuple(t) => {
                                    t.iter()
                                        .map(|x| match x {
                                            Value::Int(i) => Ok(*i),
                                            _ => Err("pickle: a tensor size that is not an int"
                                                .to_string()),
                                        })
                                        .collect()
                                }
                                _ => Err("pickle: a tensor size that is not a tuple".into()),
                            }
                        };
                        match &args[..] {
                            [
                                storage @ Value::Storage(..),
                                Value::Int(offset),
                                shape,
                                stride,
                                ..,
                            ] => Value::Tensor {
                                storage: Box::new(storage.clone()),
                                offset: *offset,
                                shape: ints(shape)?,
                                stride: ints(stride)?,
                            },
                            _ => {
                                return Err(
                                    "pickle: _rebuild_tensor_v2 with unexpected arguments".into()
                                );
                            }
                        }
                    }
                    other => {
                        return Err(format!(
                            "pickle: it builds a {} object; attune reads dicts of tensors only",
                            name(other)
                        ));
                    }
                };
                stack.push(built);
            }
            b'b' => {
                // BUILD: the state of an OrderedDict (or a tensor's metadata): nothing to keep.
                pop(&mut stack)?;
            }
            b's' => {
                let v = pop(&mut stack)?;
                let k = pop(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::Dict(d)) => d.push((k, v)),
                    _ => return Err("pickle: SETITEM on a non-dict".into()),
                }
            }
            b'u' => {
                let items = since_mark(&mut stack)?;
                let Some(Value::Dict(d)) = stack.last_mut() else {
                    return Err("pickle: SETITEMS on a non-dict".into());
                };
                for pair in items.chunks(2) {
                    if let [k, v] = pair {
                        d.push((k.clone(), v.clone()));
                    }
                }
            }
            b'a' => {
                let v = pop(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::List(l)) => l.push(v),
                    _ => return Err("pickle: APPEND on a non-list".into()),
                }
            }
            b'e' => {
                let items = since_mark(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::List(l)) => l.extend(items),
                    _ => return Err("pickle: APPENDS on a non-list".into()),
                }
            }
            other => {
                return Err(format!(
                    "pickle: opcode 0x{other:02x} is not one torch.save writes for a dict of tensors"
                ));
            }
        }
    }
}

/// Every tensor of the `torch.save` file at `path`, named `outer.inner` (nested dicts joined
/// with dots), as f32.
pub fn read(path: &Path) -> Result<Vec<(String, Weight)>, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| format!("not a torch.save zip file (legacy torch files are not read): {e}"))?;
    let pkl = (0..zip.len())
        .filter_map(|i| {
            zip.by_index(i)
                .ok()
                .and_then(|f| f.name().ok().map(|n| n.to_string()))
        })
        .find(|n| n.ends_with("/data.pkl") || n == "data.pkl")
        .ok_or("no data.pkl in the zip")?;
    let prefix = pkl
        .strip_suffix("data.pkl")
        .expect("found by its suffix")
        .to_string();
    let mut bytes = Vec::new();
    zip.by_name(&pkl)
        .map_err(|e| e.to_string())?
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    let root = unpickle(&bytes)?;
    let mut out = Vec::new();
    let mut stack = vec![(String::new(), root)];
    while let Some((at, v)) = stack.pop() {
        match v {
            Value::Dict(items) => {
                for (k, v) in items.into_iter().rev() {
                    let Value::Str(k) = k else {
                        return Err(format!("a key under '{at}' is not a string"));
                    };
                    let full = if at.is_empty() {
                        k
                    } else {
                        format!("{at}.{k}")
                    };
                    stack.push((full, v));
                }
            }
            Value::Tensor {
                storage,
                offset,
                shape,
                stride,
            } => {
                let Value::Storage(class, key) = *storage else {
                    unreachable!("built from a storage")
                };
                let width = match class.as_str() {
                    "FloatStorage" => 4,
                    "HalfStorage" | "BFloat16Storage" => 2,
                    other => return Err(format!("'{at}': a {other}, not a float tensor")),
                };
                let mut contiguous = vec![1i64; shape.len()];
                for i in (0..shape.len().saturating_sub(1)).rev() {
                    contiguous[i] = contiguous[i + 1] * shape[i + 1];
                }
                if shape.iter().product::<i64>() > 1 && stride != contiguous {
                    return Err(format!(
                        "'{at}': a non-contiguous tensor (stride {stride:?})"
                    ));
                }
                let mut data = Vec::new();
                zip.by_name(&format!("{prefix}data/{key}"))
                    .map_err(|e| format!("'{at}': storage {key}: {e}"))?
                    .read_to_end(&mut data)
                    .map_err(|e| e.to_string())?;
                let count = shape.iter().product::<i64>().max(0) as usize;
                let start = offset.max(0) as usize * width;
                let raw = data
                    .get(start..start + count * width)
                    .ok_or_else(|| format!("'{at}': storage {key} is shorter than the tensor"))?;
                let values: Vec<f32> = match width {
                    4 => raw
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                    _ if class == "HalfStorage" => raw
                        .chunks_exact(2)
                        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                        .collect(),
                    _ => raw
                        .chunks_exact(2)
                        .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                        .collect(),
                };
                out.push((
                    at,
                    Weight {
                        shape: shape.iter().map(|d| *d as usize).collect(),
                        data: values,
                    },
                ));
            }
            other => {
                return Err(format!(
                    "'{at}' holds {}, not a tensor or a dict",
                    name(&other)
                ));
            }
        }
    }
    Ok(out)
}
