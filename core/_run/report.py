"""The per-layer report attached to every quantized model (``model.quanta_report``)."""

from __future__ import annotations

import attrs

__all__ = ["LayerReport", "Report"]


@attrs.define(kw_only=True)
class LayerReport:
    """One quantized weight: spec used, relative error ‖W−Ŵ‖/‖W‖, bits, sizes and extra stats.

    ``float_bytes`` counts the weight at fp16 (Core ML's float storage); ``bytes`` counts
    packed codes plus fp16 scales and zero points. ``extra`` holds algorithm-specific
    figures (e.g. ``gptq_loss``).
    """

    name: str
    module_type: str
    shape: tuple[int, ...]
    spec: str
    reason: str
    rel_error: float
    bits: int
    bytes: int
    float_bytes: int
    index: int = 0
    total: int = 0
    extra: dict = attrs.field(factory=dict)

    def to_dict(self) -> dict:
        return attrs.asdict(self)


@attrs.define(kw_only=True)
class Report:
    """All layers of one run, plus the skipped ones and totals. ``str(report)`` is a table."""

    algorithm: str
    layers: list[LayerReport] = attrs.field(factory=list)
    skipped: list[tuple[str, str]] = attrs.field(factory=list)
    seconds: float = 0.0
    stats: dict = attrs.field(factory=dict)  # run-level figures an algorithm reports (e.g. cache bytes)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.layers)

    @property
    def float_bytes(self) -> int:
        return sum(r.float_bytes for r in self.layers)

    def __getitem__(self, name: str) -> LayerReport:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {"algorithm": self.algorithm, "seconds": self.seconds, "bytes": self.bytes,
                "float_bytes": self.float_bytes, "layers": [r.to_dict() for r in self.layers],
                "skipped": [{"name": n, "reason": why} for n, why in self.skipped], "stats": dict(self.stats)}

    def table(self) -> str:
        extra_keys = sorted({k for r in self.layers for k in r.extra})
        head = ("layer", "spec", "rel_err", "KiB", *extra_keys)
        rows = [head]
        for r in self.layers:
            rows.append((r.name, r.spec, f"{r.rel_error:.4%}", f"{r.bytes / 1024:.1f}",
                         *(f"{r.extra[k]:.4g}" if isinstance(r.extra.get(k), float) else str(r.extra.get(k, ""))
                           for k in extra_keys)))
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        for name, why in self.skipped:
            lines.append(f"{name}: float ({why})")
        for key, value in self.stats.items():
            lines.append(f"{key}: {value}")
        ratio = self.float_bytes / self.bytes if self.bytes else 0.0
        # These layers only: the whole model as stored is quanta._files.stored_size (the CLI prints it on saving).
        lines.append(f"{len(self.layers)} layers quantized with {self.algorithm!r} in {self.seconds:.2f} s: "
                     f"these layers {self.float_bytes / 2**20:.2f} MiB fp16 -> {self.bytes / 2**20:.2f} MiB "
                     f"({ratio:.2f}x smaller)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
