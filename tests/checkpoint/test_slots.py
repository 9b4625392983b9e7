"""One rank's two snapshot slots: round trip in place, and a crash while writing one leaves the
other whole."""

import pytest
import torch

from skipjack.checkpoint import slots as slots_module
from skipjack.checkpoint.slots import Slots


def state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model/w": torch.randn(3, 5, generator=g),
        "model/h": torch.randn(7, generator=g).to(torch.bfloat16),
        "optim/step": torch.tensor(float(seed)),
        "trainer/step": seed,
        "loader/name": f"at {seed}",
    }


def test_round_trip_in_place_and_both_slots(tmp_path):
    slots = Slots(tmp_path, 3)
    slots.write(1, state(1))
    slots.write(2, state(2))
    assert slots.steps() == {1: 0, 2: 1}
    target = state(9)
    w = target["model/w"]
    slots.read(1, target)
    assert target["model/w"] is w  # filled in place
    for key, value in state(1).items():
        got = target[key]
        assert torch.equal(got, value) if torch.is_tensor(value) else got == value
    slots.write(3, state(3))  # replaces the older slot
    assert slots.steps() == {2: 1, 3: 0}


def test_a_crash_while_writing_leaves_the_other_snapshot_whole(tmp_path, monkeypatch):
    slots = Slots(tmp_path, 0)
    slots.write(1, state(1))
    slots.write(2, state(2))
    calls = []

    def dying(tensor):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return tensor.detach().reshape(-1).view(torch.uint8).numpy()

    monkeypatch.setattr(slots_module, "_bytes_of", dying)
    with pytest.raises(RuntimeError, match="killed"):
        slots.write(3, state(3))
    assert slots.steps() == {2: 1}  # step 1's slot was being rewritten: gone, step 2 whole
    target = state(0)
    slots.read(2, target)
    assert torch.equal(target["model/w"], state(2)["model/w"])
    with pytest.raises(ValueError, match="model/w: the snapshot holds"):
        slots.read(2, {**state(0), "model/w": torch.zeros(2)})
