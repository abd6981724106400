"""Reading and writing checkpoints. MAE: official facebookresearch/mae files, Hugging Face
`ViTMAEForPreTraining` weights, and the project's own files. Always strict: a checkpoint either fits
the model it describes exactly, or is refused with an error that names the file. Ranker: the training
checkpoints of ranker training (`state.pt`) and the registry's files (safetensors weights and the
geometry as JSON: nothing in them is code), equally strict."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import posixpath
import re
from dataclasses import asdict, dataclass, fields
from typing import Literal

import fsspec
import safetensors.torch
import torch

from ltrp.core.mae import MAE, MAEConfig
from ltrp.core.ranker import Ranker, RankerConfig

CheckpointFormat = Literal["official", "ltrp", "huggingface"]

#: Heads cannot be read off the weights; these are the official widths' (encoder and decoder).
_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16}
_DECODER_HEADS_BY_WIDTH = {512: 16}

_WITH_DECODER = (
    "mae_visualize_vit_{base,large,huge}.pth (raw-pixel targets, what LTRP uses), "
    "mae_pretrain_vit_{base,large,huge}_full.pth (norm-pix targets), Hugging Face facebook/vit-mae-* "
    "(ViTMAEForPreTraining), or an MAE pre-trained by ltrp"
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message names the file and the problem."""


@dataclass(frozen=True)
class CheckpointInfo:
    """Where an MAE came from, so every output can carry it."""

    uri: str
    sha256: str
    format: CheckpointFormat


def load_mae(
    uri: str,
    *,
    norm_pix: bool | None = None,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
) -> MAE:
    """Loads an MAE with its decoder, strictly, in eval mode, on the CPU.

    Args:
        uri: local path or fsspec URL (`s3://bucket/key.pth`, ...) of an official `{"model": state_dict}`
            file, a Hugging Face `ViTMAEForPreTraining` `.safetensors` / `.bin` file (its `config.json`
            beside it is read if present), or a file written by `save_mae`.
        norm_pix: whether the decoder predicts per-patch standardised pixels. None: from the project's
            own file or the Hugging Face config, else from the official file name
            (`mae_visualize_*`: no, `mae_pretrain_*_full`: yes), else an error asking for it.
        num_heads, decoder_num_heads: attention heads, which weights do not reveal; needed only for
            official or Hugging Face files of non-official widths without a config.

    Returns:
        The MAE, with `mae.checkpoint` (uri, sha256, format) and `mae.cfg.norm_pix` set.

    Raises:
        FileNotFoundError: no file at `uri`.
        CheckpointError: not a checkpoint, encoder only, or weights that do not fit the geometry.
    """
    data = _read(uri)
    fmt, state, meta = _parse(uri, data)
    if fmt == "huggingface":
        state = _official_names(state)
    if not any(k.startswith(("decoder_", "mask_token")) for k in state):
        raise CheckpointError(
            f"{uri} holds an MAE encoder only (no decoder weights), but leave-one-out scoring needs the "
            f"decoder. Use a checkpoint that has one: {_WITH_DECODER}."
        )
    cfg = _config(uri, state, meta, num_heads=num_heads, decoder_num_heads=decoder_num_heads)
    if norm_pix is None:
        norm_pix = meta.get("norm_pix", _norm_pix_from_name(uri))
    if norm_pix is None:
        raise CheckpointError(
            f"{uri}: cannot tell whether this MAE predicts raw pixels or norm-pix targets; "
            "pass norm_pix=True or norm_pix=False"
        )
    with torch.device("meta"):  # no random initialisation of weights the file replaces (1.3 CPU-s for MAE-B)
        model = MAE(MAEConfig(**{**asdict(cfg), "norm_pix": bool(norm_pix)}))
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}  # fp16 files too
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise CheckpointError(f"{uri}: weights do not fit the MAE they describe ({cfg}): {err}") from None
    model.checkpoint = CheckpointInfo(uri=uri, sha256=hashlib.sha256(data).hexdigest(), format=fmt)
    return model.eval()


def save_mae(mae: MAE, uri: str, *, dtype: torch.dtype = torch.float32) -> None:
    """Writes `{"model": state_dict, "ltrp_config": {...}}`: the official layout (official tools read
    it), plus the geometry and target type so that `load_mae` needs no hints. `dtype=torch.float16`
    halves the file (`load_mae` loads it back into float32 weights)."""
    buffer = io.BytesIO()
    state = {k: v.to(dtype) for k, v in mae.state_dict().items()}
    torch.save({"model": state, "ltrp_config": asdict(mae.cfg)}, buffer)
    with fsspec.open(uri, "wb") as f:
        f.write(buffer.getvalue())


def _read(uri: str) -> bytes:
    try:
        with fsspec.open(uri, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"MAE checkpoint not found: {uri}") from None
    if not data:
        raise CheckpointError(f"{uri} is empty (0 bytes), not an MAE checkpoint")
    return data


def _parse(uri: str, data: bytes) -> tuple[CheckpointFormat, dict[str, torch.Tensor], dict]:
    """-> (format, state_dict, metadata): what the file holds, before any renaming."""
    if uri.endswith(".safetensors"):
        try:
            state = safetensors.torch.load(data)
        except Exception as err:  # safetensors raises its own error types for malformed headers
            raise CheckpointError(f"{uri} is not a readable safetensors file: {err}") from None
        return _classify(uri, state, None)
    try:
        # weights_only: never run code from a checkpoint. MAE's own training checkpoints also pickle
        # their argparse namespace, which is harmless data.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # garbage makes the unpickler fail in many ways (IndexError, EOFError, ...)
        raise CheckpointError(f"{uri} is not a PyTorch checkpoint: {type(err).__name__}: {err}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{uri} holds a {type(obj).__name__}, not a checkpoint dict")
    return _classify(uri, obj.get("model", obj), obj.get("ltrp_config"))


def _classify(uri: str, state: dict, ltrp_config: dict | None) -> tuple[CheckpointFormat, dict, dict]:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{uri}: 'model' is not a state dict of tensors")
    if ltrp_config is not None:
        return "ltrp", state, ltrp_config
    if "patch_embed.proj.weight" in state:
        return "official", state, {}
    if any(k.startswith("vit.embeddings.") for k in state):
        return "huggingface", state, _hf_config(uri)
    raise CheckpointError(
        f"{uri}: unrecognised checkpoint layout; expected {{'model': state_dict}} with the official MAE "
        f"names, or a Hugging Face ViTMAEForPreTraining state dict. First keys: {sorted(state)[:5]}"
    )


def _hf_config(uri: str) -> dict:
    """Geometry hints from the `config.json` beside Hugging Face weights, if there is one."""
    fs, path = fsspec.core.url_to_fs(uri)
    config_path = posixpath.join(posixpath.dirname(path), "config.json")
    if not fs.exists(config_path):
        return {}
    with fs.open(config_path, "r") as f:
        hf = json.load(f)
    names = {
        "num_attention_heads": "num_heads",
        "decoder_num_attention_heads": "decoder_num_heads",
        "layer_norm_eps": "norm_eps",
        "norm_pix_loss": "norm_pix",
    }
    return {ours: hf[theirs] for theirs, ours in names.items() if theirs in hf}


# Hugging Face ViTMAE names -> official MAE names, applied in order (attention.output before output).
_HF_RENAMES = [
    (r"^vit\.embeddings\.cls_token$", "cls_token"),
    (r"^vit\.embeddings\.position_embeddings$", "pos_embed"),
    (r"^vit\.embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^vit\.(encoder\.layer|layers)\.", "blocks."),  # hub files; transformers 5 in memory
    (r"^vit\.layernorm\.", "norm."),
    # Hub files say decoder_layers; transformers 5's save_pretrained writes decoder_encoder.layer.
    (r"^decoder\.decoder_(layers|encoder\.layer)\.", "decoder_blocks."),
    (r"^decoder\.", ""),
    (r"\.attention\.attention\.(query|key|value)\.", r".attn.\1."),
    (r"\.attention\.q_proj\.", ".attn.query."),
    (r"\.attention\.k_proj\.", ".attn.key."),
    (r"\.attention\.v_proj\.", ".attn.value."),
    (r"\.attention\.(output\.dense|o_proj)\.", ".attn.proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
]


def _official_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames Hugging Face keys and fuses their separate query/key/value into MAE's `attn.qkv`."""
    renamed = {}
    for key, value in state.items():
        for pattern, repl in _HF_RENAMES:
            key = re.sub(pattern, repl, key)
        renamed[key] = value
    out = {}
    for key, value in renamed.items():
        match = re.fullmatch(r"(.*\.attn)\.(query|key|value)\.(weight|bias)", key)
        if match is None:
            out[key] = value
        elif match[2] == "query":
            prefix, kind = match[1], match[3]
            parts = [renamed.get(f"{prefix}.{p}.{kind}") for p in ("query", "key", "value")]
            if any(p is None for p in parts):
                raise CheckpointError(f"{prefix}: query/key/value {kind} incomplete in Hugging Face weights")
            out[f"{prefix}.qkv.{kind}"] = torch.cat(parts)
    return out


def _depth(state: dict, prefix: str) -> int:
    layers = {int(m[1]) for k in state if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    return max(layers) + 1 if layers else 0


def _heads(uri: str, width: int, given: int | None, table: dict[int, int], kwarg: str) -> int:
    if given is not None:
        return given
    if width in table:
        return table[width]
    raise CheckpointError(
        f"{uri}: the number of attention heads of width {width} cannot be read off the weights "
        f"(official widths: {table}); pass {kwarg}="
    )


def _config(
    uri: str, state: dict, meta: dict, *, num_heads: int | None, decoder_num_heads: int | None
) -> MAEConfig:
    """The geometry, from the project's own config if present, else read off the weights' shapes."""
    known = {f.name for f in fields(MAEConfig)}
    if "embed_dim" in meta:  # the project's own files carry their whole config
        return MAEConfig(**{k: v for k, v in meta.items() if k in known})
    try:
        dim, in_chans, patch, _ = state["patch_embed.proj.weight"].shape
        num_patches = state["pos_embed"].shape[1] - 1
        decoder_dim = state["decoder_embed.weight"].shape[0]
        hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError, IndexError) as err:
        raise CheckpointError(f"{uri}: missing or malformed MAE tensor {err}") from None
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise CheckpointError(f"{uri}: pos_embed has {num_patches} patch positions, not a square grid")
    return MAEConfig(
        img_size=grid * patch,
        patch_size=patch,
        in_chans=in_chans,
        embed_dim=dim,
        depth=_depth(state, "blocks"),
        num_heads=_heads(uri, dim, num_heads or meta.get("num_heads"), _HEADS_BY_WIDTH, "num_heads"),
        decoder_embed_dim=decoder_dim,
        decoder_depth=_depth(state, "decoder_blocks"),
        decoder_num_heads=_heads(
            uri,
            decoder_dim,
            decoder_num_heads or meta.get("decoder_num_heads"),
            _DECODER_HEADS_BY_WIDTH,
            "decoder_num_heads",
        ),
        mlp_ratio=hidden / dim,
        norm_eps=meta.get("norm_eps", 1e-6),
    )


def _norm_pix_from_name(uri: str) -> bool | None:
    name = posixpath.basename(uri)
    if name.startswith("mae_visualize_"):
        return False
    if name.startswith("mae_pretrain_") and "_full" in name:
        return True
    return None


def load_ranker(uri: str) -> Ranker:
    """A ranker from a training checkpoint file (`state.pt` of a Ray Train checkpoint: {"model",
    "ranker_config", ...}), local or s3://. Strict: a file that is not a ranker, or whose weights do
    not fit the geometry it declares, is refused with the file named."""
    try:
        with fsspec.open(uri, "rb") as f:
            state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"ranker checkpoint not found: {uri}") from None
    except Exception as err:  # torch raises many types for a file that is not a checkpoint
        raise ValueError(f"{uri} is not a ranker checkpoint: {err}") from None
    if not isinstance(state, dict) or not {"model", "ranker_config"} <= state.keys():
        raise ValueError(f"{uri} is not a ranker checkpoint: expected the keys 'model' and 'ranker_config'")
    model = Ranker(RankerConfig(**state["ranker_config"]))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ValueError(f"{uri}: weights do not fit the ranker they declare: {err}") from None
    return model.eval()


#: The registry's ranker files: weights that load without unpickling, and the geometry they fit.
RANKER_WEIGHTS, RANKER_GEOMETRY = "ranker.safetensors", "ranker.json"


def save_ranker_files(model: Ranker, folder: str) -> None:
    """Writes FOLDER/ranker.safetensors and FOLDER/ranker.json (the `RankerConfig`), local or s3://."""
    fs, root = fsspec.core.url_to_fs(folder)
    fs.makedirs(root, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fs.pipe_file(posixpath.join(root, RANKER_WEIGHTS), safetensors.torch.save(state))
    fs.pipe_file(posixpath.join(root, RANKER_GEOMETRY), json.dumps(asdict(model.cfg), indent=2).encode())


def load_ranker_files(folder: str) -> Ranker:
    """The ranker `save_ranker_files` wrote to `folder`, in eval mode. Strict: a missing file, a geometry
    that is not a `RankerConfig`, or weights that do not fit it exactly are refused, the file named."""
    fs, root = fsspec.core.url_to_fs(folder)
    weights, geometry = (posixpath.join(root, name) for name in (RANKER_WEIGHTS, RANKER_GEOMETRY))
    try:
        model = Ranker(RankerConfig(**json.loads(fs.cat_file(geometry))))
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder}: no {RANKER_GEOMETRY}") from None
    except (ValueError, TypeError, AssertionError) as err:  # timm asserts on widths that heads don't divide
        raise ValueError(f"{geometry} is not a ranker geometry: {err!r}") from None
    try:
        state = safetensors.torch.load(fs.cat_file(weights))
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder}: no {RANKER_WEIGHTS}") from None
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"{weights} is not a safetensors file: {err}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{weights}: weights do not fit the geometry of {RANKER_GEOMETRY}: {err}") from None
    return model.eval()


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 of a model's weights, whatever file or registry they came from: each state_dict entry's
    name, dtype, shape and bytes, in key order. Two models with this digest compute the same function."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()
