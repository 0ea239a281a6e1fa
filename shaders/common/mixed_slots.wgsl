// The slot table of a mixed batch: per slot, TABLE_STRIDE u32 words.
//   OFT slot:  [kind = 1, blocks offset, block size b, stored blocks, 0, 0, 0, 0]
//   LoRA slot: [kind = 2, A offset, B offset, rank, scaling (f32 bits), DoRA scale offset or
//               NO_DORA, 0, 0]
// A row's slot is NONE when it takes the base alone.
const NONE: u32 = 0xffffffffu;
const NO_DORA: u32 = 0xffffffffu;
const TABLE_STRIDE: u32 = 8u;
const KIND_OFT: u32 = 1u;
const KIND_LORA: u32 = 2u;
