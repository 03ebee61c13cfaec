"""The shared Trainer helpers (``lightning_utils``): placement on the model's device, overrides, and the
device a model is left on after a run (Lightning's teardown moves it to the CPU)."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from anyedit_lightning.core.lightning_utils import call_keeping_device, trainer_for


def test_trainer_for_places_on_the_model_device_and_takes_overrides():
    model = tiny_model("llama")
    trainer = trainer_for(model, logger=False, max_epochs=3)
    assert trainer.accelerator.__class__.__name__ == "CPUAccelerator"
    assert trainer.max_epochs == 3 and trainer.logger is None
    assert trainer.checkpoint_callback is None
    assert trainer_for(model, accelerator=None, devices=None).num_devices == 1  # None keeps the model's


def test_call_keeping_device_moves_the_model_back_even_when_the_run_fails():
    assert call_keeping_device(torch.nn.Linear(1, 1), lambda value: value, 7) == 7
    model = torch.nn.Linear(2, 2)
    moves: list[tuple] = []
    model.to = lambda *args, **kwargs: moves.append(args)  # records instead of moving

    def teardown_then_fail():  # a run whose teardown left the model elsewhere (as Lightning's does)
        model.weight = torch.nn.Parameter(torch.empty(2, 2, device="meta"))
        raise RuntimeError("injected")

    with pytest.raises(RuntimeError, match="injected"):
        call_keeping_device(model, teardown_then_fail)
    assert moves == [(torch.device("cpu"),)]
