//! The smallest complete use: write two sequences' keys and values into a paged cache, run one
//! `paged_attention` call on the GPU (or the CPU reference without one), and compare with the CPU.
//!
//! ```sh
//! cargo run --release -p pagedattn --example minimal
//! ```

use pagedattn::block_manager::{BlockManager, BlockManagerConfig};
use pagedattn::layout::DType;
use pagedattn::testing::{Rng, compare, tolerance};
use pagedattn::{
    CacheLayout, Device, KvCache, KvCacheConfig, PagedAttentionArgs, PagedAttentionWorkspace, ScalarType, Tensor, Version, paged_attention,
};

fn main() -> pagedattn::Result<()> {
    let (heads, kv_heads, head_size, block_size) = (8, 2, 128, 16);
    let prompts = [300usize, 45];
    let mut rng = Rng::new(1);
    let mut random = |n: usize| (0..n).map(|_| rng.uniform()).collect::<Vec<f32>>();
    let q = random(prompts.len() * heads * head_size);
    let tokens: usize = prompts.iter().sum();
    let (k, v) = (random(tokens * kv_heads * head_size), random(tokens * kv_heads * head_size));

    let mut outputs = Vec::new();
    for device in [Device::auto(), Device::Cpu] {
        // Blocks for both prompts, and the slot of every token.
        let mut blocks = BlockManager::new(BlockManagerConfig { num_gpu_blocks: 64, num_cpu_blocks: 0, block_size, prefix_caching: false });
        let mut slots = Vec::new();
        for (id, &len) in prompts.iter().enumerate() {
            slots.extend(blocks.add_sequence(id as u64, &vec![0; len]).expect("64 blocks hold both").slots);
        }
        let config = KvCacheConfig {
            num_layers: 1,
            num_blocks: 64,
            block_size,
            num_kv_heads: kv_heads,
            head_size,
            dtype: ScalarType::F16,
            cache_dtype: ScalarType::F16,
            layout: CacheLayout::Vllm,
        };
        let mut cache = KvCache::new(&device, config)?;
        let up = |t: Tensor| device.upload(&t);
        let key = up(Tensor::from_f32(DType::F16, &[tokens, kv_heads, head_size], &k)?)?;
        let value = up(Tensor::from_f32(DType::F16, &[tokens, kv_heads, head_size], &v)?)?;
        cache.write(&device, 0, &key, &value, &Tensor::from_i64(&[tokens], &slots)?)?;

        // One query per sequence (its last token's) over all of its keys.
        let width = 32;
        let table = blocks.block_table_rows(&[0, 1], width).expect("both on the GPU pool");
        let query = up(Tensor::from_f32(DType::F16, &[prompts.len(), heads, head_size], &q)?)?;
        let lens: Vec<i32> = prompts.iter().map(|&l| l as i32).collect();
        let (block_tables, seq_lens) = (Tensor::from_i32(&[2, width], &table)?, Tensor::from_i32(&[2], &lens)?);
        let mut out = device.nan(ScalarType::F16, &[prompts.len(), heads, head_size])?;
        let mut workspace = PagedAttentionWorkspace::new(&device, prompts.len(), heads, head_size, width * block_size)?;
        let args = PagedAttentionArgs {
            query: &query,
            key_cache: cache.key(0),
            value_cache: cache.value(0),
            block_tables: &block_tables,
            seq_lens: &seq_lens,
            scale: 1.0 / (head_size as f32).sqrt(),
            alibi_slopes: None,
            k_scale: None,
            v_scale: None,
            blocksparse: None,
        };
        let version = paged_attention(&device, &mut out, &args, &mut workspace, Version::Auto)?;
        println!("{}: paged_attention ({version}) ran", device.name());
        outputs.push(out.to_cpu()?.to_f64_vec());
    }
    let e = compare(&outputs[0], &outputs[1]);
    println!("first device vs the float64 reference: rel-L2 {:.2e}, max-abs {:.2e}", e.rel_l2, e.max_abs);
    if !e.passes(tolerance(DType::F16)) {
        eprintln!("mismatch beyond the f16 tolerance");
        std::process::exit(1);
    }
    Ok(())
}
