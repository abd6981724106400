"""The registered ranker as users serve it: `mlflow.pyfunc.load_model("models:/NAME/VERSION")` in a
fresh interpreter, and `mlflow models serve` answering HTTP, on a real MLflow server's registry. Both take
encoded images (bytes, or paths and URLs) and give the scores and kept patches the ranking job gives;
wrong inputs get a short error that says what is accepted."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image
from support import image

from ltrp.core.options import ROUNDS
from ltrp.core.ranker import RANKER_GEOMETRIES, Ranker, keep_top, rank
from ltrp.data.images import png_bytes
from ltrp.data.sources import SourceImage
from ltrp.local import BIN, free_port, wait_for_port
from ltrp.pipeline.configs import RankConfig
from ltrp.pipeline.rank_stages import image_rows
from ltrp.pipeline.registry import _PyfuncRanker, register_ranker
from ltrp.pipeline.shards import usable_images

REPO = Path(__file__).resolve().parents[2]
NAME = "serving-test-ranker"
MODEL = f"models:/{NAME}/1"
#: A fresh interpreter's use of the registered model: nothing of ltrp imported before the load.
CLIENT = """
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
uris = json.loads(sys.argv[2])
images = pd.DataFrame({"image": [open(u.removeprefix("file://"), "rb").read() for u in uris]})
import ltrp  # loaded already, by the model's loader
print(json.dumps({
    "ltrp": ltrp.__file__,
    "modules": sorted({m.split(".")[0] for m in sys.modules}),
    "bytes": model.predict(images).to_dict(orient="list"),
    "uris": model.predict(pd.DataFrame({"uri": uris})).to_dict(orient="list"),
    "half": model.predict(images, params={"keep_ratio": 0.5}).to_dict(orient="list"),
    "one_pass": model.predict(images, params={"rounds": 0}).to_dict(orient="list"),
}))
"""


@dataclass(frozen=True)
class Served:
    """Version 1 of NAME, and images on disk (their uris: a path, and a file:// URL)."""

    ranker: Ranker
    uris: list[str]

    def encoded(self) -> list[bytes]:
        return [Path(u.removeprefix("file://")).read_bytes() for u in self.uris]

    def scores(self, rounds: int = ROUNDS) -> torch.Tensor:
        """The ranker's scores of the images as the ranking job computes them: its decode stage's
        centre view, then its model stage's input."""
        cfg = RankConfig(source="unused", output="unused", model=MODEL)
        size = self.ranker.cfg.img_size
        rows = [r for u, data in zip(self.uris, self.encoded(), strict=True)
                for r in image_rows(SourceImage(u, u, None, data), cfg, size)]  # fmt: skip
        _, images = usable_images(pa.Table.from_pylist(rows), size, torch.device("cpu"))
        return rank(self.ranker, images, rounds)


@pytest.fixture(scope="module")
def served(mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Served:
    folder = tmp_path_factory.mktemp("served-images")
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(image(2, 90, 70))).save(jpeg, format="JPEG", quality=90)
    rgba = np.random.default_rng(3).integers(0, 256, (64, 96, 4), dtype=np.uint8)
    files = {
        "wide.png": image(1, 80, 120),
        "tall.jpg": jpeg.getvalue(),
        "gray.png": image(4, 64, 64, gray=True),
        "alpha.png": png_bytes(rgba),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    uris = [str(folder / n) for n in files]
    uris[1] = f"file://{uris[1]}"
    torch.manual_seed(0)
    # As the training job builds it from a table scored at mask ratio 0.75: it ranks in sets of 16.
    ranker = Ranker(replace(RANKER_GEOMETRIES["ltrp_vit_micro_patch8"], set_size=16))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
        mlflow.set_tracking_uri(mlflow_uri)
        mlflow.set_experiment("ltrp-serving-test")
        with mlflow.start_run():
            register_ranker(ranker, NAME, tags={"source": "test"})
    return Served(ranker, uris)


@pytest.mark.slow
def test_a_fresh_interpreter_loads_the_model_and_ranks_images_as_the_ranking_job(
    served: Served, mlflow_uri: str, tmp_path: Path
) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    done = subprocess.run(
        [sys.executable, "-c", CLIENT, MODEL, json.dumps(served.uris)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    # The loader and the preprocessing ran from the sources the model carries, not from this checkout;
    # and loading needed nothing the model's requirements do not install.
    assert out["ltrp"].endswith("/code/ltrp/__init__.py") and not out["ltrp"].startswith(str(REPO))
    assert not {"ray", "tyro"} & set(out["modules"])

    expected = served.scores()
    for answer in (out["bytes"], out["uris"], out["half"]):
        np.testing.assert_allclose(np.array(answer["scores"]), expected.numpy(), rtol=1e-5, atol=1e-6)
    assert out["bytes"]["kept"] == out["uris"]["kept"] == keep_top(expected, 0.25).tolist()
    assert out["half"]["kept"] == keep_top(expected, 0.5).tolist()
    assert len(out["bytes"]["kept"][0]) == 16 and len(out["half"]["kept"][0]) == 32  # of 64 patches
    one_pass = np.array(out["one_pass"]["scores"])  # rounds=0: the paper's inference, every patch seen
    np.testing.assert_allclose(one_pass, served.scores(0).numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(one_pass, expected.numpy(), atol=1e-3)


@pytest.mark.slow
def test_mlflow_models_serve_answers_base64_images_with_a_keep_ratio(
    served: Served, mlflow_uri: str, tmp_path: Path
) -> None:
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    log = tmp_path / "serve.log"
    command = [BIN / "mlflow", "models", "serve", "-m", MODEL, "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    with log.open("wb") as sink:
        # A group of its own: the server runs uvicorn as a child process, stopped with it.
        server = subprocess.Popen(
            command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        try:
            wait_for_port(port, server, timeout=420)  # over a minute to listen on 2 busy cores
        except (RuntimeError, TimeoutError) as err:
            raise AssertionError(f"{err}; its log ends: {log.read_text(errors='replace')[-3000:]}") from None
        images = [base64.b64encode(data).decode() for data in served.encoded()]
        body = {"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]},
                "params": {"keep_ratio": 0.5}}  # fmt: skip
        status, answer = _post(port, body)
        print("request:", _shown(body), "\nanswer:", status, _shown(answer))
        assert status == 200, answer
        local = mlflow.pyfunc.load_model(MODEL)
        frame = pd.DataFrame({"image": served.encoded()})
        expected = local.predict(frame, params={"keep_ratio": 0.5})
        predictions = answer["predictions"]
        np.testing.assert_allclose([p["scores"] for p in predictions], expected["scores"].tolist(), rtol=1e-6)
        assert [p["kept"] for p in predictions] == expected["kept"].tolist()

        broken = {"dataframe_records": [{"image": images[0]}, {"image": base64.b64encode(b"junk").decode()}]}
        status, answer = _post(port, broken)
        print("request:", _shown(broken), "\nanswer:", status, _shown(answer))
        assert status == 400 and "row 1: cannot decode image" in answer["message"], answer
        assert len(answer["message"]) < 800
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.mark.slow
def test_wrong_inputs_get_a_short_error_naming_what_is_accepted(
    served: Served, mlflow_uri: str, tmp_path: Path
) -> None:
    mlflow.set_tracking_uri(mlflow_uri)
    model = mlflow.pyfunc.load_model(MODEL)
    encoded = served.encoded()
    gone = str(tmp_path / "gone.png")
    wrong = [  # (input, what the error must say of it)
        ({"path": served.uris}, "neither `image` nor `uri`"),
        ({"image": encoded, "uri": served.uris}, "both `image` and `uri`"),
        ({"image": [encoded[0], b"junk"]}, "row 1: cannot decode image"),
        ({"image": [image(0, 8, 8)]}, "row 0: too small"),
        ({"image": ["wide.png"]}, "row 0: `image` must be encoded image bytes"),
        ({"uri": [gone]}, f"row 0 ({gone}): not found"),
    ]
    for columns, problem in wrong:
        frame = pd.DataFrame(columns)
        with pytest.raises(MlflowException) as refused:
            model.predict(frame)
        message = str(refused.value)
        assert problem in message, message
        assert len(message) < 400 and "\n" not in message, message
        assert "`image` (encoded image bytes" in message and "`uri` (a local path or fsspec URL" in message
    for ratio in (0.0, 1.5):
        with pytest.raises(MlflowException, match=rf"keep_ratio must be in \(0, 1\], got {ratio}"):
            model.predict(pd.DataFrame({"image": encoded}), params={"keep_ratio": ratio})
    with pytest.raises(MlflowException, match="rounds must be an integer >= 0, got -1"):
        model.predict(pd.DataFrame({"image": encoded}), params={"rounds": -1})

    # Arrays: MLflow casts every input to the signature's DataFrame before the model sees it, and
    # refuses an image array itself (never ranking it, as 0-1 floats once were); handed one without
    # MLflow in between, the model says what to send instead.
    pixels = np.zeros((2, 64, 64, 3), np.uint8)
    for array in (pixels, pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255):
        with pytest.raises(MlflowException, match="Failed to enforce schema"):
            model.predict(array)
        with pytest.raises(MlflowException) as refused:
            _PyfuncRanker(served.ranker).predict(array)
        message = str(refused.value)
        assert message.startswith(f"got a ndarray of {array.dtype} {array.shape};") and len(message) < 300
        assert "encode them as PNG bytes" in message


def _post(port: int, body: dict) -> tuple[int, dict]:
    """(status, JSON answer) of a POST of `body` to the scoring server's /invocations."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _shown(body: object) -> str:
    """`body` as JSON, its base64 strings and long lists cut short, for a reader."""

    def cut(value: object) -> object:
        if isinstance(value, str) and len(value) > 40 and " " not in value:  # base64
            return f"{value[:28]}...({len(value)} chars)"
        if isinstance(value, list) and len(value) > 6:
            return [cut(v) for v in value[:4]] + [f"...({len(value)} values)"]
        if isinstance(value, list):
            return [cut(v) for v in value]
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        return value

    return json.dumps(cut(body))
