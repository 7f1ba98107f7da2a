"""The VQ-VAE labeller against outputs of the official implementation (tests/reference)."""

import pytest
import torch
from fill_weights import fill_

from illm.models.vqvae import VQVAE


@pytest.fixture(scope="module")
def official(golden):
    model = VQVAE()
    fill_(model, salt=golden["salt"])
    return model.eval()


@pytest.fixture(scope="module")
def image(golden):
    return golden["image_u8"].float().div(255).unsqueeze(0)


def _manifest_state_dict(golden):
    return {
        name: torch.zeros(shape, dtype=getattr(torch, dtype.removeprefix("torch.")))
        for name, (shape, dtype) in golden["vqvae"]["state_dict"].items()
    }


def test_state_dict_matches_manifest(official, golden):
    ours = {k: (tuple(v.shape), str(v.dtype)) for k, v in official.state_dict().items()}
    manifest = golden["vqvae"]["state_dict"]
    theirs = {k: (tuple(shape), dtype) for k, (shape, dtype) in manifest.items()}
    assert ours == theirs


def test_manifest_state_dict_loads_strict(golden):
    state_dict = _manifest_state_dict(golden)
    VQVAE().load_state_dict(state_dict, strict=True)
    assert VQVAE.from_state_dict(state_dict).config == VQVAE().config


def test_labels_match_official(official, image, golden):
    labels = official.labels(image)
    assert labels.dtype == torch.int64
    assert torch.equal(labels, golden["vqvae"]["labels"])


def test_reconstruction_matches_official(official, image, golden):
    with torch.no_grad():
        output = official(image)
    reference = golden["vqvae"]["image"]
    assert output.images.shape == reference.shape
    assert torch.equal(output.indices, golden["vqvae"]["labels"])
    error = (output.images - reference).norm() / reference.norm()
    assert error < 1e-4
