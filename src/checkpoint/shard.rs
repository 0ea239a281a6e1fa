//! One safetensors file of a checkpoint: its validated header, and reads of single tensors at
//! the byte ranges the header gives.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use crate::error::{Error, Result};
use crate::io::HostTensor;
use crate::io::header::{Header, TensorEntry};

/// A safetensors file opened for reading tensor by tensor. Opening reads the header only.
#[derive(Debug)]
pub struct Shard {
    path: PathBuf,
    header: Header,
    by_name: HashMap<String, usize>,
    file_len: u64,
    /// One reader at a time: a read is a seek then a read on the shared handle.
    file: Mutex<File>,
}

impl Shard {
    /// Opens `path` and reads and validates its header.
    pub fn open(path: &Path) -> Result<Self> {
        let label = path.display().to_string();
        let io_error = |source| Error::Io {
            path: label.clone(),
            source,
        };
        let mut file = File::open(path).map_err(io_error)?;
        let file_len = file.metadata().map_err(io_error)?.len();
        let header = Header::read(&mut file, file_len, &label)?;
        let by_name = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            header,
            by_name,
            file_len,
            file: Mutex::new(file),
        })
    }

    /// The shard file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file name (`model-00001-of-00004.safetensors`), as an index's `weight_map` says it.
    pub fn file_name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Every tensor, in the order of its data in the file.
    pub fn tensors(&self) -> &[TensorEntry] {
        &self.header.tensors
    }

    /// The header's `__metadata__` (transformers writes `{"format": "pt"}`).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.header.metadata
    }

    /// File offset of the first data byte.
    pub fn data_start(&self) -> u64 {
        self.header.data_start
    }

    /// Size of the file in bytes, as it was when opened.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Where tensor `name` lies in the file, or `None` if this shard does not hold it.
    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.by_name.get(name).map(|i| &self.header.tensors[*i])
    }

    /// The raw bytes of tensor `name`, read from its byte range alone.
    pub fn read_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let entry = self.entry(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            file: self.path.display().to_string(),
        })?;
        let mut bytes = vec![0u8; entry.len() as usize];
        let mut file = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        file.seek(SeekFrom::Start(entry.range.start))
            .and_then(|_| file.read_exact(&mut bytes))
            .map_err(|source| Error::Io {
                path: format!("{} (tensor `{name}`)", self.path.display()),
                source,
            })?;
        Ok(bytes)
    }

    /// Tensor `name` with its dtype and shape, read from its byte range alone.
    pub fn read_tensor(&self, name: &str) -> Result<HostTensor> {
        let bytes = self.read_bytes(name)?;
        let entry = &self.header.tensors[self.by_name[name]];
        Ok(HostTensor::from_raw(name, entry.dtype, &entry.shape, bytes))
    }
}
