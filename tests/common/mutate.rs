//! Seeded mutations (xorshift64*, so every case replays from its seed): structural ones of
//! an ONNX model as hand-edited or tool-written models carry, and byte/text ones for the
//! other readers. Shared by the mutation tests and the fuzz targets (tests/fuzz.rs).
use attune_compiler::onnx::ModelProto;

/// A small deterministic generator (xorshift64*), so a failing mutation can be replayed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
}

/// One structural mutation of the kind hand-edited or tool-written models carry; returns
/// what it did.
pub fn mutate(m: &mut ModelProto, rng: &mut Rng) -> String {
    use attune_compiler::onnx::attribute_proto::AttributeType;
    let g = m.graph.as_mut().expect("a graph");
    let n = rng.below(g.node.len());
    let node_name = g.node[n].name.clone();
    match rng.below(7) {
        0 => {
            let Some(a) =
                (!g.node[n].attribute.is_empty()).then(|| rng.below(g.node[n].attribute.len()))
            else {
                return format!("{node_name}: no attribute");
            };
            let a = &mut g.node[n].attribute[a];
            let v = rng.pick(&[-5i64, -1, 0, 1, 7, 1 << 40]);
            match AttributeType::try_from(a.r#type) {
                Ok(AttributeType::Int) => a.i = v,
                Ok(AttributeType::Ints) if !a.ints.is_empty() => {
                    let i = rng.below(a.ints.len());
                    a.ints[i] = v;
                }
                Ok(AttributeType::Float) => a.f = rng.pick(&[0.0, -1.0, f32::NAN, 1e30]),
                _ => a.name = "renamed".into(),
            }
            format!("{node_name}: attribute {} set with {v}", a.name)
        }
        1 if !g.node[n].input.is_empty() => {
            let other = rng.below(g.node.len());
            let i = rng.below(g.node[n].input.len());
            let to = match rng.below(3) {
                0 => String::new(),
                1 => "nowhere".into(),
                _ => g.node[other].output.first().cloned().unwrap_or_default(),
            };
            g.node[n].input[i] = to.clone();
            format!("{node_name}: input {i} reads '{to}'")
        }
        2 => {
            g.node[n].input.pop();
            format!("{node_name}: last input dropped")
        }
        3 => {
            let t = rng.below(g.initializer.len());
            let t = &mut g.initializer[t];
            if t.dims.is_empty() {
                return format!("{}: scalar kept", t.name);
            }
            let d = rng.below(t.dims.len());
            t.dims[d] = rng.pick(&[0, 1, 2, -1, 1 << 33]);
            format!("{}: dims {:?}", t.name, t.dims)
        }
        4 => {
            let op = rng.pick(&[
                "Softmax",
                "MatMul",
                "Reshape",
                "Transpose",
                "Add",
                "Cast",
                "Foo",
            ]);
            g.node[n].op_type = op.into();
            format!("{node_name}: now a {op}")
        }
        5 => {
            let copy = g.node[n].clone();
            g.node.push(copy);
            format!("{node_name}: duplicated")
        }
        _ => {
            let io = rng.below(g.input.len());
            let dims = g.input[io]
                .r#type
                .as_mut()
                .and_then(|t| match t.value.as_mut()? {
                    attune_compiler::onnx::type_proto::Value::TensorType(t) => t.shape.as_mut(),
                    _ => None,
                });
            let Some(dims) = dims.filter(|d| !d.dim.is_empty()) else {
                return "no input dims".into();
            };
            use attune_compiler::onnx::tensor_shape_proto::dimension::Value;
            let d = rng.below(dims.dim.len());
            dims.dim[d].value = Some(match rng.below(2) {
                0 => Value::DimValue(rng.pick(&[0, 1, 3, -2, 1 << 40])),
                _ => Value::DimParam(rng.pick(&["x", "batch", ""]).into()),
            });
            format!("input {io}: dim {d} changed")
        }
    }
}

/// Numbers that break readers: boundaries of the integer types, zero, negatives, huge sizes.
const INTERESTING: [i64; 10] = [
    0,
    -1,
    1,
    255,
    -128,
    1 << 31,
    1 << 40,
    i64::MIN,
    i64::MAX,
    -(1 << 33),
];

/// One byte-level mutation of `data`: a flipped bit, an interesting byte or 8-byte integer
/// written over, a range deleted, duplicated or cut short; returns what it did.
pub fn mutate_bytes(data: &mut Vec<u8>, rng: &mut Rng) -> String {
    if data.is_empty() {
        data.push(rng.next() as u8);
        return "byte added".into();
    }
    let at = rng.below(data.len());
    match rng.below(6) {
        0 => {
            let bit = rng.below(8);
            data[at] ^= 1 << bit;
            format!("bit {bit} of byte {at} flipped")
        }
        1 => {
            let b = rng.pick(&[0u8, 0xff, 0x7f, 0x80, b'\n', b'"']);
            data[at] = b;
            format!("byte {at} = {b:#x}")
        }
        2 => {
            let v = rng.pick(&INTERESTING);
            let bytes = v.to_le_bytes();
            let n = rng.pick(&[2usize, 4, 8]).min(data.len() - at);
            data[at..at + n].copy_from_slice(&bytes[..n]);
            format!("{n} bytes at {at} = {v}")
        }
        3 => {
            let n = rng.below(16).min(data.len() - at) + 1;
            data.drain(at..(at + n).min(data.len()));
            format!("{n} bytes at {at} deleted")
        }
        4 => {
            let n = (rng.below(32) + 1).min(data.len() - at);
            let copy: Vec<u8> = data[at..at + n].to_vec();
            let to = rng.below(data.len());
            data.splice(to..to, copy);
            format!("{n} bytes from {at} copied to {to}")
        }
        _ => {
            data.truncate(at);
            format!("cut at {at}")
        }
    }
}

/// One mutation of a text file (TOML): a number replaced by an extreme one, or a byte one.
pub fn mutate_text(data: &mut Vec<u8>, rng: &mut Rng) -> String {
    let numbers: Vec<(usize, usize)> = {
        let mut out = Vec::new();
        let mut i = 0;
        while i < data.len() {
            if data[i].is_ascii_digit() {
                let start = i;
                while i < data.len() && (data[i].is_ascii_digit() || data[i] == b'.') {
                    i += 1;
                }
                out.push((start, i));
            }
            i += 1;
        }
        out
    };
    if numbers.is_empty() || rng.below(3) == 0 {
        return mutate_bytes(data, rng);
    }
    let (a, b) = numbers[rng.below(numbers.len())];
    let to = rng.pick(&[
        "nan",
        "inf",
        "-inf",
        "-1",
        "0",
        "1e30",
        "99999999999",
        "-0.5",
        "\"x\"",
        "[]",
    ]);
    data.splice(a..b, to.bytes());
    format!("number at {a} = {to}")
}
