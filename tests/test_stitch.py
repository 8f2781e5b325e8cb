"""Independent segments: ``trace=stitch`` (StitchMAS) and ``topology=hierarchical``, on tiny random models.

Layout (``latent/chain.py``): each upstream segment is built at positions from 0 with every other segment
masked out of its attention, lies beside the others in the one trace, and the final agent reads them all.
"""

import pytest
import torch

from diffmas_eval.latent import AgentChain, LatentConfig
from tests.conftest import QUESTIONS
from tests.test_chain import assert_batched_equals_one_by_one

# float32, the same segment computed over a longer key set (the others present but masked) vs alone: the
# reductions run over different widths, so equal only to rounding; measured here 1.9e-7 (llama), 1.2e-6 (qwen3)
SEGMENT_ATOL = 1e-5


def chain_for(tiny, **kw):
    model, tok = tiny
    return AgentChain(model, tok, LatentConfig(**kw))


def _columns(trace, row: int) -> list[slice]:
    """Each segment's columns in ``row``: the row's real columns are contiguous at its end, in agent order."""
    start, out = trace.length - int(trace.mask[row].sum()), []
    for s in trace.segments:
        out.append(slice(start, start + s.real[row]))
        start += s.real[row]
    return out


def test_a_stitched_segment_is_what_its_agent_writes_alone(tiny):
    roles = ["planner", "critic", "refiner", "solver"]
    with torch.no_grad():
        stitched = chain_for(tiny, roles=roles, latent_steps=3, trace="stitch").stage1(QUESTIONS)
        concat = chain_for(tiny, roles=roles, latent_steps=3).stage1(QUESTIONS)
        for k, role in enumerate(roles[:-1]):
            alone = chain_for(tiny, roles=[role, "solver"], latent_steps=3).stage1(QUESTIONS)
            for i in range(len(QUESTIONS)):
                ours, ref = _columns(stitched, i)[k], _columns(alone, i)[0]
                gap = max(float((a[i][:, ours] - b[i][:, ref]).abs().max())
                          for a, b in zip(stitched.keys + stitched.values, alone.keys + alone.values))
                assert gap < SEGMENT_ATOL, (role, i, gap)
                if k > 0:  # in the sequential chain the same agent read the earlier segments: different KV
                    seq = _columns(concat, i)[k]
                    assert float((concat.keys[-1][i][:, seq] - alone.keys[-1][i][:, ref]).abs().max()) > 1e-3
    # the final agent goes on after the longest segment
    assert stitched.next_pos.tolist() == [max(s.real[i] for s in stitched.segments) for i in range(len(QUESTIONS))]
    assert stitched.length == concat.length  # the same columns, only who sees whom differs


def test_one_upstream_agent_stitched_is_the_sequential_chain(tiny):
    finals = [chain_for(tiny).final_prompt(q) for q in QUESTIONS]
    conts = [[5, 6, 7]] * len(QUESTIONS)
    with torch.no_grad():
        scores = [chain_for(tiny, roles=["planner", "solver"], latent_steps=2, trace=t) for t in ("concat", "stitch")]
        a, b = (c.loglikelihood(c.stage1(QUESTIONS), finals, conts) for c in scores)
    assert a == b  # nothing to hide from a lone agent: the same numbers, bit for bit


@pytest.mark.parametrize("options", [{"trace": "stitch"}, {"topology": "hierarchical"}])
def test_batching_changes_no_row(tiny, options):
    assert_batched_equals_one_by_one(AgentChain(*tiny, LatentConfig.from_dict({"agents": 4, "latent_steps": 3,
                                                                                **options})), max_new_tokens=10)


def test_hierarchical_roles_and_every_segment_one_hop_from_the_loss(tiny_llama):
    config = LatentConfig.from_dict({"agents": 4, "topology": "hierarchical", "latent_steps": 2})
    assert config.roles == ["math", "science", "code", "summarizer"] and config.independent
    chain = AgentChain(*tiny_llama, config)
    prompt = chain.final_prompt(QUESTIONS[0])
    answer = chain.encode(" The answer is 42.")
    probe = chain.gradient_probe(QUESTIONS[:1], [prompt + answer], [[-100] * len(prompt) + answer])
    assert [a for a, _ in probe] == ["math", "science", "code"] and all(g > 0 for _, g in probe)
    # stitched, a segment's gradient comes from the final agent alone; sequentially also through later agents
    seq = dict(chain_for(tiny_llama, roles=["planner", "critic", "solver"], latent_steps=2).gradient_probe(
        QUESTIONS[:1], [prompt + answer], [[-100] * len(prompt) + answer]))
    st = dict(chain_for(tiny_llama, roles=["planner", "critic", "solver"], latent_steps=2, trace="stitch")
              .gradient_probe(QUESTIONS[:1], [prompt + answer], [[-100] * len(prompt) + answer]))
    assert st["planner"] > 0 and st["planner"] != pytest.approx(seq["planner"], rel=1e-3)


def test_bad_layouts_name_the_valid_ones(tiny_path):
    from diffmas_eval.harness.diffmas_lm import DiffMASLM

    with pytest.raises(ValueError, match="topology='tree' is not valid; choose one of sequential, hierarchical"):
        LatentConfig.from_dict({"agents": 3, "topology": "tree"})
    with pytest.raises(ValueError, match="choose one of concat, overwrite, stitch"):
        LatentConfig(trace="append")
    with pytest.raises(ValueError, match="topology=hierarchical needs every domain agent's segment"):
        LatentConfig(roles=["math", "summarizer"], topology="hierarchical", trace="overwrite")
    for options in ({"trace": "stitch"}, {"topology": "hierarchical"}):  # refused before the model loads
        with pytest.raises(ValueError, match="stage2=vllm needs trace=concat and topology=sequential"):
            DiffMASLM(pretrained=str(tiny_path), stage2="vllm", base_url="http://127.0.0.1:9/v1", **options)
    lm = DiffMASLM(pretrained=str(tiny_path), agents=3, topology="hierarchical", device="cpu", dtype="float32")
    assert lm.chain.config.roles == ["math", "science", "summarizer"] and lm.chain.config.independent
