//! Writes the synthetic weights in upstream MiDaS's full key layouts (every key of
//! `tests/fixtures/upstream_layout.tsv` for MiDaS small and `tests/fixtures/dpt_layout.tsv` for
//! DPT-Hybrid, `tests/fixtures/depth_anything_vits_layout.tsv` for Depth Anything V2 Small,
//! which `scripts/reference/{make_fixtures,dpt,depth_anything}.py` dumped from the real upstream
//! models) as real PyTorch and safetensors files, so that the loaders are exercised on the
//! formats users bring.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

use midas_model::weights::synthetic::{self, Role};

/// One entry of upstream's state dict.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// `float32` or `int64`.
    pub dtype: String,
    /// The shape.
    pub shape: Vec<usize>,
}

/// Upstream MiDaS small's layout, in its order.
pub fn upstream_layout() -> Vec<Entry> {
    layout("upstream_layout.tsv")
}

/// Upstream DPT-Hybrid's layout, in its order.
pub fn dpt_layout() -> Vec<Entry> {
    layout("dpt_layout.tsv")
}

/// Upstream Depth Anything V2 Small's layout, in its order.
pub fn depth_anything_layout() -> Vec<Entry> {
    layout("depth_anything_vits_layout.tsv")
}

/// A layout fixture (found from the root crate's and `model-import`'s tests).
fn layout(name: &str) -> Vec<Entry> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = if manifest.join("tests/fixtures").is_dir() {
        manifest
    } else {
        manifest.parent().unwrap()
    };
    std::fs::read_to_string(root.join("tests/fixtures").join(name))
        .expect("layout fixture")
        .lines()
        .map(|line| {
            let mut parts = line.split('\t');
            let key = parts.next().unwrap().to_string();
            let dtype = parts.next().unwrap().to_string();
            let dims = parts.next().unwrap_or_default();
            let shape = dims
                .split(',')
                .filter(|d| !d.is_empty())
                .map(|d| d.parse().unwrap())
                .collect();
            Entry { key, dtype, shape }
        })
        .collect()
}

/// A tensor's value: little-endian bytes.
#[derive(Clone, Debug)]
pub struct Tensor {
    /// Key (possibly prefixed).
    pub key: String,
    /// `float32` or `int64`.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Data.
    pub bytes: Vec<u8>,
}

/// The role of an upstream key, as `scripts/reference/synthetic.py` decides it.
fn role(key: &str, rank: usize, keys: &HashSet<&str>) -> Option<Role> {
    let (prefix, leaf) = key.rsplit_once('.').unwrap();
    if keys.contains(format!("{prefix}.running_mean").as_str()) {
        return match leaf {
            "weight" => Some(Role::BnWeight),
            "bias" => Some(Role::BnBias),
            "running_mean" => Some(Role::BnRunningMean),
            "running_var" => Some(Role::BnRunningVar),
            _ => None, // num_batches_tracked
        };
    }
    Some(if leaf == "weight" && rank == 4 {
        Role::ConvWeight
    } else {
        Role::ConvBias
    })
}

/// The synthetic state dict in upstream's layout, every key prefixed by `prefix`.
pub fn synthetic_state_dict(prefix: &str) -> Vec<Tensor> {
    let layout = upstream_layout();
    let keys: HashSet<&str> = layout.iter().map(|e| e.key.as_str()).collect();
    layout
        .iter()
        .map(|entry| {
            let bytes = match role(&entry.key, entry.shape.len(), &keys) {
                Some(role) => synthetic::values(&entry.key, &entry.shape, role)
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
                None => 0i64.to_le_bytes().to_vec(),
            };
            Tensor {
                key: format!("{prefix}{}", entry.key),
                dtype: entry.dtype.clone(),
                shape: entry.shape.clone(),
                bytes,
            }
        })
        .collect()
}

/// The role of a DPT-Hybrid key, as `scripts/reference/synthetic.py`'s `dpt_kind_of` decides it.
fn dpt_role(key: &str, rank: usize) -> Role {
    let (parent, leaf) = key.rsplit_once('.').unwrap();
    let parent_leaf = parent.rsplit('.').next().unwrap_or(parent);
    if leaf == "cls_token" || leaf == "pos_embed" {
        Role::Embedding
    } else if parent_leaf.starts_with("norm") {
        if leaf == "weight" {
            Role::BnWeight
        } else {
            Role::BnBias
        }
    } else if leaf == "weight" && rank >= 2 {
        Role::ConvWeight
    } else {
        Role::ConvBias
    }
}

/// The synthetic DPT-Hybrid state dict in upstream's layout (all 368 keys, the 8 the forward
/// never uses included), every key prefixed by `prefix`.
pub fn synthetic_dpt_state_dict(prefix: &str) -> Vec<Tensor> {
    dpt_layout()
        .iter()
        .map(|entry| Tensor {
            key: format!("{prefix}{}", entry.key),
            dtype: entry.dtype.clone(),
            shape: entry.shape.clone(),
            bytes: synthetic::values(
                &entry.key,
                &entry.shape,
                dpt_role(&entry.key, entry.shape.len()),
            )
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        })
        .collect()
}

/// The synthetic Depth Anything V2 Small state dict in upstream's layout (every key, the unused
/// mask token and first unit of `refinenet4` included), every key prefixed by `prefix`; the
/// roles are `synthetic.py`'s `depth_anything_kind_of`.
pub fn synthetic_depth_anything_state_dict(prefix: &str) -> Vec<Tensor> {
    depth_anything_layout()
        .iter()
        .map(|entry| {
            let leaf = entry.key.rsplit('.').next().unwrap_or_default();
            let role = match leaf {
                "mask_token" => Role::Embedding,
                "gamma" => Role::BnWeight,
                _ if entry.key == "depth_head.scratch.output_conv2.2.bias" => Role::HeadBias,
                _ => dpt_role(&entry.key, entry.shape.len()),
            };
            Tensor {
                key: format!("{prefix}{}", entry.key),
                dtype: entry.dtype.clone(),
                shape: entry.shape.clone(),
                bytes: synthetic::values(&entry.key, &entry.shape, role)
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            }
        })
        .collect()
}

/// Writes `tensors` as a safetensors file.
pub fn write_safetensors(path: &Path, tensors: &[Tensor]) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            let dtype = if t.dtype == "int64" {
                safetensors::Dtype::I64
            } else {
                safetensors::Dtype::F32
            };
            (
                t.key.clone(),
                safetensors::tensor::TensorView::new(dtype, t.shape.clone(), &t.bytes).unwrap(),
            )
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, None, path).unwrap();
}

/// A value in a checkpoint: what `torch.save` is given.
pub enum Value {
    /// A tensor (by index into the tensor list).
    Tensor(Tensor),
    /// A Python int.
    Int(i64),
    /// A Python float.
    Float(f64),
    /// A Python dict with string keys.
    Dict(Vec<(String, Value)>),
}

/// A state dict as a checkpoint value.
pub fn as_dict(tensors: Vec<Tensor>) -> Value {
    Value::Dict(
        tensors
            .into_iter()
            .map(|t| (t.key.clone(), Value::Tensor(t)))
            .collect(),
    )
}

/// Pickle protocol 2, as much of it as `torch.save` uses for state dicts.
struct Pickler {
    out: Vec<u8>,
    storages: Vec<Tensor>,
}

impl Pickler {
    fn string(&mut self, text: &str) {
        self.out.push(b'X');
        self.out
            .extend_from_slice(&(text.len() as u32).to_le_bytes());
        self.out.extend_from_slice(text.as_bytes());
    }

    fn int(&mut self, value: i64) {
        self.out.push(b'J');
        self.out.extend_from_slice(&(value as i32).to_le_bytes());
    }

    fn global(&mut self, module: &str, name: &str) {
        self.out.push(b'c');
        self.out
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }

    fn int_tuple(&mut self, values: &[usize]) {
        self.out.push(b'(');
        for &v in values {
            self.int(v as i64);
        }
        self.out.push(b't');
    }

    fn value(&mut self, value: Value) {
        match value {
            Value::Int(v) => self.int(v),
            Value::Float(v) => {
                self.out.push(b'G');
                self.out.extend_from_slice(&v.to_be_bytes());
            }
            Value::Dict(items) => {
                self.out.push(b'}');
                self.out.push(b'(');
                for (key, item) in items {
                    self.string(&key);
                    self.value(item);
                }
                self.out.push(b'u');
            }
            Value::Tensor(tensor) => {
                // torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)
                let index = self.storages.len();
                let element = if tensor.dtype == "int64" { 8 } else { 4 };
                let numel = tensor.bytes.len() / element;
                let mut strides = vec![0usize; tensor.shape.len()];
                let mut stride = 1;
                for (i, &dim) in tensor.shape.iter().enumerate().rev() {
                    strides[i] = stride;
                    stride *= dim;
                }
                self.global("torch._utils", "_rebuild_tensor_v2");
                self.out.push(b'(');
                self.out.push(b'(');
                self.string("storage");
                self.global(
                    "torch",
                    if tensor.dtype == "int64" {
                        "LongStorage"
                    } else {
                        "FloatStorage"
                    },
                );
                self.string(&index.to_string());
                self.string("cpu");
                self.int(numel as i64);
                self.out.push(b't');
                self.out.push(b'Q');
                self.int(0);
                self.int_tuple(&tensor.shape);
                self.int_tuple(&strides);
                self.out.push(0x89); // False
                self.global("collections", "OrderedDict");
                self.out.push(b')');
                self.out.push(b'R');
                self.out.push(b't');
                self.out.push(b'R');
                self.storages.push(tensor);
            }
        }
    }
}

/// Writes `value` as `torch.save` does (ZIP container, pickle protocol 2, one entry per storage).
pub fn write_pt(path: &Path, value: Value) {
    let mut pickler = Pickler {
        out: vec![0x80, 0x02],
        storages: Vec::new(),
    };
    pickler.value(value);
    pickler.out.push(b'.');
    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", options).unwrap();
    zip.write_all(&pickler.out).unwrap();
    zip.start_file("archive/byteorder", options).unwrap();
    zip.write_all(b"little").unwrap();
    for (index, storage) in pickler.storages.iter().enumerate() {
        zip.start_file(format!("archive/data/{index}"), options)
            .unwrap();
        zip.write_all(&storage.bytes).unwrap();
    }
    zip.start_file("archive/version", options).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap();
}
