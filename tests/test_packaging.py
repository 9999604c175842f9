"""What a pip-installed user gets: the distribution name, one version, `trec --version`, completion,
and the example configs as package data (`trec configs`, `trec init NAME DIR`)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

import trecsys
from trecsys.cli import app, example_configs

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def test_distribution_name_is_not_the_unrelated_trecsys_and_version_has_one_home():
    pyproject = (REPO / "pyproject.toml").read_text()
    # `trecsys` on PyPI is another project (TRecSys, a similarity server): `pip install -U trecsys`
    # would replace this one with it.
    assert re.search(r'^name = "transfer-recsys"$', pyproject, re.M)
    assert re.search(r'^dynamic = \["version"\]$', pyproject, re.M) and not re.search(r'^version = "', pyproject, re.M)
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"trec {trecsys.__version__}"


def test_shell_completion_is_offered():
    result = runner.invoke(app, ["--help"])
    assert "--install-completion" in result.stdout and "--show-completion" in result.stdout


def test_configs_lists_every_shipped_example_with_its_summary():
    shipped = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    assert sorted(example_configs()) == shipped and "demo" in shipped
    result = runner.invoke(app, ["configs"])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == shipped
    assert any(line.startswith("demo") and "synthetic" in line for line in lines)


def test_init_copies_an_example_and_refuses_to_overwrite(tmp_path):
    result = runner.invoke(app, ["init", "demo", str(tmp_path / "exp")])
    assert result.exit_code == 0, result.output
    copied = tmp_path / "exp" / "demo.yaml"
    assert copied.read_text() == (REPO / "configs" / "demo.yaml").read_text()

    copied.write_text("# edited\n")
    result = runner.invoke(app, ["init", "demo", str(tmp_path / "exp")])
    assert result.exit_code == 2 and "exists; pass --force" in result.stderr
    assert copied.read_text() == "# edited\n"
    assert runner.invoke(app, ["init", "demo", str(tmp_path / "exp"), "--force"]).exit_code == 0
    assert copied.read_text().startswith("# The embedded demo")

    result = runner.invoke(app, ["init", "dmeo", str(tmp_path)])
    assert result.exit_code == 2 and "no example config named 'dmeo'" in result.stderr and "demo" in result.stderr


# Sizes that keep every stage of the demo to a few seconds (the catalogue stays above evaluate.ks' 50).
TINY_DEMO = ["data.synthetic.n_users=120", "data.synthetic.n_items_per_domain=60", "pretrain.train.epochs=1",
             "distill.train.epochs=1", "finetune.train.epochs=1", "finetune.candidates=[full,zero_shot]",
             "evaluate.bootstrap=10"]


@pytest.mark.slow
def test_the_built_wheel_ships_the_configs_init_run_and_the_readme_api_work_outside_the_checkout(tmp_path):
    """Build the wheel, install it (without dependencies: they are this environment's) into a folder
    of its own, and run `trec init demo` + `trec run` from a folder that is not the checkout."""
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(REPO)]
    if importlib.util.find_spec("setuptools"):
        build.insert(5, "--no-build-isolation")  # no index needed when the backend is already here
    subprocess.run(build, check=True, capture_output=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("transfer_recsys-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"trecsys/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")} <= set(names)

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}

    def trec(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "trecsys", *args], cwd=work, env=env, capture_output=True,
                              text=True)

    where = subprocess.run([sys.executable, "-c", "import trecsys; print(trecsys.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site))  # the installed wheel, not the checkout
    assert trec("init", "demo", "my-exp").returncode == 0
    done = trec("run", "-c", "my-exp/demo.yaml", f"embedding.cache_dir={tmp_path / 'cache'}", *TINY_DEMO,
                "--show", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    for stage in ("prepared", "pretrain", "distill", "finetune", "eval", "recommend"):
        assert (work / "runs" / "demo" / stage).is_dir(), stage
    assert "ndcg@10" in done.stdout

    # The README's Python API examples, in order, in one interpreter, against the installed wheel.
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert len(blocks) >= 3
    script = work / "readme_examples.py"
    script.write_text("\n".join(blocks))
    ran = subprocess.run([sys.executable, str(script)], cwd=work, env=env, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "finetune/" in ran.stdout and "'torch':" in ran.stdout


def _declared(pyproject: str, section: str) -> set[str]:
    """Distribution names in one dependency list of pyproject.toml, normalised (PEP 503)."""
    body = re.search(rf"^{section} = \[(.*?)^\]", pyproject, re.M | re.S) or re.search(
        rf"^{section} = \[(.*?)\]$", pyproject, re.M)
    specs = re.findall(r'^\s*"([^"]+)"|"([^"]+)"', re.sub(r"#.*", "", body.group(1)), re.M)
    return {re.split(r"[<>=!~\[; ]", a or b)[0].lower().replace("_", "-") for a, b in specs}


def _imported(folder: Path) -> set[str]:
    """Distributions providing the third-party modules that the .py files under `folder` import."""
    import ast
    from importlib.metadata import packages_distributions

    modules = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    # The tests' own helpers (conftest, toy_training, ...) and the scripts that tests import.
    local = {p.stem for p in folder.rglob("*.py")} | {p.stem for p in (REPO / "scripts").glob("*.py")}
    modules -= set(sys.stdlib_module_names) | local | {"trecsys", "__future__"}
    providers = packages_distributions()
    return {providers[m][0].lower().replace("_", "-") for m in modules}


def test_dependencies_are_declared_exactly_as_imported():
    pyproject = (REPO / "pyproject.toml").read_text()
    runtime = _declared(pyproject, "dependencies")
    extras = re.findall(r"^(\w+) = \[", pyproject.split("[project.optional-dependencies]")[1].split("\n[")[0], re.M)
    optional = set().union(*(_declared(pyproject, name) for name in extras if name != "dev"))
    imported = _imported(REPO / "trecsys")
    # Every runtime dependency is imported, and only optional extras' packages (tracking, scale) beyond them.
    assert runtime <= imported <= runtime | optional
    assert {"mlflow-skinny", "tensorboard"} <= optional
    assert _imported(REPO / "tests") <= runtime | optional | _declared(pyproject, "dev")
