"""Register the sae_lens_sampled architectures whenever ``sae_lens`` is imported.

SAELens has no plugin discovery: its registries hold only what has been imported. The
``sae_lens_sampled_autoload.pth`` file installed with this package runs :func:`install`
at interpreter start-up. That puts a one-shot finder on ``sys.meta_path`` which, the
first time ``sae_lens`` itself is executed (by ``import sae_lens``, by importing any of
its submodules, or by ``python -m sae_lens.<module>``), lets the import finish and then
imports ``sae_lens_sampled._plugin``, which registers the architectures. So a saved
``sampled`` SAE loads with ``SAE.load_from_disk`` and the stock training CLI accepts
``--architecture sampled`` without importing the plugin first.

``import sae_lens_sampled`` arms the same finder (whatever the environment variable
says) when SAELens is not imported yet; the package itself stays cheap to import.

While armed, the finder also wraps the plugin's own modules, so that registration
waits until no plugin module is half-executed: a plugin module that imports
``sae_lens`` at its top must not be imported again (partially initialised) by the
registration.

This module is imported by every Python process of the environment, so it imports
nothing beyond ``os`` and ``sys`` (not even ``typing``) and does nothing until
``sae_lens`` or the plugin is imported. A failure to import the plugin is reported
with ``warnings.warn`` and never breaks ``import sae_lens``. Set
``SAE_LENS_SAMPLED_AUTOLOAD=0`` (or false/no/off) to switch the start-up hook off.
"""

import os
import sys

# Names for the type checker only (it reads this constant as True): at run time the
# module still imports nothing beyond os and sys.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.abc import Loader
    from importlib.machinery import ModuleSpec
    from types import ModuleType

    _LoaderBase = Loader
else:
    _LoaderBase = object  # a Loader by duck typing; importlib.abc is not imported

ENV_VAR = "SAE_LENS_SAMPLED_AUTOLOAD"
TARGET = "sae_lens"
PLUGIN = "sae_lens_sampled"
# Importing this module registers the architectures (it imports SAELens).
REGISTRATION = "sae_lens_sampled._plugin"
_OFF_VALUES = ("0", "false", "no", "off")

# Number of wrapped modules (the target's or the plugin's) executing right now.
_executing = 0


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
    """Import the registration module; warn instead of raising."""
    # Already imported, or being imported (it imports sae_lens itself).
    if REGISTRATION in sys.modules:
        return
    try:
        __import__(REGISTRATION)
    except Exception as exc:  # never let the plugin break `import sae_lens`
        _warn(
            f"{PLUGIN} could not be imported when {TARGET} was ({exc!r}); its "
            f"architectures are not registered. Import {PLUGIN} explicitly to see "
            f"the error, or set {ENV_VAR}=0 to switch this hook off."
        )


def _is_plugin_module(fullname: str) -> bool:
    return fullname == PLUGIN or fullname.startswith(PLUGIN + ".")


def _after_import() -> None:
    """Register once the target is imported and no wrapped module is mid-execution."""
    if _executing == 0 and TARGET in sys.modules:
        uninstall()
        load_plugin()


class _LoaderWrapper(_LoaderBase):
    """Runs a module's real loader, then :func:`_after_import`.

    Before the module's code runs, the real loader is put back on the spec and the
    module, so the module only ever sees its own loader (resources, ``inspect``).
    Anything else (``get_code`` for ``runpy``, resource readers) goes to the real
    loader.
    """

    def __init__(self, loader: "Loader") -> None:
        self.loader = loader

    def __getattr__(self, name: str) -> object:
        if name == "loader":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def create_module(self, spec: "ModuleSpec") -> "ModuleType | None":
        return self.loader.create_module(spec)

    def exec_module(self, module: "ModuleType") -> None:
        global _executing
        spec = module.__spec__
        if spec is not None and spec.loader is self:
            spec.loader = self.loader
        module.__loader__ = self.loader
        _executing += 1
        try:
            self.loader.exec_module(module)  # errors here are the module's: propagate
        finally:
            _executing -= 1
        _after_import()


class AutoloadFinder:
    """``sys.meta_path`` finder that wraps the loaders of ``sae_lens`` and the plugin.

    It asks the finders after it for the real spec, so it changes nothing about where
    a module is found; a spec that is only looked up (``importlib.util.find_spec``)
    and never executed leaves the hook in place.
    """

    def find_spec(
        self,
        fullname: str,
        path: "Sequence[str] | None" = None,
        target: "ModuleType | None" = None,
    ) -> "ModuleSpec | None":
        if fullname != TARGET and not _is_plugin_module(fullname):
            return None
        if REGISTRATION in sys.modules:  # registered, or registering right now
            uninstall()
            return None
        if fullname.endswith(".__main__"):  # run by runpy, which never exec_module()s
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

    def _real_spec(
        self,
        fullname: str,
        path: "Sequence[str] | None",
        target: "ModuleType | None",
    ) -> "ModuleSpec | None":
        finders = list(sys.meta_path)
        position = finders.index(self) if self in finders else -1
        for finder in finders[position + 1 :]:
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec: ModuleSpec | None = find_spec(fullname, path, target)
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


def install(force: bool = False) -> None:
    """Arm the hook; a no-op when switched off by ``SAE_LENS_SAMPLED_AUTOLOAD``.

    The ``.pth`` file calls it at start-up; ``import sae_lens_sampled`` calls it with
    ``force=True``, since an explicit import registers whatever the variable says.
    """
    if not (force or enabled()) or installed():
        return
    if TARGET in sys.modules:
        load_plugin()
        return
    sys.meta_path.insert(0, AutoloadFinder())
