"""The GPU benchmark's own logic, on CPU: the PyTorch side builds the same shapes as ours and
runs, the ratios come out right, and a GPU trace is read into parts (no timings asserted)."""

import argparse
import json

import pytest

from benchmarks import gpu_step, profile, torch_llama_step

GPU_HLO = """\
HloModule jit_step

%fused_computation.7 (param_0: bf16[4,8]) -> f32[4,8] {
  %param_0 = bf16[4,8]{1,0} parameter(0)
  ROOT %convert.1 = f32[4,8]{1,0} convert(%param_0), metadata={op_name="jit(step)/jvp(Llama)/while/body/layers/self_attn/btkgh,bskh->bkgts/dot_general"}
}

ENTRY %main.9 (p.1: bf16[4,8], p.2: bf16[8,8]) -> f32[8,4] {
  %p.1 = bf16[4,8]{1,0} parameter(0)
  %gemm_fusion_dot.3 = f32[4,8]{1,0} fusion(%p.1), kind=kCustom, calls=%fused_computation.7
  %bitcast.2 = f32[4,8]{1,0} bitcast(%gemm_fusion_dot.3)
  %wrapped_transpose.11 = f32[8,4]{1,0} fusion(%bitcast.2), kind=kLoop, calls=%wrapped_transpose_computation.11, metadata={scheduling_name="wrapped_transpose.11"}
  %custom-call.5 = bf16[8,8]{1,0} custom-call(%p.1), custom_call_target="__cublas$gemm", metadata={op_name="jit(step)/jvp(Llama)/while/body/layers/mlp/up_proj/dot_general"}
  ROOT %loop_add_fusion = f32[8,4]{1,0} fusion(%wrapped_transpose.11), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/lm_head/add"}
}
"""


def test_compiler_made_instructions_take_the_op_they_move():
    ops = profile._op_names(GPU_HLO)
    attention = ops["gemm_fusion_dot.3"]  # from the computation it calls
    assert "self_attn" in attention
    assert ops["bitcast.2"] == attention  # from its operand
    assert ops["wrapped_transpose.11"] == attention  # through the bitcast
    assert "up_proj" in ops["custom-call.5"] and "lm_head" in ops["loop_add_fusion"]
    assert "p.1" not in ops and "convert.1" in ops


def test_gpu_trace_counts_device_kernels_once():
    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/host:CPU"}},
        # Kernels are named after their fusion with '.' -> '_'; hlo_op is the CUDA graph.
        {"ph": "X", "pid": 1, "name": "gemm_fusion_dot_3", "dur": 300_000,
         "args": {"hlo_op": "command_buffer_1"}},
        {"ph": "X", "pid": 1, "name": "wrapped_transpose_11", "dur": 100_000,
         "args": {"hlo_op": "command_buffer_1"}},
        {"ph": "X", "pid": 1, "name": "nvjet_sm90_tst_256x128_NNT", "dur": 200_000,
         "args": {"hlo_op": "command_buffer_1"}},
        {"ph": "X", "pid": 1, "name": "memcpy128", "dur": 40_000, "args": {}},
        {"ph": "X", "pid": 1, "name": "some_kernel", "dur": 20_000,
         "args": {"hlo_op": "loop_add_fusion"}},
        # The host's launch of the same op must not count again.
        {"ph": "X", "pid": 7, "name": "gemm_fusion_dot.3", "dur": 900_000, "args": {}},
    ]
    parts = profile.breakdown_of_events(events, profile._op_names(GPU_HLO), steps=2)
    assert parts["attention scores/softmax/rope"] == pytest.approx(0.2)
    assert parts["matmul (library kernel, op not named)"] == pytest.approx(0.1)
    assert parts["copies"] == pytest.approx(0.02)
    assert parts["lm head"] == pytest.approx(0.01)
    assert sum(parts.values()) == pytest.approx(0.33)


def test_cpu_trace_counts_named_thunks_only():
    events = [
        {"ph": "X", "pid": 1, "name": "gemm_fusion_dot.3", "dur": 100_000},
        {"ph": "X", "pid": 1, "name": "while.4", "dur": 900_000},  # encloses the body
        {"ph": "X", "pid": 1, "name": "unknown.1", "dur": 500_000},
    ]
    parts = profile.breakdown_of_events(events, {"gemm_fusion_dot.3": "x/self_attn/y",
                                                 "while.4": "x/while"}, steps=1)
    assert parts == {"attention scores/softmax/rope": pytest.approx(0.1)}


def test_torch_side_has_our_shapes():
    args = gpu_step.parser().parse_args(["--layers", "3", "--hidden", "256"])
    ours = gpu_step.model_config(args)
    theirs = torch_llama_step.dims(torch_llama_step.parser().parse_args(
        ["--layers", "3", "--hidden", "256"]))
    assert theirs == dict(hidden_size=ours.hidden_size, num_attention_heads=ours.num_heads,
                          intermediate_size=ours.intermediate_size,
                          num_hidden_layers=ours.num_layers)
    full = torch_llama_step.dims(argparse.Namespace(layers=0, hidden=0))
    assert full == dict(hidden_size=4096, num_attention_heads=32, intermediate_size=11008,
                        num_hidden_layers=32)


def test_kernel_kinds():
    kind = torch_llama_step.kernel_kind
    flash = "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma"
    assert kind(flash) == "attention (flash/sdpa)"
    assert kind("nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_NNT") == "matmul"
    assert kind("void at::native::vectorized_elementwise_kernel<8, CUDAFunctor_add>") == \
        "elementwise, copies"


def test_torch_side_runs_and_ratios_follow(capsys):
    torch_llama_step.main(["--mode", "full", "--layers", "1", "--hidden", "128", "--batch", "1",
                           "--length", "16", "--steps", "1", "--gen_batch", "1",
                           "--gen_prompt", "4", "--gen_new", "2"])
    theirs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["name"] for r in theirs] == ["torch_generation", "torch_train_step",
                                           "torch_train_step"]
    assert [r.get("checkpointing") for r in theirs[1:]] == ["off", "on"]
    assert all(r["side"] == "torch" and "error" not in r for r in theirs)
    assert theirs[0]["tokens_per_s"] > 0 and theirs[1]["step_s"] > 0

    # The comparison lines: time ours / theirs per setting, tokens/s ours / theirs.
    theirs = [dict(theirs[0], tokens_per_s=100.0), dict(theirs[1], step_s=2.0),
              dict(theirs[2], step_s=4.0), {"side": "torch", "error": "exit 1"}]
    ours = [{"name": "gpu_train_step", "mode": "full", "remat": "none", "step_s": 3.0},
            {"name": "gpu_generation", "tokens_per_s": 250.0}]
    lines = gpu_step.comparisons(ours, theirs)
    assert [(r["what"], r.get("torch_checkpointing")) for r in lines] == [
        ("train_step", "off"), ("train_step", "on"), ("generation", None)]
    assert [r.get("ratio_ours_over_theirs") for r in lines[:2]] == [1.5, 0.75]
    assert lines[2]["tokens_per_s_ratio_ours_over_theirs"] == 2.5
