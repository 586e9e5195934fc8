"""``check_exporter``: the contract suite of ``quanta.contracts.Exporter``."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Callable

import torch

from quanta.contracts import Exporter

from .failure import check, fail

__all__ = ["check_exporter"]


def _quantized_mlp() -> Any:
    import quanta

    from .models import reference_model

    model = reference_model("mlp")
    return model, quanta.quantize(model, {"global_config": {"dtype": "int8"}})


def _listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(root.rglob("*"))}


def check_exporter(exporter: Exporter, tmp_path: str | os.PathLike, model: Any = None, example_inputs: Any = None,
                   reread: Callable[[str], dict] | None = None, min_cosine: float = 0.999) -> None:
    """Check ``exporter`` (registered under its name) against the ``quanta.contracts.Exporter``
    contract, writing under ``tmp_path``; raise AssertionError naming it.

    ``model``: a quantized model it can write (default: the reference MLP, int8 RTN) with
    ``example_inputs``; ``reread``: a function reading a written file back into
    ``{"<module>.<param>": codes tensor}`` for an exact round trip (else, when ``can_verify``,
    ``verify`` must find the file computing the model: a ``cosine`` of at least ``min_cosine``,
    allowing for the format's float16 arithmetic).

    - ``export`` writes at ``path`` (with its declared ``suffix``) and returns the path written;
      a file or a directory as ``writes_directory`` says;
    - the round trip is exact (``reread``: the stored codes are the records') or verified
      (``verify``: outputs of the file agree with the model's);
    - ``quanta.export`` refuses an unknown option (``ConfigError`` naming it) before writing;
    - an existing file or directory that quanta did not write is refused without
      ``overwrite=True`` (``DestinationExistsError``) and left byte for byte intact;
    - exporting again onto its own earlier output replaces it without ``overwrite`` (a staged
      file gets core's ownership sidecar; a directory the ``.quanta`` marker);
    - a failure during writing (a model it cannot trace; for ``staged`` exporters also a failure
      after everything was written) leaves no partial output and no temporary file beside it,
      for any model type (``model`` need not be a torch module: pass ``reread``);
    - ``suffix`` and ``verify`` agree: ``quanta.verify`` finds this exporter by the suffix.
    """
    import quanta
    from quanta import registry
    from quanta.errors import ConfigError, DestinationExistsError, QuantaError

    if not isinstance(exporter, Exporter):
        raise AssertionError(f"{exporter!r} is not a quanta.contracts.Exporter (subclass it; docs/plugins.md)")
    try:
        registry.get("exporter", exporter.name)
    except KeyError:
        fail(exporter, "is not registered: register it first (register_plugin fixture or quanta.registry.plugin)")
    root = Path(tmp_path)
    if model is None:
        float_model, model = _quantized_mlp()
        example_inputs = example_inputs if example_inputs is not None else (torch.randn(2, 64),)
    suffix = exporter.suffix or ""
    fmt = exporter.name

    def export(path, **kw) -> str:
        return quanta.export(model, path, format=fmt, example_inputs=example_inputs, **kw)

    # 1. a plain export
    dest = root / f"model{suffix}"
    try:
        written = export(dest)
    except Exception as exc:
        fail(exporter, f"quanta.export raised {type(exc).__name__}: {exc}")
    check(isinstance(written, str) and Path(written) == dest, exporter,
          f"export() returned {written!r}; expected the path written, {str(dest)!r}")
    check(dest.is_dir() if exporter.writes_directory else dest.is_file(), exporter,
          f"wrote {'no directory' if exporter.writes_directory else 'no file'} at {dest} "
          f"(writes_directory = {exporter.writes_directory})")
    first = _listing(root)

    # 2. round trip
    if reread is not None:
        back = reread(written)
        recs = quanta.records(model)
        for name, rec in recs.items():
            check(name in back, exporter, f"re-reading {written} lacks {name!r}")
            check(torch.equal(torch.as_tensor(back[name]).to(rec.codes.dtype), rec.codes), exporter,
                  f"re-read codes of {name!r} differ from the record's")
    if exporter.can_verify:
        figures = quanta.verify(written, model, example_inputs=example_inputs, format=fmt)
        check(isinstance(figures, dict) and "max_abs" in figures, exporter,
              f"verify() must return a dict with max_abs, got {figures!r}")
        cosine = figures.get("cosine")
        check(cosine is None or float(cosine) >= min_cosine, exporter,
              f"verify() finds the written file far from the model it was written from: cosine {cosine} "
              f"(< {min_cosine})")
        if exporter.suffix:
            by_suffix = quanta.verify(written, model, example_inputs=example_inputs)
            check(by_suffix.keys() == figures.keys(), exporter, "quanta.verify by suffix picked another exporter")
    if exporter.suffix:
        from quanta._run.exporting import exporter_for_path

        check(exporter_for_path(written).name == exporter.name, exporter,
              f"quanta.verify would pick exporter {exporter_for_path(written).name!r} for {written} "
              f"(suffix {exporter.suffix!r} is not unique)")
    check(exporter.can_verify or reread is not None, exporter,
          "neither can_verify nor a reread function: the round trip cannot be checked (pass reread=...)")

    # 3. unknown option refused before writing
    bad = root / f"bad{suffix}"
    try:
        export(bad, no_such_option_x=1)
    except ConfigError as exc:
        check("no_such_option_x" in str(exc), exporter, f"an unknown option was refused without naming it: {exc}")
    except Exception as exc:
        fail(exporter, f"an unknown option raised {type(exc).__name__}: {exc}; expected quanta.ConfigError")
    else:
        fail(exporter, "accepted an unknown option no_such_option_x")
    check(not bad.exists(), exporter, "an export refused for its options left output behind")

    # 4. a user's existing file or directory is left intact
    for existing_kind in ("dir", "file"):
        user = root / f"users_{existing_kind}{suffix}"
        if existing_kind == "dir":
            user.mkdir()
            (user / "precious.txt").write_text("the user's own data")
        else:
            user.write_text("the user's own file")
        before = _listing(root)
        try:
            export(user)
        except (DestinationExistsError, QuantaError):
            pass
        except Exception as exc:
            fail(exporter, f"exporting onto an existing {existing_kind} raised {type(exc).__name__}: {exc}; "
                           "expected quanta.DestinationExistsError (write through quanta._files.atomic)")
        else:
            fail(exporter, f"replaced an existing {existing_kind} that quanta did not write without overwrite=True")
        check(_listing(root) == before, exporter, f"a refused export changed the existing {existing_kind} "
                                                  f"{user} or left files beside it")

    # 5. a failure mid-write leaves nothing behind (through core, as quanta.export runs it)
    from quanta._run.exporting import run_exporter

    broken = root / f"broken{suffix}"
    exporting = exporter.with_config(None) if exporter.config_class is not None else exporter
    if exporter.staged:  # core owns the destination: a failure after writing everything must leave nothing
        before = _listing(root)
        try:
            run_exporter(_failing_after_writing(exporting), model, broken, example_inputs=example_inputs)
        except Exception:
            pass
        else:
            fail(exporter, "an export that raised after writing reported success")
        check(_listing(root) == before, exporter, f"a staged export that failed left output or temporary files: "
                                                  f"{sorted(set(_listing(root)) - set(before))[:5]}")
    if isinstance(model, torch.nn.Module):  # a failure halfway through the exporter's own walk of the model
        before = _listing(root)
        try:
            run_exporter(exporting, _Unexportable(model, exporting), broken, example_inputs=example_inputs)
        except Exception:
            pass
        else:
            before = _listing(root)  # the exporter never walks the model: nothing to break
        check(_listing(root) == before, exporter, f"a failed export left output or temporary files: "
                                                  f"{sorted(set(_listing(root)) - set(before))[:5]}")
    # 6. a re-export replaces quanta's own earlier output (a directory's .quanta marker says so)
    from quanta._files.atomic import is_quanta_dir

    settled = _listing(root)
    if not (exporter.writes_directory and is_quanta_dir(dest)):
        try:
            again = export(dest)
        except DestinationExistsError as exc:
            fail(exporter, f"re-exporting onto its own earlier output {dest.name} was refused ({exc}); declare "
                           "staged = True (core then owns the destination and marks what it wrote)")
        except Exception as exc:
            fail(exporter, f"re-exporting onto its own earlier output raised {type(exc).__name__}: {exc}")
        check(str(again) == str(dest) and set(_listing(root)) == set(settled), exporter,
              f"re-exporting onto {dest.name} left other files: {sorted(set(_listing(root)) ^ set(settled))[:5]}")

    check(first.keys() <= _listing(root).keys(), exporter, "a later export removed an earlier output")


def _failing_after_writing(exporter: Exporter) -> Exporter:
    """A copy of ``exporter`` whose ``export`` raises after the real one has written everything."""
    import copy

    base: Any = type(exporter)

    class FailsAfterWriting(base):
        def export(self, model, path, *, example_inputs=None, overwrite=False) -> str:
            super().export(model, path, example_inputs=example_inputs, overwrite=overwrite)
            raise RuntimeError("injected failure after writing (quanta.testing)")

    failing = copy.copy(exporter)
    failing.__class__ = FailsAfterWriting
    return failing


class _Unexportable(torch.nn.Module):
    """Wraps a quantized model so that the exporter's own code fails halfway: ``forward``,
    ``state_dict`` and ``named_modules`` (which ``quanta.records`` walks) raise when called from
    a method of ``exporter`` (core's checks before the export still see a normal model)."""

    def __init__(self, inner, exporter) -> None:
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "_exporter", exporter)

    def _from_exporter(self) -> bool:
        frame = inspect.currentframe()
        while frame is not None:
            if frame.f_locals.get("self") is self._exporter:
                return True
            frame = frame.f_back
        return False

    def _maybe_fail(self) -> None:
        if self._from_exporter():
            raise RuntimeError("injected failure while exporting (quanta.testing)")

    def forward(self, *args, **kwargs) -> Any:
        self._maybe_fail()
        return self.inner(*args, **kwargs)

    def state_dict(self, *args, **kwargs) -> Any:
        self._maybe_fail()
        return super().state_dict(*args, **kwargs)

    def named_modules(self, *args, **kwargs) -> Any:
        self._maybe_fail()
        return super().named_modules(*args, **kwargs)
