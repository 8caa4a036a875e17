"""Ships ``sae_lens_sampled_autoload.pth`` at the root of site-packages.

Everything else is configured in pyproject.toml. A ``.pth`` file must sit next to the
packages, outside them, which pyproject.toml cannot express: ``build_py`` writes it into
the build directory of a regular wheel, and ``editable_wheel`` adds it to the editable
wheel (``pip install -e .``), whose build directory is not installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "sae_lens_sampled_autoload.pth"
# One line; site.py executes lines that start with "import".
PTH_LINE = "import sae_lens_sampled_autoload; sae_lens_sampled_autoload.install()\n"


class build_py_with_pth(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            target = Path(self.build_lib, PTH_NAME)
            target.write_text(PTH_LINE, encoding="utf-8")

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not self.editable_mode:
            outputs.append(str(Path(self.build_lib, PTH_NAME)))
        return outputs


class _StrategyWithPth:
    """Wraps setuptools' editable strategy and adds the .pth to the editable wheel."""

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy

    def __enter__(self) -> _StrategyWithPth:
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> Any:
        return self.strategy.__exit__(*exc_info)

    def __call__(self, wheel: Any, files: Any, mapping: Any) -> None:
        self.strategy(wheel, files, mapping)
        wheel.writestr(PTH_NAME, PTH_LINE.encode("utf-8"))


class editable_wheel_with_pth(editable_wheel):
    def _select_strategy(self, *args: Any, **kwargs: Any) -> Any:
        return _StrategyWithPth(super()._select_strategy(*args, **kwargs))


setup(
    cmdclass={"build_py": build_py_with_pth, "editable_wheel": editable_wheel_with_pth}
)
