//! Checks that a `#[repr(C)]` parameter struct and the WGSL struct it mirrors agree, member by
//! member (name, offset, scalar type) and in size, as naga reads the shader.

use crate::gpu::shaders::ShaderKey;

/// One scalar slot of a struct: name, byte offset, WGSL scalar type.
pub(crate) type Slot = (String, usize, &'static str);

/// What a Rust field is in WGSL terms: a scalar, or an array of them (one slot each, named
/// `name0`, `name1`, ...).
pub(crate) trait FieldKind {
    const SCALAR: &'static str;
    const COUNT: Option<usize>;
}

impl FieldKind for u32 {
    const SCALAR: &'static str = "u32";
    const COUNT: Option<usize> = None;
}

impl FieldKind for f32 {
    const SCALAR: &'static str = "f32";
    const COUNT: Option<usize> = None;
}

impl<const N: usize> FieldKind for [u32; N] {
    const SCALAR: &'static str = "u32";
    const COUNT: Option<usize> = Some(N);
}

pub(crate) fn push_field<T, F: FieldKind>(
    slots: &mut Vec<Slot>,
    name: &str,
    offset: usize,
    _field: fn(&T) -> &F,
) {
    let name = name.trim_start_matches('_');
    match F::COUNT {
        None => slots.push((name.to_string(), offset, F::SCALAR)),
        Some(n) => {
            (0..n).for_each(|i| slots.push((format!("{name}{i}"), offset + 4 * i, F::SCALAR)))
        }
    }
}

/// `(size, slots)` of a Rust parameter struct, from the names of all its fields in order.
macro_rules! rust_layout {
    ($ty:ty { $($field:ident),* $(,)? }) => {{
        let mut slots = Vec::new();
        $(
            crate::kernels::layout::push_field::<$ty, _>(
                &mut slots,
                stringify!($field),
                std::mem::offset_of!($ty, $field),
                |p: &$ty| &p.$field,
            );
        )*
        (std::mem::size_of::<$ty>(), slots)
    }};
}
pub(crate) use rust_layout;

/// Panics unless the struct `name`, in the first of `keys` whose source declares it, has
/// `layout` (names compared without leading underscores).
pub(crate) fn assert_matches_shader(keys: &[ShaderKey], name: &str, layout: (usize, Vec<Slot>)) {
    let declaration = format!("struct {name} {{");
    let (key, source) = keys
        .iter()
        .map(|key| (key, key.source().expect("the specialization's source")))
        .find(|(_, source)| source.contains(&declaration))
        .unwrap_or_else(|| panic!("no specialization declares {name}"));
    let module = naga::front::wgsl::parse_str(&source).expect("the shader parses");
    let ty = module
        .types
        .iter()
        .map(|(_, ty)| ty)
        .find(|ty| ty.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no struct {name} in {}", key.family));
    let naga::TypeInner::Struct { members, span } = &ty.inner else {
        panic!("{name} is not a struct");
    };
    let shader: Vec<Slot> = members
        .iter()
        .map(|m| {
            let scalar = match module.types[m.ty].inner {
                naga::TypeInner::Scalar(s) if s == naga::Scalar::U32 => "u32",
                naga::TypeInner::Scalar(s) if s == naga::Scalar::F32 => "f32",
                ref other => panic!("{name}: member of unexpected type {other:?}"),
            };
            let member = m.name.as_deref().unwrap_or_default();
            (
                member.trim_start_matches('_').to_string(),
                m.offset as usize,
                scalar,
            )
        })
        .collect();
    let (size, rust) = layout;
    assert_eq!(
        rust, shader,
        "{name}: Rust and WGSL members differ ({})",
        key.family
    );
    assert_eq!(size, *span as usize, "{name}: Rust and WGSL sizes differ");
}
