"""The other libraries' private parts this package relies on (``diffmas_eval/compat/``, and the protected hooks its
subclasses override) are still there after an upgrade: each failure names the library, the shim and what changed.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import re
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
SHIMS = ["lm_eval", "accelerate", "ray"]  # the modules of diffmas_eval/compat/


def _requirements() -> dict[str, Requirement]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    found = {}
    for r in map(Requirement, reqs):
        if r.name != "diffmas-eval" and (r.name not in found or r.specifier):  # the one with a version range
            found[r.name] = r
    return found


def _shim(name: str):
    if name == "ray":
        pytest.importorskip("ray", reason="ray (the leaderboard extra) is not installed: compat.ray is unused")
    return importlib.import_module(f"diffmas_eval.compat.{name}")


def test_the_compat_package_has_one_module_per_library_and_imports_nothing_of_ours():
    found = sorted(p.stem for p in (ROOT / "diffmas_eval" / "compat").glob("*.py") if p.stem != "__init__")
    assert found == sorted(SHIMS), "diffmas_eval/compat/ changed: list its modules in SHIMS (tests/test_compat.py)"
    for name in SHIMS:
        text = (ROOT / "diffmas_eval" / "compat" / f"{name}.py").read_text()
        assert not re.search(r"^\s*(from|import)\s+(diffmas_eval|\.)", text, re.M), (
            f"compat/{name}.py imports from diffmas_eval: the core imports compat, so compat must import none of it")


@pytest.mark.parametrize("name", SHIMS)
def test_the_installed_library_is_in_the_range_the_shim_was_checked_on(name):
    shim = _shim(name)
    req = _requirements()[shim.LIBRARY]
    assert req.specifier == SpecifierSet(shim.CHECKED), (
        f"{shim.LIBRARY}: pyproject.toml requires {req.specifier}, but diffmas_eval/compat/{name}.py was checked on "
        f"{shim.CHECKED}; re-check the shim and make the two equal")
    assert any(s.operator == "<" for s in req.specifier), f"{shim.LIBRARY}: no upper bound in pyproject.toml"
    installed = Version(importlib.metadata.version(shim.LIBRARY))
    assert installed in SpecifierSet(shim.CHECKED), (
        f"{shim.LIBRARY} {installed} is installed, outside the range {shim.CHECKED} that diffmas_eval/compat/{name}.py "
        "was checked on: re-check every shim there (this file's tests say what each needs), then widen CHECKED and "
        "pyproject.toml together")


def test_lm_eval_load_task_yaml_reads_includes_and_functions():
    from lm_eval.tasks import _yaml_loader

    from diffmas_eval.compat.lm_eval import load_task_yaml

    params = inspect.signature(_yaml_loader.load_yaml).parameters
    assert "resolve_func" in params, (
        "lm-eval: lm_eval.tasks._yaml_loader.load_yaml lost its resolve_func parameter "
        "(shim diffmas_eval/compat/lm_eval.py:load_task_yaml)")
    cfg = load_task_yaml(ROOT / "tasks" / "diffmas_gsm8k_paper.yaml")  # include: diffmas_gsm8k.yaml, !function
    assert cfg["task"] == "diffmas_gsm8k_paper" and "doc_to_text" in cfg and "include" not in cfg, (
        "lm-eval: load_yaml no longer merges includes (shim diffmas_eval/compat/lm_eval.py:load_task_yaml)")
    fn = cfg["filter_list"][1]["filter"][0]["filter_fn"]
    assert callable(fn), ("lm-eval: load_yaml(resolve_func=True) no longer imports !function tags "
                          "(shim diffmas_eval/compat/lm_eval.py:load_task_yaml)")


def test_accelerate_execution_device_reads_the_hook_accelerate_attaches():
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

    from diffmas_eval.compat.accelerate import execution_device

    layer = torch.nn.Linear(2, 2)
    assert execution_device(layer) is None
    add_hook_to_module(layer, AlignDevicesHook(execution_device="cpu"))
    assert execution_device(layer) == "cpu", (
        "accelerate: a module's AlignDevicesHook is no longer its _hf_hook with an execution_device "
        "(shim diffmas_eval/compat/accelerate.py:execution_device, used by latent.distributed.layer_devices)")
    remove_hook_from_module(layer)
    assert execution_device(layer) is None


def test_ray_single_machine_mode_switches_the_constant_ray_reads():
    pytest.importorskip("ray", reason="ray (the leaderboard extra) is not installed: compat.ray is unused")
    import ray
    from ray._private import ray_constants, services

    from diffmas_eval.compat.ray import init_on_loopback, single_machine_mode

    assert isinstance(getattr(ray_constants, "ENABLE_RAY_CLUSTER", None), bool), (
        "ray: ray._private.ray_constants.ENABLE_RAY_CLUSTER is gone "
        "(shim diffmas_eval/compat/ray.py:single_machine_mode)")
    assert "ray_constants.ENABLE_RAY_CLUSTER" in inspect.getsource(services.get_node_ip_address), (
        "ray: get_node_ip_address no longer reads ENABLE_RAY_CLUSTER (shim diffmas_eval/compat/ray.py)")
    assert 'kwargs.pop("_node_ip_address"' in inspect.getsource(ray.init), (
        "ray: ray.init lost its _node_ip_address parameter (shim diffmas_eval/compat/ray.py:init_on_loopback)")
    before = ray_constants.ENABLE_RAY_CLUSTER
    with single_machine_mode():
        assert ray_constants.ENABLE_RAY_CLUSTER is False
        if not ray.is_initialized():  # with no node yet, Ray picks the address by the constant
            assert services.get_node_ip_address() == "127.0.0.1", (
                "ray: single-machine mode no longer keeps 127.0.0.1 (shim diffmas_eval/compat/ray.py)")
    assert ray_constants.ENABLE_RAY_CLUSTER is before
    assert callable(init_on_loopback)


# The protected methods of other libraries' classes that this package's subclasses override (no public hook does
# what they do); each (library, class, method) must still exist with these parameters.
HOOKS = [
    ("lm-eval", "lm_eval.models.huggingface", "HFLM", "_create_model", ["pretrained", "dtype", "quantization_config"]),
    ("lm-eval", "lm_eval.models.huggingface", "HFLM", "_model_generate", ["context", "max_length", "stop"]),
    ("lm-eval", "lm_eval.models.huggingface", "HFLM", "_loglikelihood_tokens", ["requests", "disable_tqdm"]),
    ("lm-eval", "lm_eval.api.model", "TemplateLM", "_loglikelihood_tokens", ["requests"]),
    ("trl", "trl.trainer.sft_trainer", "SFTTrainer", "_set_signature_columns_if_needed", []),
    ("transformers", "transformers.trainer", "Trainer", "_save", ["output_dir", "state_dict"]),
    ("transformers", "transformers.trainer", "Trainer", "_push_from_checkpoint", ["checkpoint_folder"]),
]


@pytest.mark.parametrize(("library", "module", "cls", "method", "params"), HOOKS,
                         ids=[f"{h[2]}.{h[3]}" for h in HOOKS])
def test_the_protected_hooks_our_subclasses_override_are_still_there(library, module, cls, method, params):
    owner = getattr(importlib.import_module(module), cls)
    fn = getattr(owner, method, None)
    assert callable(fn), f"{library}: {cls}.{method} is gone; our subclass overrides it (harness/, training/)"
    missing = [p for p in params if p not in inspect.signature(fn).parameters]
    assert not missing, f"{library}: {cls}.{method} lost parameter(s) {missing} that our override passes on"
    spec = _requirements()[library].specifier
    assert any(s.operator == "<" for s in spec), f"{library}: overridden hooks need an upper bound in pyproject.toml"


def test_ray_token_auth_is_turned_on_as_ray_start_decides_it(tmp_path):
    """``compat.ray.use_cluster_token_auth``: where a token exists and ``RAY_AUTH_MODE`` is unset, Ray's own function
    sets token mode for this driver (what lets ``RAY_ADDRESS=...`` join a ``ray start --head`` with token auth). In a
    child process: Ray keeps what it decides for the process it runs in."""
    pytest.importorskip("ray", reason="ray (the leaderboard extra) is not installed: compat.ray is unused")
    import os
    import subprocess
    import sys

    token = tmp_path / "auth_token"
    token.write_text("a" * 32)
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"} | {"RAY_AUTH_TOKEN_PATH": str(token)}
    code = ("import os; from diffmas_eval.compat.ray import use_cluster_token_auth; use_cluster_token_auth(); "
            "print(os.environ.get('RAY_AUTH_MODE'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "token", (
        "ray: a present token no longer turns token auth on (shim diffmas_eval/compat/ray.py:use_cluster_token_auth)"
        + out.stderr[-2000:])
