"""NaN/Inf guard: a planted non-finite loss term or gradient is caught and named (or skipped)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from galip.module import NonFiniteError
from tests.helpers import build, one_batch_trainer, smoke_cfg


def module_with(tmp_path, nonfinite: str):
    module, datamodule = build(smoke_cfg(tmp_path))
    module.nonfinite = nonfinite
    return module, datamodule


def test_nan_in_a_discriminator_term_stops_naming_it(tmp_path):
    module, datamodule = module_with(tmp_path, "stop")
    with torch.no_grad():
        module.discriminator.assessor.parameters().__next__().fill_(float("nan"))
    with pytest.raises(
        NonFiniteError, match=r"non-finite loss term d/real, d/fake, d/mismatch.* at batch 1, step 0"
    ):
        one_batch_trainer().fit(module, datamodule=datamodule)


def poison_grad(param: torch.nn.Parameter) -> None:
    param.register_hook(lambda grad: grad * float("nan"))


def test_nan_gradient_stops_naming_the_parameter(tmp_path):
    module, datamodule = module_with(tmp_path, "stop")
    name, param = next((n, p) for n, p in module.generator.named_parameters() if p.requires_grad)
    poison_grad(param)
    with pytest.raises(NonFiniteError, match=rf"non-finite gradient of generator\.{name}"):
        one_batch_trainer().fit(module, datamodule=datamodule)


def test_skip_policy_drops_the_step_and_counts_it(tmp_path):
    module, datamodule = module_with(tmp_path, "skip")
    param = next(p for p in module.generator.parameters() if p.requires_grad)
    before = param.detach().clone()
    poison_grad(param)
    d_before = next(module.discriminator.parameters()).detach().clone()
    one_batch_trainer().fit(module, datamodule=datamodule)
    assert module.skipped_steps == 1
    torch.testing.assert_close(param.detach(), before, rtol=0, atol=0)  # G's step was dropped
    assert torch.isfinite(param).all()
    assert not torch.equal(next(module.discriminator.parameters()).detach(), d_before)  # D still trained


def test_entry_point_names_the_term_and_exits_3(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "galip.train",
            "+experiment=smoke",
            "model.loss.sim_weight=nan",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**__import__("os").environ, "GALIP_ROOT": str(tmp_path)},
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "galip: non-finite loss term g/loss at batch 1, step 1" in proc.stderr
