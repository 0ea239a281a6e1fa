//! The GEMV autotuner and its cache.
//!
//! Which GEMV variant (workgroup size, rows per workgroup, split-K, reduction) is fastest differs
//! from GPU to GPU, so none is hard-wired: [`tune_gemv`] times every candidate a weight offers
//! on the device at hand with timestamp queries, after checking each against the CPU reference,
//! and records the fastest in a [`TuneCache`]. A context consults its cache
//! ([`GpuContext::set_tuning`]) whenever it plans a GEMV; where the cache has no entry for the
//! device and kernel, the kernels take their heuristic default, which is safe everywhere.
//! The tuner times the bare GEMV; launches with a fused OFT prologue or LoRA epilogue use the
//! heuristic, whose split-K keeps the prologue's rotation to each workgroup's slice of x.
//!
//! The cache is a JSON file keyed by the adapter (name, vendor and device ids, backend, driver
//! and its version) and the kernel (format specialization, activation dtype, weight shape and
//! row specialization), so one file can serve several GPUs and drivers, and a driver update
//! falls back to the defaults until it is tuned again. `quantadapt tune` fills it, and the
//! command loads it at start from [`TuneCache::default_path`].

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::gpu::{ActDtype, GpuContext};
use crate::kernels::gemv::GemvVariant;

/// Format version of the cache file; a file of another version is refused, not misread.
pub const CACHE_VERSION: u32 = 1;

/// The file `quantadapt` reads its tuning from unless told otherwise: `$QUANTADAPT_TUNE_CACHE`,
/// else `quantadapt/tune.json` under `$XDG_CACHE_HOME` or `$HOME/.cache`.
pub const CACHE_ENV: &str = "QUANTADAPT_TUNE_CACHE";

/// The adapter and driver a tuning was measured on.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeviceKey {
    /// Adapter name as the driver reports it.
    pub name: String,
    /// PCI vendor id (0 where the backend has none).
    pub vendor: u32,
    /// PCI device id (0 where the backend has none).
    pub device: u32,
    /// wgpu backend (`Vulkan`, `Metal`, `Dx12`, `Gl`, `BrowserWebGpu`).
    pub backend: String,
    /// Driver name.
    pub driver: String,
    /// Driver version string.
    pub driver_info: String,
}

impl DeviceKey {
    /// The key of the adapter behind `ctx`.
    pub fn of(ctx: &GpuContext) -> Self {
        let info = &ctx.info;
        Self {
            name: info.name.clone(),
            vendor: info.vendor,
            device: info.device,
            backend: format!("{:?}", info.backend),
            driver: info.driver.clone(),
            driver_info: info.driver_info.clone(),
        }
    }
}

/// One GEMV kernel as the tuner tells them apart.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GemvKey {
    /// The format specialization (format, bits, compute dtype, word decoding), e.g.
    /// `HQQ FIELD_BITS=4 COMPUTE=0 words`.
    pub format: String,
    /// Activation dtype: `f32` or `f16`.
    pub act: String,
    /// Output features of the launch (one row slice of the weight).
    pub out_features: usize,
    /// Input features.
    pub in_features: usize,
    /// The row specialization (`MAX_M`: rows of x rounded up to a power of two).
    pub max_rows: u32,
}

impl GemvKey {
    /// A key for `format` at `act` activations, `(out, in)` features and `max_rows`.
    pub fn new(format: String, act: ActDtype, shape: (usize, usize), max_rows: u32) -> Self {
        Self {
            format,
            act: act.wgsl().to_string(),
            out_features: shape.0,
            in_features: shape.1,
            max_rows,
        }
    }
}

/// The winner of one tuning.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TuneEntry {
    /// Where it was measured.
    pub device: DeviceKey,
    /// Which kernel.
    pub gemv: GemvKey,
    /// The fastest variant that matched the CPU reference.
    pub variant: GemvVariant,
    /// Its GPU time per launch in microseconds.
    pub micros: f64,
}

/// Tuned GEMV variants, per device and kernel (see the module docs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TuneCache {
    version: u32,
    entries: Vec<TuneEntry>,
}

impl Default for TuneCache {
    fn default() -> Self {
        Self {
            version: CACHE_VERSION,
            entries: Vec::new(),
        }
    }
}

impl TuneCache {
    /// Reads a cache file. Fails with [`Error::Io`] when it cannot be read and
    /// [`Error::Config`] when it is not a cache of this version.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cache: Self = serde_json::from_str(&text)
            .map_err(|e| Error::config(format!("{} is not a tuning cache: {e}", path.display())))?;
        if cache.version != CACHE_VERSION {
            return Err(Error::config(format!(
                "{} is a tuning cache of version {}; this build reads version {CACHE_VERSION}",
                path.display(),
                cache.version
            )));
        }
        Ok(cache)
    }

    /// [`Self::load`], or an empty cache where the file does not exist.
    pub fn load_or_empty(path: &Path) -> Result<Self> {
        if path.exists() {
            Self::load(path)
        } else {
            Ok(Self::default())
        }
    }

    /// Writes the cache to `path` through a temporary file renamed into place, so a reader never
    /// sees half a file and a failed write leaves the old one.
    pub fn save(&self, path: &Path) -> Result<()> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::config(format!("tuning cache: {e}")))?;
        let mut staged = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(dir, e))?;
        std::io::Write::write_all(&mut staged, text.as_bytes()).map_err(|e| Error::io(path, e))?;
        staged.persist(path).map_err(|e| Error::io(path, e.error))?;
        Ok(())
    }

    /// The cache file named by `$QUANTADAPT_TUNE_CACHE`, else `quantadapt/tune.json` in the
    /// user's cache folder; `None` where neither the variable nor a home folder is set.
    pub fn default_path() -> Option<PathBuf> {
        if let Some(path) = std::env::var_os(CACHE_ENV) {
            return Some(PathBuf::from(path));
        }
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
        Some(base.join("quantadapt").join("tune.json"))
    }

    /// The tuned variant of `gemv` on `device`, if any.
    pub fn lookup(&self, device: &DeviceKey, gemv: &GemvKey) -> Option<GemvVariant> {
        self.entries
            .iter()
            .find(|e| &e.device == device && &e.gemv == gemv)
            .map(|e| e.variant)
    }

    /// Records a winner, replacing any earlier one for the same device and kernel.
    pub fn insert(&mut self, entry: TuneEntry) {
        self.entries
            .retain(|e| !(e.device == entry.device && e.gemv == entry.gemv));
        self.entries.push(entry);
    }

    /// Every entry, in the order they were recorded.
    pub fn entries(&self) -> &[TuneEntry] {
        &self.entries
    }

    /// Entries for the adapter behind `ctx`.
    pub fn entries_for(&self, ctx: &GpuContext) -> usize {
        let device = DeviceKey::of(ctx);
        self.entries.iter().filter(|e| e.device == device).count()
    }
}

#[cfg(feature = "tune")]
mod runner;
#[cfg(feature = "tune")]
pub use runner::{CandidateResult, TuneReport, tune_gemv};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gemv::Reduction;

    fn entry(name: &str, rows: u32, workgroup_size: u32) -> TuneEntry {
        TuneEntry {
            device: DeviceKey {
                name: name.into(),
                vendor: 1,
                device: 2,
                backend: "Vulkan".into(),
                driver: "d".into(),
                driver_info: "1.0".into(),
            },
            gemv: GemvKey::new("HQQ".into(), ActDtype::F32, (64, 128), rows),
            variant: GemvVariant {
                workgroup_size,
                rows_per_workgroup: 4,
                split_k: 1,
                reduction: Reduction::Workgroup,
            },
            micros: 1.0,
        }
    }

    #[test]
    fn insert_replaces_the_same_key_only() {
        let mut cache = TuneCache::default();
        cache.insert(entry("a", 1, 64));
        cache.insert(entry("a", 2, 64));
        cache.insert(entry("a", 1, 128));
        cache.insert(entry("b", 1, 256));
        assert_eq!(cache.entries().len(), 3);
        let e = entry("a", 1, 0);
        assert_eq!(
            cache.lookup(&e.device, &e.gemv).map(|v| v.workgroup_size),
            Some(128)
        );
    }

    #[test]
    fn a_saved_cache_loads_back_and_other_versions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("tune.json");
        let mut cache = TuneCache::default();
        cache.insert(entry("a", 1, 64));
        cache.save(&path).unwrap();
        assert_eq!(TuneCache::load(&path).unwrap(), cache);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("\"version\": 1", "\"version\": 99")).unwrap();
        let err = TuneCache::load(&path).unwrap_err().to_string();
        assert!(err.contains("version 99"), "{err}");
        std::fs::write(&path, "{").unwrap();
        assert!(TuneCache::load(&path).is_err());
        assert!(
            TuneCache::load_or_empty(&dir.path().join("none.json"))
                .unwrap()
                .entries()
                .is_empty()
        );
    }
}
