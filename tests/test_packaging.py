"""quanta as users get it: ``python -m build`` makes an sdist and a wheel, the wheel is installed
(not editable) into a fresh virtual environment, and that installation is smoke-tested there.

The fresh venv reuses the running environment's packages (torch, coremltools, ...) through a
``.pth`` file, but ``quanta`` itself comes from the wheel: each check first asserts that
``quanta.__file__`` lies inside the venv. The build runs without isolation (no download).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # one build, one venv, four fresh processes (about 30-60 s)

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_MODULES = ("quanta", "quanta.errors", "quanta.record", "quanta.contracts", "quanta.contracts.hooks",
                  "quanta.testing", "quanta.registry", "quanta.compat", "quanta.fx", "quanta.mil",
                  "quanta.plugins", "quanta.examples")


def _mapped_folders() -> dict[str, str]:
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]["package-dir"]


def _run(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300, check=False)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """``python -m build`` of the source tree: {"wheel": path, "sdist": path}."""
    outdir = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--no-isolation", "--skip-dependency-check", "--outdir", str(outdir),
          str(ROOT)])
    wheels, sdists = list(outdir.glob("*.whl")), list(outdir.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(outdir.iterdir())
    return {"wheel": wheels[0], "sdist": sdists[0]}


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory) -> dict:
    """A fresh venv with the wheel installed (``pip install --no-deps``, not editable)."""
    where = tmp_path_factory.mktemp("venv") / "v"
    _run([sys.executable, "-m", "venv", "--without-pip", str(where)])
    python = where / "bin" / "python"
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # The running environment's packages (torch, coremltools, pytest ...), after the venv's own. A directory
    # named in a .pth file is added to sys.path without running *its* .pth files, so an editable quanta
    # installed there (a path finder hook) stays inactive.
    outer = [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]
    (purelib / "_outer_env.pth").write_text("\n".join(outer) + "\n")
    _run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", str(python), "install", "-q",
          "--no-deps", "--no-index", "--ignore-installed", str(dist["wheel"])])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{where / 'bin'}{os.pathsep}{env.get('PATH', '')}", QUANTA_DISABLE_PLUGIN_AUTOLOAD="1",
               PYTHONDONTWRITEBYTECODE="1")
    return {"dir": where, "python": python, "bin": where / "bin", "env": env, "purelib": purelib}


def _wheel_modules(wheel: Path) -> list[str]:
    names = zipfile.ZipFile(wheel).namelist()
    mods = []
    for n in names:
        if n.startswith("quanta/") and n.endswith(".py"):
            mod = n[:-3].replace("/", ".")
            mod = mod[: -len(".__init__")] if mod.endswith(".__init__") else mod
            if not mod.endswith("__main__"):
                mods.append(mod)
    return sorted(mods)


def test_every_package_folder_is_in_the_wheel_and_the_sdist(dist):
    """Every folder with an __init__.py under a mapped folder is a package of the wheel."""
    wheel = set(zipfile.ZipFile(dist["wheel"]).namelist())
    with tarfile.open(dist["sdist"]) as tar:
        sdist = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    missing = []
    for package, folder in _mapped_folders().items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT / folder)
            if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
                continue
            target = "/".join([package.replace(".", "/"), *rel.parts, "__init__.py"])
            if target not in wheel:
                missing.append(f"{init.relative_to(ROOT)} (as {target}) not in the wheel")
            if str(init.relative_to(ROOT)) not in sdist:
                missing.append(f"{init.relative_to(ROOT)} not in the sdist")
    assert not missing, "\n".join(missing)
    for data in ("quanta/py.typed", "quanta/examples/recipes/tiny_llama_rtn_int4.yaml",
                 "quanta/examples/tiny_llama/model.safetensors", "quanta/examples/tiny_llama/tokenizer.json"):
        assert data in wheel, data
    assert not [n for n in wheel if n.split("/")[0] in ("core", "plugins", "registry", "lib", "tests")], \
        "a source folder was installed top-level"


def test_wheel_imports_every_module_and_ships_its_data(dist, venv):
    modules = _wheel_modules(dist["wheel"])
    assert set(PUBLIC_MODULES) <= set(modules)
    script = textwrap.dedent(f"""
        import importlib, importlib.resources as res, sys
        import quanta
        assert quanta.__file__.startswith({str(venv['dir'])!r}), quanta.__file__
        for name in {modules!r}:
            importlib.import_module(name)
        assert (res.files("quanta") / "py.typed").is_file()
        recipes = sorted(p.name for p in (res.files("quanta.examples") / "recipes").iterdir())
        assert "tiny_llama_rtn_int4.yaml" in recipes, recipes
        for f in ("config.json", "model.safetensors", "tokenizer.json", "record.json"):
            assert (res.files("quanta.examples.tiny_llama") / f).is_file(), f
        from quanta import registry
        assert "rtn" in registry.names("algorithm") and "coreml" in registry.names("exporter")
        print("ok", len({modules!r}))
    """)
    out = _run([str(venv["python"]), "-c", script], env=venv["env"])
    assert out.stdout.startswith("ok"), out.stdout


def test_installed_command_lists_plugins_and_quantizes_an_example(venv, tmp_path):
    quanta_cmd = str(venv["bin"] / "quanta")
    out = _run([str(venv["python"]), "-c", "import quanta; print(quanta.__file__)"], env=venv["env"])
    assert out.stdout.strip().startswith(str(venv["dir"])), out.stdout
    out = _run([quanta_cmd, "plugins"], env=venv["env"])
    assert "coreml" in out.stdout and "gptq" in out.stdout
    recipe = venv["purelib"] / "quanta" / "examples" / "recipes" / "tiny_llama_rtn_int4.yaml"
    out = _run([quanta_cmd, "-q", "quantize", str(recipe), "-o", str(tmp_path / "q")], env=venv["env"], cwd=tmp_path)
    assert (tmp_path / "q").is_dir() and any((tmp_path / "q").iterdir())


def test_installed_pytest_plugin_gives_its_fixtures(venv, tmp_path):
    (tmp_path / "test_kit.py").write_text(textwrap.dedent(f"""
        import quanta

        def test_fixtures(quanta_registry, reference_mlp, calibration_data):
            assert quanta.__file__.startswith({str(venv['dir'])!r}), quanta.__file__
            assert "symmetric" in quanta_registry.names("scheme")
            assert len(calibration_data("mlp", n=2)) == 2
    """))
    out = _run([str(venv["python"]), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                "-c", os.devnull, str(tmp_path / "test_kit.py")], env=venv["env"], cwd=tmp_path)
    assert "1 passed" in out.stdout, out.stdout
