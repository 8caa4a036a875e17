"""One graph: ``torch.compile(sae.training_forward_pass, fullgraph=True)`` traces the
whole training step of every architecture, with the loss, gradients and state of the
eager step; and SAELens's runner trains with ``compile_sae=True``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import LanguageModelSAETrainingRunner
from sae_lens.saes.sae import TrainStepInput

from benchmarks.op_audit import AuditShape, audit_sae
from tests.helpers import D_MODEL, runner_config, tiny_model, token_dataset

SHAPE = AuditShape(d_in=16, d_sae=64, k=4, n_tokens=32, n_dead=8)
ARCHITECTURES: list[tuple[str, dict[str, Any]]] = [
    ("mutual_choice", {}),
    ("sampled", {}),
    # re-ranked on step 2: the compiled step re-ranks on the device
    ("feature_choice", {"rerank_every": 2}),
]
IDS = [name for name, _ in ARCHITECTURES]


def _inputs(steps: int) -> list[TrainStepInput]:
    generator = torch.Generator().manual_seed(1)
    dead = torch.zeros(SHAPE.d_sae, dtype=torch.bool)
    dead[: SHAPE.n_dead] = True
    return [
        TrainStepInput(
            sae_in=torch.randn(SHAPE.n_tokens, SHAPE.d_in, generator=generator),
            coefficients={"aux_loss_coefficient": 1.0},
            dead_neuron_mask=dead,
            n_training_steps=step,
            is_logging_step=False,
        )
        for step in range(steps)
    ]


def _run(sae: Any, forward: Any, steps: int) -> list[tuple[torch.Tensor, ...]]:
    results = []
    for step, step_input in enumerate(_inputs(steps)):
        torch.manual_seed(step)  # the same pool draws for sampled
        output = forward(step_input)
        output.loss.backward()
        params = (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
        results.append(
            (output.loss.detach(), *(p.grad.clone() for p in params))  # type: ignore[union-attr]
        )
        with torch.no_grad():
            for param in params:
                param -= 1e-2 * param.grad
        sae.zero_grad()
    return results


def _check_equal(
    eager_sae: Any, compiled_sae: Any, eager: list[Any], compiled: list[Any]
) -> None:
    for eager_step, compiled_step in zip(eager, compiled, strict=True):
        for a, b in zip(eager_step, compiled_step, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    compiled_state = compiled_sae.state_dict()
    for name, value in eager_sae.state_dict().items():
        torch.testing.assert_close(compiled_state[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("architecture", "fields"), ARCHITECTURES, ids=IDS)
def test_fullgraph_compile_matches_eager(architecture: str, fields: dict[str, Any]):
    torch._dynamo.reset()
    eager_sae = audit_sae(architecture, SHAPE, **fields)
    compiled_sae = copy.deepcopy(eager_sae)
    compiled = torch.compile(
        compiled_sae.training_forward_pass, fullgraph=True, backend="aot_eager"
    )
    steps = 3
    _check_equal(
        eager_sae,
        compiled_sae,
        _run(eager_sae, eager_sae.training_forward_pass, steps),
        _run(compiled_sae, compiled, steps),
    )


@pytest.mark.slow
def test_inductor_compile_matches_eager():
    torch._dynamo.reset()
    eager_sae = audit_sae("mutual_choice", SHAPE)
    compiled_sae = copy.deepcopy(eager_sae)
    compiled = torch.compile(compiled_sae.training_forward_pass, fullgraph=True)
    _check_equal(
        eager_sae,
        compiled_sae,
        _run(eager_sae, eager_sae.training_forward_pass, 2),
        _run(compiled_sae, compiled, 2),
    )


@pytest.mark.slow
@pytest.mark.parametrize("architecture", [name for name, _ in ARCHITECTURES])
def test_runner_trains_with_compile_sae(architecture: str, tmp_path: Path):
    from sae_lens.registry import get_sae_training_class

    torch._dynamo.reset()
    _, cfg_class = get_sae_training_class(architecture)
    cfg = cfg_class(d_in=D_MODEL, d_sae=64, k=4)  # type: ignore[call-arg]
    runner_cfg = runner_config(cfg, tmp_path, steps=4, compile_sae=True)
    runner = LanguageModelSAETrainingRunner(
        runner_cfg,
        override_model=tiny_model(),
        override_dataset=token_dataset(),
    )
    sae = runner.run()
    assert sae.training_forward_pass is not type(sae).training_forward_pass
    assert all(torch.isfinite(p).all() for p in sae.parameters())
    assert sae.n_tokens_seen.item() == 4 * 128
    assert (tmp_path / "final").exists()
