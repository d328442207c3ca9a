"""Built-in reward plugins: clip_score / pickscore on a tiny saved CLIP, reflection_format, the
GenEval client against a detector server started here, and their registration."""

from __future__ import annotations

import base64
import io
import json
import random
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from r3rl.errors import UserError
from r3rl.rewards import available_rewards, load_reward
from r3rl.shapes.prompts import shapes_prompts
from r3rl.shapes.scene import render, sample_scene
from rewards.shapes_geneval import ShapesGenEval

BUILTINS = {
    "vlm_judge",
    "geneval",
    "clip_score",
    "pickscore",
    "reflection_format",
    "remote",
    "shapes_geneval",
}


def test_builtins_are_registered_and_listed(run_cli) -> None:
    assert BUILTINS <= set(available_rewards())
    listed = run_cli("rewards", "list").stdout
    for name in BUILTINS:
        assert f"{name} " in listed and "builtin" in listed


def _shapes(n: int, seed: int = 0) -> tuple[list[str], list[Image.Image], list[dict]]:
    rng = random.Random(seed)
    metas = shapes_prompts("eval", n, seed=seed)
    images = [
        render(sample_scene(m, rng)) if i % 3 else Image.new("RGB", (32, 32), (245, 245, 240))
        for i, m in enumerate(metas)
    ]
    return [m["prompt"] for m in metas], images, metas


# ------------------------------------------------------------------ clip_score / pickscore


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CLIPModel from a tiny config with random weights, a local tokenizer and image processor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from r3rl.models.tokenizer import train_chat_tokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    tok = train_chat_tokenizer([m["prompt"] for m in shapes_prompts("train", 64)])
    small = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    cfg = CLIPConfig(
        # eos_token_id=2 selects CLIP's original pooling (at the highest token id), which real
        # CLIP checkpoints rely on and which the padding token (id 0) cannot disturb
        text_config={
            **small,
            "vocab_size": len(tok),
            "max_position_embeddings": 32,
            "eos_token_id": 2,
            "bos_token_id": 1,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(path)
    return path


def _pair_logit(model, tok, proc, prompt: str, image: Image.Image) -> float:
    """logit_scale * cos(text, image) for one pair, by hand from the projected embeddings."""
    import torch

    with torch.no_grad():
        text = tok([prompt], truncation=True, max_length=32, return_tensors="pt")
        t = model.text_projection(model.text_model(**text).pooler_output)
        pixels = proc(images=[image], return_tensors="pt")["pixel_values"]
        v = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        cos = torch.nn.functional.cosine_similarity(t, v).item()
    return model.logit_scale.exp().item() * cos


def test_clip_score_and_pickscore_are_scaled_pair_logits(tiny_clip: Path, one_thread: None) -> None:
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    prompts, images, metas = _shapes(5)
    prompts[0] = prompts[0] + " and a much longer caption so the batch needs padding"
    clip = load_reward("clip_score", model_path=str(tiny_clip), device="cpu", batch_size=2)
    pick = load_reward(
        "pickscore", model_path=str(tiny_clip), processor_path=str(tiny_clip), device="cpu"
    )
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    tok, proc = (
        AutoTokenizer.from_pretrained(tiny_clip),
        AutoImageProcessor.from_pretrained(tiny_clip),
    )
    logits = [_pair_logit(model, tok, proc, p, im) for p, im in zip(prompts, images)]
    assert clip(prompts, images, metas) == pytest.approx([x / 100 for x in logits], abs=1e-5)
    assert pick(prompts, images, metas) == pytest.approx([x / 26 for x in logits], abs=1e-5)


def test_clip_score_needs_an_existing_model_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="model folder not found"):
        load_reward("clip_score", model_path=str(tmp_path / "missing"))


# ------------------------------------------------------------------ reflection_format


def test_reflection_format_scores_r3_shape() -> None:
    fn = load_reward("reflection_format")
    assert fn.is_text
    texts = [
        "<think>the circle should be red</think> make the circle red",
        "<think>all constraints hold</think> no further edit needed",
        "make the circle red",  # no reasoning block
        "<think></think> make it red",  # empty reasoning
        None,  # a sample without a reflection: cannot be scored
    ]
    assert fn(["p"] * 5, [None] * 5, [{}] * 5, completions=texts) == [1.0, 1.0, 0.0, 0.0, None]


# ------------------------------------------------------------------ geneval (detector server)


class DetectorServer(ThreadingHTTPServer):
    """A GenEval-compatible detector on the wire, answering with the shapes checker."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), DetectorHandler)
        self.batches: list[int] = []


class DetectorHandler(BaseHTTPRequestHandler):
    server: DetectorServer

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/geneval":
            status, out = 404, {"error": f"no route {self.path}"}
        else:
            images = [Image.open(io.BytesIO(base64.b64decode(s))) for s in body["images"]]
            metas = body["meta_datas"]
            self.server.batches.append(len(images))
            checker = ShapesGenEval(partial_credit=not body["only_strict"])
            status, out = 200, {"scores": checker([m["prompt"] for m in metas], images, metas)}
        data = json.dumps(out).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def detector() -> Iterator[DetectorServer]:
    srv = DetectorServer()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("partial_credit", [True, False])
def test_geneval_client_gets_the_detector_scores(
    detector: DetectorServer, partial_credit: bool
) -> None:
    prompts, images, metas = _shapes(5)
    url = f"http://127.0.0.1:{detector.server_address[1]}/geneval"
    detector.batches.clear()
    fn = load_reward(
        "geneval", url=url, partial_credit=partial_credit, batch_size=2, image_format="png"
    )
    expected = ShapesGenEval(partial_credit=partial_credit)(prompts, images, metas)
    assert fn(prompts, images, metas) == expected
    assert len(set(expected)) > 1
    assert sorted(detector.batches) == [1, 2, 2]


def test_geneval_wrong_path_is_none_not_zero(detector: DetectorServer) -> None:
    prompts, images, metas = _shapes(2)
    url = f"http://127.0.0.1:{detector.server_address[1]}/wrong"
    fn = load_reward("geneval", url=url, max_retries=0)
    assert fn(prompts, images, metas) == [None, None]
    assert fn._fn.stats.failures == 1
