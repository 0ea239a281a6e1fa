// The sum over a workgroup of WG invocations (a power of two) of one f32 each, returned to
// invocation 0 (the others get a partial sum). Every invocation calls it, once: it holds barriers.
// With SUBGROUP, each subgroup adds with subgroupAdd and invocation 0 adds one value per
// subgroup, counted by num_subgroups, so any subgroup size works; otherwise a tree in workgroup
// memory. The entry point takes `lanes: Lanes` for the builtins either way needs.
struct Lanes {
    @builtin(local_invocation_index) index: u32,
#ifdef SUBGROUP
    @builtin(subgroup_id) subgroup: u32,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(num_subgroups) subgroups: u32,
#endif
}

var<workgroup> sum_parts: array<f32, WG>;

fn workgroup_sum(value: f32, lanes: Lanes) -> f32 {
#ifdef SUBGROUP
    let subgroup_total = subgroupAdd(value);
    if (lanes.lane == 0u) {
        sum_parts[lanes.subgroup] = subgroup_total;
    }
    workgroupBarrier();
    var total = 0.0;
    if (lanes.index == 0u) {
        for (var s = 0u; s < lanes.subgroups; s++) {
            total += sum_parts[s];
        }
    }
    return total;
#else
    sum_parts[lanes.index] = value;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        if (lanes.index < stride) {
            sum_parts[lanes.index] += sum_parts[lanes.index + stride];
        }
        workgroupBarrier();
    }
    return sum_parts[0];
#endif
}
