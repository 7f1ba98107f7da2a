"""``--precision bf16``: only the encoder's analysis transform and the generator run in bf16.

A file decodes to the same latent whatever precision wrote or reads it (the hyperprior path and
the entropy coder stay float32), so only the generator's output may differ.

What makes the PSNR checks meaningful with an untrained tiny model (random weights reconstruct
at 5-10 dB, so "within 0.1 dB of fp32 against the photo" alone would prove little): the tests
measure bf16's own effect directly, as the PSNR between the bf16 and the float32 generator
outputs for the same file, on real photos. At `MIN_DEVIATION_PSNR` = 47 dB or more, a deviation
independent of the coding error costs under 0.1 dB against any reconstruction of 30 dB or less
(the official models' range: 10 log10(1 + 10^-1.7) = 0.08 dB). The bf16 encoder is checked by
the share of latent values it rounds differently. scripts/benchmark_codec.py reports the same
figures for the full-size architecture.
"""

import pytest
import torch
from skimage import data

from helpers.models import tiny_autoencoder
from illm import codec, tiling, zoo
from illm.cli import main
from illm.errors import IllmError

PHOTOS = ("astronaut", "coffee", "chelsea")
MIN_DEVIATION_PSNR = 47.0


def photo(name: str) -> torch.Tensor:
    """A 128 x 192 crop of a scikit-image photo, float in [0, 1]."""
    pixels = getattr(data, name)()[64:192, 64:256]
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div(255)


def psnr(first: torch.Tensor, second: torch.Tensor) -> float:
    quantized = [(image * 255).round() for image in (first, second)]
    return (10 * torch.log10(255**2 / (quantized[0] - quantized[1]).pow(2).mean())).item()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("precision") / "weights.pt"
    torch.save(tiny_autoencoder(seed=4).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def models(weights, tmp_path_factory):
    """{"fp32": model, "bf16": model} from one weights file, and the weights id."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ILLM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        loaded = {
            precision: zoo.load_for_coding(weights, precision=precision) for precision in ("fp32", "bf16")
        }
    (_, fp32_id), (_, bf16_id) = loaded["fp32"], loaded["bf16"]
    assert fp32_id == bf16_id
    return {precision: model for precision, (model, _) in loaded.items()}, fp32_id


def decoded_latents(model, data: bytes, model_id: bytes) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The latents that the entropy decoder handed to the generator while decoding ``data``,
    and the image."""
    latents = []
    generate = tiling.generate

    def recording(generator, latent, tile):
        latents.append(latent.clone())
        return generate(generator, latent, tile)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiling, "generate", recording)
        image = codec.decompress(model, data, model_id=model_id)
    return latents, image


def test_only_the_encoder_and_generator_are_bf16(models):
    (networks, _) = models
    for name, tensor in networks["bf16"].state_dict().items():
        if tensor.is_floating_point():
            expected = torch.bfloat16 if name.startswith(("encoder.", "decoder.")) else torch.float32
            assert tensor.dtype == expected, name


@pytest.mark.parametrize("name", PHOTOS)
def test_a_file_decodes_to_the_same_latent_in_both_precisions(models, name):
    (networks, model_id) = models
    image = photo(name)
    for writer in ("fp32", "bf16"):
        data = codec.compress(networks[writer], image, model_id=model_id)
        fp32_latents, fp32_image = decoded_latents(networks["fp32"], data, model_id)
        bf16_latents, bf16_image = decoded_latents(networks["bf16"], data, model_id)
        assert len(fp32_latents) == len(bf16_latents) >= 1
        for fp32_latent, bf16_latent in zip(fp32_latents, bf16_latents):
            assert fp32_latent.dtype == bf16_latent.dtype == torch.float32
            assert torch.equal(fp32_latent, bf16_latent)
        assert bf16_image.dtype == torch.float32 and bf16_image.shape == fp32_image.shape
        # the generator's output is all that differs, and by little
        assert psnr(bf16_image, fp32_image) >= MIN_DEVIATION_PSNR
        assert abs(psnr(bf16_image, image) - psnr(fp32_image, image)) < 0.1


@pytest.mark.parametrize("name", PHOTOS)
def test_bf16_end_to_end_psnr_is_within_0_1_db_of_fp32(models, name):
    """bf16 both ways against fp32 both ways. The bf16 encoder may put a latent value on the
    other side of a rounding boundary: few may change (an untrained generator amplifies each)."""
    (networks, model_id) = models
    image = photo(name)
    files = {
        precision: codec.compress(networks[precision], image, model_id=model_id) for precision in networks
    }
    (fp32_latent,), fp32 = decoded_latents(networks["fp32"], files["fp32"], model_id)
    (bf16_latent,), bf16 = decoded_latents(networks["bf16"], files["bf16"], model_id)
    assert (fp32_latent != bf16_latent).float().mean() <= 0.02
    assert abs(psnr(bf16, image) - psnr(fp32, image)) < 0.1


def test_fp32_stays_the_default_and_bit_exact(models, weights):
    """The default load is float32 and codes exactly as the weights' own model does."""
    (networks, model_id) = models
    reference = tiny_autoencoder(seed=4)
    assert zoo.load(weights).decoder.blocks[-1].weight.dtype == torch.float32
    image = photo("astronaut")
    data = codec.compress(networks["fp32"], image, model_id=model_id)
    assert data == codec.compress(reference, image)
    assert torch.equal(
        codec.decompress(networks["fp32"], data, model_id=model_id), codec.decompress(reference, data)
    )


def test_cli_bf16_round_trip(weights, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("ILLM_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "photo.png"
    Image.fromarray(data.coffee()[64:192, 64:256]).save(source)
    common = ["--weights", str(weights), "--device", "cpu"]
    assert (
        main(["compress", *common, "--precision", "bf16", str(source), "-o", str(tmp_path / "a.illm")]) == 0
    )
    for precision in ("fp32", "bf16"):
        output = tmp_path / f"{precision}.png"
        assert (
            main(
                ["decompress", *common, "--precision", precision, str(tmp_path / "a.illm"), "-o", str(output)]
            )
            == 0
        )
        assert output.is_file()


def test_unknown_precision_is_a_one_line_error(weights, capsys):
    with pytest.raises(IllmError, match="unknown precision 'fp16'"):
        zoo.load(weights, precision="fp16")
    with pytest.raises(IllmError, match="precision is for the autoencoder"):
        zoo.load(weights, kind="vqvae", precision="bf16")
    with pytest.raises(SystemExit):
        main(["compress", "--weights", str(weights), "--precision", "fp16", "x.png"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err


def test_evaluate_with_bf16_codes_the_same_files_as_fp32_decodes(weights, tmp_path, monkeypatch):
    """scripts/evaluate.py --precision bf16: it is recorded, and its PSNR is within 0.1 dB."""
    import csv
    import json

    from PIL import Image

    from illm import evaluate

    monkeypatch.setenv("ILLM_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in PHOTOS:
        Image.fromarray(getattr(data, name)()[64:192, 64:256]).save(folder / f"{name}.png")
    psnrs = {}
    for precision in ("fp32", "bf16"):
        output = tmp_path / precision
        argv = ["--weights", str(weights), "--data", f"photos={folder}", "-o", str(output), "--device", "cpu"]
        assert evaluate.main([*argv, "--metrics", "psnr", "--precision", precision]) == 0
        assert json.loads((output / "evaluation.json").read_text())["precision"] == precision
        with open(output / "results.csv") as file:
            (row,) = csv.DictReader(file)
        psnrs[precision] = float(row["psnr"])
    assert abs(psnrs["bf16"] - psnrs["fp32"]) < 0.1


def test_a_bf16_model_needs_the_weights_id_given(models):
    """Its own weights hash differently from the float32 ones: no silent id of the bf16 copy."""
    (networks, model_id) = models
    image = photo("coffee")
    with pytest.raises(IllmError, match="pass model_id"):
        codec.compress(networks["bf16"], image)
    data = codec.compress(networks["bf16"], image, model_id=model_id)
    with pytest.raises(IllmError, match="pass model_id"):
        codec.decompress(networks["bf16"], data)
    assert codec.decompress(networks["fp32"], data).shape == (1, 3, 128, 192)
