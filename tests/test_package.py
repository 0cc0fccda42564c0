"""Packaging, public API, model loading and the CLI's contract."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

import kvcomm
from kvcomm.errors import KVCommError, ModelLoadError
from kvcomm.models import load_model
from kvcomm.tools.cli import main


def test_exported_members_sorted_and_resolvable():
    assert kvcomm.__all__ == sorted(kvcomm.__all__)
    for name in kvcomm.__all__:
        assert getattr(kvcomm, name) is not None, name


def test_subpackages_import_without_transformers():
    code = "import sys, kvcomm.store, kvcomm.kernels; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_python_started_in_the_clone_root_gets_the_installed_kernels_package(repo_root):
    # the root on sys.path puts kernels/ (kvcomm.kernels) before the Hugging Face `kernels` that
    # transformers imports: loading a model from a REPL in a clone failed with an ImportError
    try:
        installed = Path(str(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the Hugging Face kernels distribution is not installed")
    code = ("import kernels, kvcomm.kernels; from transformers.integrations import hub_kernels; "
            "print(kernels.__file__); print(kvcomm.kernels.rope_shift.__module__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    bare, ours = out.stdout.split()
    assert Path(bare).resolve() == installed.resolve()
    assert ours == "kvcomm.kernels.rope_shift"


@pytest.mark.parametrize("name", ["store", "kernels", "agents"])
def test_a_bare_import_in_the_clone_root_gets_the_installed_package_of_that_name(name, repo_root, tmp_path):
    # e.g. openai-agents installs a top-level `agents`: a REPL in a clone must not run our folder for it
    site = tmp_path / "site"
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text("WHOSE = 'installed'\n")
    code = (f"import {name}, kvcomm.{name} as ours; print({name}.WHOSE); "
            f"print(ours.__name__, getattr(ours, 'WHOSE', 'ours'))")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=repo_root, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["installed", f"kvcomm.{name}", "ours"]

    if name != "kernels":  # (transformers installs a `kernels`) with no namesake, the folder, as before
        alone = subprocess.run([sys.executable, "-c", f"import {name}; print({name}.__file__)"], cwd=repo_root,
                               capture_output=True, text=True)
        assert alone.returncode == 0, alone.stderr
        assert Path(alone.stdout.strip()) == repo_root / name / "__init__.py"


def test_wheel_contains_every_subpackage(tmp_path, repo_root):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(repo_root)],
        check=True, capture_output=True,
    )
    wheel = next(tmp_path.glob("kvcomm-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for pkg in ("kvcomm", "kvcomm/store", "kvcomm/kernels", "kvcomm/agents", "kvcomm/fastpath", "kvcomm/models",
                "kvcomm/tools"):
        assert f"{pkg}/__init__.py" in names, f"wheel lacks {pkg}"
    assert not any(n.startswith(("store/", "kernels/", "agents/")) for n in names)
    assert "kvcomm/py.typed" in names


@pytest.mark.parametrize("bad", ["no-such-model", "/nonexistent/dir/model.gguf"])
def test_load_model_bad_name_names_path_and_forms(bad):
    with pytest.raises(ModelLoadError) as exc:
        load_model(bad)
    assert isinstance(exc.value, KVCommError)
    assert bad in str(exc.value) and "smollm2-135m" in str(exc.value) and ".gguf" in str(exc.value)


def test_load_model_rejects_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_real_model_answers_and_fingerprint_is_stable(smollm2, capsys):
    tok, model = smollm2.tokenizer, smollm2.model
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
    again = load_model("smollm2-135m", dtype="float32", progress=False)
    assert again.fingerprint == smollm2.fingerprint
    assert "GGUF" not in capsys.readouterr().err  # the conversion's progress bar is silenced
    assert load_model("smollm2-135m", dtype="bfloat16").fingerprint != smollm2.fingerprint


def test_cli_version_and_help():
    runner = CliRunner()
    assert kvcomm.__version__ in runner.invoke(main, ["--version"]).output
    res = runner.invoke(main, ["--help"])
    assert res.exit_code == 0 and "Usage" in res.output


def test_cli_user_error_is_one_line_exit_1():
    res = CliRunner().invoke(main, ["ask", "--model", "no-such-model"])
    assert res.exit_code == 1
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ModelLoadError:") and "Traceback" not in res.output


def test_readme_decorator_example_is_the_tested_file(repo_root):
    """The README's LangGraph example is examples/readme_decorator.py (run by the agents tests)."""
    readme = (repo_root / "README.md").read_text()
    example = (repo_root / "examples" / "readme_decorator.py").read_text()
    body = example.split('"""', 2)[2].strip()  # without the module docstring
    assert body in readme


def test_ci_runs_the_readme_test_command(repo_root):
    assert "make test" in (repo_root / ".ci" / "run").read_text()
    readme = (repo_root / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme


def test_make_demo_runs_the_rag_pipeline_then_the_report(repo_root):
    out = subprocess.run(["make", "-n", "demo"], cwd=repo_root, capture_output=True, text=True, check=True,
                         env={**os.environ, "MAKEFLAGS": ""}).stdout
    lines = [line for line in out.splitlines() if ".venv/bin/" in line]
    assert "examples/rag_pipeline.py" in lines[0] and "--run-dir runs/demo" in lines[0]
    assert "kvcomm report --run-dir runs/demo" in lines[1]
