//! Module names as users write them, and the order modules are listed in.

use std::cmp::Ordering;

/// The prefix PEFT puts before every module name of the model it wraps.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// `name` as the checkpoint writes a module: without PEFT's `base_model.model.` prefix and
/// without a trailing dot (`base_model.model.model.layers.0.mlp.up_proj.` ->
/// `model.layers.0.mlp.up_proj`).
pub fn canonical(name: &str) -> &str {
    let name = name.strip_prefix(PEFT_PREFIX).unwrap_or(name);
    name.strip_suffix('.').unwrap_or(name)
}

/// Orders names part by part (split at dots), numbers by value: `layers.2` before `layers.10`.
/// safetensors stores tensors by dtype then name, so this is the order a listing can give.
pub fn natural_order(a: &str, b: &str) -> Ordering {
    let key = |part: &str| (part.parse::<u64>().ok(), part.to_string());
    let parts = |s: &str| s.split('.').map(key).collect::<Vec<_>>();
    parts(a).cmp(&parts(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_come_to_the_checkpoint_name() {
        for spelling in [
            "model.layers.0.mlp.up_proj",
            "model.layers.0.mlp.up_proj.",
            "base_model.model.model.layers.0.mlp.up_proj",
            "base_model.model.model.layers.0.mlp.up_proj.",
        ] {
            assert_eq!(canonical(spelling), "model.layers.0.mlp.up_proj");
        }
    }

    #[test]
    fn numbers_sort_by_value() {
        let mut names = vec![
            "m.layers.10.q",
            "m.layers.2.v",
            "m.layers.2.k",
            "m.layers.1.q",
        ];
        names.sort_by(|a, b| natural_order(a, b));
        assert_eq!(
            names,
            [
                "m.layers.1.q",
                "m.layers.2.k",
                "m.layers.2.v",
                "m.layers.10.q"
            ]
        );
    }
}
