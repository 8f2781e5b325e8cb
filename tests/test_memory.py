"""``diffmas-eval memory`` reads only a config and predicts the bytes a real trace allocates."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen3Config

from diffmas_eval.cli import main
from diffmas_eval.latent import AgentChain, LatentConfig
from diffmas_eval.tiny import make_tokenizer

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
