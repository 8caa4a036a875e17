"""``import sae_lens_sampled`` is cheap and still registers the architectures.

Each case runs in a fresh interpreter with the start-up hook switched off
(``SAE_LENS_SAMPLED_AUTOLOAD=0``), so whatever registers comes from importing the
package. The interpreters run side by side; each prints one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch
from sae_lens import SAE

from sae_lens_sampled import SampledSAE
from tests.helpers import D_MODEL

REPO = Path(__file__).resolve().parents[1]
PLUGIN_KEYS = ["feature_choice", "mutual_choice", "sampled"]

REGISTERED = f"""
def registered():
    from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY
    keys = [k for k in SAE_TRAINING_CLASS_REGISTRY if k in {PLUGIN_KEYS!r}]
    both = [k for k in keys if k in SAE_CLASS_REGISTRY]
    return sorted(both)
"""

CASES = {
    # The import alone: nothing heavy, the hook armed.
    "bare_import": """
        import sys
        import sae_lens_sampled
        import sae_lens_sampled_autoload
        heavy = sorted(m for m in ("torch", "sae_lens", "transformer_lens")
                       if m in sys.modules)
        result = {"heavy": heavy, "armed": sae_lens_sampled_autoload.installed()}
    """,
    # The package first, then SAELens's loader: the plugin SAE loads.
    "import_then_load": """
        import sae_lens_sampled
        import torch
        from sae_lens import SAE
        sae = SAE.load_from_disk(SAVED)
        x = torch.load(INPUT)
        result = {"class": type(sae).__name__, "acts": sae.encode(x).tolist(),
                  "registered": registered()}
    """,
    # A public name first: imports and registers. Then importlib.reload, which
    # registers again what was removed, with the same classes.
    "from_import_and_reload": """
        import importlib
        from sae_lens_sampled import SampledTrainingSAEConfig
        from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY
        same = SAE_TRAINING_CLASS_REGISTRY["sampled"][1] is SampledTrainingSAEConfig
        first = registered()
        import sae_lens_sampled
        del SAE_CLASS_REGISTRY["sampled"], SAE_TRAINING_CLASS_REGISTRY["sampled"]
        importlib.reload(sae_lens_sampled)
        result = {"same_class": same, "registered": first,
                  "same_class_after_reload":
                  SAE_TRAINING_CLASS_REGISTRY["sampled"][1] is SampledTrainingSAEConfig
                  and sae_lens_sampled.SampledTrainingSAEConfig
                  is SampledTrainingSAEConfig,
                  "registered_after_reload": registered()}
    """,
    # A module that imports SAELens at its top, first: no half-initialised import.
    "submodule_first": """
        import sae_lens_sampled.saes.sampled_sae as module
        from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
        result = {"same_class": SAE_TRAINING_CLASS_REGISTRY["sampled"][1]
                  is module.SampledTrainingSAEConfig, "registered": registered()}
    """,
    # SAELens first: the package registers at once, before any name is used.
    "saelens_first": """
        import sae_lens
        import sae_lens_sampled
        result = {"registered": registered()}
    """,
    # No site module (no .pth files run): the import arms the hook itself.
    "no_site": """
        import sys
        hook_ran_at_start = "sae_lens_sampled_autoload" in sys.modules
        import sae_lens_sampled
        import sae_lens
        result = {"hook_ran_at_start": hook_ran_at_start, "registered": registered()}
    """,
    # python -m sae_lens_sampled: runpy runs __main__ (the CLI) after the package.
    "module_version": None,
}


def case_command(name: str, root: Path) -> list[str]:
    if name == "module_version":
        return [sys.executable, "-m", "sae_lens_sampled", "--version"]
    code = (
        f"SAVED, INPUT = {str(root / 'sampled')!r}, {str(root / 'x.pt')!r}\n"
        + textwrap.dedent(REGISTERED)
        + textwrap.dedent(CASES[name])
        + "import json; print(json.dumps(result))\n"
    )
    flags = ["-S"] if name == "no_site" else []
    return [sys.executable, *flags, "-W", "error::RuntimeWarning", "-c", code]


def case_env(name: str) -> dict[str, str]:
    env = {
        **os.environ,
        "SAE_LENS_SAMPLED_AUTOLOAD": "0",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("PYTHONPATH", None)
    if name == "no_site":
        # What a user of `python -S` would do: the checkout and the packages on
        # PYTHONPATH by hand.
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
        )
    return env


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("package_import")
    torch.manual_seed(0)
    sae = SAE.from_dict(
        {"architecture": "sampled", "d_in": D_MODEL, "d_sae": 64, "k": 4}
    )
    with torch.no_grad():
        for param in sae.parameters():
            param.normal_()
        sae.threshold.uniform_(0.0, 2.0)
    sae.save_model(root / "sampled")
    torch.save(torch.randn(3, D_MODEL, generator=torch.Generator().manual_seed(1)),
               root / "x.pt")  # fmt: skip
    return root


@pytest.fixture(scope="module")
def outcomes(saved) -> dict[str, subprocess.CompletedProcess[str]]:
    processes = {
        name: subprocess.Popen(
            case_command(name, saved),
            cwd=saved,
            env=case_env(name),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in CASES
    }
    results = {}
    for name, process in processes.items():
        out, err = process.communicate(timeout=600)
        results[name] = subprocess.CompletedProcess(
            process.args, process.returncode, out, err
        )
    return results


def result_of(outcomes, name: str) -> dict:
    outcome = outcomes[name]
    assert outcome.returncode == 0, outcome.stderr[-3000:]
    return json.loads(outcome.stdout.strip().splitlines()[-1])


def test_bare_import_is_light_and_arms_the_hook(outcomes):
    assert result_of(outcomes, "bare_import") == {"heavy": [], "armed": True}


def test_import_then_load_from_disk(outcomes, saved):
    result = result_of(outcomes, "import_then_load")
    assert result["class"] == "SampledSAE"
    assert result["registered"] == PLUGIN_KEYS
    expected = SAE.load_from_disk(saved / "sampled")
    assert isinstance(expected, SampledSAE)
    x = torch.load(saved / "x.pt")
    torch.testing.assert_close(
        torch.tensor(result["acts"]), expected.encode(x), rtol=0, atol=0
    )


def test_public_name_registers_and_reload_registers_again(outcomes):
    assert result_of(outcomes, "from_import_and_reload") == {
        "same_class": True,
        "registered": PLUGIN_KEYS,
        "same_class_after_reload": True,
        "registered_after_reload": PLUGIN_KEYS,
    }


def test_module_importing_saelens_first_registers_once_it_is_done(outcomes):
    assert result_of(outcomes, "submodule_first") == {
        "same_class": True,
        "registered": PLUGIN_KEYS,
    }


def test_saelens_first_registers_at_import(outcomes):
    assert result_of(outcomes, "saelens_first") == {"registered": PLUGIN_KEYS}


def test_without_site_the_import_registers(outcomes):
    assert result_of(outcomes, "no_site") == {
        "hook_ran_at_start": False,
        "registered": PLUGIN_KEYS,
    }


def test_python_dash_m_prints_the_version(outcomes):
    from importlib.metadata import version

    outcome = outcomes["module_version"]
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.stdout == f"sae-lens-sampled {version('sae-lens-sampled')}\n"


def test_every_public_name_resolves():
    import sae_lens_sampled

    assert set(sae_lens_sampled.__all__) == {*sae_lens_sampled._LAZY, "__version__"}
    for name in sae_lens_sampled.__all__:
        assert getattr(sae_lens_sampled, name) is not None
        assert name in dir(sae_lens_sampled)
    with pytest.raises(AttributeError, match="has no attribute 'nonexistent'"):
        sae_lens_sampled.nonexistent  # noqa: B018


def test_only_the_package_is_installed():
    """The studies, checks and tests beside the package stay in the checkout."""
    from setuptools.config.pyprojecttoml import read_configuration

    setuptools = read_configuration(REPO / "pyproject.toml")["tool"]["setuptools"]
    packages = setuptools["packages"]
    assert "sae_lens_sampled.distributed" in packages
    assert {p.split(".")[0] for p in packages} == {"sae_lens_sampled"}
    assert (REPO / "experiments" / "__init__.py").exists()
    assert (REPO / "benchmarks" / "__init__.py").exists()
