"""`diffmas` and `textmas` take every `hf` model_arg; `--batch_size auto` sized for a DiffMAS row."""

import functools
import inspect
import logging

import huggingface_hub.constants
import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from diffmas_eval.harness import batching
from diffmas_eval.harness.batching import RowCost
from diffmas_eval.harness.common import FROM_PRETRAINED
from diffmas_eval.harness.diffmas_lm import OPTIONS, DiffMASLM
from diffmas_eval.harness.textmas_lm import TextMASLM
from diffmas_eval.latent import AgentChain
from diffmas_eval.testing.tiny import save_tiny_model

REQUESTS = [("Question: what is 12 + 30? Answer:", " 42"), ("Question: what is 12 + 30? Answer:", " 100"),
            ("The quick brown fox jumps over the", " lazy dog.")]


def loglikelihoods(lm):
    return lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(REQUESTS)], disable_tqdm=True)


def assert_close(a, b):
    assert len(a) == len(b)
    for (la, ga), (lb, gb) in zip(a, b):
        assert abs(la - lb) < 1e-4 and ga == gb


def hflm_parameters():
    params = inspect.signature(HFLM.__init__).parameters.values()
    return {p.name: p.default for p in params if p.name != "self" and p.kind is not p.VAR_KEYWORD}


def test_every_hflm_parameter_reaches_hflm_unchanged(tiny_path, monkeypatch):
    given = {k: v for k, v in hflm_parameters().items() if v is not inspect.Parameter.empty}
    # every HFLM argument the chain honours (truncation, logits_cache, softmax_dtype at HFLM's defaults: another
    # value is refused, test_arguments_the_chain_cannot_honour_are_refused_with_the_reason)
    given |= {"pretrained": str(tiny_path), "device": "cpu", "dtype": "float32", "max_length": 77,
              "prefix_token_id": 5, "think_end_token": "</x>",
              "max_batch_size": 7, "batch_size": "auto:2", "attn_implementation": "sdpa"}
    seen = {}
    init = HFLM.__init__

    @functools.wraps(init)  # keeps HFLM's signature, which diffmas reads
    def recording(self, *args, **kwargs):
        seen.update(kwargs)
        init(self, *args, **kwargs)

    monkeypatch.setattr(HFLM, "__init__", recording)
    lm = DiffMASLM(**given, agents=1)
    assert seen == given  # every HFLM argument (and from_pretrained's attn_implementation), as given
    assert (lm.max_length, lm.truncation, lm.prefix_token_id, lm.think_end_token, lm.max_batch_size) == (
        77, False, 5, "</x>", 7)
    assert lm.softmax_dtype is None and lm.batch_size == "auto" and lm.batch_schedule == 2
    assert lm.model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("arg", ["truncation=True", "logits_cache=False", "softmax_dtype=float32"])
def test_arguments_the_chain_cannot_honour_are_refused_with_the_reason(tiny_path, arg):
    # accepted and silently ignored before issue 30 (the chain truncates, caches and computes softmax its own way)
    with pytest.raises(ValueError, match=rf"diffmas cannot honour {arg.split('=')[0]}=.*: the chain .*drop it"):
        DiffMASLM.create_from_arg_string(f"pretrained={tiny_path},device=cpu,{arg}")


def test_misspelt_argument_fails_with_ours_first_then_hflms(tiny_path):
    with pytest.raises(ValueError, match=r"unknown diffmas model_args \['revison'\]; valid ones:\n") as err:
        DiffMASLM.create_from_arg_string(f"pretrained={tiny_path},revison=main")
    text = str(err.value)
    ours = [text.index(f"\n  {k}: ") for k in OPTIONS]  # each of ours with its one-line help, in order
    assert ours == sorted(ours)
    hf_start = text.index("lm-eval hf (HFLM) arguments")
    assert max(ours) < hf_start
    for name in [*hflm_parameters(), *FROM_PRETRAINED]:
        assert f"\n  {name}" in text


def test_revision_picks_the_same_weights_as_hf(tmp_path, monkeypatch):
    """A hub-cache layout with two branches of one repo (different weights), read offline."""
    repo = tmp_path / "models--tiny--chain"
    for branch, seed, commit in [("main", 0, "a" * 40), ("other", 1, "b" * 40)]:
        save_tiny_model(repo / "snapshots" / commit, seed=seed)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / branch).write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    scores = {}
    for revision in ["main", "other"]:
        args = dict(pretrained="tiny/chain", revision=revision, device="cpu", dtype="float32")
        scores[revision] = loglikelihoods(HFLM(**args))
        assert_close(loglikelihoods(DiffMASLM(**args, agents=1)), scores[revision])
    assert abs(scores["main"][0][0] - scores["other"][0][0]) > 1e-3  # the branches really differ


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attn_implementation_scores_as_hf(tiny_path, attn):
    args = dict(pretrained=str(tiny_path), device="cpu", dtype="float32", attn_implementation=attn)
    hf, dm = HFLM(**args), DiffMASLM(**args, agents=1)
    assert dm.model.config._attn_implementation == attn
    assert_close(loglikelihoods(dm), loglikelihoods(hf))


def test_batch_size_auto_end_to_end_scores_as_a_fixed_batch_size(tiny_path, local_data, monkeypatch, caplog):
    """The everyday `hf` line, with --model diffmas, and --batch_size auto."""
    rows = []
    stage1 = AgentChain.stage1
    monkeypatch.setattr(AgentChain, "stage1", lambda self, qs, **kw: rows.append(len(qs)) or stage1(self, qs, **kw))
    line = f"pretrained={tiny_path},dtype=float32,revision=main,trust_remote_code=True,attn_implementation=sdpa"
    chain = "agents=3,latent_steps=1"
    tasks = ["diffmas_arc_challenge", "diffmas_gsm8k"]

    def run(batch_size):
        out = simple_evaluate(model="diffmas", model_args=f"{line},{chain}", tasks=tasks, limit=5, device="cpu",
                              batch_size=batch_size, log_samples=True, gen_kwargs={"max_gen_toks": 8})
        return out["results"], {t: sorted((s["doc_id"], s["resps"]) for s in out["samples"][t]) for t in tasks}

    fixed = run(2)
    assert max(rows) == 2
    rows.clear()
    with caplog.at_level(logging.INFO, logger="lm_eval.models.diffmas"):
        auto = run("auto")
    assert max(rows) == 5  # the tiny model fits every question in one batch (cap: max_batch_size 64)
    assert "diffmas batch_size auto: 64 rows" in caplog.text and "KV cache per position" in caplog.text
    for task in tasks:
        assert auto[0][task] == fixed[0][task]
        for (d1, r1), (d2, r2) in zip(auto[1][task], fixed[1][task], strict=True):
            assert d1 == d2
            flat1, flat2 = [x[0] for x in r1], [x[0] for x in r2]
            if isinstance(flat1[0], str):
                assert flat1 == flat2
            else:
                assert_close(flat1, flat2)


def test_auto_on_cpu_fits_the_free_memory(tiny_path, monkeypatch):
    lm = DiffMASLM(pretrained=str(tiny_path), device="cpu", dtype="float32", agents=3, latent_steps=2,
                   batch_size="auto:2")
    questions = ["What is 12 + 30?", "Which option is correct: (A) fox (B) dog?", "What is 1 + 1?", "Why?"] * 3
    prompts = [len(a[0]) for a in lm.chain.upstream_prompts([questions[1]])]
    per_row = RowCost.of(lm.model).row(sum(prompts) + 2 * len(prompts), 40, prefill=max([40, *prompts]), scored=1)
    monkeypatch.setattr(batching, "available_memory", lambda: int(3.5 * per_row / batching.CPU_SHARE))
    plan = lm._plan(questions, [40] * len(questions), [1] * len(questions))
    assert [size for _, size in plan][0] == 3 and len(lm.batch_sizes) == 2  # auto:2 sized twice
    assert sorted(i for rows, _ in plan for i in rows) == list(range(len(questions)))
    assert all(len(rows) <= size for rows, size in plan)


def test_probe_shrinks_on_out_of_memory(tiny_path, monkeypatch):
    """The CUDA path (as hf's): the real scoring path at decreasing sizes until one runs, then a margin."""
    lm = DiffMASLM(pretrained=str(tiny_path), device="cpu", dtype="float32", agents=2, latent_steps=1,
                   max_batch_size=16)
    tried = []
    stage1 = AgentChain.stage1

    def limited(self, qs, **kw):
        tried.append(len(qs))
        if len(qs) > 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return stage1(self, qs, **kw)

    monkeypatch.setattr(AgentChain, "stage1", limited)
    size = lm._probe("What is 12 + 30?", final=30, scored=2)
    assert tried[0] == 16 and tried[-1] <= 5  # the largest size that ran, and it keeps a margin below it
    assert size == max(1, int(tried[-1] * batching.PROBE_SHARE))


def test_auto_with_no_room_for_one_row_is_a_clear_error(tiny_path, monkeypatch):
    """CPU: the estimate says one row does not fit; CUDA: the probe ran out of memory even at one row.
    Either way an error naming the cause and the fixes, not a batch of 1 that dies later."""
    with pytest.raises(batching.NoRowFitsError, match=r"one row needs about 2 MiB .* is 0 MiB; lower latent_steps"):
        batching.cpu_batch_size(2 * 2**20, 64, free=2**20)
    lm = DiffMASLM(pretrained=str(tiny_path), device="cpu", dtype="float32", agents=2, latent_steps=1,
                   max_batch_size=4)
    tried = []

    def never(self, qs, **kw):
        tried.append(len(qs))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(AgentChain, "stage1", never)
    with pytest.raises(batching.NoRowFitsError, match=r"even one row ran out of cpu memory .* 30 final-agent "
                                                      r"positions\); lower latent_steps, agents or max_gen_toks"):
        lm._probe("What is 12 + 30?", final=30, scored=2)
    assert tried[0] == 4 and tried[-1] == 1  # from max_batch_size down to one row


def test_bad_batch_size_names_the_choices(tiny_path):
    with pytest.raises(ValueError, match="batch_size must be a positive integer, auto or auto:N"):
        DiffMASLM(pretrained=str(tiny_path), device="cpu", batch_size="big")


def test_textmas_routes_hf_arguments_by_backend(tiny_path):
    with pytest.raises(ValueError, match=r"textmas model_args \['attn_implementation', 'revision'\] are lm-eval hf "
                                         r"\(HFLM\) arguments; they apply to backend=hf only"):
        TextMASLM.create_from_arg_string(f"pretrained={tiny_path},backend=openai,base_url=http://127.0.0.1:9/v1,"
                                         "revision=main,attn_implementation=sdpa")
    with pytest.raises(ValueError, match=r"(?s)unknown textmas model_args \['revison'\]; valid ones:\n.*revision"):
        TextMASLM.create_from_arg_string(f"pretrained={tiny_path},backend=openai,base_url=http://x/v1,revison=main")
    tm = TextMASLM.create_from_arg_string(f"pretrained={tiny_path},agents=1,dtype=float32,device=cpu,"
                                          "revision=main,attn_implementation=sdpa,prefix_token_id=5")
    assert tm.final_hflm.model.config._attn_implementation == "sdpa" and tm.final_hflm.prefix_token_id == 5
    hf = HFLM(pretrained=str(tiny_path), device="cpu", dtype="float32", attn_implementation="sdpa")
    assert_close(loglikelihoods(tm), loglikelihoods(hf))


def test_think_end_token_cuts_the_answer_as_hf(tiny_path):
    args = dict(pretrained=str(tiny_path), device="cpu", dtype="float32")
    request = ("Question: what is 12 + 30? Answer:", {"until": ["Question:"], "max_gen_toks": 12})

    def generate(lm):
        return lm.generate_until([Instance("generate_until", {}, request, 0)], disable_tqdm=True)[0]

    hf = HFLM(**args)
    full = generate(hf)
    ids = hf.tok_encode(full, add_special_tokens=False)
    end = ids[len(ids) // 2]  # a token id the answer contains
    for think_end_token in [end, hf.tok_decode([end])]:
        hf = HFLM(**args, think_end_token=think_end_token)
        dm = DiffMASLM(**args, agents=1, think_end_token=think_end_token)
        assert generate(dm) == generate(hf) not in ("", full)  # cut after the token, as hf cuts


def test_auto_rolling_sizes_once_and_scores_as_batch_size_1(tiny_path):
    docs = [("The quick brown fox jumps over the lazy dog. " * 5,), ("def add(a, b): return a + b",)]
    scores = {}
    for batch_size in [1, "auto"]:
        lm = DiffMASLM(pretrained=str(tiny_path), device="cpu", dtype="float32", agents=2, latent_steps=1,
                       batch_size=batch_size, max_length=300)
        requests = [Instance("loglikelihood_rolling", {}, d, i) for i, d in enumerate(docs)]
        scores[batch_size] = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    assert lm.batch_sizes == {0: 64}
    assert all(abs(a - b) < 1e-3 for a, b in zip(scores[1], scores["auto"], strict=True))
