"""The start-up hook that registers the plugin whenever SAELens is imported.

The first half drives ``sae_lens_sampled_autoload`` in-process on two throwaway
packages standing in for ``sae_lens`` and ``sae_lens_sampled``. The second half runs
real SAELens in fresh interpreters, where the hook is armed by the installed
``sae_lens_sampled_autoload.pth`` (``pip install -e .`` and a wheel install).
"""

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from sae_lens import SAE

import sae_lens_sampled_autoload as autoload
from sae_lens_sampled import export_jumprelu
from tests.helpers import D_MODEL

REPO = Path(__file__).resolve().parents[1]
PTH_NAME = "sae_lens_sampled_autoload.pth"
ARCHITECTURES = ["mutual_choice", "sampled", "feature_choice"]

# ---------------------------------------------------------------------------
# In-process: the hook's mechanics on stand-in packages
# ---------------------------------------------------------------------------

TARGET_INIT = """
from . import registry
registry.KEYS.append("builtin")
COMPLETE = True
"""
PLUGIN_INIT = """
import sys
from {target} import registry
registry.KEYS.append("plugin")
TARGET_WAS_COMPLETE = getattr(sys.modules["{target}"], "COMPLETE", False)
"""


class Packages:
    def __init__(self, root: Path, target: str, plugin: str):
        self.root, self.target, self.plugin = root, target, plugin

    def write(self, name: str, init: str) -> None:
        package = self.root / name
        package.mkdir(exist_ok=True)
        (package / "__init__.py").write_text(textwrap.dedent(init))

    def keys(self) -> list[str]:
        return sys.modules[f"{self.target}.registry"].KEYS


@pytest.fixture
def packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request):
    """A stand-in target with a ``registry`` submodule and a plugin that imports it."""
    suffix = request.node.name.replace("[", "_").replace("]", "").replace("-", "_")
    pkgs = Packages(tmp_path, f"fake_target_{suffix}", f"fake_plugin_{suffix}")
    pkgs.write(pkgs.target, TARGET_INIT)
    (tmp_path / pkgs.target / "registry.py").write_text("KEYS = []\n")
    pkgs.write(pkgs.plugin, PLUGIN_INIT.format(target=pkgs.target))
    monkeypatch.setattr(autoload, "TARGET", pkgs.target)
    monkeypatch.setattr(autoload, "PLUGIN", pkgs.plugin)
    monkeypatch.setattr(autoload, "REGISTRATION", pkgs.plugin)
    monkeypatch.delenv(autoload.ENV_VAR, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    saved_meta_path = sys.meta_path
    sys.meta_path = [
        f for f in saved_meta_path if not isinstance(f, autoload.AutoloadFinder)
    ]
    importlib.invalidate_caches()
    yield pkgs
    sys.meta_path = saved_meta_path
    for name in list(sys.modules):
        if name.split(".")[0] in (pkgs.target, pkgs.plugin):
            del sys.modules[name]


def test_importing_a_submodule_loads_the_plugin_after_the_target(packages):
    autoload.install()
    assert autoload.installed()
    module = importlib.import_module(f"{packages.target}.registry")
    # the plugin ran once, after the target's __init__ had finished
    assert module.KEYS == ["builtin", "plugin"]
    assert sys.modules[packages.plugin].TARGET_WAS_COMPLETE is True
    assert not autoload.installed()
    # the target only ever sees its own loader
    target = sys.modules[packages.target]
    assert type(target.__loader__).__name__ == "SourceFileLoader"
    assert target.__spec__.loader is target.__loader__


def test_plugin_imported_first_registers_once(packages):
    autoload.install()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plugin = importlib.import_module(packages.plugin)
    assert packages.keys() == ["builtin", "plugin"]
    assert plugin.TARGET_WAS_COMPLETE is True
    assert not autoload.installed()


def test_failing_plugin_warns_and_target_still_imports(packages):
    packages.write(packages.plugin, "raise RuntimeError('plugin is broken')\n")
    autoload.install()
    with pytest.warns(RuntimeWarning, match="plugin is broken") as record:
        target = importlib.import_module(packages.target)
    assert target.COMPLETE is True
    assert packages.keys() == ["builtin"]
    assert packages.plugin not in sys.modules
    assert autoload.ENV_VAR in str(record[0].message)


def test_failing_plugin_under_warnings_as_errors_still_imports_target(packages, capsys):
    packages.write(packages.plugin, "raise RuntimeError('plugin is broken')\n")
    autoload.install()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        target = importlib.import_module(packages.target)
    assert target.COMPLETE is True
    assert "plugin is broken" in capsys.readouterr().err


def test_failing_target_raises_its_own_error(packages):
    packages.write(packages.target, "raise ImportError('target is broken')\n")
    autoload.install()
    with pytest.raises(ImportError, match="target is broken"):
        importlib.import_module(packages.target)
    assert packages.plugin not in sys.modules


def test_spec_lookup_alone_does_not_load_the_plugin(packages):
    autoload.install()
    spec = importlib.util.find_spec(packages.target)
    assert spec is not None and spec.name == packages.target
    assert packages.plugin not in sys.modules
    assert autoload.installed()
    importlib.import_module(packages.target)
    assert packages.keys() == ["builtin", "plugin"]


@pytest.mark.parametrize("value", ["0", "false", "OFF", " no "])
def test_environment_variable_switches_the_hook_off(packages, monkeypatch, value):
    monkeypatch.setenv(autoload.ENV_VAR, value)
    autoload.install()
    assert not autoload.installed()
    importlib.import_module(packages.target)
    assert packages.keys() == ["builtin"]
    assert packages.plugin not in sys.modules


def test_install_after_the_target_loads_the_plugin_at_once(packages):
    importlib.import_module(packages.target)
    assert packages.plugin not in sys.modules
    autoload.install()
    assert packages.keys() == ["builtin", "plugin"]
    assert not autoload.installed()


def test_install_is_idempotent(packages):
    autoload.install()
    autoload.install()
    finders = [f for f in sys.meta_path if isinstance(f, autoload.AutoloadFinder)]
    assert len(finders) == 1


# A plugin shaped like sae_lens_sampled: a light package that arms the hook, a heavy
# module that imports the target at its top, and a registration module.
LAZY_PLUGIN_INIT = """
import sae_lens_sampled_autoload
sae_lens_sampled_autoload.install(force=True)
"""
LAZY_PLUGIN_CORE = """
from {target} import registry
CORE_READY = True
"""
LAZY_PLUGIN_REGISTRATION = """
import sys
from {target} import registry
from {plugin}.core import CORE_READY
registry.KEYS.append("plugin")
TARGET_WAS_COMPLETE = getattr(sys.modules["{target}"], "COMPLETE", False)
"""


@pytest.fixture
def lazy_packages(packages, monkeypatch):
    packages.write(packages.plugin, LAZY_PLUGIN_INIT)
    root = packages.root / packages.plugin
    (root / "core.py").write_text(LAZY_PLUGIN_CORE.format(target=packages.target))
    (root / "_plugin.py").write_text(
        LAZY_PLUGIN_REGISTRATION.format(target=packages.target, plugin=packages.plugin)
    )
    monkeypatch.setattr(autoload, "REGISTRATION", f"{packages.plugin}._plugin")
    monkeypatch.setenv(autoload.ENV_VAR, "0")  # the package arms the hook itself
    return packages


def test_light_plugin_registers_when_the_target_is_imported(lazy_packages):
    importlib.import_module(lazy_packages.plugin)
    assert autoload.installed()
    assert lazy_packages.target not in sys.modules
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        importlib.import_module(lazy_packages.target)
    assert [str(w.message) for w in caught] == []
    assert lazy_packages.keys() == ["builtin", "plugin"]
    registration = sys.modules[f"{lazy_packages.plugin}._plugin"]
    assert registration.TARGET_WAS_COMPLETE is True
    assert not autoload.installed()


def test_heavy_plugin_module_imported_first_registers_after_it(lazy_packages):
    # core imports the target; registering at the end of the target's import would
    # import core again while it is half-executed. Registration waits for core.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        core = importlib.import_module(f"{lazy_packages.plugin}.core")
    assert [str(w.message) for w in caught] == []
    assert core.CORE_READY is True
    assert lazy_packages.keys() == ["builtin", "plugin"]
    assert not autoload.installed()
    assert autoload._executing == 0


def test_light_plugin_registers_at_once_after_the_target(lazy_packages):
    importlib.import_module(lazy_packages.target)
    importlib.import_module(lazy_packages.plugin)
    assert lazy_packages.keys() == ["builtin", "plugin"]
    assert not autoload.installed()


def test_runpy_main_of_the_plugin_is_left_to_runpy(lazy_packages):
    (lazy_packages.root / lazy_packages.plugin / "__main__.py").write_text(
        "RAN = True\n"
    )
    importlib.import_module(lazy_packages.plugin)
    spec = importlib.util.find_spec(f"{lazy_packages.plugin}.__main__")
    assert not isinstance(spec.loader, autoload._LoaderWrapper)


def test_hook_module_imports_nothing_heavy():
    # It runs in every interpreter of the environment (python -X importtime shows
    # ~0.3 ms for a wheel install); typing alone costs ~20 ms.
    code = (
        "import os, sys; before = set(sys.modules); import sae_lens_sampled_autoload; "
        "print(sorted(set(sys.modules) - before))"
    )
    env = {**os.environ, autoload.ENV_VAR: "0"}
    out = subprocess.run(
        [sys.executable, "-S", "-c", code],
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "['sae_lens_sampled_autoload']"


# ---------------------------------------------------------------------------
# The installed .pth file
# ---------------------------------------------------------------------------


def installed_pth_files() -> list[Path]:
    return [Path(p) / PTH_NAME for p in sys.path if (Path(p) / PTH_NAME).is_file()]


def test_pth_file_is_installed_in_site_packages():
    found = installed_pth_files()
    assert found, (
        f"{PTH_NAME} is not in any sys.path directory; reinstall the package "
        "(pip install -e .) so the autoload hook is armed"
    )
    for path in found:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        assert lines == [
            "import sae_lens_sampled_autoload; sae_lens_sampled_autoload.install()"
        ]


# ---------------------------------------------------------------------------
# Fresh interpreters with the real SAELens
# ---------------------------------------------------------------------------


def run_python(
    code: str, *, autoload_on: bool, cwd: Path, python: str = sys.executable
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        autoload.ENV_VAR: "1" if autoload_on else "0",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("PYTHONPATH", None)  # the installed package, not the checkout on a path
    return subprocess.run(
        [python, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def plugin_inference_sae(architecture: str, seed: int = 0) -> SAE:
    """A plugin inference SAE with random weights and finite, varied thresholds."""
    torch.manual_seed(seed)
    sae = SAE.from_dict(
        {"architecture": architecture, "d_in": D_MODEL, "d_sae": 64, "k": 4}
    )
    with torch.no_grad():
        for param in sae.parameters():
            param.normal_()
        sae.threshold.uniform_(0.0, 2.0)
    return sae


@pytest.fixture(scope="module")
def saved_saes(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Each plugin SAE saved natively and as an exported JumpReLU, plus a test input."""
    root = tmp_path_factory.mktemp("saved")
    torch.save(
        torch.randn(3, 5, D_MODEL, generator=torch.Generator().manual_seed(1)),
        root / "x.pt",
    )
    paths = {}
    for architecture in ARCHITECTURES:
        sae = plugin_inference_sae(architecture)
        native, exported = root / architecture, root / f"{architecture}_jumprelu"
        sae.save_model(native)
        export_jumprelu(sae, exported)
        paths[architecture] = {"native": native, "exported": exported}
    return paths


LOAD_SCRIPT = """
import sys, torch
from sae_lens import SAE
x = torch.load("x.pt")
results = {}
for name in NAMES:
    try:
        sae = SAE.load_from_disk(name)
    except KeyError as err:
        results[name] = ("KeyError", str(err))
        continue
    results[name] = (type(sae).__module__ + "." + type(sae).__name__, sae.encode(x))
results["plugin_imported"] = "sae_lens_sampled" in sys.modules
torch.save(results, "results.pt")
"""


def load_in_fresh_process(names: list[str], root: Path, *, autoload_on: bool) -> dict:
    result = run_python(
        f"NAMES = {names!r}\n" + textwrap.dedent(LOAD_SCRIPT),
        autoload_on=autoload_on,
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(root / "results.pt")


@pytest.fixture(scope="module")
def fresh_load_autoload_on(saved_saes):
    root = saved_saes["sampled"]["native"].parent
    return load_in_fresh_process(ARCHITECTURES, root, autoload_on=True)


@pytest.fixture(scope="module")
def fresh_load_autoload_off(saved_saes):
    root = saved_saes["sampled"]["native"].parent
    names = ARCHITECTURES + [f"{a}_jumprelu" for a in ARCHITECTURES]
    return load_in_fresh_process(names, root, autoload_on=False)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_fresh_process_loads_plugin_sae_without_importing_the_plugin(
    architecture, saved_saes, fresh_load_autoload_on
):
    cls_name, acts = fresh_load_autoload_on[architecture]
    expected = SAE.load_from_disk(saved_saes[architecture]["native"])
    assert cls_name == f"{type(expected).__module__}.{type(expected).__name__}"
    x = torch.load(saved_saes[architecture]["native"].parent / "x.pt")
    torch.testing.assert_close(acts, expected.encode(x), rtol=0, atol=0)
    assert fresh_load_autoload_on["plugin_imported"] is True


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_autoload_off_fails_with_keyerror(architecture, fresh_load_autoload_off):
    assert fresh_load_autoload_off[architecture] == ("KeyError", repr(architecture))
    assert fresh_load_autoload_off["plugin_imported"] is False


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_exported_jumprelu_loads_without_plugin_and_encodes_equal(
    architecture, saved_saes, fresh_load_autoload_off
):
    cls_name, acts = fresh_load_autoload_off[f"{architecture}_jumprelu"]
    assert cls_name == "sae_lens.saes.jumprelu_sae.JumpReLUSAE"
    plugin_sae = SAE.load_from_disk(saved_saes[architecture]["native"])
    x = torch.load(saved_saes[architecture]["native"].parent / "x.pt")
    expected = plugin_sae.encode(x)
    assert (expected > 0).any() and (expected == 0).any()
    torch.testing.assert_close(acts, expected, rtol=0, atol=0)


def test_stock_training_cli_accepts_plugin_architecture(tmp_path):
    # runpy imports the sae_lens package before running the module as __main__, so
    # the hook has filled the registry by the time _parse_cfg_args reads it.
    env = {**os.environ, autoload.ENV_VAR: "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sae_lens.llm_sae_training_runner",
            "--architecture",
            "sampled",
            "--help",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--pool_factor [float]" in result.stdout
    assert "--score {" in result.stdout
    assert "--aux_loss {aux_k,aux_zipf,none}" in result.stdout


# ---------------------------------------------------------------------------
# Packaging: the .pth lands at the root of site-packages for both install kinds
# ---------------------------------------------------------------------------


def setuptools_version() -> tuple[int, ...] | None:
    if importlib.util.find_spec("setuptools") is None:
        return None
    import setuptools

    return tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())


def copy_project(dest: Path) -> Path:
    """A clean copy of what a build needs, so builds leave the checkout untouched."""
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    for name in (
        "pyproject.toml",
        "setup.py",
        "sae_lens_sampled_autoload.py",
        "README.md",
    ):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "sae_lens_sampled", dest / "sae_lens_sampled", ignore=ignore)
    return dest


OFFLINE_BUILD = (setuptools_version() or (0,)) >= (70, 1)


def build(kind: str, project: Path, out: Path) -> Path:
    """Build a wheel (kind 'wheel' or 'editable') with setuptools' PEP 517 backend.

    With setuptools>=70.1 here (bdist_wheel built in) the build runs offline in this
    environment; otherwise pip builds a regular wheel in an isolated environment,
    which fetches setuptools.
    """
    if OFFLINE_BUILD:
        code = f"from setuptools import build_meta; print(build_meta.build_{kind}({str(out)!r}))"
        command = [sys.executable, "-c", code]
    elif kind == "wheel":
        command = [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(out),
            ".",
        ]
    else:
        pytest.skip("building an editable wheel directly needs setuptools>=70.1")
    result = subprocess.run(command, cwd=project, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    [wheel] = out.glob("sae_lens_sampled-*.whl")  # one build per directory
    return wheel


def test_editable_wheel_ships_the_pth(tmp_path):
    project = copy_project(tmp_path / "project")
    wheel = build("editable", project, tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert PTH_NAME in names  # at the root: installed next to the packages
        line = archive.read(PTH_NAME).decode()
    assert line.startswith("import sae_lens_sampled_autoload;")


def this_environments_site_packages() -> list[str]:
    """The site-packages directories this interpreter imports from."""
    return [
        p
        for p in sys.path
        if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()
    ]


def make_venv_seeing_this_environment(venv: Path) -> str:
    """A new venv whose own site-packages come first, then this environment's.

    ``python -m venv --system-site-packages`` would not do: run from inside a
    virtualenv it bases the new venv on the base interpreter, whose packages are not
    this environment's. A ``.pth`` file in the new venv's site-packages appends this
    environment's directories to ``sys.path`` instead; ``.pth`` files inside those
    directories are not run (only site directories' are), so the only autoload hook
    armed is the one the wheel installs.
    """
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True
    )
    python = str(venv / "bin" / "python")
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    lines = "".join(f"{p}\n" for p in this_environments_site_packages())
    (Path(purelib) / "outer_environment.pth").write_text(lines)
    return python


def test_wheel_install_registers_on_sae_lens_import(tmp_path):
    # Takes ~15-25 s: build, a venv that sees this environment's packages, and a
    # fresh interpreter importing SAELens.
    project = copy_project(tmp_path / "project")
    wheel = build("wheel", project, tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        shipped = {
            PTH_NAME,
            "sae_lens_sampled_autoload.py",
            "sae_lens_sampled/py.typed",
        }
        assert shipped <= set(archive.namelist())
    venv = tmp_path / "venv"
    python = make_venv_seeing_this_environment(venv)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            str(wheel),
        ],
        check=True,
    )
    code = """
        import sys
        import sae_lens.registry as registry
        registered = sorted(k for k in registry.SAE_CLASS_REGISTRY if k in ARCHS)
        print(sys.modules["sae_lens_sampled"].__file__)
        print(registered)
    """
    result = run_python(
        f"ARCHS = {ARCHITECTURES!r}\n" + textwrap.dedent(code),
        autoload_on=True,
        cwd=tmp_path,
        python=python,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    plugin_file, registered = result.stdout.strip().splitlines()[-2:]
    site_packages = Path(plugin_file).parents[1]
    assert site_packages.is_relative_to(venv)
    assert (site_packages / PTH_NAME).is_file()
    assert registered == repr(sorted(ARCHITECTURES))
