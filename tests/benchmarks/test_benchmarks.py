"""The benchmark harness's own logic (no timings: numbers stay out of tests)."""

import json
import subprocess
import sys

from benchmarks import profile, run, train_step, video_step


def test_profile_parts_name_the_model_scopes():
    assert profile._part("jit(step)/jvp(Llama)/Llama.logits/lm_head/dot_general") == "lm head"
    assert profile._part("jit(step)/transpose(jvp(Llama))/while/body/closed_call/layers/"
                         "self_attn/q_proj/...i,io->...o/dot_general") == "attention projections"
    assert profile._part("jit(step)/jvp(Llama)/while/body/closed_call/layers/self_attn/"
                         "jit(_where)/select_n") == "attention scores/softmax/rope"
    assert profile._part("jit(step)/jvp(VideoLLM)/vision/layers/mlp/fc1") == "vision tower"
    assert profile._part("jit(step)/jvp()/exp") == "loss"
    assert profile._part("jit(step)/add") == "optimizer"


def test_op_names_read_from_hlo_text():
    text = ('  %dot.64 = f32[512,32000]{1,0} dot(%a, %b), metadata={op_name="jit(step)/x/lm_head"}\n'
            '  ROOT %tuple.1 = (f32[]) tuple(%c)\n')
    assert profile._op_names(text) == {"dot.64": "jit(step)/x/lm_head"}


def test_summary_lists_each_ratio_and_errors():
    records = [
        {"name": "sft_train_step", "ratio_ours_over_theirs": 0.75},
        {"name": "generation", "mode": "greedy", "tokens_per_s_ratio_ours_over_theirs": 2.5},
        {"name": "data_pipeline/decode", "source_frames": 8, "ratio_vs_loop_per_item": 3.0,
         "ratio_vs_loop_per_video": 1.2},
        {"name": "video_llm_train_step", "error": "exit 1: boom"},
    ]
    table = run.summary(records).splitlines()
    assert table[0].split() == ["benchmark", "ratio", "value", "better"]
    assert any("sft_train_step" in row and "0.750" in row and "lower" in row for row in table)
    assert any("[greedy]" in row and "2.500" in row and "higher" in row for row in table)
    assert sum("data_pipeline/decode [8-frame sources]" in row for row in table) == 2
    assert any("video_llm_train_step" in row and "error" in row for row in table)


def test_run_rejects_unknown_benchmark():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--only", "nope"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "unknown benchmarks ['nope']" in proc.stderr


def test_run_one_names_lines_and_reports_failures(monkeypatch):
    class Done:
        returncode = 2
        stdout = json.dumps({"benchmark": "decode", "ratio_vs_loop_per_item": 2.0}) + "\nnoise\n"
        stderr = "Traceback\nValueError: bad\n"

    monkeypatch.setattr(run.subprocess, "run", lambda *a, **k: Done())
    records = run.run_one("data_pipeline", quick=True, profile=False, timeout=5)
    assert records[0]["name"] == "data_pipeline/decode"
    assert records[1]["name"] == "data_pipeline" and "exit 2" in records[1]["error"]
    assert "ValueError: bad" in records[1]["error"]


def test_decode_step_tool_reports_its_floors_on_cpu():
    """benchmarks/decode_step.py on a tiny LLaMA on XLA:CPU: the lone-matmul floor counts every
    projection kernel (their bytes are what the tiny model's kernels hold) and lies between
    the plain floor and the step's own bytes."""
    import jax
    import jax.numpy as jnp
    import flax.linen as nn

    from benchmarks import decode_step
    from rlaif_jax.models.llama import Llama, LlamaConfig

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                         num_heads=4, num_kv_heads=2, scan_layers=False)
    costs = decode_step.decode_step_costs(config, rows=4, slots=64)
    assert costs["floor_gib"] <= costs["matmul_floor_gib"]
    assert costs["over_matmul_floor"] <= costs["over_floor"]
    params = nn.unbox(jax.eval_shape(lambda: Llama(config).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))["params"])
    matmuls = decode_step.lone_matmul_bytes(params, 4, jax.devices()[0])
    per_layer = 64 * (64 + 2 * 32 + 64) + 3 * 64 * 96  # q, k, v (2 kv heads), o; gate, up, down
    assert matmuls["weights"] == 4 * (2 * per_layer + 64 * 128)  # float32, + the LM head
    assert matmuls["charged"] >= matmuls["weights"]


def test_benchmarks_run_on_jax_default_xla_flags_unless_set(monkeypatch):
    seen = {}

    class Done:
        returncode, stdout, stderr = 0, "", ""

    def fake_run(command, env, **kwargs):
        seen[command[2]] = env.get("XLA_FLAGS")
        return Done()

    monkeypatch.setattr(run.subprocess, "run", fake_run)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    for name in ("sft_train_step", "generation"):
        run.run_one(name, quick=True, profile=False, timeout=5)
    assert seen == {"benchmarks.train_step": None, "benchmarks.generation": None}
    monkeypatch.setenv("XLA_FLAGS", "--mine")
    run.run_one("sft_train_step", quick=True, profile=False, timeout=5)
    assert seen["benchmarks.train_step"] == "--mine"


def test_train_step_benchmarks_unroll_the_layers_unless_asked():
    """The CPU train steps run the layers unrolled by default (their docstring says why);
    `--scan_layers 1` gives the presets' scanned stack, in both towers of the video step."""
    assert train_step.parser().parse_args([]).scan_layers == 0
    for flag, scanned in (([], False), (["--scan_layers", "1"], True)):
        config = video_step.configs(video_step.parser().parse_args(flag))
        assert (config.llm.scan_layers, config.vision.scan_layers) == (scanned, scanned)
        assert config.llm.attention_block == 128
