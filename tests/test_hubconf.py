"""hubconf.py: torch.hub entry points under the official names, loading the official-format
weights from the hub cache (never from the network: the `offline` fixture)."""

import runpy

import torch

from helpers.models import tiny_autoencoder
from helpers.paths import REPO
from illm import official
from illm.models.discriminator import ConditionalUNetDiscriminator
from illm.models.hific import HiFiCAutoencoder


def test_entry_points_are_the_official_names_and_the_discriminator():
    hub = runpy.run_path(str(REPO / "hubconf.py"))
    entries = {name for name, value in hub.items() if callable(value) and not name.startswith("_")}
    expected = {f"msillm_quality_{q}" for q in ("vlo1", "vlo2", 1, 2, 3, 4, 5, 6)}
    expected |= {f"noganms_quality_{q}" for q in range(1, 7)}
    expected |= {"msillm_vqvae_xcit_p8_ch64_cb1024_h8", "discriminator"}
    assert entries == expected
    assert (
        "0.14 bpp" in hub["msillm_quality_3"].__doc__
        and "RANDOMLY INITIALISED" in hub["discriminator"].__doc__
    )


def test_hub_load_reads_the_official_weights_from_the_cache(offline):
    reference = tiny_autoencoder(seed=3)
    offline.mkdir(parents=True)
    torch.save(reference.state_dict(), offline / "msillm_target_0.14bpp.ckpt")  # the official file name
    model = torch.hub.load(str(REPO), "msillm_quality_3", source="local")
    assert isinstance(model, HiFiCAutoencoder) and not model.training
    state = model.state_dict()
    assert all(torch.equal(state[key], value) for key, value in reference.state_dict().items())
    assert official.OFFICIAL_WEIGHTS["msillm_quality_3"].endswith("/msillm_target_0.14bpp.ckpt")


def test_hub_discriminator_is_random_and_configurable(offline):
    small = dict(num_classes=5, context_in_channels=8, context_out_channels=4, channels=(7, 8, 8, 16, 16))
    torch.manual_seed(0)
    first = torch.hub.load(str(REPO), "discriminator", source="local", **small)
    torch.manual_seed(1)
    second = torch.hub.load(str(REPO), "discriminator", source="local", **small)
    assert isinstance(first, ConditionalUNetDiscriminator)
    assert not torch.equal(next(first.parameters()), next(second.parameters()))
