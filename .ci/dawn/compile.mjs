// Compiles every shader specialization written by `cargo run --example shader_catalogue -- DIR`
// with Dawn (Chrome's WebGPU; Tint reads the WGSL), the way quantadapt asks for a device: the
// adapter's limits and the optional features it offers. Each distinct source is compiled once;
// its compilation messages (errors and warnings alike) and a compute pipeline per entry point,
// built inside error scopes, decide. Exit status 0 only when nothing was reported.
//
//   node compile.mjs DIR [--jobs N]
//
// Dawn runs on Vulkan (Mesa 25 lavapipe in CI: Dawn refuses older lavapipe), so every pipeline
// also goes through Tint's SPIR-V writer and a driver. Dawn's null backend would be faster but
// offers only WebGPU's default limits (8 storage buffers per stage), which most fused variants
// exceed. The sources are split over N processes (default: the number of CPUs), each with its
// own device, so that a crash names the sources it was compiling.

import { fork } from 'node:child_process';
import { availableParallelism } from 'node:os';
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';

// The optional features quantadapt requests when the adapter offers them (src/gpu/context.rs).
const WANTED_FEATURES = ['shader-f16', 'subgroups', 'timestamp-query'];
// Sources in flight at once in one process.
const BATCH = 32;

function option(name, fallback) {
  const at = process.argv.indexOf(name);
  return at < 0 ? fallback : process.argv[at + 1];
}

const dir = process.argv[2];
const shard = option('--shard', null);

if (!dir || dir.startsWith('--')) {
  console.error('usage: node compile.mjs DIR [--jobs N]');
  process.exit(2);
}

const files = readdirSync(dir).filter((f) => f.endsWith('.json')).sort();

if (shard === null) {
  await coordinate();
} else {
  await compileShard(...shard.split('/').map(Number));
}

async function coordinate() {
  if (files.length === 0) {
    console.error(`no shader sources in ${dir}`);
    process.exit(1);
  }
  const jobs = Math.min(Number(option('--jobs', availableParallelism())), files.length);
  const started = performance.now();
  const children = [];
  for (let k = 0; k < jobs; k++) {
    children.push(runShard(k, jobs));
  }
  const reports = await Promise.all(children);
  const failures = reports.flatMap((r) => r.failures);
  const sources = reports.reduce((n, r) => n + r.sources, 0);
  const specializations = reports.reduce((n, r) => n + r.specializations, 0);
  const pipelines = reports.reduce((n, r) => n + r.pipelines, 0);
  for (const f of failures) {
    console.log(`FAIL ${f.file} ${f.name}\n  ${f.message.replaceAll('\n', '\n  ')}`);
  }
  const seconds = ((performance.now() - started) / 1000).toFixed(1);
  console.log(
    `Dawn on ${reports[0].adapter ?? 'no adapter'}: ${sources} of ${files.length} sources ` +
      `(${specializations} specializations, ${pipelines} pipelines) checked in ${seconds} s ` +
      `with ${jobs} processes; ${failures.length} failures`,
  );
  process.exit(failures.length === 0 && sources === files.length ? 0 : 1);
}

// Runs one shard in a child process; a child that dies is a failure naming its current source.
function runShard(k, jobs) {
  return new Promise((resolve) => {
    const child = fork(process.argv[1], [dir, '--shard', `${k}/${jobs}`]);
    let current = null;
    let report = null;
    child.on('message', (m) => {
      if (m.compiling) current = m.compiling.join(' ');
      if (m.report) report = m.report;
    });
    child.on('exit', (code, signal) => {
      if (report && code === 0) return resolve(report);
      const message = `the Dawn process of shard ${k}/${jobs} died (${signal ?? `exit ${code}`})`;
      resolve({
        adapter: report?.adapter,
        sources: 0,
        specializations: 0,
        pipelines: 0,
        failures: [{ file: current ?? '-', name: 'while compiling one of these sources', message }],
      });
    });
  });
}

async function compileShard(k, jobs) {
  const { create, globals } = await import('webgpu');
  Object.assign(globalThis, globals);
  const gpu = create(['backend=vulkan']);
  const adapter = await gpu.requestAdapter();
  const report = { adapter: null, sources: 0, specializations: 0, pipelines: 0, failures: [] };
  const fail = (file, name, message) => report.failures.push({ file, name, message });
  if (!adapter) {
    fail('-', 'backend=vulkan', 'Dawn found no adapter (it needs a Vulkan driver it accepts, e.g. Mesa 25 lavapipe)');
    return finish(report);
  }
  report.adapter = adapter.info.description || adapter.info.vendor;
  const requiredFeatures = WANTED_FEATURES.filter((f) => adapter.features.has(f));
  const requiredLimits = {};
  for (const name in adapter.limits) requiredLimits[name] = adapter.limits[name];
  const device = await adapter.requestDevice({ requiredFeatures, requiredLimits });
  const uncaptured = [];
  device.onuncapturederror = (e) => uncaptured.push(e.error.message);
  device.lost.then((info) => {
    if (info.reason !== 'destroyed') fail('-', 'device lost', info.message);
  });

  const mine = files.filter((_, index) => index % jobs === k);
  for (let at = 0; at < mine.length; at += BATCH) {
    const batch = mine.slice(at, at + BATCH);
    process.send({ compiling: batch });
    const specs = batch.map((file) => JSON.parse(readFileSync(join(dir, file), 'utf8')));
    const outcomes = specs.map((spec) => {
      const missing = unmet(device, spec);
      return missing.length > 0 ? missing : compileSource(device, spec);
    });
    for (const [i, problems] of (await Promise.all(outcomes)).entries()) {
      const spec = specs[i];
      report.sources += 1;
      report.specializations += spec.specializations;
      report.pipelines += spec.entries.length;
      if (problems.length > 0) {
        const entries = spec.entries.map((e) => e.entry).join(', ');
        fail(batch[i], `${spec.name}, entry points ${entries}`, problems.join('\n'));
      }
    }
    if (uncaptured.length > 0) {
      fail(batch.join(' '), 'outside any error scope', uncaptured.splice(0).join('\n'));
    }
  }
  device.destroy();
  finish(report);
}

// Every error or warning Dawn reports for one source, as text naming where it points. The
// calls are all made before anything is awaited, so that many sources can be in flight at once
// while each keeps its own error scopes.
async function compileSource(device, spec) {
  const scopes = ['validation', 'internal', 'out-of-memory'];
  for (const filter of scopes) device.pushErrorScope(filter);
  const module = device.createShaderModule({ code: spec.source, label: spec.name });
  for (const { entry } of spec.entries) {
    device.createComputePipeline({
      label: `${spec.name} ${entry}`,
      layout: 'auto',
      compute: { module, entryPoint: entry },
    });
  }
  const errors = scopes.map(() => device.popErrorScope());
  const info = await module.getCompilationInfo();
  const lines = spec.source.split('\n');
  const problems = [];
  for (const m of info.messages) {
    if (m.type === 'info') continue;
    const text = lines[m.lineNum - 1] ?? '';
    problems.push(`${m.type} at ${m.lineNum}:${m.linePos}: ${m.message}\n    ${text.trim()}`);
  }
  const compiled = !info.messages.some((m) => m.type === 'error');
  for (const error of await Promise.all(errors)) {
    // A module that failed to compile makes its pipelines fail too; its messages say why.
    if (error && compiled) problems.push(`${error.constructor.name}: ${error.message}`);
  }
  return problems;
}

// The features and limits a source needs that the device does not have.
function unmet(device, spec) {
  const problems = [];
  for (const feature of spec.features) {
    if (!device.features.has(feature)) problems.push(`needs ${feature}, which the device lacks`);
  }
  for (const { entry, limits } of spec.entries) {
    for (const [name, needed] of Object.entries(limits)) {
      if (needed > device.limits[name]) {
        problems.push(`${entry} needs ${name} = ${needed}; the device offers ${device.limits[name]}`);
      }
    }
  }
  return problems;
}

function finish(report) {
  process.send({ report }, () => process.exit(0));
}
