"""The discriminator against the official implementation's golden outputs (full-size model)."""

import pytest
import torch
from fill_weights import fill_

from illm.models.discriminator import ConditionalUNetDiscriminator


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.fixture(scope="module")
def filled_model(golden):
    model = ConditionalUNetDiscriminator()
    fill_(model, salt=golden["salt"])
    return model.eval()


def test_state_dict_matches_official_manifest(filled_model, golden):
    manifest = golden["discriminator"]["state_dict"]
    state = filled_model.state_dict()
    assert list(state) == list(manifest)
    for name, (shape, dtype) in manifest.items():
        assert (tuple(state[name].shape), str(state[name].dtype)) == (tuple(shape), dtype), name

    built = {
        name: torch.zeros(shape, dtype=getattr(torch, dtype.removeprefix("torch.")))
        for name, (shape, dtype) in manifest.items()
    }
    ConditionalUNetDiscriminator().load_state_dict(built, strict=True)


def test_from_state_dict_infers_official_architecture(filled_model):
    model = ConditionalUNetDiscriminator.from_state_dict(filled_model.state_dict())
    assert model.num_classes == 1025
    assert model.context_in_channels == 220
    assert model.channels == (19, 128, 128, 256, 256, 512, 512)
    assert model.output_factor == 8
    assert model.norm_type == "identity"


def test_logits_match_official(filled_model, golden):
    images = golden["image_u8"].float().unsqueeze(0) / 255
    context = golden["hific"]["forward_latent"]
    with torch.no_grad():
        logits = filled_model(images, context)
    expected = golden["discriminator"]["logits"]
    assert logits.shape == expected.shape
    assert _relative_error(logits, expected) < 1e-4
