//! Writes every shader specialization the library can create into a folder, one JSON file per
//! distinct preprocessed source: its WGSL, its entry points, the WebGPU features it enables and,
//! per entry point, the limits it needs (read from naga's analysis of the module). Other WGSL
//! compilers read this folder (`.ci/dawn/compile.mjs` compiles it with Dawn).
//!
//! `cargo run --example shader_catalogue -- DIR`

use std::collections::BTreeMap;
use std::path::PathBuf;

use quantadapt::gpu::shaders::ShaderKey;
use quantadapt::kernels::catalogue;
use serde_json::{Value, json};

/// WebGPU rounds each workgroup variable up to 16 bytes when it sums them.
const WORKGROUP_VAR_ALIGN: u32 = 16;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir: PathBuf = std::env::args_os()
        .nth(1)
        .ok_or("usage: shader_catalogue DIR")?
        .into();
    std::fs::create_dir_all(&dir)?;
    for old in std::fs::read_dir(&dir)? {
        let path = old?.path();
        if path.extension().is_some_and(|e| e == "json") {
            std::fs::remove_file(path)?;
        }
    }

    let keys = catalogue();
    // Specializations that differ only in their entry point share a source.
    let mut by_source: BTreeMap<String, Vec<ShaderKey>> = BTreeMap::new();
    for key in keys.iter() {
        by_source
            .entry(key.webgpu_source()?)
            .or_default()
            .push(key.clone());
    }
    for (index, (source, keys)) in by_source.iter().enumerate() {
        let file = dir.join(format!("{index:04}.json"));
        std::fs::write(&file, describe(source, keys)?.to_string())?;
    }
    println!(
        "{} specializations, {} distinct sources, written to {}",
        keys.len(),
        by_source.len(),
        dir.display()
    );
    Ok(())
}

fn describe(source: &str, keys: &[ShaderKey]) -> Result<Value, String> {
    let first = &keys[0];
    // naga refuses the `enable subgroups;` of the WebGPU form, so it reads its own.
    let naga_source = first.source().map_err(|e| format!("{first:?}: {e}"))?;
    let module = naga::front::wgsl::parse_str(&naga_source)
        .map_err(|e| format!("{first:?}: {}", e.emit_to_string(&naga_source)))?;
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .map_err(|e| format!("{first:?}: {:?}", e.into_inner()))?;
    let mut layouter = naga::proc::Layouter::default();
    layouter
        .update(module.to_ctx())
        .map_err(|e| format!("{first:?}: {e}"))?;

    let mut entries: Vec<&str> = keys.iter().map(|k| k.entry).collect();
    entries.sort_unstable();
    entries.dedup();
    let mut described = Vec::new();
    for entry in entries {
        let (index, point) = module
            .entry_points
            .iter()
            .enumerate()
            .find(|(_, ep)| ep.name == entry)
            .ok_or_else(|| format!("{first:?}: no entry point `{entry}`"))?;
        let uses = info.get_entry_point(index);
        let (mut storage, mut uniform, mut workgroup_bytes) = (0u32, 0u32, 0u32);
        for (handle, var) in module.global_variables.iter() {
            if uses[handle].is_empty() {
                continue;
            }
            match var.space {
                naga::AddressSpace::Storage { .. } => storage += 1,
                naga::AddressSpace::Uniform => uniform += 1,
                naga::AddressSpace::WorkGroup => {
                    workgroup_bytes += layouter[var.ty].size.next_multiple_of(WORKGROUP_VAR_ALIGN)
                }
                _ => {}
            }
        }
        let [x, y, z] = point.workgroup_size;
        described.push(json!({
            "entry": entry,
            "limits": {
                "maxStorageBuffersPerShaderStage": storage,
                "maxUniformBuffersPerShaderStage": uniform,
                "maxComputeWorkgroupStorageSize": workgroup_bytes,
                "maxComputeInvocationsPerWorkgroup": x * y * z,
                "maxComputeWorkgroupSizeX": x,
                "maxComputeWorkgroupSizeY": y,
                "maxComputeWorkgroupSizeZ": z,
            },
        }));
    }
    // The WebGPU feature behind each `enable` directive of the source.
    let features: Vec<&str> = source
        .lines()
        .filter_map(|line| line.trim().strip_prefix("enable "))
        .flat_map(|names| names.trim_end_matches(';').split(','))
        .map(|name| match name.trim() {
            "f16" => "shader-f16",
            other => other,
        })
        .collect();
    Ok(json!({
        "name": format!(
            "{} flags {:?} consts {:?} act {:?}",
            first.family, first.flags, first.consts, first.act
        ),
        "specializations": keys.len(),
        "features": features,
        "entries": described,
        "source": source,
    }))
}
