//! The device status word: a `u32` in device memory that kernels OR flags into when they meet bad
//! device-side data (which the host cannot check without reading device memory). The kernel never
//! reads or writes out of bounds because of such data: it skips it, writes NaN to the affected
//! output and raises a flag. The host reads the word later (after a sync, an event, or a graph
//! replay) and turns it into a typed error.

/// A block table entry (or a `copy_blocks` block id) was negative or `>= num_blocks`.
pub const BAD_BLOCK_ID: u32 = 1 << 0;
/// A sequence length was negative or longer than `max_num_blocks_per_seq * block_size`.
pub const BAD_SEQ_LEN: u32 = 1 << 1;
/// A `slot_mapping` entry was `>= num_blocks * block_size` (negative entries are padding, not errors).
pub const BAD_SLOT: u32 = 1 << 2;

/// An fp8 cache scale (`k_scale` or `v_scale`, read from device memory) was not finite and positive.
pub const BAD_SCALE: u32 = 1 << 3;

/// Every flag with its name, for messages.
pub const FLAGS: &[(u32, &str)] = &[
    (BAD_BLOCK_ID, "block id out of range"),
    (BAD_SEQ_LEN, "sequence length out of range"),
    (BAD_SLOT, "slot out of range"),
    (BAD_SCALE, "fp8 scale not finite and positive"),
];
