//! Broken HQQ files and parameters come back as errors naming what is wrong, never panics.

use quantadapt::formats::hqq::{ComputeDtype, HqqConfig, HqqWeight};
use quantadapt::io::{HostTensor, TensorFile};
use quantadapt::tensor::Matrix;
use safetensors::Dtype;

const P: &str = "layer.";

/// A valid 4-bit 8x16 layer (group 16, axis 1) in HQQLinear's saved form.
fn valid_file() -> TensorFile {
    let weight = Matrix::new(
        8,
        16,
        (0..128)
            .map(|v| ((v * 37 % 101) as f32 - 50.0) / 400.0)
            .collect(),
    )
    .unwrap();
    let w = HqqWeight::quantize(&weight, Some(vec![0.5; 8]), &HqqConfig::new(4, 16, 1)).unwrap();
    let mut f = TensorFile {
        label: "test".into(),
        ..Default::default()
    };
    let put = |f: &mut TensorFile, t: HostTensor| {
        f.insert(HostTensor {
            name: format!("{P}{}", t.name),
            ..t
        })
    };
    put(
        &mut f,
        HostTensor::from_raw("W_q", Dtype::U8, &[4, 16], w.packed.clone()),
    );
    put(&mut f, HostTensor::from_f16("scale", &[8, 1], &w.scale));
    put(&mut f, HostTensor::from_f16("zero", &[8, 1], &w.zero));
    put(&mut f, HostTensor::from_f16("bias", &[8], &[0.5; 8]));
    put(
        &mut f,
        HostTensor::from_raw(
            "shape",
            Dtype::I64,
            &[2],
            [8i64, 16].iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
    );
    put(
        &mut f,
        HostTensor::from_raw("nbits", Dtype::I32, &[], 4i32.to_le_bytes().to_vec()),
    );
    put(
        &mut f,
        HostTensor::from_raw("group_size", Dtype::I32, &[], 16i32.to_le_bytes().to_vec()),
    );
    put(
        &mut f,
        HostTensor::from_raw("axis", Dtype::I32, &[], 1i32.to_le_bytes().to_vec()),
    );
    put(
        &mut f,
        HostTensor::from_raw("packing", Dtype::U8, &[7], b"4bit_u8".to_vec()),
    );
    put(
        &mut f,
        HostTensor::from_raw("compute_dtype", Dtype::U8, &[13], b"torch.float16".to_vec()),
    );
    f
}

fn load_err(f: &TensorFile) -> String {
    let bytes = f.to_bytes().unwrap();
    let file = TensorFile::from_bytes(&bytes, "test").unwrap();
    HqqWeight::from_tensors(&file, P).unwrap_err().to_string()
}

fn replaced(name: &str, t: HostTensor) -> TensorFile {
    let mut f = valid_file();
    f.insert(HostTensor {
        name: format!("{P}{name}"),
        ..t
    });
    f
}

#[test]
fn the_valid_file_loads() {
    let bytes = valid_file().to_bytes().unwrap();
    let w = HqqWeight::from_tensors(&TensorFile::from_bytes(&bytes, "test").unwrap(), P).unwrap();
    assert_eq!(w.compute_dtype, ComputeDtype::F16);
    assert_eq!((w.out_features, w.in_features), (8, 16));
}

#[test]
fn truncated_and_garbage_files_are_errors() {
    let bytes = valid_file().to_bytes().unwrap();
    for cut in [0, 4, 8, 20, bytes.len() / 2, bytes.len() - 1] {
        let err = TensorFile::from_bytes(&bytes[..cut], "cut.safetensors").unwrap_err();
        assert!(err.to_string().contains("cut.safetensors"), "{err}");
    }
    let mut lying = bytes.clone();
    lying[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(TensorFile::from_bytes(&lying, "lying").is_err());
    assert!(TensorFile::open("/nonexistent/model.safetensors").is_err());
}

#[test]
fn wrong_dtypes_and_shapes_name_the_tensor() {
    let err = load_err(&replaced(
        "W_q",
        HostTensor::from_f32("W_q", &[16], &[0.0; 16]),
    ));
    assert!(err.contains("W_q"), "{err}");
    let err = load_err(&replaced(
        "W_q",
        HostTensor::from_raw("W_q", Dtype::U8, &[3, 16], vec![0; 48]),
    ));
    assert!(err.contains("W_q"), "{err}");
    let err = load_err(&replaced(
        "scale",
        HostTensor::from_f16("scale", &[7, 1], &[0.1; 7]),
    ));
    assert!(err.contains("scale"), "{err}");
    let mut f = valid_file();
    f.tensors.remove(&format!("{P}zero"));
    assert!(load_err(&f).contains("zero"));
}

#[test]
fn undefined_nbits_group_size_or_axis_are_errors() {
    let err = load_err(&replaced(
        "nbits",
        HostTensor::from_raw("nbits", Dtype::I32, &[], 7i32.to_le_bytes().to_vec()),
    ));
    assert!(err.contains("nbits"), "{err}");
    let err = load_err(&replaced(
        "group_size",
        HostTensor::from_raw("group_size", Dtype::I32, &[], 0i32.to_le_bytes().to_vec()),
    ));
    assert!(err.contains("group_size"), "{err}");
    let err = load_err(&replaced(
        "group_size",
        HostTensor::from_raw("group_size", Dtype::I32, &[], 48i32.to_le_bytes().to_vec()),
    ));
    assert!(err.contains("group_size"), "{err}");
    let err = load_err(&replaced(
        "axis",
        HostTensor::from_raw("axis", Dtype::I32, &[], 2i32.to_le_bytes().to_vec()),
    ));
    assert!(err.contains("axis"), "{err}");
    let err = load_err(&replaced(
        "packing",
        HostTensor::from_raw("packing", Dtype::U8, &[7], b"2bit_u8".to_vec()),
    ));
    assert!(err.contains("packing"), "{err}");
}

#[test]
fn non_finite_scale_or_zero_is_an_error() {
    for name in ["scale", "zero"] {
        let mut v = vec![0.25f32; 8];
        v[3] = if name == "scale" {
            f32::NAN
        } else {
            f32::INFINITY
        };
        let err = load_err(&replaced(name, HostTensor::from_f16(name, &[8, 1], &v)));
        assert!(err.contains(name) && err.contains("non-finite"), "{err}");
    }
}
