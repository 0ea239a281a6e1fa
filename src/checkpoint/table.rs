//! What a checkpoint holds, as text: where its tensors are, its quantization settings, and a
//! table of its modules with totals (what `quantadapt inspect` prints).

use std::collections::BTreeMap;
use std::fmt::Write;

use super::{Checkpoint, QuantizationConfig};

impl Checkpoint {
    /// The files, the quantization settings, one row per module (name, format, bits, group
    /// size, `out x in`, stored bytes) and the totals.
    pub fn describe(&self) -> String {
        let mut text = String::new();
        let files = match self.index() {
            Some(index) => format!("{} ({} shards)", index.path.display(), self.shards().len()),
            None => self.shards()[0].path().display().to_string(),
        };
        let file_bytes: u64 = self.shards().iter().map(|s| s.file_len()).sum();
        writeln!(text, "checkpoint: {files}, {file_bytes} bytes").unwrap();
        writeln!(text, "quantization: {}", self.quantization_line()).unwrap();
        writeln!(text).unwrap();

        let header = ["module", "format", "bits", "group", "shape", "bytes"];
        let rows: Vec<[String; 6]> = self
            .modules()
            .iter()
            .map(|m| {
                [
                    m.name.clone(),
                    m.format.to_string(),
                    m.bits.to_string(),
                    m.group_size.map_or("-".to_string(), |g| g.to_string()),
                    format!("{} x {}", m.out_features, m.in_features),
                    m.bytes.to_string(),
                ]
            })
            .collect();
        let widths: Vec<usize> = (0..header.len())
            .map(|c| {
                rows.iter()
                    .map(|r| r[c].len())
                    .chain([header[c].len()])
                    .max()
                    .unwrap_or_default()
            })
            .collect();
        let line = |cells: &[&str]| {
            let mut out = String::new();
            for (c, cell) in cells.iter().enumerate() {
                match c {
                    0 | 1 => write!(out, "{cell:<w$}  ", w = widths[c]).unwrap(),
                    _ => write!(out, "{cell:>w$}  ", w = widths[c]).unwrap(),
                }
            }
            out.trim_end().to_string()
        };
        writeln!(text, "{}", line(&header)).unwrap();
        for row in &rows {
            let cells: Vec<&str> = row.iter().map(String::as_str).collect();
            writeln!(text, "{}", line(&cells)).unwrap();
        }

        let mut per_format: BTreeMap<&str, usize> = BTreeMap::new();
        for m in self.modules() {
            *per_format.entry(m.format.name()).or_default() += 1;
        }
        let formats: Vec<String> = per_format.iter().map(|(f, n)| format!("{n} {f}")).collect();
        let module_bytes: u64 = self.modules().iter().map(|m| m.bytes).sum();
        let parameters: usize = self
            .modules()
            .iter()
            .map(|m| m.in_features * m.out_features)
            .sum();
        writeln!(
            text,
            "total: {} module{} ({}), {parameters} weights in {module_bytes} bytes; \
             {} bytes of other tensors",
            self.modules().len(),
            if self.modules().len() == 1 { "" } else { "s" },
            formats.join(", "),
            self.data_bytes() - module_bytes
        )
        .unwrap();
        text
    }

    /// Bytes of every tensor's data, in all files.
    fn data_bytes(&self) -> u64 {
        self.shards()
            .iter()
            .map(|s| s.file_len() - s.data_start())
            .sum()
    }

    fn quantization_line(&self) -> String {
        match self.quantization() {
            None => "no quantization_config; formats told by the tensors".to_string(),
            Some(QuantizationConfig::Hqq(c)) => {
                let params = c
                    .weight_quant_params
                    .map_or("per-module settings".to_string(), |p| {
                        format!(
                            "{}-bit, group {}, axis {}",
                            p.nbits,
                            p.group_size.map_or("none".to_string(), |g| g.to_string()),
                            p.axis
                        )
                    });
                format!("hqq {params}{}", skipped(&c.skip_modules))
            }
            Some(QuantizationConfig::Gptq(c)) => format!(
                "gptq {}-bit, group {}, sym {}, desc_act {}, zeros {:?}",
                c.bits,
                c.group_size.map_or("-1".to_string(), |g| g.to_string()),
                c.sym,
                c.desc_act,
                c.zeros
            ),
            Some(QuantizationConfig::Eetq {
                modules_to_not_convert,
            }) => format!("eetq int8{}", skipped(modules_to_not_convert)),
        }
    }
}

fn skipped(modules: &[String]) -> String {
    match modules.is_empty() {
        true => String::new(),
        false => format!("; not quantized: {}", modules.join(", ")),
    }
}
