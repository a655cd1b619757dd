"""Channel conversion, padding/resizing and scaling to [-1, 1]."""
import numpy as np
import pytest

from ama_stream.preprocess import PreprocessSpec, fit_image, to_tensor


def test_mnist_sized_images_are_zero_padded_centred():
    img = np.full((28, 28), 255, dtype=np.uint8)
    out = fit_image(img, PreprocessSpec(image_size=32, channels=1))
    assert out.shape == (32, 32, 1)
    assert out[2:30, 2:30].min() == 255 and out[:2].max() == 0 and out[:, 30:].max() == 0


def test_large_images_are_resized_and_colour_converted():
    rgb = np.zeros((300, 200, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # pure red -> luma 0.299 * 255
    gray = fit_image(rgb, PreprocessSpec(image_size=64, channels=1))
    assert gray.shape == (64, 64, 1)
    assert abs(int(gray[32, 32, 0]) - 76) <= 1
    back = fit_image(gray[:, :, 0], PreprocessSpec(image_size=32, channels=3))
    assert back.shape == (32, 32, 3) and (back[..., 0] == back[..., 2]).all()
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    assert fit_image(rgba, PreprocessSpec(image_size=32, channels=3)).shape == (32, 32, 3)


def test_forced_resize_of_a_small_image():
    img = np.full((28, 28), 200, dtype=np.uint8)
    out = fit_image(img, PreprocessSpec(image_size=32, channels=1, resize="resize"))
    assert out.shape == (32, 32, 1)
    assert (out == 200).all()  # stretched to the border, not padded with zeros


def test_scaling_to_minus_one_one():
    imgs = np.array([[[[0]], [[255]]]], dtype=np.uint8).reshape(1, 1, 2, 1)
    t = to_tensor(imgs)
    assert t.shape == (1, 1, 1, 2)
    assert t.min().item() == -1.0 and t.max().item() == 1.0


@pytest.mark.parametrize(
    "img, match",
    [
        (np.zeros((4, 4), dtype=np.float32), "uint8"),
        (np.zeros((0, 4), dtype=np.uint8), "empty"),
        (np.zeros((4, 4, 2), dtype=np.uint8), "HxWxC"),
        (np.zeros((2, 4, 4, 1), dtype=np.uint8), "HxWxC"),
    ],
)
def test_bad_images_get_clear_errors(img, match):
    with pytest.raises(ValueError, match=match):
        fit_image(img, PreprocessSpec())


def test_spec_validation():
    with pytest.raises(ValueError, match="resize"):
        PreprocessSpec(resize="crop")
