"""Coder tables are built on the CPU in float32 whatever the model's device and dtype, and the CPU
copy of the hyperprior is kept until the weights change (issue 18, point 2)."""

import pytest
import torch

from helpers.models import TINY_AUTOENCODER
from illm.models import hific
from illm.models.hific import HiFiCAutoencoder

TABLES = {
    "hyper_bottleneck": ("_quantized_cdf", "_offset", "_cdf_length"),
    "latent_bottleneck": ("_quantized_cdf", "_offset", "_cdf_length", "scale_table"),
}


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = HiFiCAutoencoder(**TINY_AUTOENCODER).eval()
    # quantiles away from their initial integers, so that float64 and float32 tables could differ
    with torch.no_grad():
        model.hyper_bottleneck.quantiles.add_(torch.rand_like(model.hyper_bottleneck.quantiles) * 3.3)
    return model


def image(seed=1):
    return torch.rand(1, 3, 70, 90, generator=torch.Generator().manual_seed(seed))


def tables(model):
    return {
        f"{module}.{name}": getattr(getattr(model, module), name).cpu()
        for module in TABLES
        for name in TABLES[module]
    }


def assert_same_tables(model, reference):
    built, expected = tables(model), tables(reference)
    for name, table in expected.items():
        assert table.numel() > 0, name
        assert built[name].dtype == table.dtype and torch.equal(built[name], table), name


def as_float32(model):
    """A CPU float32 model with ``model``'s weights rounded to float32."""
    reference = tiny_model(seed=99)
    state = model.state_dict()
    reference.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return reference


def test_tables_of_a_float64_model_are_the_cpu_float32_tables():
    double = tiny_model().double()
    with torch.no_grad():  # a lower quantile 3 + 1e-9 below the median: 3 bins in float32, 4 in float64
        quantiles = double.hyper_bottleneck.quantiles
        quantiles[:, 0, 0] = quantiles[:, 0, 1] - 3 - 1e-9
    reference = as_float32(double)
    assert reference.update(force=True)
    assert double.update(force=True)
    assert_same_tables(double, reference)
    # what the old code did: tables from the float64 arithmetic
    old = as_float32(double).double()
    old.hyper_bottleneck.quantiles.data.copy_(quantiles)
    old.hyper_bottleneck.update(force=True)
    assert not torch.equal(old.hyper_bottleneck._offset, reference.hyper_bottleneck._offset)


def test_a_file_from_a_float64_model_is_the_file_of_the_cpu_float32_model():
    reference = tiny_model()
    double = tiny_model().double()
    [(latent_string, hyper_string)] = double.compress(image())
    assert [(latent_string, hyper_string)] == reference.compress(image())
    assert_same_tables(double, reference)  # compress built the tables, on the CPU in float32
    torch.testing.assert_close(
        reference.decompress(latent_string, hyper_string, 70, 90),
        double.decompress(latent_string, hyper_string, 70, 90).float(),
        atol=1e-5,
        rtol=0,
    )


def test_tables_of_a_bf16_model_are_those_of_its_weights_in_float32():
    bf16 = tiny_model().to(torch.bfloat16)
    assert bf16.update(force=True)
    assert bf16.hyper_bottleneck.quantiles.dtype == torch.bfloat16  # the model itself is untouched
    reference = as_float32(bf16)
    reference.update(force=True)
    assert_same_tables(bf16, reference)


@pytest.fixture
def copies(monkeypatch):
    """Counts the CPU copies of the entropy modules."""
    made = []
    copy = hific._cpu_float32_copy

    def counted(module):
        made.append(module)
        return copy(module)

    monkeypatch.setattr(hific, "_cpu_float32_copy", counted)
    return made


def test_the_cpu_copy_is_made_once_for_unchanged_weights(copies):
    double = tiny_model().double()
    double.update(force=True)
    first = len(copies)
    assert first == len(hific._ENTROPY_MODULES)
    strings = double.compress(image())
    double.decompress(*strings[0], 70, 90)
    double.compress(image())
    assert len(copies) == first
    cpu_model = tiny_model()  # nothing to copy on the CPU in float32
    cpu_model.compress(image())
    assert len(copies) == first


def coded_means(model, x):
    """The latent means the entropy coder computes for ``x``'s hyper-latent (through the coder)."""
    coder = model._entropy_coder()
    latent = hific.tiling.encode(model.encoder, hific._pad_to_multiple(x, 64), None)
    [hyper_string] = coder.hyper_bottleneck.compress(coder.hyper_analysis(latent))
    return coder._indexes_and_means(hyper_string, (2, 2))[1]


@pytest.mark.parametrize("change", ["fused_adam_step", "load_state_dict", "update_force"])
def test_the_cpu_copy_follows_the_weights(change, copies):
    double = tiny_model().double()
    before = coded_means(double, image())
    copied = len(copies)
    if change == "fused_adam_step":  # in place, without bumping PyTorch's version counters
        optimizer = torch.optim.Adam(double.parameters(), lr=0.1, fused=True)
        for parameter in double.parameters():
            parameter.grad = torch.ones_like(parameter)
        optimizer.step()
    elif change == "load_state_dict":
        double.load_state_dict(tiny_model(seed=3).double().state_dict())
    else:
        with torch.no_grad():
            double.hyper_synthesis_mean[-1].bias.data += 1.0  # through .data: seen by the values
        double.update(force=True)
    after = coded_means(double, image())
    assert len(copies) > copied
    assert not torch.equal(after, before)
    assert torch.equal(after, coded_means(as_float32(double), image()))
