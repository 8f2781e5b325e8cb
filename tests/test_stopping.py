"""Where an answer ends (``stopping.py``): one stop convention and one EOS set for the chain, the text MAS and the
servers."""

from __future__ import annotations

from diffmas_eval.latent import AgentChain, LatentConfig
from diffmas_eval.stopping import cut_at_stop, eos_ids
from diffmas_eval.testing.tiny import make_tiny_model
from diffmas_eval.textmas.backends import HFBackend


def test_cut_at_stop_is_lm_evals_convention():
    assert cut_at_stop("a\n\nQuestion: b", ["Question:", "\n\n"]) == "a"
    assert cut_at_stop("abc", ["", None, "z"]) == "abc"  # empty stops are ignored, not a cut at 0
    assert cut_at_stop("abc", None) == "abc"


def test_eos_ids_join_the_tokenizer_and_the_generation_config():
    model, tok = make_tiny_model("llama")
    model.generation_config.eos_token_id = [tok.eos_token_id, 7, 9]
    assert eos_ids(model, tok) == {tok.eos_token_id, 7, 9}
    model.generation_config.eos_token_id = None
    assert eos_ids(model, tok) == {tok.eos_token_id}


def test_the_chain_and_the_text_backend_stop_at_the_same_ids():
    """Both end a row at any id of ``eos_ids``: with every id an EOS, both stop at their first token (the chain
    leaves the EOS out of the answer's ids; the backend counts it as the one token it generated)."""
    model, tok = make_tiny_model("llama")
    model.generation_config.eos_token_id = list(range(model.config.vocab_size))
    chain = AgentChain(model, tok, LatentConfig.from_dict({"agents": 1, "latent_steps": 0}))
    trace = chain.stage1(["q"])
    answer = chain.generate(trace, [chain.encode("hi")], max_new_tokens=5)[0]
    assert (answer.text, answer.token_ids, answer.stats.stopped) == ("", [], "eos")
    done = HFBackend(model, tok, chain.encode).generate(["hi"], max_tokens=5)[0]
    assert (done.text, done.tokens) == ("", 1)
