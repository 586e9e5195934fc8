"""The quanta command, run as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent.parent


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "quanta._cli", *args], capture_output=True, text=True, cwd=cwd)


def test_quantize_example_recipe_prints_table_and_writes_model(tmp_path):
    out = _run("quantize", str(ROOT / "examples/recipes/digits_int8.yaml"), "--output", str(tmp_path / "d"))
    assert out.returncode == 0, out.stderr
    assert "int8 affine per_channel" in out.stdout and "test accuracy" in out.stdout
    assert "[3/3]" in out.stderr  # progress display, from the layer_quantized hook
    import quanta

    model = quanta.load(tmp_path / "d")  # a quanta.save directory that records how to rebuild the model
    assert len(quanta.records(model)) == 3


def test_plan_describe_and_errors(tmp_path):
    out = _run("plan", str(ROOT / "examples/recipes/digits_int8.yaml"))
    assert out.returncode == 0 and "3 of 3 weights would be quantized" in out.stdout
    out = _run("describe", "observer", "percentile")
    assert out.returncode == 0 and "percentile: float = 99.99" in out.stdout
    assert "observer: {name: percentile, percentile: ...}" in out.stdout
    assert "ranges_carry_non_finite = False" in out.stdout
    out = _run("describe", "exporter", "coreml")
    assert "suffix = .mlpackage" in out.stdout and "grids = affine" in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: digits\nglobal_config: {granularity: per_blok}\n")
    out = _run("plan", str(bad))
    assert out.returncode == 2 and "did you mean 'per_block'" in out.stderr and "Traceback" not in out.stderr
    out = _run("describe", "scheme", "afine")
    assert out.returncode == 2 and "did you mean 'affine'" in out.stderr


@pytest.mark.slow
def test_minilm_example_recipe(tmp_path):
    out = _run("quantize", str(ROOT / "examples/recipes/minilm_int4.yaml"), "--output", str(tmp_path / "m"))
    assert out.returncode == 0, out.stderr
    assert "37 layers quantized" in out.stdout
    cosine = float(out.stdout.split("mean ")[1].split(",")[0])
    assert cosine > 0.9


# -- behaving like a Unix tool ---------------------------------------------------------------

def _main(*args, cwd=None):
    """Run ``quanta._cli.main`` in-process; returns (status, stdout, stderr)."""
    import contextlib
    import io
    import os

    from quanta._cli import main

    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    if cwd:
        os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = main([str(a) for a in args])
            except SystemExit as exc:
                status = exc.code
    finally:
        os.chdir(old)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture
def model_recipe(tmp_path):
    (tmp_path / "netdef.py").write_text(NETDEF)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tmp_path / 'netdef.py'}:build\nglobal_config: {{dtype: int8}}\n")
    return recipe


#: A model named as ``file.py:function`` (quanta never unpickles models).
NETDEF = """import torch


def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
"""


def test_help_imports_no_torch_and_prints_no_noise():
    code = ("import sys\nfrom quanta._cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'coremltools' not in sys.modules, 'imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert "exit status: 0 done, 1 internal or plugin error, 2 usage or input error, 3 verification failed,\n130 " \
           "interrupted, 143 terminated" in out.stdout


@pytest.mark.slow  # a fresh process importing torch (and coremltools for the export)
def test_plugins_prints_no_third_party_noise():
    out = _run("plugins")
    assert out.returncode == 0 and "coreml" in out.stdout
    assert out.stderr == "", out.stderr  # no "Failed to load _MLModelProxy", no version warnings


def test_every_argument_has_help_and_choices_are_listed():
    from quanta._cli import build_parser
    from quanta._cli.parser import KINDS

    assert set(KINDS) == set(quanta_registry_kinds())
    parser = build_parser(["export"])  # export's --target comes from the coreml exporter plugin
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help, f"quanta {name} {action.option_strings or action.dest} has no help"
    export = " ".join(subparsers.choices["export"].format_help().split())
    assert "iOS16, iOS17, iOS18, macOS13, macOS14, macOS15" in export
    assert "scheme, observer, algorithm, backend, exporter" in " ".join(subparsers.choices["describe"].format_help().split())


def quanta_registry_kinds():
    from quanta.registry import KINDS

    return KINDS


def test_results_on_stdout_messages_on_stderr_and_quiet(model_recipe, tmp_path):
    status, out, err = _main("plan", model_recipe)
    assert status == 0 and "2 of 2 weights would be quantized" in out and "loading model" in err
    status, out, err = _main("quantize", model_recipe, "-o", tmp_path / "q", "-q")
    assert status == 0 and err == "" and "2 layers quantized" in out
    status, out, err = _main("quantize", model_recipe, "-o", tmp_path / "q")  # quanta's own output: replaced
    assert status == 0 and "[2/2] rtn layers" in err and "wrote" in err and "wrote" not in out


def test_own_output_is_replaced_but_a_users_file_needs_overwrite(model_recipe, tmp_path):
    import quanta

    user = tmp_path / "mine.pt"  # a pickle output (--format pickle) onto a user's file
    user.write_bytes(b"mine")
    status, _, err = _main("quantize", model_recipe, "-o", user, "--format", "pickle")
    assert status == 2 and user.read_bytes() == b"mine" and "--overwrite" in err
    status, _, err = _main("quantize", model_recipe, "-o", user, "--format", "pickle", "--overwrite")
    assert status == 0 and len(quanta_records(torch.load(user, weights_only=False))) == 2  # noqa: S614 (test)
    assert _main("quantize", model_recipe, "-o", user, "--format", "pickle")[0] == 0  # now quanta's own file
    folder = tmp_path / "mine"  # a saved directory (the default format) onto a user's folder
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    status, _, err = _main("quantize", model_recipe, "-o", folder)
    assert status == 2 and (folder / "notes.txt").read_text() == "mine" and "--overwrite" in err
    assert _main("quantize", model_recipe, "-o", folder, "--overwrite")[0] == 0
    netdef = f"{folder.parent / 'netdef.py'}:build"
    assert len(quanta.records(quanta.load(folder, factory=netdef))) == 2 and not (folder / "notes.txt").exists()


def quanta_records(model):
    import quanta

    return quanta.records(model)


def _failing_algorithm(exc):
    import quanta
    from quanta.plugin import Algorithm

    class Failing(Algorithm):
        name = "failing-algo"
        description = "raises on purpose (tests)"

        def run(self, model, plan, data, context):
            raise exc

    class Plugin:
        @quanta.hookimpl
        def register_algorithms(self, register):
            register(Failing())

    return Plugin()


@pytest.mark.parametrize("exc,status,text", [
    (RuntimeError("boom in plugin code"), 1, "boom in plugin code"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_internal_errors_exit_1_and_interrupts_130(register_plugin, model_recipe, tmp_path, exc, status, text):
    register_plugin(_failing_algorithm(exc))
    recipe = tmp_path / "f.yaml"
    recipe.write_text(model_recipe.read_text() + "algorithm: failing-algo\n")
    got, out, err = _main("quantize", recipe, "-o", tmp_path / "q")
    assert got == status and text in err and "Traceback" not in err
    assert len([ln for ln in err.splitlines() if "error:" in ln]) == 1
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".q.*"))
    got, _, err = _main("quantize", recipe, "-o", tmp_path / "q", "--debug")
    assert got == status and "Traceback" in err


def test_html_report_has_one_bar_per_layer(model_recipe, tmp_path):
    from html.parser import HTMLParser

    status, out, err = _main("quantize", model_recipe, "-o", tmp_path / "q", "--report", tmp_path / "r.html")
    assert status == 0, err
    page = (tmp_path / "r.html").read_text()

    class Bars(HTMLParser):
        def __init__(self):
            super().__init__()
            self.bars, self.tags, self.titles = {}, set(), []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            self.tags.add(tag)
            if tag == "rect":
                self.bars.setdefault(attrs.get("class"), 0)
                self.bars[attrs.get("class")] += 1
            assert "src" not in attrs and not str(attrs.get("href", "")).startswith("http"), "not self-contained"

    parser = Bars()
    parser.feed(page)
    assert parser.bars == {"bar error": 2, "bar size": 2}
    assert "script" not in parser.tags and "svg" in parser.tags
    assert "global_config" in page and "2 layers quantized with &#x27;rtn&#x27;" in page or "2 layers quantized" in page
    # rerunning replaces quanta's own report; a user's page needs --overwrite
    assert _main("quantize", model_recipe, "-o", tmp_path / "q", "--report", tmp_path / "r.html")[0] == 0
    (tmp_path / "user.html").write_text("<p>mine</p>")
    assert _main("quantize", model_recipe, "-o", tmp_path / "q", "--report", tmp_path / "user.html")[0] == 2
    assert (tmp_path / "user.html").read_text() == "<p>mine</p>"


@pytest.mark.slow  # a fresh process importing torch (and coremltools for the export)
def test_quantizing_a_torch_model_does_not_import_coremltools():
    code = ("import sys, torch, quanta\n"
            "m = torch.nn.Sequential(torch.nn.Linear(8, 8))\n"
            "quanta.plan(m, {}); q = quanta.quantize(m, {'global_config': {'dtype': 'int4', 'granularity': 'per_block',"
            " 'block_size': 4}})\n"
            "assert quanta.records(q)\n"
            "print('coremltools' in sys.modules, sorted(k for k in sys.modules if k.startswith('quanta.mil')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    # Nor quanta.mil: the Core ML backend is asked whether it accepts the model, and its package
    # check (which reads MIL blobs) is imported only when a path is opened.
    assert out.stdout.strip() == "False []"
    assert "Failed to load" not in out.stderr


@pytest.mark.slow  # a fresh process importing torch (and coremltools for the export)
def test_export_cli_writes_atomically_and_prints_the_path(model_recipe, tmp_path):
    assert _main("quantize", model_recipe, "-o", tmp_path / "q", "-q")[0] == 0
    status, out, err = _main("export", tmp_path / "q", "-o", tmp_path / "q.mlpackage", "--input-shape", "1,16",
                             "--factory", f"{tmp_path / 'netdef.py'}:build")
    assert status == 0 and out.strip().endswith("q.mlpackage"), err
    assert (tmp_path / "q.mlpackage" / ".quanta").is_file()
    assert "Failed to load" not in err and "Converting" not in err  # third-party noise hidden
    assert not list(tmp_path.glob(".q.mlpackage.*"))


def _run_with_tty_stderr(args, env_extra=None, cwd=None):
    """Run ``quanta`` with stderr on a pseudo-terminal (as in an interactive shell); returns (status, stderr)."""
    import os
    import pty

    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    env = {**os.environ, **(env_extra or {})}
    if "NO_COLOR" not in (env_extra or {}):
        env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, "-m", "quanta._cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=slave, env=env, cwd=cwd)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=120)
    os.close(master)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_terminal_gets_a_progress_bar_and_colour_unless_no_color(model_recipe, tmp_path):
    status, err = _run_with_tty_stderr(["plan", tmp_path / "missing.yaml"])
    assert status == 2 and "\x1b[31;1merror\x1b[0m" in err
    status, err = _run_with_tty_stderr(["plan", tmp_path / "missing.yaml"], {"NO_COLOR": "1"})
    assert status == 2 and "quanta: error: recipe file" in err and "\x1b[" not in err
    status, err = _run_with_tty_stderr(["quantize", model_recipe, "-o", tmp_path / "q"])
    assert status == 0, err
    assert "\r" in err and "rtn layers" in err and "2/2" in err  # a tqdm bar redrawn in place, not lines
    assert "[1/2]" not in err  # the plain-line form is for pipes and files
