//! ALU operations per weight of every GEMV specialization, counted from its WGSL with naga, and
//! a ceiling per format so that a change which makes the decode dearer shows.
//!
//! The convention this relies on: a GEMV specialization's module has a function `gemv_unit`, the
//! body of its innermost loop over K, which decodes one unit of packed weights and multiplies it
//! into the accumulators; a unit covers `UNIT_WEIGHTS` weights where the module defines that
//! constant, `UNIT_K · ROWS` (inputs per unit times output rows it feeds) otherwise.
//!
//! What counts: every arithmetic expression `gemv_unit` evaluates, through the functions it calls,
//! at M = 1 (the `MAX_M = 1` specializations): binary and unary operators (index arithmetic
//! included: a GPU spends ALU issue slots on it too), built-in math functions, conversions and
//! bitcasts (`As`), `select` and relational built-ins, each counted once per vector component,
//! `dot` of N components as N. Loads, stores, accesses and vector construction do not count.
//! Loops with constant bounds count their trips; a branch counts its dearer side (the side taken
//! where the condition is on constants only). This is the
//! work the WGSL asks for before the driver's compiler folds and unrolls: a proxy to compare
//! variants and versions, not a machine-instruction count.

use std::collections::HashMap;

use naga::{Block, Expression, Function, Handle, Literal, MathFunction, Module, Statement};
use quantadapt::gpu::ActDtype;
use quantadapt::gpu::shaders::ShaderKey;
use quantadapt::kernels::catalogue;

/// The function that decodes one unit of weights.
const UNIT_FUNCTION: &str = "gemv_unit";

/// Ceilings of ALU operations per weight at M = 1, per format flag (the values when this test
/// was written, rounded up): lower them as the kernels get leaner.
const CEILINGS: [(&str, f64); 4] = [
    ("HQQ", 81.0),
    ("GPTQ", 86.0),
    ("EETQ", 48.0),
    ("dense", 10.5),
];

struct Counter<'a> {
    module: &'a Module,
    info: &'a naga::valid::ModuleInfo,
    memo: HashMap<Handle<Function>, f64>,
    /// Loops whose trip count is not a constant (counted once).
    runtime_loops: usize,
}

impl Counter<'_> {
    fn function(&mut self, handle: Handle<Function>) -> f64 {
        if let Some(cost) = self.memo.get(&handle) {
            return *cost;
        }
        let function = &self.module.functions[handle];
        let cost = self.block(handle, function, &function.body);
        self.memo.insert(handle, cost);
        cost
    }

    fn block(&mut self, handle: Handle<Function>, f: &Function, block: &Block) -> f64 {
        let statements: Vec<&Statement> = block.iter().collect();
        let mut total = 0.0;
        for (at, statement) in statements.iter().enumerate() {
            total += match statement {
                Statement::Emit(range) => range
                    .clone()
                    .map(|expr| self.expression(handle, f, expr))
                    .sum(),
                Statement::Block(inner) => self.block(handle, f, inner),
                // A condition on constants only (`if (FIELD_BITS == 3u)`) is folded: one side.
                Statement::If {
                    condition,
                    accept,
                    reject,
                } => match f.expressions[*condition] {
                    Expression::Literal(Literal::Bool(true)) => self.block(handle, f, accept),
                    Expression::Literal(Literal::Bool(false)) => self.block(handle, f, reject),
                    _ => self
                        .block(handle, f, accept)
                        .max(self.block(handle, f, reject)),
                },
                Statement::Switch { cases, .. } => cases
                    .iter()
                    .map(|case| self.block(handle, f, &case.body))
                    .fold(0.0, f64::max),
                Statement::Loop {
                    body, continuing, ..
                } => {
                    let trips = trip_count(self.module, f, &statements[..at], body, continuing)
                        .unwrap_or_else(|| {
                            self.runtime_loops += 1;
                            1
                        });
                    trips as f64 * (self.block(handle, f, body) + self.block(handle, f, continuing))
                }
                Statement::Call { function, .. } => self.function(*function),
                _ => 0.0,
            };
        }
        total
    }

    fn expression(&self, handle: Handle<Function>, f: &Function, expr: Handle<Expression>) -> f64 {
        let width =
            |e: Handle<Expression>| match self.info[handle][e].ty.inner_with(&self.module.types) {
                naga::TypeInner::Vector { size, .. } => *size as u32 as f64,
                _ => 1.0,
            };
        match &f.expressions[expr] {
            Expression::Math {
                fun: MathFunction::Dot,
                arg,
                ..
            } => width(*arg),
            // A conversion to the type it already has is no operation.
            Expression::As {
                expr: input,
                kind,
                convert,
            } => {
                let scalar = self.info[handle][*input]
                    .ty
                    .inner_with(&self.module.types)
                    .scalar();
                match scalar {
                    Some(s) if s.kind == *kind && convert.is_none_or(|w| w == s.width) => 0.0,
                    _ => width(expr),
                }
            }
            Expression::Binary { .. }
            | Expression::Unary { .. }
            | Expression::Math { .. }
            | Expression::Select { .. }
            | Expression::Relational { .. } => width(expr),
            _ => 0.0,
        }
    }
}

/// Trips of a `for (var i = a; i < b; i += s)` loop (naga's lowering: the body opens with
/// `if (i < b) {} else { break; }`, the continuing block stores `i + s`) with constant a, b, s.
fn trip_count(
    module: &Module,
    f: &Function,
    before: &[&Statement],
    body: &Block,
    continuing: &Block,
) -> Option<u64> {
    let (condition, _) = body.iter().find_map(|s| match s {
        Statement::If {
            condition,
            accept,
            reject,
        } if accept.is_empty() && matches!(reject.iter().next(), Some(Statement::Break)) => {
            Some((*condition, ()))
        }
        _ => None,
    })?;
    let Expression::Binary {
        op: naga::BinaryOperator::Less,
        left,
        right,
    } = f.expressions[condition]
    else {
        return None;
    };
    let counter = local_loaded(f, left)?;
    let bound = evaluate(module, f, right)?;
    let start = before
        .iter()
        .rev()
        .find_map(|s| match s {
            Statement::Store { pointer, value } if local_of(f, *pointer) == Some(counter) => {
                Some(*value)
            }
            _ => None,
        })
        .or(f.local_variables[counter].init)
        .and_then(|value| evaluate(module, f, value))?;
    let step = continuing.iter().find_map(|s| match s {
        Statement::Store { pointer, value } if local_of(f, *pointer) == Some(counter) => {
            match f.expressions[*value] {
                Expression::Binary {
                    op: naga::BinaryOperator::Add,
                    left,
                    right,
                } if local_loaded(f, left) == Some(counter) => evaluate(module, f, right),
                _ => None,
            }
        }
        _ => None,
    })?;
    (step > 0).then(|| bound.saturating_sub(start).div_ceil(step))
}

fn local_of(f: &Function, pointer: Handle<Expression>) -> Option<Handle<naga::LocalVariable>> {
    match f.expressions[pointer] {
        Expression::LocalVariable(v) => Some(v),
        _ => None,
    }
}

fn local_loaded(f: &Function, expr: Handle<Expression>) -> Option<Handle<naga::LocalVariable>> {
    match f.expressions[expr] {
        Expression::Load { pointer } => local_of(f, pointer),
        _ => None,
    }
}

fn literal(value: &Literal) -> Option<u64> {
    match *value {
        Literal::U32(v) => Some(v as u64),
        Literal::I32(v) => u64::try_from(v).ok(),
        Literal::AbstractInt(v) => u64::try_from(v).ok(),
        _ => None,
    }
}

fn evaluate(module: &Module, f: &Function, expr: Handle<Expression>) -> Option<u64> {
    match &f.expressions[expr] {
        Expression::Literal(value) => literal(value),
        Expression::Constant(c) => evaluate_global(module, module.constants[*c].init),
        _ => None,
    }
}

fn evaluate_global(module: &Module, expr: Handle<Expression>) -> Option<u64> {
    match &module.global_expressions[expr] {
        Expression::Literal(value) => literal(value),
        Expression::Constant(c) => evaluate_global(module, module.constants[*c].init),
        Expression::Binary { op, left, right } => {
            let (a, b) = (
                evaluate_global(module, *left)?,
                evaluate_global(module, *right)?,
            );
            match op {
                naga::BinaryOperator::Add => Some(a + b),
                naga::BinaryOperator::Subtract => a.checked_sub(b),
                naga::BinaryOperator::Multiply => Some(a * b),
                naga::BinaryOperator::Divide => a.checked_div(b),
                _ => None,
            }
        }
        _ => None,
    }
}

fn module_constant(module: &Module, name: &str) -> Option<u64> {
    module
        .constants
        .iter()
        .find(|(_, c)| c.name.as_deref() == Some(name))
        .and_then(|(_, c)| evaluate_global(module, c.init))
}

/// One GEMV specialization's count.
struct UnitCount {
    key: ShaderKey,
    format: &'static str,
    ops_per_unit: f64,
    weights_per_unit: u64,
    runtime_loops: usize,
}

impl UnitCount {
    fn per_weight(&self) -> f64 {
        self.ops_per_unit / self.weights_per_unit as f64
    }

    fn label(&self) -> String {
        let consts: Vec<String> = self
            .key
            .consts
            .iter()
            .filter(|(name, _)| !matches!(*name, "WG" | "MAX_M" | "CHUNK" | "REDUCE_ROWS"))
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        format!(
            "{} {} [{}] {}",
            self.key.family,
            self.key.flags.join("+"),
            consts.join(" "),
            self.key.act.wgsl()
        )
    }
}

/// The count for `key`, or `None` when its module has no `gemv_unit`.
fn count(key: &ShaderKey) -> Option<UnitCount> {
    let source = key.source().unwrap();
    let module = naga::front::wgsl::parse_str(&source)
        .unwrap_or_else(|e| panic!("{key:?}: {}", e.emit_to_string(&source)));
    let (unit, _) = module
        .functions
        .iter()
        .find(|(_, f)| f.name.as_deref() == Some(UNIT_FUNCTION))?;
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .unwrap_or_else(|e| panic!("{key:?}: {:?}", e.into_inner()));
    let weights_per_unit = module_constant(&module, "UNIT_WEIGHTS").unwrap_or_else(|| {
        let unit_k = module_constant(&module, "UNIT_K");
        let rows = module_constant(&module, "ROWS");
        match (unit_k, rows) {
            (Some(k), Some(rows)) => k * rows,
            _ => panic!("{key:?}: `{UNIT_FUNCTION}` without UNIT_WEIGHTS or UNIT_K and ROWS"),
        }
    });
    let format = CEILINGS
        .iter()
        .map(|(flag, _)| *flag)
        .find(|flag| key.flags.contains(flag) || key.family.contains(&flag.to_lowercase()))
        .unwrap_or_else(|| panic!("{key:?}: no ceiling for its format"));
    let mut counter = Counter {
        module: &module,
        info: &info,
        memo: HashMap::new(),
        runtime_loops: 0,
    };
    let ops_per_unit = counter.function(unit);
    Some(UnitCount {
        key: key.clone(),
        format,
        ops_per_unit,
        weights_per_unit,
        runtime_loops: counter.runtime_loops,
    })
}

/// The plain GEMVs at M = 1 (no fused prologue or epilogue), on f32 activations.
fn gemv_keys() -> Vec<ShaderKey> {
    let fused = ["FUSED", "OFT_PROLOGUE", "LORA_EPILOGUE", "LORA_PER_ROW"];
    catalogue()
        .into_iter()
        .filter(|k| {
            k.consts.contains(&("MAX_M", 1))
                && k.act == ActDtype::F32
                && !k.flags.iter().any(|f| fused.contains(f))
        })
        .collect()
}

#[test]
fn gemv_alu_operations_per_weight_stay_under_their_ceilings() {
    let counts: Vec<UnitCount> = gemv_keys().iter().filter_map(count).collect();
    // The dense yardstick is in the catalogue with the bench only.
    let dense: &[&str] = if cfg!(feature = "bench") {
        &["dense"]
    } else {
        &[]
    };
    for format in ["HQQ", "GPTQ", "EETQ"].iter().chain(dense) {
        assert!(
            counts.iter().any(|c| c.format == *format),
            "no GEMV specialization of {format} has a `{UNIT_FUNCTION}`"
        );
    }
    println!(
        "{:<70} {:>8} {:>8} {:>9} {:>6}",
        "GEMV specialization (M = 1)", "ops/unit", "weights", "ops/weight", "loops?"
    );
    let mut over = Vec::new();
    for c in &counts {
        println!(
            "{:<70} {:>8.0} {:>8} {:>9.2} {:>6}",
            c.label(),
            c.ops_per_unit,
            c.weights_per_unit,
            c.per_weight(),
            c.runtime_loops
        );
        let ceiling = CEILINGS.iter().find(|(f, _)| *f == c.format).unwrap().1;
        assert!(c.ops_per_unit > 0.0, "{}: nothing counted", c.label());
        if c.per_weight() > ceiling {
            over.push(format!("{}: {:.2} > {ceiling}", c.label(), c.per_weight()));
        }
    }
    assert!(over.is_empty(), "over the ceiling:\n{}", over.join("\n"));
}
