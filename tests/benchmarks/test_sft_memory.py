"""The vicuna7b SFT step (real width, 2 of its 32 layers to keep CI fast) lowers and compiles
ahead of time for 8 devices (fsdp 8), and its arguments are sharded ~8 ways."""

from benchmarks.sft_memory import sft_step_memory


def test_vicuna7b_step_compiles_for_fsdp8_with_sharded_arguments():
    result = sft_step_memory("vicuna7b", fsdp=8, layers=2, seq_len=64, batch=8, accum=1,
                             text_only=True)
    assert result["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and result["devices"] == 8
    whole = result["frozen_bytes"] + result["trainable_bytes"] + result["optimizer_bytes"]
    assert whole > 2.5e9  # 2 layers + embeddings + lm_head of the 7B, fp32
    # Every device holds about an eighth of the state (plus the small batch and norms).
    assert whole / 8 <= result["argument_size_in_bytes"] < whole / 6
    assert result["temp_size_in_bytes"] > 0
    # LoRA r 32 on 7 projections: the adapter and its Adam moments are small next to the base.
    assert result["trainable_bytes"] < 0.01 * result["frozen_bytes"]
