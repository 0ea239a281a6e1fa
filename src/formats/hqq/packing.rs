//! HQQ's BitPack layouts (`hqq/core/bitpack.py`).
//!
//! Packing acts on dim 0 of the grouped 2-D tensor `U[rows, cols]`: the rows are cut into `k`
//! contiguous slabs and slab `j` goes to a fixed bit field, the first slab in the most significant
//! bits. Flattened: packed element `p` holds the codes of flat indices `p + j * slab_len`. Because
//! the grouped tensor is a reshape of the weight, flat index `f` of the codes is weight `(f / K, f % K)`.

use crate::error::{Error, Result};

/// The packing HQQ uses for a bit width: its storage word and how many codes one word holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packing {
    /// Bits per code.
    pub nbits: u32,
    /// Codes per stored element (1, 2, 4, 8, or 10 for 3-bit).
    pub per_element: usize,
    /// Bytes per stored element (1, or 4 for 3-bit's int32).
    pub element_bytes: usize,
}

impl Packing {
    /// The layout for `nbits`; `Error::Config` for a width HQQ does not pack (not 8, 6, 5, 4, 3, 2 or 1).
    pub fn for_bits(nbits: u32) -> Result<Self> {
        let (per_element, element_bytes) = match nbits {
            8 | 6 | 5 => (1, 1),
            4 => (2, 1),
            3 => (10, 4),
            2 => (4, 1),
            1 => (8, 1),
            _ => {
                return Err(Error::config(format!(
                    "HQQ nbits {nbits} is not supported (8, 6, 5, 4, 3, 2, 1)"
                )));
            }
        };
        Ok(Self {
            nbits,
            per_element,
            element_bytes,
        })
    }

    /// HQQ's name for the packing, as stored in the `packing` meta tensor.
    pub fn name(&self) -> &'static str {
        match self.nbits {
            4 => "4bit_u8",
            3 => "3bit_32",
            2 => "2bit_u8",
            1 => "1bit_u8",
            _ => "8bit_u8",
        }
    }

    /// Rows of the packed tensor for a grouped tensor of `rows` rows.
    pub fn packed_rows(&self, rows: usize) -> Result<usize> {
        if self.nbits == 3 {
            return Ok(rows.div_ceil(10));
        }
        if !rows.is_multiple_of(self.per_element) {
            return Err(Error::config(format!(
                "HQQ {}-bit packing needs the grouped row count ({rows}) to be a multiple of {}",
                self.nbits, self.per_element
            )));
        }
        Ok(rows / self.per_element)
    }

    /// Width of one field in storage: 5- and 6-bit codes take a whole byte.
    pub fn field_bits(&self) -> u32 {
        match self.per_element {
            1 => 8,
            _ => self.nbits,
        }
    }

    /// Bit shift of slab `j` inside a stored element.
    pub fn shift(&self, slab: usize) -> u32 {
        if self.nbits == 3 {
            27 - 3 * slab as u32
        } else {
            8 - self.field_bits() * (slab as u32 + 1)
        }
    }

    /// Mask of one field's low bits, `2^field_bits - 1`.
    pub fn mask(&self) -> u32 {
        (1u32 << self.field_bits()) - 1
    }
}

/// Reads stored element `p` (a byte, or a little-endian int32 for 3-bit).
fn element(packing: &Packing, bytes: &[u8], p: usize) -> u32 {
    if packing.element_bytes == 4 {
        let b = &bytes[4 * p..4 * p + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    } else {
        bytes[p] as u32
    }
}

/// Unpacks the codes of flat indices `flat` (e.g. `0..numel`) from packed storage of
/// `packed_rows x cols` elements. The caller has checked that `bytes` holds exactly that many
/// elements and that `flat` lies within the weight.
pub fn unpack(
    packing: &Packing,
    bytes: &[u8],
    packed_rows: usize,
    cols: usize,
    flat: std::ops::Range<usize>,
) -> Vec<u8> {
    let slab_len = packed_rows * cols;
    flat.map(|f| {
        let (slab, p) = (f / slab_len, f % slab_len);
        ((element(packing, bytes, p) >> packing.shift(slab)) & packing.mask()) as u8
    })
    .collect()
}

/// Packs codes of a grouped `rows x cols` tensor (flat order) into HQQ's storage bytes.
pub fn pack(packing: &Packing, codes: &[u8], rows: usize, cols: usize) -> Result<Vec<u8>> {
    if codes.len() != rows * cols {
        return Err(Error::shape(
            "codes",
            format!("[{rows}, {cols}]"),
            &[codes.len()],
        ));
    }
    if let Some(bad) = codes.iter().find(|c| (**c as u32) > packing.mask()) {
        return Err(Error::config(format!(
            "code {bad} does not fit in {} bits",
            packing.nbits
        )));
    }
    let packed_rows = packing.packed_rows(rows)?;
    let slab_len = packed_rows * cols;
    let mut words = vec![0u32; slab_len];
    for (f, code) in codes.iter().enumerate() {
        words[f % slab_len] |= (*code as u32) << packing.shift(f / slab_len);
    }
    Ok(if packing.element_bytes == 4 {
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    } else {
        words.iter().map(|w| *w as u8).collect()
    })
}
