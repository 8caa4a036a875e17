"""Every ```python block of README.md runs, offline, so the README cannot rot.

The blocks run in order in one namespace, as a reader would paste them one after the
other, with three kinds of stand-in:

- SIZES: keyword arguments rewritten to tiny values (``d_in=768`` becomes the tiny
  model's width, ``training_tokens=100_000_000`` a few thousand, ...), and paths
  given to ``load_from_disk`` pointed at a tiny saved SAE;
- LOADERS: SAELens's model and dataset loading return a tiny random
  ``HookedTransformer`` and an in-memory token dataset, so a block that names
  ``pythia-160m-deduped`` and the Pile trains on those instead;
- NAMES: values a block uses without defining them (``x``: activations).

A block that still fails (another hub download, a name with no stand-in, a size the
table does not rewrite) fails this test with the block's line number and first line:
extend the tables below rather than weakening the README.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE, TrainingSAE

import sae_lens_sampled
from sae_lens_sampled.saes.base import BatchLevelTrainingSAE
from tests.helpers import CONTEXT, D_MODEL, HOOK, tiny_model, token_dataset

README = Path(__file__).parent.parent / "README.md"

D_SAE, K, STEPS, BATCH_TOKENS = 64, 4, 30, 128
SIZES: list[tuple[str, str]] = [
    (r"(?<![\w.])d_in=[\d_]+", f"d_in={D_MODEL}"),
    (r"(?<![\w.])d_sae=[\d_]+", f"d_sae={D_SAE}"),
    (r"(?<![\w.])k=[\d_.]+", f"k={K}"),
    (r"(?<![\w.])context_size=[\d_]+", f"context_size={CONTEXT}"),
    (r"(?<![\w.])training_tokens=[\d_]+", f"training_tokens={STEPS * BATCH_TOKENS}"),
    (r"(?<![\w.])train_batch_size_tokens=[\d_]+", f"train_batch_size_tokens={BATCH_TOKENS}"),
    (r"(?<![\w.])n_batches_in_buffer=[\d_]+", "n_batches_in_buffer=16"),
    (r"(?<![\w.])store_batch_size_prompts=[\d_]+", "store_batch_size_prompts=8"),
    # the tiny model has one block
    (r"""(hook_name=["'])blocks\.\d+\.hook_resid_post""", rf"\g<1>{HOOK}"),
]  # fmt: skip
# load_from_disk("any/literal/path") loads the tiny saved SAE instead
SAVED_SAE_PATH = r"""(load_from_disk\(\s*)(["'])[^"']*\2"""


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    code: str

    def describe(self) -> str:
        first = next((s for s in self.code.splitlines() if s.strip()), "")
        return f"README.md python block at line {self.line} ({first.strip()!r})"


def python_blocks(text: str) -> list[Block]:
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if re.fullmatch(r"\s*```python\s*", lines[i]):
            start = i
            body = []
            i += 1
            while i < len(lines) and not re.fullmatch(r"\s*```\s*", lines[i]):
                body.append(lines[i])
                i += 1
            assert i < len(lines), f"README.md: unclosed ```python at line {start + 1}"
            blocks.append(Block(start + 1, textwrap.dedent("\n".join(body))))
        i += 1
    return blocks


def tiny_sizes(code: str, saved_path: Path) -> str:
    for pattern, replacement in SIZES:
        code = re.sub(pattern, replacement, code)
    return re.sub(SAVED_SAE_PATH, lambda m: m.group(1) + repr(str(saved_path)), code)


@pytest.fixture
def offline_loaders(monkeypatch):
    """SAELens's hub loading (model, dataset) returns the tests' tiny stand-ins."""
    import sae_lens.llm_sae_training_runner as runner_module
    import sae_lens.training.activations_store as store_module

    monkeypatch.setattr(runner_module, "load_model", lambda *a, **k: tiny_model())
    monkeypatch.setattr(store_module, "load_dataset", lambda *a, **k: token_dataset())


@pytest.fixture
def saved_sae(tmp_path) -> Path:
    """A tiny inference ``sampled`` SAE on disk, random weights."""
    cfg = sae_lens_sampled.SampledSAEConfig(
        d_in=D_MODEL, d_sae=D_SAE, k=K, pool_factor=4, pool_seed=0
    )
    path = tmp_path / "saved_sae"
    sae_lens_sampled.SampledSAE(cfg).save_model(path)
    return path


def stand_in_names(tmp_path: Path) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, D_MODEL, generator=generator)
    return {
        "x": x,  # activations [n_tokens, d_in]
        "batches": [x[:32], x[32:]],  # an iterable of activation batches
        "held_out_batches": [x[:32], x[32:]],
        "path": str(tmp_path / "exported"),  # somewhere to write an SAE
    }


def test_readme_has_python_blocks():
    blocks = python_blocks(README.read_text())
    assert blocks, "README.md has no ```python block; this test would check nothing"
    for block in blocks:
        compile(block.code, block.describe(), "exec")  # a syntax error names its block


def test_sizes_table_rewrites_only_what_it_names(tmp_path):
    code = 'cfg(d_in=768, d_sae=16_384, k=64, topk=9, hook_name="blocks.6.hook_resid_post")'
    assert tiny_sizes(code, tmp_path) == (
        f'cfg(d_in={D_MODEL}, d_sae={D_SAE}, k={K}, topk=9, hook_name="{HOOK}")'
    )
    assert tiny_sizes('SAE.load_from_disk("path/to/output")', tmp_path) == (
        f"SAE.load_from_disk({str(tmp_path)!r})"
    )


def test_readme_python_blocks_run_offline(
    offline_loaders, saved_sae, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # a runner's default output and checkpoint paths
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_blocks(README.read_text(), saved_sae, tmp_path)
    finally:
        torch.set_num_threads(threads)


def test_a_block_without_stand_in_fails_naming_it(offline_loaders, saved_sae, tmp_path):
    text = "Intro\n\n```python\nfrom sae_lens import SAE\n\nSAE.from_pretrained('r', 'i')\n```\n"
    with pytest.raises(pytest.fail.Exception, match="block at line 3 .'from sae_lens"):
        run_blocks(text, saved_sae, tmp_path)


def run_blocks(text: str, saved_sae: Path, tmp_path: Path) -> None:
    namespace: dict[str, Any] = {"__name__": "__readme__", **stand_in_names(tmp_path)}
    for block in python_blocks(text):
        code = tiny_sizes(block.code, saved_sae)
        try:
            exec(compile(code, block.describe(), "exec"), namespace)
        except Exception as error:
            pytest.fail(
                f"{block.describe()} failed with the offline stand-ins: {error!r}. "
                "If it needs a stand-in the tables in tests/test_readme.py lack, add "
                f"it there. The code as run:\n{code}"
            )
        check_results(block, namespace)


def check_results(block: Block, namespace: dict[str, Any]) -> None:
    """What a block leaves behind is what the README says it is."""
    where = block.describe()
    saes = {k: v for k, v in namespace.items() if isinstance(v, SAE | TrainingSAE)}
    for name, sae in saes.items():
        # every SAE a block built or loaded got the tiny sizes (none kept a hub size)
        assert sae.cfg.d_in == D_MODEL, f"{where}: {name}.cfg.d_in is {sae.cfg.d_in}"
    if ".run()" in block.code:
        trained = [v for v in saes.values() if isinstance(v, BatchLevelTrainingSAE)]
        assert trained, f"{where} runs a runner, but leaves no plugin training SAE"
        for sae in trained:  # the rewritten number of tokens, no more, no less
            assert float(sae.n_tokens_seen) == STEPS * BATCH_TOKENS, where
    x = namespace["x"]
    for name, value in namespace.items():
        if not isinstance(value, torch.Tensor) or name == "x":
            continue
        assert torch.isfinite(value).all(), f"{where}: {name} has NaN or Inf entries"
        if name.endswith("_batch") and value.shape == (x.shape[0], D_SAE):
            # the batch rule keeps k codes per token on average
            l0 = (value != 0).sum(-1).float().mean().item()
            assert l0 == pytest.approx(K), f"{where}: {name} has mean L0 {l0}, not {K}"
