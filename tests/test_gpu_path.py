"""The GPU path on this CPU: a trace split over devices, stage 1's memory, quantized loading, the decode loop.

A model split over devices (``device_map``) keeps each layer's trace on that layer's device. There is no
second real device here, so the split trace puts its layers on ``cpu`` and ``meta`` and a torch-function mode
checks that every tensor an op receives lies on one device: a misplaced index fails the test even though
``meta`` would accept it silently.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch
from torch.overrides import TorchFunctionMode

from diffmas_eval.latent import chain as chain_module
from diffmas_eval.latent.chain import AgentChain
from diffmas_eval.latent.config import LatentConfig
from diffmas_eval.latent.trace import LatentTrace, Segment
from diffmas_eval.testing.tiny import make_tiny_model

QUESTIONS = ["What is 2 + 3?", "Name a prime number greater than ten, please.", "Why?"]


class OneDevicePerOp(TorchFunctionMode):
    """Records every torch op whose tensor arguments (0-dim ones aside) span more than one device."""

    def __init__(self) -> None:
        super().__init__()
        self.mixed: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = set()

        def visit(x):
            if isinstance(x, torch.Tensor) and x.dim() > 0:
                devices.add(x.device)
            elif isinstance(x, (list, tuple)):
                for y in x:
                    visit(y)

        visit(args)
        visit(list(kwargs.values()))
        if len(devices) > 1:
            self.mixed.append(f"{getattr(func, '__name__', func)}: {sorted(map(str, devices))}")
        return func(*args, **kwargs)


def split_trace(batch: int = 3, layers: int = 4, width: int = 5) -> LatentTrace:
    """A trace whose first half of layers lives on ``cpu``, the second on ``meta``, rows right-padded."""
    trace = LatentTrace(batch, layers, "cpu")
    for i in range(layers):
        device = "cpu" if i < layers // 2 else "meta"
        trace.keys[i] = torch.randn(batch, 2, width, 4).to(device)
        trace.values[i] = torch.randn(batch, 2, width, 4).to(device)
    real = torch.tensor([width, width - 2, width - 1][:batch])
    trace.mask = (torch.arange(width)[None, :] < real[:, None]).long()  # right-padded: left_align has work
    trace.next_pos = real.clone()
    trace.add_segment(Segment("planner", width, 0, real.tolist()))
    return trace


def test_split_trace_ops_index_on_each_layers_device():
    trace = split_trace()
    with OneDevicePerOp() as mode:
        trace.left_align()
        picked = trace.select([0, 0, 2, 1])
        picked.select(torch.tensor([1, 3]))
        trace.fork()
        trace.keep_last_segment()
    assert not mode.mixed, mode.mixed
    assert [k.device.type for k in picked.keys] == ["cpu", "cpu", "meta", "meta"]
    assert picked.batch == 4 and picked.keys[0].shape[0] == 4 and picked.keys[3].shape[0] == 4


def test_split_trace_select_matches_one_device_trace():
    """The cpu half of a split trace selects the same rows as the unsplit trace does."""
    trace = split_trace()
    cpu = LatentTrace(trace.batch, 4, "cpu")
    cpu.keys = [k if k.device.type == "cpu" else torch.zeros(k.shape) for k in trace.keys]
    cpu.values = [v if v.device.type == "cpu" else torch.zeros(v.shape) for v in trace.values]
    cpu.mask, cpu.next_pos = trace.mask, trace.next_pos
    a, b = trace.select([2, 0]), cpu.select([2, 0])
    for i in range(2):
        assert torch.equal(a.keys[i], b.keys[i]) and torch.equal(a.values[i], b.values[i])
    assert torch.equal(a.mask, b.mask)


def test_one_device_per_op_catches_a_misplaced_index():
    """The detector itself: indexing a meta layer with a cpu index is reported."""
    t = torch.empty(2, 1, 3, 1, device="meta")
    with OneDevicePerOp() as mode:
        t.index_select(0, torch.tensor([1, 0]))
    assert mode.mixed


# -- stage 1 keeps only the last layer's hidden state ----------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
@torch.no_grad()
def test_stage1_last_hidden_state_is_bit_identical_to_hidden_states_last(arch, monkeypatch):
    """The hook on the decoder reads exactly ``hidden_states[-1]`` (after the final norm), batch and padding
    included; the fallback (no decoder found) is today's path."""
    model, tok = make_tiny_model(arch)
    config = LatentConfig(latent_steps=3)
    new = AgentChain(model, tok, config).stage1(QUESTIONS, record_inputs=True)
    monkeypatch.setattr(chain_module, "decoder_of", lambda model: None)
    old = AgentChain(model, tok, config).stage1(QUESTIONS, record_inputs=True)
    assert all(torch.equal(a, b) for a, b in zip(new.keys + new.values, old.keys + old.values))
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(new.history, old.history))


def test_stage1_asks_for_no_hidden_states_and_finds_the_decoder_under_wrappers():
    model, tok = make_tiny_model("qwen3")
    seen = []
    original = model.model.forward  # stage 1 calls the decoder alone (no LM head: tests/test_head_memory.py)

    def spy(*args, **kwargs):
        seen.append(kwargs.get("output_hidden_states"))
        return original(*args, **kwargs)

    model.model.forward = spy
    with torch.no_grad():
        AgentChain(model, tok, LatentConfig(latent_steps=2)).stage1(QUESTIONS[:2])
    assert seen and not any(seen)
    assert chain_module.decoder_of(model) is model.model
    from diffmas_eval.latent.distributed import CallThrough
    assert chain_module.decoder_of(CallThrough(model, model)) is model.model


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@torch.no_grad()
def test_latent_dtype_float32_casts_module_by_module_as_the_whole_model_cast_did(arch, monkeypatch):
    """Per-module casting gives the numbers of casting the whole model to float32 first, and holds at most one
    module's float32 copy at a time."""
    model, tok = make_tiny_model(arch)
    model = model.to(torch.bfloat16)
    config = LatentConfig(latent_steps=3, latent_dtype="float32")
    up = AgentChain(model, tok, config).stage1(QUESTIONS, record_inputs=True)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}

    @contextmanager
    def whole_model(m):  # the cast this replaced: every half tensor in float32 for all of stage 1
        tensors = [t for t in (*m.parameters(), *m.buffers()) if t.dtype == torch.bfloat16]
        for t in tensors:
            t.data = t.data.float()
        yield
        for t in tensors:
            t.data = t.data.to(torch.bfloat16)

    monkeypatch.setattr(chain_module, "upcast_modules", whole_model)
    ref = AgentChain(model, tok, config).stage1(QUESTIONS, record_inputs=True)
    monkeypatch.undo()
    assert all(torch.equal(a, b) for a, b in zip(ref.keys + ref.values, up.keys + up.values))
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(ref.history, up.history))

    largest = max(sum(t.numel() for t in m.parameters(recurse=False)) for m in model.modules()) * 4
    live = []
    with chain_module.upcast_modules(model):
        def watch(module, args, output):
            live.append(sum(p.numel() * 4 for p in model.parameters() if p.dtype == torch.float32))
        handles = [m.register_forward_hook(watch) for m in model.modules()]
        AgentChain(model, tok, LatentConfig(latent_steps=1)).stage1(QUESTIONS[:1])
        for h in handles:
            h.remove()
    assert live and max(live) <= largest


# -- quantized training and evaluation (bitsandbytes runs 4-bit on this CPU) ---------------------------------

ROWS = [
    {"prompt": "Question: What is 12 + 30?\nAnswer:", "completion": " 42"},
    {"prompt": "Question: Which animal barks? (A) fox (B) dog\nAnswer:", "completion": " (B) dog"},
    {"prompt": "Question: What is 2 + 3?\nAnswer:", "completion": " 5"},
]


def _sft_args(tiny_path, tmp_path, *extra: str) -> list[str]:
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS * 4) + "\n")
    return ["--model_name_or_path", str(tiny_path), "--dataset_name", str(data), "--agents", "3",
            "--latent_steps", "2", "--per_device_train_batch_size", "2", "--report_to", "none", "--logging_steps", "1",
            "--save_strategy", "no", "--output_dir", str(tmp_path / "out"), "--seed", "0", *extra]


def test_qlora_trains_through_the_chain_and_loads_in_lm_eval(tiny_path, tmp_path):
    pytest.importorskip("bitsandbytes")
    from lm_eval.api.instance import Instance

    from diffmas_eval.harness.diffmas_lm import DiffMASLM
    from diffmas_eval.training.sft import main, parser

    trainer = main(*parser().parse_args_and_config(_sft_args(
        tiny_path, tmp_path, "--use_peft", "--load_in_4bit", "--bnb_4bit_quant_type", "nf4", "--dtype", "float32",
        "--lora_target_modules", "q_proj", "v_proj", "--max_steps", "10", "--learning_rate", "3e-2"))[:4])
    base = trainer.accelerator.unwrap_model(trainer.model).get_base_model()
    assert base.is_loaded_in_4bit and type(base.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    out = tmp_path / "out"
    quant = json.loads((out / "diffmas.json").read_text())["training"]["quantization"]
    assert quant["load_in_4bit"] is True and quant["bnb_4bit_quant_type"] == "nf4"

    prompt, answer = "Question: What is 12 + 30?\nAnswer:", " 42"
    request = [Instance("loglikelihood", {}, (prompt, answer), 0)]
    lm = DiffMASLM.create_from_arg_string(f"pretrained={tiny_path},peft={out},device=cpu,dtype=float32,"
                                          "load_in_4bit=True,bnb_4bit_quant_type=nf4,bnb_4bit_compute_dtype=float32")
    assert lm.model.get_base_model().is_loaded_in_4bit and lm.chain.config.latent_steps == 2
    trained = lm.loglikelihood(request, disable_tqdm=True)[0][0]
    plain = DiffMASLM.create_from_arg_string(f"pretrained={tiny_path},device=cpu,dtype=float32,latent_steps=2,"
                                             "agents=3,load_in_4bit=True,bnb_4bit_compute_dtype=float32")
    untrained = plain.loglikelihood(request, disable_tqdm=True)[0][0]
    assert trained > untrained + 0.1  # the adapter was loaded over the 4-bit model, and it learned the answer
    assert lm.generate_until([Instance("generate_until", {}, (prompt, {"max_gen_toks": 4, "until": ["\n"]}), 0)],
                             disable_tqdm=True)[0] is not None


def test_quantized_loading_without_bitsandbytes_names_the_install(tiny_path, tmp_path, monkeypatch):
    import importlib.util

    from diffmas_eval.harness.diffmas_lm import DiffMASLM
    from diffmas_eval.training.sft import main, parser

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ImportError, match=r"bitsandbytes, which is not installed: pip install 'diffmas-eval\[quant\]'"):
        main(*parser().parse_args_and_config(_sft_args(tiny_path, tmp_path, "--use_peft", "--load_in_4bit",
                                                       "--max_steps", "1"))[:4])
    with pytest.raises(ImportError, match=r"diffmas-eval\[quant\]"):
        DiffMASLM.create_from_arg_string(f"pretrained={tiny_path},device=cpu,load_in_8bit=True")


def test_quantized_training_refuses_full_weights_and_a_device_bnb_cannot_use(tiny_path, tmp_path):
    pytest.importorskip("bitsandbytes")
    from diffmas_eval.models import require_bitsandbytes
    from diffmas_eval.training.sft import main, parser

    with pytest.raises(ValueError, match="add --use_peft"):
        main(*parser().parse_args_and_config(_sft_args(tiny_path, tmp_path, "--load_in_4bit", "--max_steps", "1"))[:4])
    with pytest.raises(RuntimeError, match="bitsandbytes cannot quantize on meta"):
        require_bitsandbytes("meta")


# -- the decode loop: tokens on the device, read in chunks; the same answers as one token at a time -----------

@torch.no_grad()
def reference_generate(chain, trace, prompts, max_new_tokens, stop=(), do_sample=False, generator=None):
    """The decode loop before it kept tokens on the device (host work every token), as the reference."""
    import torch.nn.functional as F

    from diffmas_eval.stability import step_stats
    from diffmas_eval.stopping import cut_at_stop, eos_ids

    stop = [s for s in stop if s]
    eos = eos_ids(chain.model, chain.tokenizer)
    work, logits = chain.prefill(trace, prompts)
    cache = work.cache(reserve=max_new_tokens)
    step = torch.ones(len(prompts), 1, dtype=work.mask.dtype)
    out_ids, done, ended = [[] for _ in prompts], [False] * len(prompts), ["length"] * len(prompts)
    logps, ents = [[] for _ in prompts], [[] for _ in prompts]
    for n in range(max_new_tokens):
        logits = logits.float()
        nxt = (torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)[:, 0] if do_sample
               else logits.argmax(-1))
        logp, ent = (x.tolist() for x in step_stats(logits, nxt))
        for i, tok in enumerate(nxt.tolist()):
            if done[i]:
                continue
            if tok in eos:
                done[i], ended[i] = True, "eos"
                continue
            out_ids[i].append(tok)
            logps[i].append(logp[i])
            ents[i].append(ent[i])
            if stop and any(s in chain.tokenizer.decode(out_ids[i][-64:]) for s in stop):
                done[i], ended[i] = True, "stop"
        if all(done) or n == max_new_tokens - 1:
            break
        out = chain.model(input_ids=nxt[:, None], attention_mask=work.full_mask(step),
                          position_ids=work.positions(step), cache=cache, use_cache=True, logits_to_keep=1)
        work.advance(step)
        logits = out.logits[:, -1]
    return [(cut_at_stop(chain.tokenizer.decode(ids, skip_special_tokens=True), stop), ids, lp, en, how)
            for ids, lp, en, how in zip(out_ids, logps, ents, ended)]


@pytest.mark.parametrize("do_sample", [False, True])
@torch.no_grad()
def test_chunked_decode_loop_gives_the_answers_of_the_per_token_loop(do_sample):
    model, tok = make_tiny_model("llama")
    chain = AgentChain(model, tok, LatentConfig(latent_steps=2))
    prompts = [chain.final_prompt(q) for q in QUESTIONS]
    trace = chain.stage1(QUESTIONS)
    free = chain.generate(trace, prompts, max_new_tokens=40, ignore_eos=True)
    # an EOS that row 0 meets at its 5th token, and a stop string from row 1's text: rows end at different steps
    model.generation_config.eos_token_id = free[0].token_ids[4]
    stop = [tok.decode(free[1].token_ids[6:8]).strip() or "zz", "never-there"]
    for budget in (1, 3, 40, 150):
        g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        new = chain.generate(trace, prompts, max_new_tokens=budget, stop=stop, do_sample=do_sample, generator=g1)
        ref = reference_generate(chain, trace, prompts, budget, stop, do_sample, g2)
        for gen, (text, ids, lp, en, how) in zip(new, ref):
            assert (gen.text, gen.token_ids, gen.stats.stopped) == (text, ids, how)
            assert gen.stats.logprobs == lp and gen.stats.entropies == en
        assert torch.equal(g1.get_state(), g2.get_state())  # the sampler is left where the per-token loop left it
    assert {g.stats.stopped for g in new} >= {"eos"}


def test_a_decode_budget_past_the_context_fails_before_any_compute():
    model, tok = make_tiny_model("llama", context=64)
    chain = AgentChain(model, tok, LatentConfig(latent_steps=1))
    trace = LatentTrace(1, chain.num_layers, "cpu")
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(chain_module.TraceTooLongError, match="max_new_tokens 100 .* exceed the model's context of 64"):
        chain.generate(trace, [[1, 2, 3]], max_new_tokens=100)
    assert not calls  # refused before the prefill


def test_checkpointed_agents_get_a_tensor_on_every_layer_device(monkeypatch):
    """torch's checkpoint restores the RNG of its tensor arguments' devices only: with layers on a second GPU,
    LoRA dropout would draw other masks in the recompute. Every device a layer runs on must reach it as an
    argument (``meta`` stands in for the second device; the gradients are the unsplit model's)."""
    model, tok = make_tiny_model("llama")
    seen, real = [], chain_module.checkpoint

    def spy(fn, *args, **kwargs):
        seen.append({a.device.type for a in args if isinstance(a, torch.Tensor)})
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(chain_module, "checkpoint", spy)
    grads = []
    for split in (False, True):
        chain = AgentChain(model, tok, LatentConfig(latent_steps=2, checkpoint_agents=True), trainable_realign=True)
        with monkeypatch.context() as m:  # stage 1 only: stage 2 would rightly refuse a trace off its layer's device
            if split:
                m.setattr(chain, "_layer_devices", lambda: {0: torch.device("cpu"), 1: torch.device("meta")})
            trace = chain.stage1(QUESTIONS[:2])
        loss = chain.loss(trace, [[5, 6, 7]] * 2, [[-100, 6, 7]] * 2)
        grads.append(torch.autograd.grad(loss, chain.realigner.weight)[0])
    assert seen and all(s == {"cpu"} for s in seen[:len(seen) // 2]) and all(s == {"cpu", "meta"}
                                                                         for s in seen[len(seen) // 2:])
    assert torch.equal(grads[0], grads[1])
