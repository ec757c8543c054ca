"""Pretrained encoders with the offline default weights (no hub access at run time)."""

import numpy as np
import pytest
import torch

from bonmf_core.content.encoders import (ImageEncoder, TextEncoder, default_image_weights_path,
                                 image_identity, image_weights_hash, pick_device,
                                 resolve_precision, text_identity, text_weights_hash)


@pytest.fixture(scope="module")
def text_encoder():
    return TextEncoder(device="cpu", batch_size=4, precision="fp32")


@pytest.fixture(scope="module")
def image_encoder():
    return ImageEncoder(device="cpu", workers=0, batch_size=4, precision="fp32")


def test_text_vectors_are_normalised_and_meaningful(text_encoder):
    texts = ["a space adventure with robots and starships", "a romantic comedy set in paris",
             "robots fight a war among the stars", "two lovers meet in a cafe in france"]
    v = text_encoder.encode(texts)
    assert v.shape == (4, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[2] > v[0] @ v[1] + 0.1 and v[1] @ v[3] > v[1] @ v[2] + 0.1


def test_length_sorted_batches_give_the_same_vectors_as_one_at_a_time(text_encoder):
    """Dynamic padding must not change a text's vector (the attention mask pools it out)."""
    texts = ["short", "a much longer text " * 12, "medium length text here", "x"]
    batched = text_encoder.encode(texts)
    single = np.concatenate([text_encoder.encode([t]) for t in texts])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    np.testing.assert_array_equal(batched, text_encoder.encode(texts))  # deterministic


def test_text_identity_names_weights(text_encoder):
    ident = text_encoder.identity()
    assert ident["name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert len(ident["weights_hash"]) == 16 and ident["max_length"] == 128


def test_images_opened_by_content_and_failures_masked(image_encoder, small_demo, tmp_path):
    png_named_jpg = tmp_path / "poster.jpg"
    png_named_jpg.write_bytes(open(small_demo.items["image_path"][0], "rb").read())
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 not really a jpeg")
    paths = list(small_demo.items["image_path"][:5]) + [str(png_named_jpg), str(corrupt),
                                                         str(tmp_path / "missing.png"), None]
    vectors, present = image_encoder.encode(paths)
    assert vectors.shape == (9, 1280)
    assert present.tolist() == [True] * 6 + [False] * 3
    assert not vectors[~present].any() and (np.abs(vectors[present]).sum(1) > 0).all()
    np.testing.assert_allclose(vectors[5], vectors[0], atol=1e-5)  # same picture, same vector
    again, _ = image_encoder.encode(paths)
    np.testing.assert_allclose(again, vectors, atol=1e-6)


def test_default_image_weights_are_the_packaged_imagenet_ones(image_encoder):
    packaged = torch.load(default_image_weights_path(), map_location="cpu", weights_only=True)
    ours = image_encoder.model.state_dict()
    assert image_encoder.preprocessing()["mean"] == [0.5, 0.5, 0.5]
    # The stem's BatchNorm is folded into the convolution: W · γ / sqrt(var + eps).
    scale = packaged["_bn0.weight"] / torch.sqrt(packaged["_bn0.running_var"]
                                                  + image_encoder.model.bn1.eps)
    torch.testing.assert_close(ours["conv_stem.weight"],
                               packaged["_conv_stem.weight"] * scale.view(-1, 1, 1, 1))
    torch.testing.assert_close(ours["conv_stem.bias"],
                               packaged["_bn0.bias"] - packaged["_bn0.running_mean"] * scale)
    assert image_encoder.identity()["weights_hash"] == image_weights_hash("efficientnet_lite0")


def test_batchnorm_folding_is_exact(small_demo):
    import timm
    from PIL import Image

    from bonmf_core.content.encoders import _fold_batchnorm

    torch.manual_seed(0)
    model = timm.create_model("efficientnet_lite0").eval()
    for m in model.modules():  # non-trivial statistics, so folding has work to do
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        before = model(x)
        assert _fold_batchnorm(model) == 49
        torch.testing.assert_close(model(x), before, atol=1e-4, rtol=1e-4)


def test_demo_pictures_of_one_theme_are_closer(image_encoder, small_demo):
    """Pretrained image features separate the demo's colour/shape themes."""
    main = small_demo.items["genres"].str.split("|").str[0].to_numpy()
    vectors, _ = image_encoder.encode(list(small_demo.items["image_path"][:80]))
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sim = v @ v.T
    same = main[:80, None] == main[None, :80]
    off_diag = ~np.eye(80, dtype=bool)
    assert sim[same & off_diag].mean() > sim[~same].mean() + 0.05


def test_vit_from_a_local_checkpoint(tmp_path, small_demo):
    """The paper's ViT is a configuration change; weights may come from a local file."""
    import timm

    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    torch.save(reference.state_dict(), tmp_path / "vit.pth")
    encoder = ImageEncoder("vit_tiny_patch16_224", weights=tmp_path / "vit.pth", device="cpu",
                           workers=0, precision="fp32")
    assert encoder.dim == 192 and encoder.identity()["weights_hash"] != "hub:vit_tiny_patch16_224"
    vectors, present = encoder.encode([small_demo.items["image_path"][0]])
    reference.reset_classifier(0)
    from PIL import Image

    x = encoder.transform(Image.open(small_demo.items["image_path"][0]).convert("RGB"))[None]
    with torch.inference_mode():
        expected = reference.eval()(x).numpy()
    np.testing.assert_allclose(vectors, expected, atol=1e-4)
    assert present.all()


def test_default_weights_only_for_the_packaged_model():
    with pytest.raises(ValueError, match="efficientnet_lite0 only"):
        ImageEncoder("vit_tiny_patch16_224", weights="default", device="cpu")


def test_device_choice():
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu").type == "cpu"


def test_cheap_identity_matches_the_loaded_encoders(text_encoder, image_encoder):
    """Cache keys are computed without loading a model; they must equal the loaded ones."""
    name, weights = text_weights_hash("default")
    assert text_identity(name, weights, 128, "fp32") == text_encoder.identity()
    assert image_identity("efficientnet_lite0", image_weights_hash("efficientnet_lite0"),
                          "fp32") == image_encoder.identity()
    assert text_identity(name, weights, 128, "bf16") != text_encoder.identity()


def test_reduced_precision_keeps_cosine_to_fp32(text_encoder, image_encoder, small_demo):
    """bf16 is a speed trick only: its vectors stay within cosine 0.99 of fp32."""
    from bonmf_core.config import EncodersConfig
    from bonmf_core.content.text import compose_item_texts

    settings = EncodersConfig()
    texts = compose_item_texts(small_demo.items, settings.text_fields,
                               settings.text_separator)[:24]
    fast_text = TextEncoder(device="cpu", batch_size=8, precision="bf16")
    assert fast_text.identity()["precision"] == "bf16"
    cos = (fast_text.encode(texts) * text_encoder.encode(texts)).sum(1)
    assert cos.min() >= 0.99
    paths = list(small_demo.items["image_path"][:16])
    fast_image = ImageEncoder(device="cpu", workers=0, batch_size=8, precision="bf16")
    a, _ = fast_image.encode(paths)
    b, _ = image_encoder.encode(paths)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.99


def test_precision_choice():
    assert resolve_precision(torch.device("cuda"), "auto") == "fp16"
    assert resolve_precision(torch.device("cpu"), "fp32") == "fp32"
    assert resolve_precision(torch.device("cpu"), "auto") in ("bf16", "fp32")
    with pytest.raises(ValueError, match="precision"):
        resolve_precision(torch.device("cpu"), "int4")


def test_text_model_from_a_local_folder_is_a_configuration_change(text_encoder):
    """A folder (or hub name such as roberta-base where the hub is reachable) replaces the
    default by configuration; the same weights give the same vectors and weights hash."""
    from bonmf_core.content.encoders import default_text_model_path

    folder = str(default_text_model_path())
    encoder = TextEncoder(folder, device="cpu", precision="fp32")
    assert encoder.name == folder and encoder.weights_hash == text_encoder.weights_hash
    texts = ["a heist thriller in los angeles"]
    np.testing.assert_allclose(encoder.encode(texts), text_encoder.encode(texts), atol=1e-6)
