"""``diffmas-eval memory`` reads only a config and predicts the bytes a real trace allocates."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV3Config, Gemma3TextConfig, LlamaConfig, Qwen3Config

from diffmas_eval import memory
from diffmas_eval.commands.cli import main
from diffmas_eval.harness.batching import RowCost
from diffmas_eval.latent import AgentChain, LatentConfig
from diffmas_eval.testing.tiny import make_tokenizer

TOKENIZER = make_tokenizer()
SMALL = dict(vocab_size=len(TOKENIZER), hidden_size=64, intermediate_size=96, num_attention_heads=4,
             pad_token_id=TOKENIZER.pad_token_id, eos_token_id=TOKENIZER.eos_token_id, bos_token_id=None)
CONFIGS = {
    "llama": LlamaConfig(num_hidden_layers=2, num_key_value_heads=2, **SMALL),  # head_dim = hidden / heads
    # head_dim set apart from hidden / heads (as in Qwen3), one KV head per two query heads
    "qwen3": Qwen3Config(num_hidden_layers=3, num_key_value_heads=2, head_dim=24, **SMALL),
    # sliding-window layers beside full ones: the chain's cache keeps every position of both
    "gemma3": Gemma3TextConfig(num_hidden_layers=3, num_key_value_heads=1, head_dim=8, sliding_window=4,
                               sliding_window_pattern=2, **SMALL),
    # multi-head latent attention: the cache holds a latent (key, width kv_lora_rank 16) and a RoPE key
    # (value, width qk_rope_head_dim 8) for one head: key width != value width; one MoE layer
    "deepseek_v3": DeepseekV3Config(num_hidden_layers=2, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None,
                                    qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, moe_intermediate_size=32,
                                    n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                                    first_k_dense_replace=1, **SMALL),
}


def _memory(capsys, path, *args):
    assert main(["memory", "--model", str(path), "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_memory_equals_the_bytes_of_a_real_trace(arch, dtype, tmp_path, capsys):
    config = CONFIGS[arch]
    config.save_pretrained(tmp_path)  # the command sees only this config.json
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype), attn_implementation="eager").eval()
    for agents, steps in [(2, 3), (4, 2)]:
        chain = AgentChain(model, TOKENIZER, LatentConfig.from_dict({"agents": agents, "latent_steps": steps}))
        with torch.no_grad():
            trace = chain.stage1(["What is 12 + 30? Think step by step."])
        assert trace.length > 2 * 4  # longer than the sliding window: its layers still keep every position
        prompts = ",".join(str(s.prompt) for s in trace.segments)
        m = _memory(capsys, tmp_path, "--agents", str(agents), "--latent-steps", str(steps),
                    "--prompt-tokens", prompts, "--dtype", dtype, "--final-tokens", "7")
        assert m["trace_positions"] == trace.length
        assert m["trace_bytes"] == trace.nbytes
        assert m["bytes_per_position"] == trace.bytes_per_position()
        assert m["total_bytes"] == trace.nbytes + 7 * m["bytes_per_position"]


def test_qwen3_8b_per_position_matches_the_design_notes(tmp_path, capsys):
    """36 layers x 8 KV heads x head_dim 128 in bf16: 2 x 36 x 8 x 128 x 2 bytes = 144 KiB per position."""
    Qwen3Config(num_hidden_layers=36, num_key_value_heads=8, head_dim=128, hidden_size=4096,
                num_attention_heads=32, intermediate_size=12288, vocab_size=151936).save_pretrained(tmp_path)
    m = _memory(capsys, tmp_path, "--prompt-tokens", "100")
    assert m["bytes_per_position"] == 144 * 1024
    assert m["trace_positions"] == 3 * (100 + 10) and m["trace_bytes"] == 330 * 144 * 1024


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    assert main(["memory", "--model", str(tmp_path / "missing")]) == 2
    assert "cannot read the config" in capsys.readouterr().err
    CONFIGS["llama"].save_pretrained(tmp_path)
    assert main(["memory", "--model", str(tmp_path), "--agents", "4", "--prompt-tokens", "5,6"]) == 2
    assert "one per upstream agent (3)" in capsys.readouterr().err


def test_the_function_returns_what_the_command_prints(tmp_path, capsys):
    from diffmas_eval.memory import format_memory, trace_memory

    CONFIGS["qwen3"].save_pretrained(tmp_path)
    m = trace_memory(str(tmp_path), agents=3, latent_steps=4, prompt_tokens=[7, 9], final_tokens=5,
                     dtype="float32")
    assert _memory(capsys, tmp_path, "--agents", "3", "--latent-steps", "4", "--prompt-tokens", "7,9",
                   "--final-tokens", "5", "--dtype", "float32") == m.as_dict()
    assert main(["memory", "--model", str(tmp_path), "--agents", "3", "--latent-steps", "4", "--prompt-tokens",
                 "7,9", "--final-tokens", "5", "--dtype", "float32"]) == 0
    assert capsys.readouterr().out == format_memory(m) + "\n"
    assert m.trace_positions == 7 + 9 + 2 * 4 and m.total_bytes == (m.trace_positions + 5) * m.bytes_per_position
    assert main(["memory", "--model", str(tmp_path), "--prompt-tokens", "7,x"]) == 2
    assert "--prompt-tokens takes N or N,N,... (integers), got '7,x'" in capsys.readouterr().err


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_one_estimate_for_the_trace_the_memory_command_and_batch_size_auto(arch):
    """``memory.bytes_per_position`` (from the config, or from the loaded model) is what a real trace
    holds per row and position, and what ``RowCost`` (``--batch_size auto``) plans with."""
    config = CONFIGS[arch]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="eager").eval()
    chain = AgentChain(model, TOKENIZER, LatentConfig.from_dict({"agents": 3, "latent_steps": 2}))
    with torch.no_grad():
        trace = chain.stage1(["What is 12 + 30? Think step by step.", "Why?"])  # two rows, padded
    held = trace.nbytes // (trace.length * trace.batch)
    estimate = memory.bytes_per_position(model)
    assert estimate == memory.bytes_per_position(config, "bfloat16") == trace.bytes_per_position() == held
    assert RowCost.of(model).bytes_per_position == estimate
    assert memory.bytes_per_position(config, torch.float32) == 2 * estimate
    if arch == "deepseek_v3":  # the arithmetic 2 x layers x kv_heads x head_dim does not describe this cache
        widths = {(k.shape[1], k.shape[-1], v.shape[-1]) for k, v in zip(trace.keys, trace.values)}
        assert widths == {(1, 16, 8)} and held == 2 * 1 * (16 + 8) * 2


def test_row_cost_plans_with_the_one_estimate(monkeypatch):
    model = AutoModelForCausalLM.from_config(CONFIGS["qwen3"], dtype=torch.float32, attn_implementation="eager")
    cost = RowCost.of(model)
    monkeypatch.setattr(memory, "bytes_per_position", lambda m, dtype=None: cost.bytes_per_position + 1000)
    bigger = RowCost.of(model)
    assert bigger.bytes_per_position == cost.bytes_per_position + 1000
    # the KV cache counts twice per position of the trace and the final agent (see RowCost.row)
    assert bigger.row(30, 10, prefill=20) - cost.row(30, 10, prefill=20) == 2 * 1000 * (30 + 10)


def test_the_estimate_leaves_a_live_model_as_it_is():
    """Measuring builds a copy on ``meta``: the model keeps its attention implementation and dtype."""
    model = AutoModelForCausalLM.from_config(CONFIGS["llama"], dtype=torch.float32, attn_implementation="sdpa")
    memory.bytes_per_position(model, torch.bfloat16)
    assert model.config._attn_implementation == "sdpa" and model.config.dtype == torch.float32
