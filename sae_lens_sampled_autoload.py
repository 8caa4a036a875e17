"""Register the sae_lens_sampled architectures whenever ``sae_lens`` is imported.

SAELens has no plugin discovery: its registries hold only what has been imported. The
``sae_lens_sampled_autoload.pth`` file installed with this package runs :func:`install`
at interpreter start-up. That puts a one-shot finder on ``sys.meta_path`` which, the
first time ``sae_lens`` itself is executed (by ``import sae_lens``, by importing any of
its submodules, or by ``python -m sae_lens.<module>``), lets the import finish and then
imports ``sae_lens_sampled``, whose ``__init__`` registers the architectures. So a
saved ``sampled`` SAE loads with ``SAE.load_from_disk`` and the stock training CLI
accepts ``--architecture sampled`` without importing the plugin first.

This module is imported by every Python process of the environment, so it imports
nothing beyond ``os`` and ``sys`` (not even ``typing``) and does nothing until
``sae_lens`` is imported. A failure to import the plugin is reported with
``warnings.warn`` and never breaks ``import sae_lens``. Set
``SAE_LENS_SAMPLED_AUTOLOAD=0`` (or false/no/off) to switch the hook off.
"""

import os
import sys

ENV_VAR = "SAE_LENS_SAMPLED_AUTOLOAD"
TARGET = "sae_lens"
PLUGIN = "sae_lens_sampled"
_OFF_VALUES = ("0", "false", "no", "off")


def enabled() -> bool:
    """False when ``SAE_LENS_SAMPLED_AUTOLOAD`` is set to 0, false, no or off."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in _OFF_VALUES


def _warn(message: str) -> None:
    import warnings

    try:
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    except Exception:  # warnings turned into errors (-W error) must not break imports
        sys.stderr.write(f"RuntimeWarning: {message}\n")


def load_plugin() -> None:
    """Import the plugin (registering its architectures); warn instead of raising."""
    # Already imported, or being imported: the plugin's own __init__ imports sae_lens,
    # which lands here while the plugin is only partly initialised.
    if PLUGIN in sys.modules:
        return
    try:
        __import__(PLUGIN)
    except Exception as exc:  # never let the plugin break `import sae_lens`
        _warn(
            f"{PLUGIN} could not be imported when {TARGET} was ({exc!r}); its "
            f"architectures are not registered. Import {PLUGIN} explicitly to see "
            f"the error, or set {ENV_VAR}=0 to switch this hook off."
        )


class _LoaderWrapper:
    """Runs the real loader of ``sae_lens``, then imports the plugin.

    Before ``sae_lens``'s code runs, the real loader is put back on the spec and the
    module, so ``sae_lens`` only ever sees its own loader (resources, ``inspect``).
    """

    def __init__(self, loader):  # an importlib Loader; no typing import here
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        spec = module.__spec__
        if spec is not None and spec.loader is self:
            spec.loader = self.loader
        module.__loader__ = self.loader
        self.loader.exec_module(module)  # errors here are sae_lens's own: propagate
        uninstall()
        load_plugin()


class AutoloadFinder:
    """``sys.meta_path`` finder that wraps the loader of ``sae_lens`` only.

    It asks the finders after it for the real spec, so it changes nothing about where
    ``sae_lens`` is found; a spec that is only looked up (``importlib.util.find_spec``)
    and never executed leaves the hook in place.
    """

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> object:
        if fullname != TARGET:
            return None
        if PLUGIN in sys.modules:  # the plugin is importing sae_lens itself
            uninstall()
            return None
        try:
            spec = self._real_spec(fullname, path, target)
            if spec is None or spec.loader is None:
                return None
            if not hasattr(spec.loader, "exec_module"):
                return None
            if not isinstance(spec.loader, _LoaderWrapper):
                spec.loader = _LoaderWrapper(spec.loader)
            return spec
        except Exception as exc:
            _warn(f"{PLUGIN} autoload hook stepped aside: {exc!r}")
            uninstall()
            return None

    def _real_spec(self, fullname: str, path: object, target: object) -> object:
        finders = list(sys.meta_path)
        position = finders.index(self) if self in finders else -1
        for finder in finders[position + 1 :]:
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                return spec
        return None

    # Some tools call invalidate_caches() on every finder.
    def invalidate_caches(self) -> None:
        return None


def installed() -> bool:
    return any(isinstance(finder, AutoloadFinder) for finder in sys.meta_path)


def uninstall() -> None:
    """Remove the hook. The list is replaced, not mutated in place, since an import
    may be iterating over the current one."""
    sys.meta_path = [f for f in sys.meta_path if not isinstance(f, AutoloadFinder)]


def install() -> None:
    """Arm the hook (called by the ``.pth`` file); a no-op when switched off."""
    if not enabled() or installed():
        return
    if TARGET in sys.modules:
        load_plugin()
        return
    sys.meta_path.insert(0, AutoloadFinder())
