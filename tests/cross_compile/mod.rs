//! Cross-compilation of every shader specialization with naga to SPIR-V, MSL, HLSL and GLSL, so
//! that Metal, DX12 and GL users meet no surprise. Writer panics are caught and reported.

use std::panic::{AssertUnwindSafe, catch_unwind};

use quantadapt::gpu::shaders::ShaderKey;

/// The outcome of translating one specialization, per target.
#[derive(Debug)]
pub struct CrossCompile {
    /// Parse and validation with every capability (what any backend starts from).
    pub validation: Result<(), String>,
    pub spirv: Result<(), String>,
    pub msl: Result<(), String>,
    pub hlsl: Result<(), String>,
    pub glsl: Result<(), String>,
}

fn guarded(f: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| Err("the naga writer panicked".into()))
}

fn validate(
    module: &naga::Module,
    caps: naga::valid::Capabilities,
) -> Result<naga::valid::ModuleInfo, String> {
    naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
        .validate(module)
        .map_err(|e| format!("{:?}", e.into_inner()))
}

/// Parses, validates and translates `key`'s source for all four targets.
pub fn cross_compile(key: &ShaderKey) -> CrossCompile {
    let mut report = CrossCompile {
        validation: Err("not run".into()),
        spirv: Err("not run".into()),
        msl: Err("not run".into()),
        hlsl: Err("not run".into()),
        glsl: Err("not run".into()),
    };
    let source = match key.source() {
        Ok(s) => s,
        Err(e) => {
            report.validation = Err(e.to_string());
            return report;
        }
    };
    let module = match naga::front::wgsl::parse_str(&source) {
        Ok(m) => m,
        Err(e) => {
            report.validation = Err(e.emit_to_string(&source));
            return report;
        }
    };
    report.validation = validate(&module, naga::valid::Capabilities::all()).map(|_| ());
    if report.validation.is_err() {
        return report;
    }
    report.spirv = guarded(|| {
        let info = validate(&module, naga::back::spv::supported_capabilities())?;
        naga::back::spv::write_vec(&module, &info, &Default::default(), None)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    report.msl = guarded(|| {
        let info = validate(&module, naga::back::msl::supported_capabilities())?;
        let options = naga::back::msl::Options {
            lang_version: (2, 4),
            ..Default::default()
        };
        naga::back::msl::write_string(&module, &info, &options, &Default::default())
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    report.hlsl = guarded(|| {
        let info = validate(&module, naga::back::hlsl::supported_capabilities())?;
        let options = naga::back::hlsl::Options {
            shader_model: naga::back::hlsl::ShaderModel::V6_2,
            ..Default::default()
        };
        let pipeline = naga::back::hlsl::PipelineOptions::default();
        let mut out = String::new();
        naga::back::hlsl::Writer::new(&mut out, &options, &pipeline)
            .write(&module, &info, None)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    report.glsl = guarded(|| {
        let info = validate(&module, naga::back::glsl::supported_capabilities())?;
        let options = naga::back::glsl::Options {
            version: naga::back::glsl::Version::Desktop(450),
            ..Default::default()
        };
        let pipeline = naga::back::glsl::PipelineOptions {
            shader_stage: naga::ShaderStage::Compute,
            entry_point: key.entry.to_string(),
            multiview: None,
        };
        let mut out = String::new();
        naga::back::glsl::Writer::new(
            &mut out,
            &module,
            &info,
            &options,
            &pipeline,
            naga::proc::BoundsCheckPolicies::default(),
        )
        .and_then(|mut w| w.write())
        .map(|_| ())
        .map_err(|e| e.to_string())
    });
    report
}
