#!/usr/bin/env bash
# Runs every fuzz target for BUDGET seconds (default 120) from the seeds of seeds.py, then prints
# one line per target: executions, coverage, features, and any crash/timeout/OOM artifacts.
# Logs go to fuzz/logs/<target>.log, new inputs to fuzz/corpus/<target>/, findings to
# fuzz/artifacts/<target>/ (all ignored by git).
set -euo pipefail
cd "$(dirname "$0")"
budget="${1:-120}"
targets=(hqq_checkpoint gptq_checkpoint eetq_checkpoint peft_adapter run_input)
python3 seeds.py
mkdir -p logs
cargo +nightly fuzz build
for t in "${targets[@]}"; do
    # -rss_limit_mb / -malloc_limit_mb flag oversized allocations, -timeout hangs (seconds).
    cargo +nightly fuzz run "$t" "corpus/$t" -- \
        -max_total_time="$budget" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024 \
        -print_final_stats=1 >"logs/$t.log" 2>&1 || true
done
for t in "${targets[@]}"; do
    log="logs/$t.log"
    execs=$(grep -ao 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$') || execs='?'
    last=$(grep -aE '^#[0-9]+' "$log" | tail -1) || last=''
    cov=$(grep -o 'cov: [0-9]*' <<<"$last") || cov='cov: ?'
    ft=$(grep -o 'ft: [0-9]*' <<<"$last") || ft='ft: ?'
    found=$(find "artifacts/$t" -type f 2>/dev/null | wc -l)
    echo "$t: $execs execs, $cov, $ft, $found findings"
done
