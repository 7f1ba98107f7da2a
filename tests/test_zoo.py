"""Loading weights: official names (never downloading), state dicts, checkpoints, run folders."""

import pytest
import torch

from helpers.models import TINY_AUTOENCODER, TINY_VQVAE
from helpers.paths import REPO
from illm import codec, download, zoo
from illm.config import load_config
from illm.errors import IllmError, MissingWeightsError
from illm.experiment import FinetuneConfig
from illm.models.discriminator import ConditionalUNetDiscriminator
from illm.models.hific import HiFiCAutoencoder
from illm.models.vqvae import VQVAE
from illm.stages.finetune import load_labeller

TINY_DISCRIMINATOR = dict(
    num_classes=5, context_in_channels=8, context_out_channels=4, channels=(7, 8, 8, 16, 16)
)


class NotWeights:
    """Pickled by torch.save as a reference to this class: weights_only loading must refuse it."""


def tiny_autoencoder(seed: int = 0) -> HiFiCAutoencoder:
    """Built through the zoo: training mode, no coder tables (unlike `helpers.models.tiny_autoencoder`)."""
    torch.manual_seed(seed)
    return zoo.autoencoder(**TINY_AUTOENCODER)


def same_weights(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    first_state, second_state = first.state_dict(), second.state_dict()
    return first_state.keys() == second_state.keys() and all(
        torch.equal(first_state[key], second_state[key]) for key in first_state
    )


def training_checkpoint(step: int, **models: torch.nn.Module) -> dict:
    return {
        "illm_checkpoint": 1,
        "step": step,
        "models": {name: model.state_dict() for name, model in models.items()},
        "optimizers": {},
    }


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub cache where every download fails as it would without network."""

    def no_network(url, destination, *args, **kwargs):
        raise OSError(f"network is unreachable: {url}")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(download, "_fetch", no_network)
    monkeypatch.setattr(zoo, "_license_shown", False)
    return tmp_path / "hub" / "checkpoints"


def test_official_names_and_urls():
    names = [f"msillm_quality_{q}" for q in ("vlo1", "vlo2", 1, 2, 3, 4, 5, 6)]
    names += [f"noganms_quality_{q}" for q in range(1, 7)] + ["vqvae_xcit_p8_ch64_cb1024_h8"]
    assert sorted(zoo.OFFICIAL_WEIGHTS) == sorted(names)
    base = "https://dl.fbaipublicfiles.com/NeuralCompression/2023-muckley-msillm/"
    assert zoo.OFFICIAL_WEIGHTS["msillm_quality_vlo1"] == base + "msillm_target_0.00218bpp.ckpt"
    assert zoo.OFFICIAL_WEIGHTS["msillm_quality_4"] == base + "msillm_target_0.3bpp.ckpt"
    assert zoo.OFFICIAL_WEIGHTS["noganms_quality_1"] == base + "noganms_target_0.035bpp.ckpt"
    assert zoo.OFFICIAL_WEIGHTS["noganms_quality_6"] == base + "noganms_target_0.9bpp.ckpt"
    assert zoo.OFFICIAL_WEIGHTS["vqvae_xcit_p8_ch64_cb1024_h8"] == base + "vqvae_xcit_p8_ch64_cb1024_h8.ckpt"


def test_official_name_offline_is_a_one_line_missing_weights_error(offline_hub, capsys):
    for _ in range(2):
        with pytest.raises(MissingWeightsError) as error:
            zoo.load("msillm_quality_3")
        message = str(error.value)
        assert "\n" not in message
        assert str(offline_hub / "msillm_target_0.14bpp.ckpt") in message  # where to put the file
        assert zoo.OFFICIAL_WEIGHTS["msillm_quality_3"] in message  # where to get it
    assert capsys.readouterr().err.count("CC-BY-NC 4.0") == 1  # the licence notice, once


def test_official_name_downloads_into_the_hub_cache(offline_hub, monkeypatch):
    reference = tiny_autoencoder()
    downloads = []

    def fake_download(url, destination, *args, **kwargs):
        downloads.append(url)
        torch.save(reference.state_dict(), destination)

    monkeypatch.setattr(download, "_fetch", fake_download)
    first = zoo.load("noganms_quality_2")
    second = zoo.load("noganms_quality_2")  # from the cache: no second download
    assert downloads == [zoo.OFFICIAL_WEIGHTS["noganms_quality_2"]]
    assert (offline_hub / "noganms_target_0.07bpp.ckpt").is_file()
    assert same_weights(first, second)
    assert codec.weights_id(first) == codec.weights_id(second)


def test_official_torch_hub_labeller_name_loads_the_same_file(offline_hub, monkeypatch):
    """`msillm_vqvae_xcit_p8_ch64_cb1024_h8` (the official torch.hub name) is our labeller name."""
    downloads = []

    def fake_download(url, destination, *args, **kwargs):
        downloads.append(url)
        torch.manual_seed(0)
        torch.save(
            zoo.vqvae(ch=8, ch_mult=(1, 1, 1, 1), embed_dim=8, attention_levels=()).state_dict(), destination
        )

    monkeypatch.setattr(download, "_fetch", fake_download)
    by_hub_name = zoo.load("msillm_vqvae_xcit_p8_ch64_cb1024_h8", kind="vqvae")
    by_our_name = zoo.load("vqvae_xcit_p8_ch64_cb1024_h8", kind="vqvae")
    assert downloads == [zoo.OFFICIAL_WEIGHTS["vqvae_xcit_p8_ch64_cb1024_h8"]]  # one file, cached
    assert same_weights(by_hub_name, by_our_name)
    cfg = load_config(
        FinetuneConfig,
        REPO / "configs" / "finetune_0.14bpp.toml",
        ["init.labeller=msillm_vqvae_xcit_p8_ch64_cb1024_h8"],
    )
    assert same_weights(load_labeller(cfg.init.labeller), by_our_name)


def test_official_vqvae_name_is_not_an_autoencoder(offline_hub):
    with pytest.raises(IllmError, match="vqvae weights, not autoencoder weights"):
        zoo.load("vqvae_xcit_p8_ch64_cb1024_h8")


def test_unknown_name_suggests_the_closest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(IllmError, match=r"did you mean 'msillm_quality_6'\?.*noganms_quality_1") as error:
        zoo.load("msillm_quality6")
    assert "\n" not in str(error.value)
    with pytest.raises(IllmError, match="no such file"):
        zoo.load(tmp_path / "absent.pt")


def test_plain_state_dict_file_loads_ready_to_code(tmp_path):
    reference = tiny_autoencoder()  # never updated: the loader builds the coder tables
    torch.save(reference.state_dict(), tmp_path / "weights.pt")
    model = zoo.load(tmp_path / "weights.pt")
    assert isinstance(model, HiFiCAutoencoder) and not model.training
    parameters = dict(model.named_parameters())
    assert all(torch.equal(parameters[name], value) for name, value in reference.named_parameters())
    image = torch.rand(1, 3, 40, 24)
    assert codec.decompress(model, codec.compress(model, image)).shape == image.shape


def test_stored_coder_tables_are_kept(tmp_path):
    reference = tiny_autoencoder()
    reference.update(force=True)
    torch.save(reference.state_dict(), tmp_path / "weights.pt")
    assert codec.weights_id(zoo.load(tmp_path / "weights.pt")) == codec.weights_id(reference)


def test_training_checkpoint_and_run_folder(tmp_path):
    autoencoders = {step: tiny_autoencoder(seed=step) for step in (9, 10)}
    labeller = VQVAE(**TINY_VQVAE)
    critic = ConditionalUNetDiscriminator(**TINY_DISCRIMINATOR)
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    for step, autoencoder in autoencoders.items():
        checkpoint = training_checkpoint(step, autoencoder=autoencoder, vqvae=labeller, discriminator=critic)
        torch.save(checkpoint, folder / f"step_{step:08d}.pt")

    from_file = zoo.load(folder / "step_00000009.pt")
    assert same_weights(from_file.encoder, autoencoders[9].encoder)
    from_run = zoo.load(tmp_path / "run")  # the latest step, ordered by number
    assert same_weights(from_run.decoder, autoencoders[10].decoder)
    assert same_weights(zoo.load(tmp_path / "run", kind="vqvae"), labeller)
    assert same_weights(zoo.load(tmp_path / "run", kind="discriminator"), critic)


def test_checkpoint_without_the_requested_model(tmp_path):
    torch.save(training_checkpoint(1, vqvae=VQVAE(**TINY_VQVAE)), tmp_path / "stage0.pt")
    with pytest.raises(IllmError, match="without autoencoder weights.*vqvae"):
        zoo.load(tmp_path / "stage0.pt")


def test_run_folder_without_checkpoints(tmp_path):
    with pytest.raises(IllmError, match="without checkpoints"):
        zoo.load(tmp_path)


def test_pickled_code_is_refused(tmp_path):
    torch.save({"weights": NotWeights()}, tmp_path / "evil.pt")
    with pytest.raises(IllmError, match=r"weights_only.*NotWeights") as error:
        zoo.load(tmp_path / "evil.pt")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("notes.pt", b"not a checkpoint at all", "not a PyTorch state dict"),
        ("tensor.pt", torch.zeros(3), "not a state dict"),
        ("numbers.pt", {"a": 1}, "not a state dict"),
        ("empty.pt", {}, "not a state dict"),
        (
            "critic.pt",
            ConditionalUNetDiscriminator(**TINY_DISCRIMINATOR).state_dict(),
            "critic.pt: .*autoencoder",
        ),
    ],
)
def test_files_that_are_not_autoencoder_weights(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
    with pytest.raises(IllmError, match=message) as error:
        zoo.load(path)
    assert "\n" not in str(error.value)


def test_unknown_kind(tmp_path):
    with pytest.raises(IllmError, match="unknown network kind"):
        zoo.load(tmp_path, kind="generator")


def test_builders_return_the_classes():
    assert isinstance(tiny_autoencoder(), HiFiCAutoencoder)
    assert zoo.vqvae(**TINY_VQVAE).num_codes == 32
    assert isinstance(zoo.discriminator(**TINY_DISCRIMINATOR), ConditionalUNetDiscriminator)
