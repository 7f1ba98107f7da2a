"""The checkpoint's RNG state holds the current CUDA device's RNG only, so that a run resumes with
any number of visible GPUs (issue 18, point 7). CUDA is simulated: a CPU has none."""

import io

import pytest
import torch

from illm import checkpoint


class FakeCuda:
    """`torch.cuda`'s RNG functions for ``visible`` GPUs, this process on ``current``."""

    def __init__(self, visible: int, current: int):
        self.visible, self.current = visible, current
        self.states = {index: torch.full((16,), index, dtype=torch.uint8) for index in range(visible)}

    def install(self, monkeypatch):
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "device_count", lambda: self.visible)
        monkeypatch.setattr(cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(cuda, "get_rng_state", self.get_rng_state)
        monkeypatch.setattr(cuda, "set_rng_state", self.set_rng_state)
        monkeypatch.setattr(cuda, "get_rng_state_all", lambda: [self.states[i] for i in range(self.visible)])
        monkeypatch.setattr(cuda, "set_rng_state_all", self.set_rng_state_all)

    def _index(self, device):
        index = self.current if device in ("cuda", None) else torch.device(device).index
        if index >= self.visible:
            raise RuntimeError(f"invalid device ordinal {index}")
        return index

    def get_rng_state(self, device="cuda"):
        return self.states[self._index(device)].clone()

    def set_rng_state(self, state, device="cuda"):
        self.states[self._index(device)] = state.clone()

    def set_rng_state_all(self, states):
        for index, state in enumerate(states):
            self.set_rng_state(state, f"cuda:{index}")


def through_a_file(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("saved_on, resumed_on", [((4, 2), (1, 0)), ((1, 0), (8, 5)), ((2, 1), (2, 1))])
def test_the_current_devices_state_resumes_on_any_number_of_gpus(monkeypatch, saved_on, resumed_on):
    before = FakeCuda(*saved_on)
    before.install(monkeypatch)
    state = through_a_file(checkpoint.rng_state())
    assert torch.equal(state["cuda"], before.states[saved_on[1]])  # one device's state, not a list

    after = FakeCuda(*resumed_on)
    after.install(monkeypatch)
    checkpoint.set_rng_state(state)
    assert torch.equal(after.states[resumed_on[1]], before.states[saved_on[1]])
    others = [index for index in range(resumed_on[0]) if index != resumed_on[1]]
    assert all(torch.equal(after.states[i], torch.full((16,), i, dtype=torch.uint8)) for i in others)


@pytest.mark.parametrize("current, expected", [(1, 1), (3, None)])
def test_older_checkpoints_with_every_gpus_state_still_resume(monkeypatch, current, expected):
    before = FakeCuda(2, 0)
    before.install(monkeypatch)
    state = checkpoint.rng_state()
    state["cuda"] = [before.states[0], torch.full((16,), 77, dtype=torch.uint8)]  # as written before
    after = FakeCuda(4, current)
    after.install(monkeypatch)
    checkpoint.set_rng_state(through_a_file(state))
    restored = after.states[current]
    if expected is None:  # this device had no saved state: left as it was, no error
        assert torch.equal(restored, torch.full((16,), current, dtype=torch.uint8))
    else:
        assert torch.equal(restored, state["cuda"][expected])


def test_cpu_only_states_have_no_cuda_entry(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    state = checkpoint.rng_state()
    assert "cuda" not in state
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(4)
    state = checkpoint.rng_state()
    checkpoint.set_rng_state(state)
    first = torch.rand(3)
    checkpoint.set_rng_state(state)
    assert torch.equal(torch.rand(3), first) and not torch.equal(first, expected)
