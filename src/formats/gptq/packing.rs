//! GPTQ's packing: small codes as a little-endian bit stream of u32 words. Value `j` of a
//! stream occupies bits `[bits*j, bits*j + bits)` of the words concatenated low word first.
//! For 2/4/8 bits that is `32/bits` values per word, LSB first; for 3 bits, 32 values per 3 words
//! with values 10 and 21 straddling a word boundary.
//!
//! A stream runs down a column of `qweight` (along in_features) or along a row of `qzeros` (along
//! out_features); `Stream` says where its words sit in the row-major buffer.

use crate::error::{Error, Result};

/// Words needed for `count` values of `bits` bits: `ceil(count * bits / 32)`.
pub fn words_for(count: usize, bits: u32) -> Result<usize> {
    count
        .checked_mul(bits as usize)
        .map(|b| b.div_ceil(32))
        .ok_or_else(|| Error::config(format!("{count} values of {bits} bits overflow")))
}

/// Position of one stream's words in a row-major buffer: word `w` is at `first + w * stride`.
#[derive(Clone, Copy, Debug)]
pub struct Stream {
    pub first: usize,
    pub stride: usize,
    pub bits: u32,
}

impl Stream {
    /// Column `n` of `qweight` (`out_features` words per row): codes along in_features.
    pub fn qweight_column(n: usize, out_features: usize, bits: u32) -> Self {
        Self {
            first: n,
            stride: out_features,
            bits,
        }
    }

    /// Row `g` of `qzeros` (`cols` words per row): zeros along out_features.
    pub fn qzeros_row(g: usize, cols: usize, bits: u32) -> Self {
        Self {
            first: g * cols,
            stride: 1,
            bits,
        }
    }

    fn locate(&self, index: usize) -> (usize, u32) {
        let bit = index * self.bits as usize;
        (self.first + (bit / 32) * self.stride, (bit % 32) as u32)
    }

    fn mask(&self) -> u32 {
        (1u32 << self.bits) - 1
    }

    /// Value `index` of the stream. The words must hold it (see [`words_for`]).
    pub fn get(&self, words: &[u32], index: usize) -> u32 {
        let (at, shift) = self.locate(index);
        let mut v = words[at] >> shift;
        if shift + self.bits > 32 {
            v |= words[at + self.stride] << (32 - shift);
        }
        v & self.mask()
    }

    /// ORs `value` (masked to `bits`) into place; the field must still be zero.
    pub fn put(&self, words: &mut [u32], index: usize, value: u32) {
        let value = value & self.mask();
        let (at, shift) = self.locate(index);
        words[at] |= value << shift;
        if shift + self.bits > 32 {
            words[at + self.stride] |= value >> (32 - shift);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(values: &[u32], bits: u32) -> Vec<u32> {
        let mut words = vec![0; words_for(values.len(), bits).unwrap()];
        let s = Stream {
            first: 0,
            stride: 1,
            bits,
        };
        for (j, v) in values.iter().enumerate() {
            s.put(&mut words, j, *v);
        }
        words
    }

    #[test]
    fn four_bit_is_lsb_first() {
        assert_eq!(pack(&[1, 2, 3, 4, 5, 6, 7, 8], 4), vec![0x8765_4321]);
        assert_eq!(pack(&[7; 8], 4), vec![0x7777_7777]);
        assert_eq!(pack(&[1; 16], 2), vec![0x5555_5555]);
        assert_eq!(pack(&[0x7f; 4], 8), vec![0x7f7f_7f7f]);
    }

    #[test]
    fn three_bit_straddles_words_10_and_21() {
        // Only value 10 set to 0b111: bits 30, 31 of word 0 and bit 0 of word 1.
        let mut v = vec![0; 32];
        v[10] = 7;
        assert_eq!(pack(&v, 3), vec![0xC000_0000, 1, 0]);
        v[10] = 0;
        v[21] = 7; // bit 31 of word 1, bits 0-1 of word 2
        assert_eq!(pack(&v, 3), vec![0, 0x8000_0000, 3]);
        // Every field 3 (a symmetric v1 zero): 0b011 repeated.
        assert_eq!(
            pack(&[3; 32], 3),
            vec![0xDB6D_B6DB, 0xB6DB_6DB6, 0x6DB6_DB6D]
        );
    }

    #[test]
    fn get_inverts_put_for_every_width_and_a_strided_layout() {
        for bits in [2u32, 3, 4, 8] {
            let n = 70; // not a whole number of words
            let values: Vec<u32> = (0..n)
                .map(|j| (j as u32 * 7 + 3) & ((1 << bits) - 1))
                .collect();
            let cols = 3;
            let rows = words_for(n, bits).unwrap();
            let mut words = vec![0; rows * cols];
            let s = Stream {
                first: 1,
                stride: cols,
                bits,
            };
            for (j, v) in values.iter().enumerate() {
                s.put(&mut words, j, *v);
            }
            let back: Vec<u32> = (0..n).map(|j| s.get(&words, j)).collect();
            assert_eq!(back, values, "{bits} bits");
            assert!(words.iter().skip(2).step_by(cols).all(|w| *w == 0));
        }
    }
}
