"""A folder of JPEG and PNG images as a stream's input: decoded, resized, cropped and normalised as read."""

import numpy as np
import pytest

import hetero
from hetero.errors import HeteroError
from hetero.images import ImageFolder
from hetero.stream import PROGRESS

from .conftest import SMALL_NETWORK

Image = pytest.importorskip("PIL.Image")


def _folder(path, count, size=(40, 30)):
    path.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (size[1] + i, size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    return path


def test_images_become_normalised_centre_crops(tmp_path):
    folder = _folder(tmp_path / "images", 3)
    images = ImageFolder(folder, (3, 16, 16), threads=2)
    batch = images[0:3]
    assert batch.shape == (3, 3, 16, 16) and batch.dtype == np.float32
    with Image.open(folder / "001.png") as image:  # 40 x 31: the shorter side becomes 16 * 256 / 224
        short = round(16 * 256 / 224)
        resized = image.convert("RGB").resize((int(short * 40 / 31), short), Image.Resampling.BILINEAR)
        left, top = (resized.width - 16) // 2, (resized.height - 16) // 2
        crop = np.asarray(resized.crop((left, top, left + 16, top + 16)), np.float32) / 255
    expected = ((crop - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).transpose(2, 0, 1)
    np.testing.assert_allclose(batch[1], expected, rtol=1e-5, atol=1e-5)


def test_a_folder_streams_like_the_array_of_its_images(tmp_path):
    folder = _folder(tmp_path / "images", 12, size=(260, 240))
    network = hetero.get_network(SMALL_NETWORK)
    options = dict(table=tmp_path / "t.json", profile_batches=[1, 4], progress=False)
    hetero.stream(network, "cpu", folder, tmp_path / "out.npy", **options)
    decoded = ImageFolder(folder, network.input_shape)[0:12]
    expected = hetero.stream(network, "cpu", decoded, **options).outputs
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-5, atol=1e-5)


def test_an_image_that_does_not_decode_is_named_and_the_rest_kept(tmp_path):
    folder = _folder(tmp_path / "images", 6, size=(260, 240))
    (folder / "003.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(HeteroError, match=r"003.jpg: cannot decode the image") as info:
        hetero.stream(SMALL_NETWORK, "cpu", folder, tmp_path / "out.npy", table=tmp_path / "t.json",
                      profile_batches=[1], progress=False)
    assert "\n" not in str(info.value) and "samples done are kept" in str(info.value)
    assert (tmp_path / f"out.npy{PROGRESS}").exists() and not (tmp_path / "out.npy").exists()


def test_an_empty_folder_is_one_clear_line(tmp_path):
    (tmp_path / "none").mkdir()
    with pytest.raises(HeteroError, match="no .jpg, .jpeg or .png images"):
        ImageFolder(tmp_path / "none", (3, 8, 8))
