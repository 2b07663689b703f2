"""Several LoRA adapters on one base model, switched per generation (peft multi-adapter), with a bounded cache.

peft keeps one *active* adapter per model, so two generations with different adapters cannot run at the same
time on one model object. :class:`AdapterSet` hands out leases first come, first served: any number of
generations share the active adapter (or the bare base) while nobody waits for another one; a generation that
needs another adapter waits until the current users are done, and whoever came after it waits behind it (a
steady stream for the active adapter cannot starve a switch), then switches (``set_adapter`` / adapter layers disabled for the base). Adapters load on first use
(``load_adapter``) and the least recently used one is unloaded (``delete_adapter``) beyond ``max_loaded``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

BASE = None  # the lease name of the bare base model


class AdapterSet:
    """The model (a ``PeftModel`` once an adapter is loaded) and the adapters it may serve by name."""

    def __init__(self, model, adapters: Mapping[str, str], max_loaded: int, preload: int | None = None):
        if max_loaded < 1:
            raise ValueError("max_loaded must be at least 1")
        self.model, self.paths, self.max_loaded = model, dict(adapters), max_loaded
        self.loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.active: str | None = BASE
        self.users = 0
        self.loads = 0  # adapters loaded so far (stats)
        self._cond = threading.Condition()
        self.waiting: deque[object] = deque()  # tickets of the leases asked for, in arrival order
        for name in list(self.paths)[: max_loaded if preload is None else preload]:
            self._load(name)
        self._activate(BASE)

    def _load(self, name: str) -> None:
        from peft import PeftModel

        if not self.loaded:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(self.paths[name], adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, self.paths[name], adapter_name=name)
        else:
            self.model.load_adapter(self.paths[name], adapter_name=name)
        self.model.eval()
        self.loaded[name] = None
        self.loads += 1
        while len(self.loaded) > self.max_loaded:
            old = next(iter(self.loaded))
            del self.loaded[old]
            self.model.delete_adapter(old)

    def _activate(self, name: str | None) -> None:
        if not self.loaded:
            return  # a plain model: only the base exists
        if name is BASE:
            self.model.base_model.disable_adapter_layers()
        else:
            if name not in self.loaded:
                self._load(name)
            self.loaded.move_to_end(name)
            self.model.base_model.enable_adapter_layers()
            self.model.set_adapter(name)
        self.active = name

    @contextmanager
    def use(self, name: str | None) -> Iterator[object]:
        """Lease the model with adapter ``name`` (None = the base) active; yields the model."""
        if name is not BASE and name not in self.paths:
            raise KeyError(name)
        ticket = object()
        with self._cond:
            self.waiting.append(ticket)
            while self.waiting[0] is not ticket or (self.users and self.active != name):
                self._cond.wait()
            self.waiting.popleft()
            self._cond.notify_all()  # the next in line may join these users (same adapter)
            if self.active != name or (name is not BASE and name not in self.loaded):
                self._activate(name)
            elif name is not BASE:
                self.loaded.move_to_end(name)
            self.users += 1
        try:
            yield self.model
        finally:
            with self._cond:
                self.users -= 1
                self._cond.notify_all()
