"""One `get_peft_model` call's residual-init adapters, from the first layer to the last commit: begin, commit, rollback.

peft creates the layers one after another and gives a config no hook before it starts. So each layer validates its
input and computes its factors without touching its base weight, and records itself here ("begin" is the first
one). peft activates the adapter once more after it created every layer; each layer then writes its residual
("commit"), and the last one closes the injection. If any target fails, `rollback` removes every adapter this call
added and puts every wrapper it created back to its base layer, so no weight was modified and the model has its old
structure.

A wrapper's parent and attribute are recorded when peft installs it (`setattr(parent, name, wrapper)`), through
torch's module-registration hook, which is active only while the injection is open.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook
from tqdm.auto import tqdm


class Injection:
    """The layers that received a residual-init adapter in the current `get_peft_model` call and are not committed."""

    def __init__(self, method: str, total: int | None = None):
        self.entries: list[tuple[nn.Module, str, bool]] = []  # (layer, adapter name, wrapper created by this call)
        self._created: dict[int, nn.Module] = {}  # wrappers this call created, by id
        self._homes: dict[int, tuple[nn.Module, str]] = {}  # id(wrapper) -> (parent, attribute) where peft put it
        self._hook = register_module_module_registration_hook(self._on_register)
        self.progress = tqdm(total=total, desc=f"peft_ext {method} init", unit="layer", leave=False)

    def _on_register(self, parent: nn.Module, name: str, module: nn.Module):
        if id(module) in self._created and self._created[id(module)] is module:
            self._homes[id(module)] = (parent, name)

    def add(self, layer: nn.Module, adapter_name: str, created: bool) -> None:
        self.entries.append((layer, adapter_name, created))
        if created:
            self._created[id(layer)] = layer
        self.progress.update(1)

    def commit(self, layer: nn.Module) -> bool:
        """`layer` has written its residual; True when it was the last one (the injection is then closed)."""
        self.entries = [e for e in self.entries if e[0] is not layer]
        if self.entries:
            return False
        self.close()
        return True

    def rollback(self) -> None:
        """Remove every adapter this injection added; wrappers it created are replaced by their base layer again."""
        for layer, adapter_name, created in reversed(self.entries):
            layer.drop_residual_init_state(adapter_name)
            home = self._homes.get(id(layer)) if created else None
            if home is not None:
                setattr(home[0], home[1], layer.get_base_layer())
            elif not created:
                layer.delete_adapter(adapter_name)
        self.entries = []
        self.close()

    def close(self) -> None:
        self._hook.remove()
        self.progress.close()
