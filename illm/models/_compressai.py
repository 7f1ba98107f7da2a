"""compressai's entropy models, imported without the parts of compressai that coding never uses.

``import compressai`` runs a package ``__init__`` that imports every subpackage; through its
registry and point-cloud transforms that imports torch_geometric (and with it torch._dynamo),
and the entropy models import scipy.stats: together about 2.5 s of a 3 s import. Here
compressai's own ``__init__`` runs unchanged, but while it runs the modules in `_DEFERRED`
are stand-ins that import the real module on first use:

- compressai's subpackages other than its entropy models and ops stay stand-ins afterwards, so
  ``compressai.zoo`` or ``from compressai.models import ...`` still work (and import then);
- scipy.stats is a stand-in only during the import: compressai reaches it as ``scipy.stats``
  through scipy's own lazy attribute loading, which imports it when a coder table is first
  computed (never when the weights file stores its tables).

Whatever a later compressai adds to its ``__init__`` is imported for real; nothing in
site-packages is modified. tests/test_startup.py checks what a fresh ``illm compress`` imports.
"""

import importlib
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

_COMPRESSAI_SUBPACKAGES = (
    "datasets",
    "latent_codecs",
    "layers",
    "losses",
    "models",
    "optimizers",
    "registry",
    "transforms",
    "zoo",
)
_DEFERRED = tuple(f"compressai.{name}" for name in _COMPRESSAI_SUBPACKAGES) + ("scipy.stats",)
_DEFERRED_DURING_IMPORT_ONLY = ("scipy.stats",)


class _DeferredModule(ModuleType):
    """Stands for a package until an attribute of it is read, then imports the real one.

    It has the real ``__path__``, so its submodules import without it; dunder lookups (tools
    such as `inspect` probe every module in `sys.modules`) do not trigger the import.
    """

    def __getattr__(self, attribute: str):
        if attribute.startswith("__") and attribute.endswith("__"):
            raise AttributeError(attribute)
        return getattr(_import_now(self.__name__), attribute)


def _import_now(name: str) -> ModuleType:
    if isinstance(sys.modules.get(name), _DeferredModule):
        del sys.modules[name]
    module = importlib.import_module(name)
    parent, _, child = name.rpartition(".")
    setattr(sys.modules[parent], child, module)
    return module


def _install_stand_in(name: str) -> _DeferredModule | None:
    """Put a stand-in for the package ``name`` in `sys.modules`, unless it is imported already."""
    parent, _, _ = name.rpartition(".")
    parent_spec = sys.modules[parent].__spec__ if parent in sys.modules else importlib.util.find_spec(parent)
    if name in sys.modules or parent_spec is None or parent_spec.submodule_search_locations is None:
        return None
    spec = importlib.machinery.PathFinder.find_spec(name, parent_spec.submodule_search_locations)
    if spec is None or spec.submodule_search_locations is None:
        return None  # not a package in this version
    stand_in = _DeferredModule(name)
    stand_in.__spec__ = None
    stand_in.__path__ = spec.submodule_search_locations
    sys.modules[name] = stand_in
    return stand_in


def _remove_stand_in(name: str, stand_in: _DeferredModule) -> None:
    if sys.modules.get(name) is stand_in:
        del sys.modules[name]
    parent, _, child = name.rpartition(".")
    if parent in sys.modules and vars(sys.modules[parent]).get(child) is stand_in:
        delattr(sys.modules[parent], child)


def _import_compressai() -> None:
    if "compressai" in sys.modules:  # imported already, fully or by this module
        return
    stand_ins = {name: _install_stand_in(name) for name in _DEFERRED}
    stand_ins = {name: stand_in for name, stand_in in stand_ins.items() if stand_in is not None}
    try:
        importlib.import_module("compressai")
        importlib.import_module("compressai.entropy_models")
    except BaseException:
        for name, stand_in in stand_ins.items():
            _remove_stand_in(name, stand_in)
        raise
    for name in _DEFERRED_DURING_IMPORT_ONLY:
        if name in stand_ins:
            _remove_stand_in(name, stand_ins[name])


_import_compressai()

from compressai.entropy_models import EntropyBottleneck, GaussianConditional  # noqa: E402

__all__ = ["EntropyBottleneck", "GaussianConditional"]
