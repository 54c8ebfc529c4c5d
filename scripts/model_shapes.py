"""Random-weight model shapes of the GPU scripts (check_model_gpu.py, bench_decode_step.py)."""

from models.config import ModelConfig

CONFIGS = {
    # Llama-3-like attention (group 4, head_dim 128) at a width that runs in seconds.
    "llama_gqa4_d128": ModelConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=8, num_q_heads=16,
        num_kv_heads=4, head_dim=128, rope_theta=500000.0,
    ),
    # SmolLM2-135M's shapes (group 3, head_dim 64, tied embeddings), random weights.
    "smollm2_shape": ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_q_heads=9,
        num_kv_heads=3, head_dim=64, rope_theta=100000.0, tie_word_embeddings=True,
    ),
    # Llama-3-8B's shapes (configs/llama3_8b.gin without the rope scaling), random weights.
    "llama3_8b_shape": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_q_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=500000.0,
    ),
    "tiny": ModelConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_q_heads=4, num_kv_heads=2,
        head_dim=16,
    ),
}  # fmt: skip
