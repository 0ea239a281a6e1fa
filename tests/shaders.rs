//! Every shader specialization parses, validates and translates to SPIR-V, MSL and HLSL; GLSL
//! too unless it uses f16, which naga's GLSL writer does not support.

use quantadapt::kernels::catalogue;
mod cross_compile;
use cross_compile::cross_compile;

#[test]
fn every_specialization_cross_compiles() {
    let keys = catalogue();
    assert!(!keys.is_empty());
    let mut failures = Vec::new();
    for key in &keys {
        let r = cross_compile(key);
        let glsl_expected = !key.needs_f16();
        let checks = [
            ("validation", &r.validation, true),
            ("SPIR-V", &r.spirv, true),
            ("MSL", &r.msl, true),
            ("HLSL", &r.hlsl, true),
            ("GLSL", &r.glsl, glsl_expected),
        ];
        for (target, result, required) in checks {
            if required && result.is_err() {
                failures.push(format!(
                    "{key:?} -> {target}: {}",
                    result.as_ref().unwrap_err()
                ));
            }
        }
        if !glsl_expected && r.glsl.is_ok() {
            failures.push(format!(
                "{key:?}: GLSL unexpectedly accepted f16; update the test"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} failed:\n{}",
        failures.len(),
        keys.len(),
        failures.join("\n")
    );
}
