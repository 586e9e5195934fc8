"""What both compat ``LinearQuantizer`` paths (torch.ao's, ``compat/qat.py``, and quanta's own
``qat`` graph, ``compat/_qat_quanta.py``) answer the same way."""

from __future__ import annotations


class _LinearQuantizerCommon:
    """Properties shared by the two compat ``LinearQuantizer`` classes (they set ``_observer_sync``
    and ``_result``)."""

    _observer_sync: bool
    _result: object

    @property
    def observer_sync(self) -> bool:
        """Whether observer synchronisation is on (see ``enable_observer_sync``)."""
        return self._observer_sync

    @property
    def minimum_deployment_target(self):
        """The lowest ``ct.target`` that stores the last ``finalize()``'s weights compressed (or None)."""
        return getattr(self._result, "coreml_minimum_deployment_target", None)
