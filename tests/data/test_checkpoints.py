import hashlib
from pathlib import Path

import fsspec
import pytest
import torch

import ltrp
from ltrp.core.ranker import RANKER_GEOMETRIES, Ranker
from ltrp.data.checkpoints import (
    RANKER_GEOMETRY,
    RANKER_WEIGHTS,
    CheckpointError,
    load_ranker_files,
    save_ranker_files,
    weights_sha256,
)

TINY = ltrp.GEOMETRIES["mae_vit_tiny_patch8"]
HEADS = {"num_heads": TINY.num_heads, "decoder_num_heads": TINY.decoder_num_heads}


def _inputs(cfg: ltrp.MAEConfig = TINY) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(2, 3, cfg.img_size, cfg.img_size), ltrp.visible_sets(["a", "b"], grid=cfg.grid)


def _save_official(mae: ltrp.MAE, path: Path, drop_prefixes: tuple[str, ...] = ()) -> Path:
    # As facebookresearch/mae saves them: torch.save({"model": model.state_dict()}, ...).
    state = {k: v for k, v in mae.state_dict().items() if not k.startswith(drop_prefixes)}
    torch.save({"model": state}, path)
    return path


def test_official_format_round_trip(tiny_mae: ltrp.MAE, tmp_path: Path) -> None:
    path = _save_official(tiny_mae, tmp_path / "mae_visualize_vit_tiny.pth")
    loaded = ltrp.load_mae(str(path), **HEADS)
    images, visible = _inputs()
    torch.testing.assert_close(loaded(images, visible), tiny_mae(images, visible), rtol=0, atol=0)
    assert loaded.cfg == TINY and not loaded.cfg.norm_pix and not loaded.training
    assert loaded.checkpoint.format == "official"
    assert loaded.checkpoint.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_official_training_checkpoint_with_args_namespace_loads(tiny_mae: ltrp.MAE, tmp_path: Path) -> None:
    import argparse

    path = tmp_path / "mae_pretrain_vit_tiny_full.pth"
    torch.save({"model": tiny_mae.state_dict(), "epoch": 399, "args": argparse.Namespace(lr=1e-3)}, path)
    assert ltrp.load_mae(str(path), **HEADS).cfg.norm_pix  # "_full" pretrain files are norm-pix


def test_own_format_needs_no_hints_and_keeps_norm_pix(tmp_path: Path) -> None:
    mae = ltrp.MAE(ltrp.MAEConfig(**{**TINY.__dict__, "norm_pix": True})).eval()
    ltrp.save_mae(mae, str(tmp_path / "mine.pth"))
    loaded = ltrp.load_mae(str(tmp_path / "mine.pth"))
    assert loaded.cfg == mae.cfg and loaded.checkpoint.format == "ltrp"
    images, visible = _inputs()
    torch.testing.assert_close(
        ltrp.loo_scores(loaded, images, visible), ltrp.loo_scores(mae, images, visible)
    )


@pytest.mark.parametrize("name", ["mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"])
def test_official_geometry_is_read_off_the_weights(name: str) -> None:
    from ltrp.data.checkpoints import _config

    with torch.device("meta"):
        state = ltrp.MAE(ltrp.GEOMETRIES[name]).state_dict()
    assert _config(f"{name}.pth", state, {}, num_heads=None, decoder_num_heads=None) == ltrp.GEOMETRIES[name]


def test_hugging_face_weights_load_and_match_transformers(tmp_path: Path) -> None:
    hf = _hf_tiny(mask_ratio=0.75)
    hf.save_pretrained(tmp_path)  # model.safetensors with the hub's key names, and config.json
    mae = ltrp.load_mae(str(tmp_path / "model.safetensors"))
    assert mae.checkpoint.format == "huggingface" and mae.cfg.norm_eps == hf.config.layer_norm_eps
    images = torch.randn(2, 3, 64, 64)
    visible = ltrp.visible_sets(["a", "b"], grid=8, mask_ratio=0.75)
    noise = torch.ones(2, 64).scatter(1, visible, 0.0)  # lowest noise = kept by transformers
    with torch.no_grad():
        expected = hf(pixel_values=images, noise=noise).logits
    torch.testing.assert_close(mae(images, visible), expected, rtol=1e-4, atol=1e-5)


def test_loads_from_s3(tiny_mae: ltrp.MAE, s3_bucket: str, tmp_path: Path) -> None:
    local = _save_official(tiny_mae, tmp_path / "mae_visualize_vit_tiny.pth")
    uri = f"{s3_bucket}/models/mae_visualize_vit_tiny.pth"
    with fsspec.open(uri, "wb") as f:
        f.write(local.read_bytes())
    loaded = ltrp.load_mae(uri, **HEADS)
    assert loaded.checkpoint.uri == uri
    assert loaded.checkpoint.sha256 == hashlib.sha256(local.read_bytes()).hexdigest()
    images, visible = _inputs()
    torch.testing.assert_close(loaded(images, visible), tiny_mae(images, visible), rtol=0, atol=0)


def test_refuses_encoder_only_checkpoint(tiny_mae: ltrp.MAE, tmp_path: Path) -> None:
    path = _save_official(
        tiny_mae, tmp_path / "mae_pretrain_vit_base.pth", drop_prefixes=("decoder", "mask_token")
    )
    with pytest.raises(CheckpointError) as err:
        ltrp.load_mae(str(path), **HEADS)
    message = str(err.value)
    assert str(path) in message and "decoder" in message
    assert "mae_visualize_vit_" in message and "_full.pth" in message


def test_refuses_partial_decoder(tiny_mae: ltrp.MAE, tmp_path: Path) -> None:
    # The first of two decoder blocks is missing: the second says how deep the decoder is.
    path = _save_official(tiny_mae, tmp_path / "mae_visualize_x.pth", drop_prefixes=("decoder_blocks.0.",))
    with pytest.raises(CheckpointError, match=r"(?s)mae_visualize_x\.pth.*decoder_blocks\.0\."):
        ltrp.load_mae(str(path), **HEADS)


def test_refuses_wrong_shapes(tiny_mae: ltrp.MAE, tmp_path: Path) -> None:
    state = tiny_mae.state_dict()
    state["blocks.1.mlp.fc2.weight"] = torch.zeros(64, 100)
    path = tmp_path / "mae_visualize_bad.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"(?s)mae_visualize_bad\.pth.*blocks\.1\.mlp\.fc2\.weight"):
        ltrp.load_mae(str(path), **HEADS)


def test_refuses_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth"):
        ltrp.load_mae(str(tmp_path / "nowhere.pth"))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("notes.pth", b"this is a text file, not weights\n", "not a PyTorch checkpoint"),
        ("empty.pth", b"", "empty"),
        ("bad.safetensors", b"\x00\x01garbage", "not a readable safetensors file"),
    ],
)
def test_refuses_files_that_are_not_checkpoints(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as err:
        ltrp.load_mae(str(tmp_path / name))
    assert name in str(err.value)


def test_refuses_a_checkpoint_of_something_else(tmp_path: Path) -> None:
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match=r"resnet\.pth: unrecognised checkpoint layout"):
        ltrp.load_mae(str(tmp_path / "resnet.pth"))


def test_asks_for_norm_pix_and_heads_when_the_file_cannot_tell(tiny_mae: ltrp.MAE, tmp_path: Path) -> None:
    path = _save_official(tiny_mae, tmp_path / "renamed.pth")
    with pytest.raises(CheckpointError, match=r"renamed\.pth.*num_heads="):
        ltrp.load_mae(str(path), norm_pix=False)
    with pytest.raises(CheckpointError, match=r"renamed\.pth.*norm_pix=True or norm_pix=False"):
        ltrp.load_mae(str(path), **HEADS)
    assert not ltrp.load_mae(str(path), norm_pix=False, **HEADS).cfg.norm_pix


def _hf_tiny(**overrides: object) -> object:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTMAEConfig(
        image_size=64,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=4,
        decoder_intermediate_size=128,
        **overrides,
    )
    torch.manual_seed(0)
    return transformers.ViTMAEForPreTraining(config).eval()


def test_hugging_face_config_beside_weights_gives_heads_and_norm_pix(tmp_path: Path) -> None:
    _hf_tiny(norm_pix_loss=True).save_pretrained(tmp_path)
    assert ltrp.load_mae(str(tmp_path / "model.safetensors")).cfg.norm_pix
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*num_heads="):
        ltrp.load_mae(str(tmp_path / "model.safetensors"), norm_pix=True)
    assert ltrp.load_mae(str(tmp_path / "model.safetensors"), norm_pix=True, **HEADS).cfg.norm_pix


def test_hugging_face_in_memory_names_load_too(tmp_path: Path) -> None:
    # transformers 5 names its modules differently from the hub files (q_proj, o_proj, vit.layers).
    hf = _hf_tiny()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    mae = ltrp.load_mae(str(tmp_path / "pytorch_model.bin"), norm_pix=False, **HEADS)
    assert mae.checkpoint.format == "huggingface"


def test_hub_decoder_layer_names_load(tmp_path: Path) -> None:
    # facebook/vit-mae-* on the hub name decoder blocks decoder.decoder_layers.N (not decoder_encoder).
    from safetensors.torch import load_file, save_file

    hf = _hf_tiny()
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    hub = {
        k.replace("decoder.decoder_encoder.layer.", "decoder.decoder_layers."): v for k, v in state.items()
    }
    assert any(k.startswith("decoder.decoder_layers.0.attention.attention.query") for k in hub)
    save_file(hub, tmp_path / "model.safetensors")
    images, visible = _inputs()
    noise = torch.ones(2, 64).scatter(1, visible, 0.0)
    with torch.no_grad():
        hf.config.mask_ratio = 1 - visible.shape[1] / 64
        expected = hf(pixel_values=images, noise=noise).logits
    torch.testing.assert_close(
        ltrp.load_mae(str(tmp_path / "model.safetensors"))(images, visible), expected, rtol=1e-4, atol=1e-5
    )


def test_ranker_files_round_trip_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ranker = Ranker(RANKER_GEOMETRIES["ltrp_vit_micro_patch8"])
    save_ranker_files(ranker, str(tmp_path))
    loaded = load_ranker_files(str(tmp_path))
    assert loaded.cfg == ranker.cfg and weights_sha256(loaded) == weights_sha256(ranker)
    assert not loaded.training


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        (RANKER_WEIGHTS, None, "no ranker.safetensors"),
        (RANKER_GEOMETRY, None, "no ranker.json"),
        (RANKER_WEIGHTS, b"\x80\x04pickled", "is not a safetensors file"),
        (RANKER_GEOMETRY, b'{"depth": 2, "layers": 3}', "is not a ranker geometry"),
        (RANKER_GEOMETRY, b'{"embed_dim": 50, "num_heads": 4}', "is not a ranker geometry"),
        (
            RANKER_GEOMETRY,
            b'{"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 3, "num_heads": 4}',
            "do not fit",
        ),
    ],
)
def test_ranker_files_that_do_not_fit_are_refused_with_the_file_named(
    tmp_path: Path, name: str, content: bytes | None, problem: str
) -> None:
    save_ranker_files(Ranker(RANKER_GEOMETRIES["ltrp_vit_micro_patch8"]), str(tmp_path))
    if content is None:
        (tmp_path / name).unlink()
    else:
        (tmp_path / name).write_bytes(content)
    with pytest.raises((ValueError, FileNotFoundError), match=problem) as err:
        load_ranker_files(str(tmp_path))
    assert str(tmp_path) in str(err.value)
