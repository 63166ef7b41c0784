"""``ctiqa evaluate/predict --server``: scoring through an OpenAI-compatible inference server.

Two servers: a vLLM-like fake on 127.0.0.1 (ctiqa/testing/loopback.py) that answers from the real tiny model with token
log-probabilities (greedy, raw logits, top 20; ``continue_final_message``), scripted to fail or stall; and a real
``transformers serve`` subprocess (marked slow: ~1 min to start on 2 cores) for the end-to-end check.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ctiqa import CTIQAError
from ctiqa.cli import main as ctiqa_main
from ctiqa.inference import load_model, predict_images
from ctiqa.serving import LOGPROB_ALTERNATIVES, ServerScorer
from ctiqa.testing.loopback import send_json, start_server, stop_server
from ctiqa.testing.loopback import transformers_serve as serve_model
from ctiqa.testing.sft_data import rows, write_dataset

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def trained(trained_tiny_model):
    return trained_tiny_model


@pytest.fixture(scope="module")
def lm(trained):
    return load_model(str(trained), precision="fp32")


@pytest.fixture(scope="module")
def images():
    return [r["images"][0] for r in rows(5, np.random.default_rng(11))]


# ------------------------------------------------------------------------------------------ a vLLM-like fake
class FakeVLLM:
    """Chat completions answered by the tiny model, as vLLM would: greedy, logprobs of the raw logits with the top
    ``top_logprobs`` alternatives (tokens in SentencePiece form), ``continue_final_message``. ``script``: a list
    of ``("status", code)`` / ``("sleep", seconds)`` / ``("refuse_logprobs",)`` consumed one per request."""

    def __init__(self, lm):
        self.lm, self.script, self.requests, self.lock = lm, [], [], threading.Lock()
        self.server = start_server(self.dispatch)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        stop_server(self.server)

    def dispatch(self, h):
        body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
        with self.lock:
            self.requests.append(body)
            step = self.script.pop(0) if self.script else None
        if step and step[0] == "status":
            return send_json(h, step[1], {"error": {"message": "scripted failure", "code": step[1]}})
        if step and step[0] == "sleep":
            time.sleep(step[1])
        if step and step[0] == "refuse_logprobs" and body.get("logprobs"):
            return send_json(h, 422, {"detail": "Unexpected fields in the request: {'logprobs', 'top_logprobs'}"})
        if body["model"] != "tiny":
            return send_json(h, 404, {"error": {"message": f"The model `{body['model']}` does not exist."}})
        with self.lock:  # one forward at a time (torch on 2 cores)
            send_json(h, 200, self.answer(body))

    def answer(self, body):
        proc, model = self.lm.processor, self.lm.model
        user = body["messages"][0]["content"]
        url = next(c["image_url"]["url"] for c in user if c["type"] == "image_url")
        image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
        text = next(c["text"] for c in user if c["type"] == "text")
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompt = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        if body.get("continue_final_message"):
            prompt += body["messages"][-1]["content"]
        inputs = proc(text=[prompt], images=[[image]], return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=body["max_tokens"], do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        new = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        tok = proc.tokenizer
        content = None
        if body.get("logprobs"):
            content = []
            for tid, logits in zip(new, out.logits, strict=False):
                lp = logits[0].float().log_softmax(-1)
                top = lp.topk(body.get("top_logprobs") or 1)
                content.append({"token": tok.convert_ids_to_tokens(tid), "logprob": float(lp[tid]), "bytes": None,
                                "top_logprobs": [{"token": tok.convert_ids_to_tokens(int(i)), "logprob": float(v),
                                                  "bytes": None} for v, i in zip(top.values, top.indices, strict=True)]})
        eos = model.generation_config.eos_token_id
        stopped = new and new[-1] in (eos if isinstance(eos, list) else [eos])
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop" if stopped else "length",
                             "message": {"role": "assistant", "content": tok.decode(new, skip_special_tokens=True)},
                             "logprobs": None if content is None else {"content": content}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": len(new), "total_tokens": 1 + len(new)}}


@pytest.fixture
def fake(lm):
    srv = FakeVLLM(lm)
    yield srv
    srv.close()


def _fast_retry():
    from ctiqa.clients import RetryPolicy

    return RetryPolicy(max_attempts=3, initial_delay=0.01, max_delay=0.02, jitter=0.0)


def test_probability_score_from_server_logprobs_equals_in_process(lm, fake, images, tmp_path):
    ref = predict_images(lm, images, max_new_tokens=40, batch_size=5)
    scorer = ServerScorer(fake.url, "tiny", max_new_tokens=40, concurrency=3, cache=tmp_path / "c.jsonl")
    try:
        got = scorer(images)
    finally:
        scorer.close()
    assert [g["text"] for g in got] == [r.text for r in ref]
    assert [g["parsed_score"] for g in got] == [r.parsed_score for r in ref]
    # equal up to the digits outside the top 20 alternatives (the tiny model's decimals are diffuse): <= 7e-4 seen
    np.testing.assert_allclose([g["prob_score"] for g in got], [r.prob_score for r in ref], atol=2e-3)
    np.testing.assert_allclose([g["prob_std"] for g in got], [r.prob_std for r in ref], atol=2e-3)
    np.testing.assert_allclose([g["prob_mass"] for g in got], [r.prob_mass for r in ref], atol=1e-3)
    first = fake.requests[0]
    assert first["temperature"] == 0.0 and first["logprobs"] is True
    assert first["top_logprobs"] == LOGPROB_ALTERNATIVES
    assert first["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    prefixes = sorted(r["messages"][-1]["content"] for r in fake.requests if r.get("continue_final_message"))
    assert prefixes == sorted(f"Score: {d}." for d in range(4) for _ in images)
    assert scorer.describe()["logprobs"] is True


def test_score_only_reads_the_score_position(lm, fake, images, tmp_path):
    ref = predict_images(lm, images[:2], generate=False)
    scorer = ServerScorer(fake.url, "tiny", score_only=True)
    got = scorer(images[:2])
    scorer.close()
    assert all(g["text"] is None for g in got)
    np.testing.assert_allclose([g["prob_score"] for g in got], [r.prob_score for r in ref], atol=2e-3)
    assert all(r["max_tokens"] <= 8 for r in fake.requests)


def test_refused_logprobs_give_parsed_scores_and_say_so(lm, fake, images):
    fake.script = [("refuse_logprobs",)]
    scorer = ServerScorer(fake.url, "tiny", max_new_tokens=40)
    got = scorer(images[:2])
    scorer.close()
    assert all(g["parsed_score"] is not None and g["prob_score"] is None for g in got)
    d = scorer.describe()
    assert d["logprobs"] is False and "refused" in d["probability_score"]
    assert not any(r.get("logprobs") for r in fake.requests[1:])
    # score-only without logprobs: the score is parsed from the short answer
    fake.script = [("refuse_logprobs",)]
    scorer = ServerScorer(fake.url, "tiny", score_only=True)
    got = scorer(images[:2])
    scorer.close()
    ref = predict_images(lm, images[:2], max_new_tokens=40)
    assert [g["parsed_score"] for g in got] == [r.parsed_score for r in ref]


def test_errors_retries_timeouts_and_the_cache(lm, fake, images, tmp_path):
    cache = tmp_path / "answers.jsonl"
    fake.script = [("status", 503), ("status", 500)]  # retried: the first image still gets its answer
    s = ServerScorer(fake.url, "tiny", score_only=True, cache=cache, retry=_fast_retry(), concurrency=2)
    got = s(images[:2])
    s.close()
    assert all(g["prob_score"] is not None and g["error"] is None for g in got)
    n = len(fake.requests)
    # a second run (after a kill, say) asks nothing again: every answer is in the cache file
    s = ServerScorer(fake.url, "tiny", score_only=True, cache=cache, concurrency=2)
    again = s(images[:2])
    s.close()
    assert len(fake.requests) == n and again == got
    # a stalled server: the row says timeout, it is not cached, and the next run asks again
    fake.script = [("sleep", 1.5)] * 3
    s = ServerScorer(fake.url, "tiny", max_new_tokens=20, cache=cache, timeout_s=0.5, retry=_fast_retry(),
                     probability=False)
    slow = s(images[2:3])
    assert slow[0]["error"].startswith("timeout") and slow[0]["parsed_score"] is None
    s.close()
    n = len(fake.requests)
    s = ServerScorer(fake.url, "tiny", max_new_tokens=20, cache=cache, probability=False)
    assert s(images[2:3])[0]["parsed_score"] is not None  # asked again (not cached), answered now
    s.close()
    assert len(fake.requests) == n + 1
    # an unknown model fails every request: one clear error
    s = ServerScorer(fake.url, "no-such-model")
    with pytest.raises(CTIQAError, match="no-such-model"):
        s(images[:1])
    s.close()


@pytest.mark.slow
def test_evaluate_and_predict_cli_through_the_fake(lm, trained, fake, tmp_path, capsys):
    data = write_dataset(tmp_path / "ds", {"train": 2, "validation": 2, "test": 4})
    common = ["--dataset", str(data), "--max-new-tokens", "40", "--bootstrap", "50"]
    assert ctiqa_main(["evaluate", "--model", str(trained), "--out", str(tmp_path / "local"), *common]) == 0
    assert ctiqa_main(["evaluate", "--server", fake.url.removesuffix("/v1"), "--model", "tiny",
                       "--out", str(tmp_path / "srv"), *common]) == 0
    local = json.loads((tmp_path / "local" / "results.json").read_text())
    srv = json.loads((tmp_path / "srv" / "results.json").read_text())
    assert srv["kind"] == "server" and srv["provenance"]["model"]["logprobs"] is True
    assert srv["metrics"]["parsed"]["srcc"] == local["metrics"]["parsed"]["srcc"]
    assert abs(srv["metrics"]["probability"]["plcc"] - local["metrics"]["probability"]["plcc"]) < 1e-3
    n = len(fake.requests)
    assert ctiqa_main(["evaluate", "--server", fake.url, "--model", "tiny", "--out", str(tmp_path / "srv"),
                       *common]) == 0
    assert len(fake.requests) == n  # resumed from predictions.jsonl
    assert ctiqa_main(["report", str(tmp_path / "local"), str(tmp_path / "srv"), "--out",
                       str(tmp_path / "report")]) == 0
    assert "tiny (server)" in capsys.readouterr().out
    png = tmp_path / "slice.png"
    rows(1, np.random.default_rng(3))[0]["images"][0].save(png)
    assert ctiqa_main(["predict", str(png), "--server", fake.url, "--model", "tiny", "--max-new-tokens", "40",
                       "--out", str(tmp_path / "p.jsonl")]) == 0
    row = json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])
    assert row["parsed_score"] is not None and row["prob_score"] is not None
    assert ctiqa_main(["evaluate", "--server", fake.url, "--model", "tiny", "--adapter", str(trained),
                       "--out", str(tmp_path / "x"), *common]) == 2
    assert "ctiqa export" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ a real server
@pytest.fixture(scope="module")
def transformers_serve(trained, tmp_path_factory):
    """``transformers serve MODEL`` on 127.0.0.1, fp32 on the CPU, offline; yields (url, served model name)."""
    pytest.importorskip("fastapi")
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serve_model(trained, log=log, env={"OMP_NUM_THREADS": "1"}) as url:
        yield url, str(trained)


@pytest.mark.slow
def test_transformers_serve_reproduces_in_process_parsed_scores(trained, transformers_serve, tmp_path, capsys):
    url, name = transformers_serve
    data = write_dataset(tmp_path / "ds", {"train": 2, "validation": 2, "test": 6}, seed=4)
    common = ["--dataset", str(data), "--max-new-tokens", "48", "--bootstrap", "50"]
    assert ctiqa_main(["evaluate", "--model", str(trained), "--out", str(tmp_path / "local"), *common]) == 0
    assert ctiqa_main(["evaluate", "--server", url, "--model", name, "--concurrency", "3",
                       "--out", str(tmp_path / "srv"), *common]) == 0
    read = lambda d: [json.loads(x) for x in (tmp_path / d / "predictions.jsonl").read_text().splitlines()]  # noqa: E731
    local, srv = read("local"), read("srv")
    assert [r["text"] for r in srv] == [r["text"] for r in local]
    assert [r["parsed_score"] for r in srv] == [r["parsed_score"] for r in local]
    assert sum(r["parsed_score"] is not None for r in srv) == len(srv)
    res = json.loads((tmp_path / "srv" / "results.json").read_text())
    assert "probability" not in res["metrics"] and res["provenance"]["model"]["logprobs"] is False
    assert res["provenance"]["model"]["probability_score"].startswith("none")
    assert ctiqa_main(["report", str(tmp_path / "local"), str(tmp_path / "srv"), "--out",
                       str(tmp_path / "report")]) == 0
    capsys.readouterr()
    # predict through the server: the same parsed score as in-process for a PNG slice
    png = tmp_path / "slice.png"
    rows(1, np.random.default_rng(9))[0]["images"][0].save(png)
    assert ctiqa_main(["predict", str(png), "--model", str(trained), "--max-new-tokens", "48",
                       "--out", str(tmp_path / "a.jsonl")]) == 0
    assert ctiqa_main(["predict", str(png), "--server", url, "--model", name, "--max-new-tokens", "48",
                       "--out", str(tmp_path / "b.jsonl")]) == 0
    a, b = (json.loads((tmp_path / f).read_text().splitlines()[0]) for f in ("a.jsonl", "b.jsonl"))
    assert b["parsed_score"] == a["parsed_score"] is not None and b["rationale"] == a["rationale"]
