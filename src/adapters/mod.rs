//! PEFT adapters (OFT, LoRA, rsLoRA, DoRA): parameters, PEFT directory loading, CPU math.
//! Adapters never look inside a base format.

pub mod lora;
pub mod oft;
pub mod peft_dir;
