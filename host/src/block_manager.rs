//! The block manager: which physical cache blocks hold each sequence's tokens.
//!
//! Host bookkeeping only (no device memory): it hands out blocks of a GPU pool and of a CPU pool
//! (the swap space), keeps a block table per sequence, and tells the caller which cache op to run:
//!
//! - [`BlockManager::add_sequence`]: blocks for a prompt; with prefix caching, full blocks whose
//!   content (the hash of the block's tokens chained to the previous block's hash) is already in a
//!   GPU block are shared instead of recomputed, and [`Allocation::cached_tokens`] says how many
//!   leading tokens need no prefill. [`Allocation::slots`] are the slots of the rest, for
//!   [`crate::reshape_and_cache`] / [`crate::reshape_and_cache_flash`].
//! - [`BlockManager::append_token`]: the slot of one decoded token. When the sequence's last block
//!   is shared (after a [`BlockManager::fork`]) it is first copied (copy-on-write):
//!   [`Append::copy`] is the `(src, dst)` pair for [`crate::copy_blocks`], to run before the write.
//! - [`BlockManager::swap_out`] / [`BlockManager::swap_in`]: preemption to the CPU pool and back;
//!   the returned `(src, dst)` pairs are [`crate::swap_blocks`]'s `block_mapping`.
//! - [`BlockManager::free`]: a finished sequence's blocks go back to the pool. A freed full block
//!   keeps its content hash until it is handed out again, so a later prompt with the same prefix
//!   still finds it (blocks are reused least recently freed first).
//!
//! Every call that fails (e.g. [`BlockError::OutOfBlocks`]) changes nothing. The caller enqueues the
//! cache op a call asks for before any op that writes blocks allocated by a later call (stream order
//! does the rest): a block released by [`BlockManager::swap_out`] may be handed out again at once.
//! [`BlockManager::check`] verifies the reference counts against every table (the tests run it after
//! every operation).
//!
//! ```
//! use pagedattn::block_manager::{BlockManager, BlockManagerConfig, Pool};
//! let mut bm = BlockManager::new(BlockManagerConfig { num_gpu_blocks: 8, num_cpu_blocks: 8, block_size: 4, prefix_caching: true });
//! let a = bm.add_sequence(1, &[10, 11, 12, 13, 14, 15]).unwrap(); // 2 blocks
//! assert_eq!((a.cached_tokens, a.slots.len()), (0, 6));
//! let b = bm.add_sequence(2, &[10, 11, 12, 13, 99]).unwrap(); // shares the first block
//! assert_eq!(b.cached_tokens, 4);
//! assert_eq!(bm.block_table(1).unwrap()[0], bm.block_table(2).unwrap()[0]);
//! bm.fork(1, 3).unwrap(); // 3 shares both of 1's blocks
//! let w = bm.append_token(3, 7).unwrap(); // writes into the shared half-full block: copied first
//! assert!(w.copy.is_some());
//! for s in [1, 2, 3] {
//!     bm.free(s).unwrap();
//! }
//! assert_eq!(bm.num_free(Pool::Gpu), 8);
//! bm.check().unwrap();
//! ```

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

/// A sequence's id, chosen by the caller.
pub type SeqId = u64;

/// A token id (only its identity matters: prefix caching hashes them).
pub type Token = u32;

/// One of the two block pools.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pool {
    /// Blocks of the device's KV cache (where attention reads).
    Gpu,
    /// Blocks of the host swap space (pinned memory), where preempted sequences wait.
    Cpu,
}

impl std::fmt::Display for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pool::Gpu => "GPU",
            Pool::Cpu => "CPU",
        })
    }
}

/// Why a block-manager call refused (nothing was changed).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    /// The pool has fewer free blocks than the call needs.
    #[error("out of {pool} blocks: {needed} needed, {free} free")]
    OutOfBlocks {
        /// The exhausted pool.
        pool: Pool,
        /// Blocks the call needed.
        needed: usize,
        /// Blocks that were free.
        free: usize,
    },
    /// No sequence has this id.
    #[error("sequence {0} is not known")]
    UnknownSeq(SeqId),
    /// A sequence with this id exists already.
    #[error("sequence {0} exists already")]
    SeqExists(SeqId),
    /// The call needs the sequence in the other pool (e.g. appending to a swapped-out sequence).
    #[error("sequence {seq} is in the {pool} pool; {op} needs it in the other one")]
    WrongPool {
        /// The sequence.
        seq: SeqId,
        /// Where it is.
        pool: Pool,
        /// The refused call.
        op: &'static str,
    },
    /// The sequence would need more blocks than a block-table row holds.
    #[error("sequence {seq} would need {blocks} blocks, more than the {max} of a block-table row")]
    TooLong {
        /// The sequence.
        seq: SeqId,
        /// Blocks it would need.
        blocks: usize,
        /// [`BlockManagerConfig::max_blocks_per_seq`].
        max: usize,
    },
    /// A prompt must have at least one token.
    #[error("sequence {0}: empty prompt")]
    EmptyPrompt(SeqId),
}

/// Sizes of a [`BlockManager`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockManagerConfig {
    /// Blocks of the device cache.
    pub num_gpu_blocks: usize,
    /// Blocks of the host swap space.
    pub num_cpu_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Share full prompt blocks by content hash.
    pub prefix_caching: bool,
}

impl BlockManagerConfig {
    /// The widest block table a sequence may need: every GPU block.
    pub fn max_blocks_per_seq(&self) -> usize {
        self.num_gpu_blocks
    }
}

/// What [`BlockManager::add_sequence`] gave a prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    /// Leading tokens whose keys and values are already in shared blocks (a multiple of the block
    /// size, less than the prompt's length): prefill only the tokens after them.
    pub cached_tokens: usize,
    /// The cache slots (`block * block_size + offset`) of tokens `cached_tokens..`, in order.
    pub slots: Vec<i64>,
}

/// What [`BlockManager::append_token`] gave a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Append {
    /// The token's cache slot.
    pub slot: i64,
    /// `(src, dst)`: copy block `src` to block `dst` (every layer, keys and values) before writing
    /// the slot; the sequence's last block was shared and `dst` is its private copy.
    pub copy: Option<(u32, u32)>,
}

/// One pool: reference counts, a free list (least recently freed first) and, for the GPU pool, the
/// content-hash index of full blocks.
#[derive(Clone, Debug)]
struct BlockPool {
    refs: Vec<u32>,
    /// The content hash a full block is registered under in `index`.
    hash: Vec<Option<u64>>,
    /// Free list entries `(block, stamp)`; an entry is live while the block is free and `stamp` is
    /// its `freed_at` (a block revived by a prefix hit leaves a dead entry behind).
    free: VecDeque<(u32, u64)>,
    freed_at: Vec<u64>,
    clock: u64,
    num_free: usize,
    index: HashMap<u64, u32>,
}

impl BlockPool {
    fn new(n: usize) -> BlockPool {
        BlockPool {
            refs: vec![0; n],
            hash: vec![None; n],
            free: (0..n as u32).map(|b| (b, 1)).collect(),
            freed_at: vec![1; n],
            clock: 2,
            num_free: n,
            index: HashMap::new(),
        }
    }

    fn len(&self) -> usize {
        self.refs.len()
    }

    /// The least recently freed block, now referenced once (its old hash forgotten).
    fn alloc(&mut self) -> Option<u32> {
        while let Some((b, stamp)) = self.free.pop_front() {
            let i = b as usize;
            if self.refs[i] != 0 || self.freed_at[i] != stamp {
                continue; // dead entry
            }
            if let Some(h) = self.hash[i].take()
                && self.index.get(&h) == Some(&b)
            {
                self.index.remove(&h);
            }
            self.refs[i] = 1;
            self.num_free -= 1;
            return Some(b);
        }
        None
    }

    /// One more reference to `b` (a free block leaves the free list, keeping its content).
    fn share(&mut self, b: u32) {
        let i = b as usize;
        if self.refs[i] == 0 {
            self.num_free -= 1;
            self.freed_at[i] = 0; // kills its free-list entry (stamps of free blocks are at least 1)
        }
        self.refs[i] += 1;
    }

    fn release(&mut self, b: u32) {
        let i = b as usize;
        debug_assert!(self.refs[i] > 0, "block {b} released more often than taken");
        self.refs[i] -= 1;
        if self.refs[i] == 0 {
            self.freed_at[i] = self.clock;
            self.free.push_back((b, self.clock));
            self.clock += 1;
            self.num_free += 1;
            // Dead entries pile up when freed blocks are revived by prefix hits; drop them now and then.
            if self.free.len() > 2 * self.len() + 16 {
                let (refs, freed_at) = (&self.refs, &self.freed_at);
                self.free.retain(|&(b, s)| refs[b as usize] == 0 && freed_at[b as usize] == s);
            }
        }
    }

    /// Records that full block `b` holds content `h`, unless another block does already.
    fn register(&mut self, b: u32, h: u64) {
        if let std::collections::hash_map::Entry::Vacant(e) = self.index.entry(h) {
            e.insert(b);
            self.hash[b as usize] = Some(h);
        }
    }
}

#[derive(Clone, Debug)]
struct Seq {
    tokens: Vec<Token>,
    blocks: Vec<u32>,
    pool: Pool,
}

/// Per-sequence block tables over a GPU and a CPU block pool, with reference-counted sharing (forks,
/// prefix caching), copy-on-write and swapping. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct BlockManager {
    config: BlockManagerConfig,
    gpu: BlockPool,
    cpu: BlockPool,
    seqs: HashMap<SeqId, Seq>,
}

/// The content hash of a full block: its tokens chained to the previous block's hash (so equal
/// hashes mean equal prefixes, not just equal blocks).
pub fn block_hash(prev: u64, tokens: &[Token]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    prev.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl BlockManager {
    /// Empty pools of the configured sizes (block ids `0..num_*_blocks`).
    pub fn new(config: BlockManagerConfig) -> BlockManager {
        BlockManager {
            config,
            gpu: BlockPool::new(config.num_gpu_blocks),
            cpu: BlockPool::new(config.num_cpu_blocks),
            seqs: HashMap::new(),
        }
    }

    /// The sizes it was made with.
    pub fn config(&self) -> &BlockManagerConfig {
        &self.config
    }

    fn pool(&self, p: Pool) -> &BlockPool {
        match p {
            Pool::Gpu => &self.gpu,
            Pool::Cpu => &self.cpu,
        }
    }

    /// Free blocks of a pool (freed blocks kept for prefix hits count as free).
    pub fn num_free(&self, pool: Pool) -> usize {
        self.pool(pool).num_free
    }

    /// How many sequences share block `block` of `pool` (0: free).
    pub fn ref_count(&self, pool: Pool, block: u32) -> u32 {
        self.pool(pool).refs[block as usize]
    }

    fn seq(&self, id: SeqId) -> Result<&Seq, BlockError> {
        self.seqs.get(&id).ok_or(BlockError::UnknownSeq(id))
    }

    /// The sequence's blocks, in token order (GPU or CPU block ids, see [`BlockManager::pool_of`]).
    pub fn block_table(&self, id: SeqId) -> Result<&[u32], BlockError> {
        Ok(&self.seq(id)?.blocks)
    }

    /// The sequence's tokens (its length is the number of cached keys once the caller wrote them).
    pub fn tokens(&self, id: SeqId) -> Result<&[Token], BlockError> {
        Ok(&self.seq(id)?.tokens)
    }

    /// Which pool the sequence's blocks are in.
    pub fn pool_of(&self, id: SeqId) -> Result<Pool, BlockError> {
        Ok(self.seq(id)?.pool)
    }

    /// Ids of all sequences (any order).
    pub fn seq_ids(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.seqs.keys().copied()
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.config.block_size)
    }

    fn slot(&self, block: u32, pos: usize) -> i64 {
        block as i64 * self.config.block_size as i64 + (pos % self.config.block_size) as i64
    }

    /// Takes blocks for a new sequence's prompt (in the GPU pool). With prefix caching, its leading
    /// full blocks that match cached content are shared (at most up to the prompt's last token,
    /// which is always computed).
    pub fn add_sequence(&mut self, id: SeqId, prompt: &[Token]) -> Result<Allocation, BlockError> {
        if self.seqs.contains_key(&id) {
            return Err(BlockError::SeqExists(id));
        }
        if prompt.is_empty() {
            return Err(BlockError::EmptyPrompt(id));
        }
        let bs = self.config.block_size;
        let n_blocks = self.blocks_for(prompt.len());
        if n_blocks > self.config.max_blocks_per_seq() {
            return Err(BlockError::TooLong { seq: id, blocks: n_blocks, max: self.config.max_blocks_per_seq() });
        }
        // Hashes of the full blocks; hits only among blocks wholly before the last token.
        let hashes: Vec<u64> = prompt
            .chunks_exact(bs)
            .scan(0u64, |prev, c| {
                *prev = block_hash(*prev, c);
                Some(*prev)
            })
            .collect();
        let mut hits = Vec::new();
        if self.config.prefix_caching {
            for (i, h) in hashes.iter().enumerate() {
                if (i + 1) * bs >= prompt.len() {
                    break;
                }
                match self.gpu.index.get(h) {
                    Some(&b) => hits.push(b),
                    None => break,
                }
            }
        }
        let revived = hits.iter().filter(|&&b| self.gpu.refs[b as usize] == 0).count();
        let needed = n_blocks - hits.len() + revived;
        if needed > self.gpu.num_free {
            return Err(BlockError::OutOfBlocks { pool: Pool::Gpu, needed, free: self.gpu.num_free });
        }
        for &b in &hits {
            self.gpu.share(b);
        }
        let mut blocks = hits.clone();
        while blocks.len() < n_blocks {
            blocks.push(self.gpu.alloc().expect("counted above"));
        }
        if self.config.prefix_caching {
            for (i, &h) in hashes.iter().enumerate().skip(hits.len()) {
                self.gpu.register(blocks[i], h);
            }
        }
        let cached_tokens = hits.len() * bs;
        let slots = (cached_tokens..prompt.len()).map(|p| self.slot(blocks[p / bs], p)).collect();
        self.seqs.insert(id, Seq { tokens: prompt.to_vec(), blocks, pool: Pool::Gpu });
        Ok(Allocation { cached_tokens, slots })
    }

    /// Adds one token to a GPU-resident sequence: a new block when the last is full, a private copy
    /// of the last block when it is shared (see [`Append::copy`]).
    pub fn append_token(&mut self, id: SeqId, token: Token) -> Result<Append, BlockError> {
        let bs = self.config.block_size;
        let max = self.config.max_blocks_per_seq();
        let seq = self.seqs.get(&id).ok_or(BlockError::UnknownSeq(id))?;
        if seq.pool != Pool::Gpu {
            return Err(BlockError::WrongPool { seq: id, pool: seq.pool, op: "append_token" });
        }
        let pos = seq.tokens.len();
        let last = seq.blocks.last().copied();
        let (block, copy) = if pos.is_multiple_of(bs) {
            if seq.blocks.len() + 1 > max {
                return Err(BlockError::TooLong { seq: id, blocks: seq.blocks.len() + 1, max });
            }
            let b = self.gpu.alloc().ok_or(BlockError::OutOfBlocks { pool: Pool::Gpu, needed: 1, free: 0 })?;
            (b, None)
        } else {
            let last = last.expect("a sequence with a partial block has blocks");
            if self.gpu.refs[last as usize] > 1 {
                let b = self.gpu.alloc().ok_or(BlockError::OutOfBlocks { pool: Pool::Gpu, needed: 1, free: 0 })?;
                self.gpu.release(last);
                (b, Some((last, b)))
            } else {
                (last, None)
            }
        };
        let seq = self.seqs.get_mut(&id).expect("looked up above");
        if pos.is_multiple_of(bs) {
            seq.blocks.push(block);
        } else {
            *seq.blocks.last_mut().expect("non-empty") = block;
        }
        seq.tokens.push(token);
        if self.config.prefix_caching && seq.tokens.len().is_multiple_of(bs) {
            let h = seq.tokens.chunks_exact(bs).fold(0u64, block_hash);
            self.gpu.register(block, h);
        }
        Ok(Append { slot: self.slot(block, pos), copy })
    }

    /// A new sequence `child` sharing all of `parent`'s blocks (both must then copy a shared block
    /// before writing it, which [`BlockManager::append_token`] arranges).
    pub fn fork(&mut self, parent: SeqId, child: SeqId) -> Result<(), BlockError> {
        if self.seqs.contains_key(&child) {
            return Err(BlockError::SeqExists(child));
        }
        let seq = self.seq(parent)?.clone();
        if seq.pool != Pool::Gpu {
            return Err(BlockError::WrongPool { seq: parent, pool: seq.pool, op: "fork" });
        }
        for &b in &seq.blocks {
            self.gpu.share(b);
        }
        self.seqs.insert(child, seq);
        Ok(())
    }

    /// Drops a sequence; its blocks go back to their pool when nobody else holds them.
    pub fn free(&mut self, id: SeqId) -> Result<(), BlockError> {
        let seq = self.seqs.remove(&id).ok_or(BlockError::UnknownSeq(id))?;
        let pool = match seq.pool {
            Pool::Gpu => &mut self.gpu,
            Pool::Cpu => &mut self.cpu,
        };
        for b in seq.blocks {
            pool.release(b);
        }
        Ok(())
    }

    /// Moves a sequence to the CPU pool: returns the `(gpu_block, cpu_block)` pairs to copy device
    /// to host (each of its blocks gets a CPU block of its own, shared or not). Its GPU blocks are
    /// released at once: enqueue the copy before anything writes them.
    pub fn swap_out(&mut self, id: SeqId) -> Result<Vec<(u32, u32)>, BlockError> {
        self.swap(id, Pool::Gpu)
    }

    /// Moves a swapped-out sequence back to the GPU pool: returns the `(cpu_block, gpu_block)` pairs
    /// to copy host to device.
    pub fn swap_in(&mut self, id: SeqId) -> Result<Vec<(u32, u32)>, BlockError> {
        self.swap(id, Pool::Cpu)
    }

    fn swap(&mut self, id: SeqId, from: Pool) -> Result<Vec<(u32, u32)>, BlockError> {
        let bs = self.config.block_size;
        let seq = self.seq(id)?;
        if seq.pool != from {
            let op = if from == Pool::Gpu { "swap_out" } else { "swap_in" };
            return Err(BlockError::WrongPool { seq: id, pool: seq.pool, op });
        }
        let to = if from == Pool::Gpu { Pool::Cpu } else { Pool::Gpu };
        let needed = seq.blocks.len();
        let free = self.pool(to).num_free;
        if needed > free {
            return Err(BlockError::OutOfBlocks { pool: to, needed, free });
        }
        let mut seq = self.seqs.remove(&id).expect("looked up above");
        let (src, dst) = match from {
            Pool::Gpu => (&mut self.gpu, &mut self.cpu),
            Pool::Cpu => (&mut self.cpu, &mut self.gpu),
        };
        let mut pairs = Vec::with_capacity(needed);
        for b in seq.blocks.iter_mut() {
            let nb = dst.alloc().expect("counted above");
            src.release(*b);
            pairs.push((*b, nb));
            *b = nb;
        }
        if to == Pool::Gpu && self.config.prefix_caching {
            let mut prev = 0u64;
            for (c, &b) in seq.tokens.chunks_exact(bs).zip(&seq.blocks) {
                prev = block_hash(prev, c);
                self.gpu.register(b, prev);
            }
        }
        seq.pool = to;
        self.seqs.insert(id, seq);
        Ok(pairs)
    }

    /// A `[seqs.len(), width]` block table (row-major i32, unused entries 0) for the given
    /// GPU-resident sequences, for the attention ops' `block_tables` / `block_table`.
    pub fn block_table_rows(&self, seqs: &[SeqId], width: usize) -> Result<Vec<i32>, BlockError> {
        let mut rows = vec![0i32; seqs.len() * width];
        for (r, &id) in seqs.iter().enumerate() {
            let seq = self.seq(id)?;
            if seq.pool != Pool::Gpu {
                return Err(BlockError::WrongPool { seq: id, pool: seq.pool, op: "block_table_rows" });
            }
            if seq.blocks.len() > width {
                return Err(BlockError::TooLong { seq: id, blocks: seq.blocks.len(), max: width });
            }
            for (j, &b) in seq.blocks.iter().enumerate() {
                rows[r * width + j] = b as i32;
            }
        }
        Ok(rows)
    }

    /// Checks the bookkeeping: every block's reference count equals the number of table entries
    /// naming it, the free count and free list match the unreferenced blocks, each table has the
    /// blocks its length needs, and every hash-index entry names a block registered under it.
    pub fn check(&self) -> Result<(), String> {
        let bs = self.config.block_size;
        for (pool, p) in [(Pool::Gpu, &self.gpu), (Pool::Cpu, &self.cpu)] {
            let mut refs = vec![0u32; p.len()];
            for (id, s) in &self.seqs {
                if s.blocks.len() != s.tokens.len().div_ceil(bs) {
                    return Err(format!("sequence {id}: {} blocks for {} tokens", s.blocks.len(), s.tokens.len()));
                }
                if s.pool == pool {
                    for &b in &s.blocks {
                        *refs.get_mut(b as usize).ok_or(format!("sequence {id}: {pool} block {b} out of range"))? += 1;
                    }
                }
            }
            if refs != p.refs {
                let b = (0..p.len()).find(|&b| refs[b] != p.refs[b]).expect("differs");
                return Err(format!("{pool} block {b}: {} references counted, tables hold {}", p.refs[b], refs[b]));
            }
            let free = refs.iter().filter(|&&r| r == 0).count();
            if free != p.num_free {
                return Err(format!("{pool}: {} free counted, {free} unreferenced", p.num_free));
            }
            let mut live = vec![false; p.len()];
            for &(b, s) in &p.free {
                let i = b as usize;
                if p.refs[i] == 0 && p.freed_at[i] == s {
                    if live[i] {
                        return Err(format!("{pool} block {b} is twice on the free list"));
                    }
                    live[i] = true;
                }
            }
            if live.iter().filter(|&&l| l).count() != free {
                return Err(format!("{pool}: the free list does not hold every free block once"));
            }
            for (&h, &b) in &p.index {
                if p.hash[b as usize] != Some(h) {
                    return Err(format!("{pool} block {b} is indexed under a hash it does not hold"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manager(gpu: usize, cpu: usize, bs: usize, prefix_caching: bool) -> BlockManager {
        BlockManager::new(BlockManagerConfig { num_gpu_blocks: gpu, num_cpu_blocks: cpu, block_size: bs, prefix_caching })
    }

    #[test]
    fn prompt_blocks_and_slots() {
        let mut bm = manager(4, 0, 4, false);
        let a = bm.add_sequence(7, &[1, 2, 3, 4, 5]).unwrap();
        let t = bm.block_table(7).unwrap().to_vec();
        assert_eq!(t.len(), 2);
        let want: Vec<i64> = (0..5).map(|p| t[p / 4] as i64 * 4 + (p % 4) as i64).collect();
        assert_eq!((a.cached_tokens, a.slots), (0, want));
        assert_eq!(bm.num_free(Pool::Gpu), 2);
        bm.check().unwrap();
    }

    #[test]
    fn exhaustion_is_an_error_that_changes_nothing() {
        let mut bm = manager(3, 1, 4, true);
        bm.add_sequence(1, &[0; 9]).unwrap(); // 3 blocks
        let before = format!("{:?}", bm.gpu.refs);
        assert_eq!(bm.add_sequence(2, &[5]), Err(BlockError::OutOfBlocks { pool: Pool::Gpu, needed: 1, free: 0 }));
        assert!(matches!(bm.swap_out(1), Err(BlockError::OutOfBlocks { pool: Pool::Cpu, needed: 3, free: 1 })));
        for _ in 0..3 {
            bm.append_token(1, 9).unwrap(); // fills the third block
        }
        assert!(matches!(bm.append_token(1, 9), Err(BlockError::TooLong { .. }) | Err(BlockError::OutOfBlocks { .. })));
        assert_eq!(bm.tokens(1).unwrap().len(), 12);
        assert_eq!(format!("{:?}", bm.gpu.refs), before);
        assert_eq!(bm.add_sequence(1, &[1]), Err(BlockError::SeqExists(1)));
        assert_eq!(bm.free(5), Err(BlockError::UnknownSeq(5)));
        bm.check().unwrap();
    }

    #[test]
    fn prefix_hits_share_full_blocks_and_survive_a_free() {
        let mut bm = manager(8, 0, 2, true);
        let p: Vec<Token> = (0..7).collect();
        assert_eq!(bm.add_sequence(1, &p).unwrap().cached_tokens, 0);
        // Same first 5 tokens: blocks 0 and 1 are shared (block 2 holds token 4, which differs after).
        let mut q = p[..5].to_vec();
        q.extend([50, 51]);
        let a = bm.add_sequence(2, &q).unwrap();
        assert_eq!((a.cached_tokens, a.slots.len()), (4, 3));
        assert_eq!(bm.block_table(1).unwrap()[..2], bm.block_table(2).unwrap()[..2]);
        // A prompt that is exactly the cached blocks still computes its last block.
        assert_eq!(bm.add_sequence(3, &p[..4]).unwrap().cached_tokens, 2);
        bm.check().unwrap();
        let shared = bm.block_table(1).unwrap()[0];
        for s in [1, 2, 3] {
            bm.free(s).unwrap();
        }
        assert_eq!(bm.num_free(Pool::Gpu), 8);
        // Freed blocks keep their content until reused.
        let a = bm.add_sequence(4, &p).unwrap();
        assert_eq!(a.cached_tokens, 6);
        assert_eq!(bm.block_table(4).unwrap()[0], shared);
        bm.check().unwrap();
        // Another prompt's first block (different tokens) does not match.
        assert_eq!(bm.add_sequence(5, &[9, 9, 9]).unwrap().cached_tokens, 0);
        bm.check().unwrap();
    }

    #[test]
    fn fork_copies_on_write_once() {
        let mut bm = manager(8, 0, 4, false);
        bm.add_sequence(1, &[1, 2, 3, 4, 5, 6]).unwrap();
        bm.fork(1, 2).unwrap();
        let last = bm.block_table(1).unwrap()[1];
        assert_eq!(bm.ref_count(Pool::Gpu, last), 2);
        let w = bm.append_token(2, 7).unwrap();
        let (src, dst) = w.copy.expect("the shared last block is copied");
        assert_eq!(src, last);
        assert_eq!(w.slot, dst as i64 * 4 + 2);
        assert_eq!(bm.ref_count(Pool::Gpu, last), 1);
        // The parent now owns its block alone: no copy.
        assert_eq!(bm.append_token(1, 8).unwrap(), Append { slot: last as i64 * 4 + 2, copy: None });
        assert_eq!(bm.append_token(2, 9).unwrap().copy, None);
        // Full first block stays shared; filling the last block then opens a fresh one.
        assert_eq!(bm.ref_count(Pool::Gpu, bm.block_table(1).unwrap()[0]), 2);
        bm.append_token(2, 10).unwrap();
        assert_eq!(bm.append_token(2, 11).unwrap().copy, None);
        assert_eq!(bm.block_table(2).unwrap().len(), 3);
        bm.check().unwrap();
    }

    #[test]
    fn swap_out_and_in() {
        let mut bm = manager(4, 4, 4, true);
        bm.add_sequence(1, &[1, 2, 3, 4, 5]).unwrap();
        let gpu = bm.block_table(1).unwrap().to_vec();
        let out = bm.swap_out(1).unwrap();
        assert_eq!(out.iter().map(|p| p.0).collect::<Vec<_>>(), gpu);
        assert_eq!((bm.num_free(Pool::Gpu), bm.num_free(Pool::Cpu)), (4, 2));
        assert!(matches!(bm.append_token(1, 0), Err(BlockError::WrongPool { pool: Pool::Cpu, .. })));
        assert!(bm.block_table_rows(&[1], 4).is_err());
        let back = bm.swap_in(1).unwrap();
        assert_eq!(back.iter().map(|p| p.0).collect::<Vec<_>>(), out.iter().map(|p| p.1).collect::<Vec<_>>());
        assert_eq!(bm.block_table(1).unwrap(), back.iter().map(|p| p.1).collect::<Vec<_>>());
        assert_eq!((bm.num_free(Pool::Gpu), bm.num_free(Pool::Cpu)), (2, 4));
        bm.check().unwrap();
    }

    /// Thousands of random operations with the bookkeeping checked after each, then everything freed:
    /// no block leaks, and a sequence's blocks are never shared with one that wrote differently.
    #[test]
    fn random_operations_keep_counts_exact() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        for prefix_caching in [false, true] {
            let mut bm = manager(48, 24, 4, prefix_caching);
            let mut next_id = 0u64;
            let (mut copies, mut hits, mut refusals) = (0, 0, 0);
            for _ in 0..20_000 {
                let ids: Vec<SeqId> = {
                    let mut v: Vec<_> = bm.seq_ids().collect();
                    v.sort_unstable();
                    v
                };
                let pick = |r: u64| ids.get(r as usize % ids.len().max(1)).copied().unwrap_or(u64::MAX);
                let r = rand(ids.len() as u64 + 1);
                let seq = pick(r);
                let res = match rand(10) {
                    0 | 1 => {
                        // Prompts from a few shared prefixes, so prefix hits happen.
                        let len = 1 + rand(14) as usize;
                        let family = rand(3) as u32;
                        let prompt: Vec<Token> = (0..len as u32).map(|i| if i < 6 { family * 100 + i } else { rand(5) as u32 }).collect();
                        next_id += 1;
                        bm.add_sequence(next_id, &prompt).map(|a| hits += (a.cached_tokens > 0) as usize)
                    }
                    2..=5 => bm.append_token(seq, rand(4) as u32).map(|a| copies += a.copy.is_some() as usize),
                    6 => {
                        next_id += 1;
                        bm.fork(seq, next_id)
                    }
                    7 => bm.free(seq),
                    8 => bm.swap_out(seq).map(drop),
                    _ => bm.swap_in(seq).map(drop),
                };
                refusals += res.is_err() as usize;
                bm.check().unwrap_or_else(|e| panic!("after {res:?}: {e}"));
            }
            assert!(copies > 100 && refusals > 100, "the walk exercised too little: {copies} copies, {refusals} refusals");
            assert_eq!(hits > 100, prefix_caching, "{hits} prefix hits");
            let ids: Vec<SeqId> = bm.seq_ids().collect();
            for id in ids {
                bm.free(id).unwrap();
            }
            assert_eq!((bm.num_free(Pool::Gpu), bm.num_free(Pool::Cpu)), (48, 24));
            bm.check().unwrap();
        }
    }
}
