"""datasets_builder: teachers against a fake Gemini API (real google-genai SDK), the answer cache (resume after
kill -9), rationale checks, the template teacher, the dataset folder, the card, and Hub round trips (fake Hub)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from ctiqa import CTIQAError, prompts
from ctiqa.clients import (
    CallResult,
    ClientConfigError,
    GeminiClient,
    OpenAICompatClient,
    RetryPolicy,
    Usage,
    server_retry_delay,
)
from ctiqa.imaging import image_sha256
from ctiqa.testing.fake_gemini import (
    OK_RATIONALE,
    FakeGemini,
    blocked,
    empty_stop,
    malformed_json,
    max_tokens,
    ok,
    quota_zero,
    rate_limited,
    server_error,
    status,
)
from datasets_builder import checks
from datasets_builder.build import BuildOptions, build_dataset
from datasets_builder.cache import AnswerCache
from datasets_builder.teachers import LLMTeacher, TemplateTeacher

REPO = Path(__file__).resolve().parents[1]
#: (dose fraction, views, score): a monotone quality ladder like the simulator's.
LADDER = [(1.0, 1024, 3.8), (0.5, 512, 2.8), (0.25, 256, 1.8), (0.1, 64, 0.6)]
FAST = RetryPolicy(max_attempts=4, initial_delay=0.01, max_delay=0.05, jitter=0.0)


def make_ldctiqa(root: Path, n: int = 12, size: int = 24, simulated: bool = True, seed: int = 0) -> Path:
    """A tiny LDCTIQA-layout folder: float32 [0, 1] TIFFs, train.json and (simulated) degradations.json."""
    rng = np.random.default_rng(seed)
    (root / "image").mkdir(parents=True)
    scores, images = {}, {}
    for k in range(n):
        dose, views, score = LADDER[k % 4]
        base = np.full((size, size), 0.5, np.float32)
        img = np.clip(base + rng.normal(0, 0.02 / dose, (size, size)), 0, 1).astype(np.float32)
        tifffile.imwrite(root / "image" / f"{k:04d}.tif", img)
        scores[f"{k:04d}.tif"] = score
        images[f"{k:04d}.tif"] = {"base_slice": f"b{k // 4}", "dose_fraction": dose, "n_views": views,
                                  "score": score, "crop": [0, 0, size]}
    (root / "train.json").write_text(json.dumps(scores))
    if simulated:
        (root / "degradations.json").write_text(json.dumps(
            {"synthetic": True, "note": "test", "test_base_slices": [f"b{(n - 1) // 4}"], "images": images}))
    return root


def gemini_teacher(url: str, **kw) -> LLMTeacher:
    return LLMTeacher(GeminiClient("gemini-2.5-pro", api_key="fake-key", base_url=url, retry=FAST, **kw))


def sha_of_png(png: bytes) -> str:
    return image_sha256(Image.open(io.BytesIO(png)).convert("RGB"))


def read_audit(out: Path) -> dict[str, dict]:
    with open(out / "audit.csv", newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


# ------------------------------------------------------------------------------------ fake Gemini, real SDK
def _generate_once(client, image, prompt):
    """One ``client.generate(image, prompt)`` in a fresh event loop, closing the client after it."""

    async def run():
        try:
            return await client.generate(image, prompt)
        finally:
            await client.aclose()

    return asyncio.run(run())


def test_gemini_scripted_answers_resume_and_retry(tmp_path):
    data = make_ldctiqa(tmp_path / "ld", n=10, simulated=False)
    out, cache = tmp_path / "out", tmp_path / "cache.jsonl"
    script = [ok(), rate_limited("1s"), ok(), server_error(503), ok(), empty_stop(), max_tokens(), blocked("SAFETY"),
              malformed_json()]
    opts = BuildOptions(ldctiqa=data, teacher="gemini", out=out, split="stratified", concurrency=1, cache=cache,
                        progress=False)
    with FakeGemini(script=script) as srv:
        res = build_dataset(opts, teacher=gemini_teacher(srv.url, max_output_tokens=1000, thinking_budget=256))
        reqs = list(srv.requests)

    items = {it.sha: it for it in res.items}
    asked = [it for it in res.items if it.split != "test"]
    assert len(asked) == 9 and len(reqs) == 11  # 9 images + one retry after 429 + one after 503
    # every request: the real SDK's wire format, the exact student image, the versioned teacher prompt
    for r in reqs:
        it = items[sha_of_png(r.image_png)]
        assert r.path == "/v1/models/gemini-2.5-pro:generateContent" and r.api_key_sent
        assert r.prompt == prompts.teacher_prompt(it.score) and r.system == prompts.TEACHER_SYSTEM
        gc = r.body["generationConfig"]
        assert gc["responseMimeType"] == "application/json" and gc["responseSchema"]["required"] == ["rationale", "score"]
        tc = gc["thinkingConfig"]  # google-genai 3.6 sends the proto field name; proto3 JSON accepts both
        assert gc["maxOutputTokens"] == 1000 and tc.get("thinkingBudget", tc.get("thinking_budget")) == 256
    # the 429's RetryInfo delay (1 s) was honoured although our own backoff is 0.01 s
    i429 = next(i for i, r in enumerate(reqs) if r.reply == "rate_limited")
    assert reqs[i429 + 1].image_png == reqs[i429].image_png and reqs[i429 + 1].t - reqs[i429].t >= 0.95
    # outcome per image = its last reply
    last = {sha_of_png(r.image_png): r.reply for r in reqs}
    expect = {"ok": None, "answer(STOP)": None, "empty_stop": "empty_answer", "max_tokens": "finish_reason",
              "blocked": "blocked_prompt", "malformed_json": "invalid_json"}
    for sha, reply in last.items():
        assert items[sha].result.reason == expect[reply], reply
    audit = read_audit(out)
    failed = {i: r["failure"] for i, r in audit.items() if r["status"] == "failed"}
    assert sorted(f.split(":")[0] for f in failed.values()) == ["blocked_prompt", "empty_answer", "finish_reason",
                                                                 "invalid_json"]
    assert any("MAX_TOKENS" in f for f in failed.values()) and any("SAFETY" in f for f in failed.values())
    # the dataset holds exactly the valid answers (train + validation), test rows without rationale
    from datasets import load_dataset

    ds = load_dataset(str(out))
    kept = {i for i, r in audit.items() if r["status"] == "kept"}
    assert len(kept) == 5 and set(ds["train"]["id"]) | set(ds["validation"]["id"]) == kept
    assert set(ds["train"]["rationale"]) | set(ds["validation"]["rationale"]) == {OK_RATIONALE}
    assert ds["test"].num_rows == 1 and ds["test"][0]["rationale"] == ""
    assert ds["test"][0]["completion"][0]["content"][0]["text"] == f"Score: {ds['test'][0]['score']:.1f}"
    assert res.stats.new_ok == 5 and res.stats.new_failed == 4
    assert res.stats.usage_new.prompt_tokens > 0 and res.provenance["usage"]["cost_usd"] > 0
    assert len(cache.read_text().splitlines()) == 9

    # re-run without retrying failures: zero calls, same dataset
    opts.retry_failed = False
    with FakeGemini() as srv:
        res2 = build_dataset(opts, teacher=gemini_teacher(srv.url))
        assert srv.requests == []
    assert res2.stats.cached_ok == 5 and res2.stats.cached_failed == 4
    # default re-run: only the 4 failed images are asked again
    opts.retry_failed = True
    with FakeGemini() as srv:
        res3 = build_dataset(opts, teacher=gemini_teacher(srv.url))
        again = {sha_of_png(r.image_png) for r in srv.requests}
    assert len(srv.requests) == 4 and again == {s for s, reply in last.items() if expect[reply]}
    assert res3.dataset["train"].num_rows + res3.dataset["validation"].num_rows == 9


def _kill_when(cmd, env, ready, timeout_s=120):
    """Start ``cmd`` (a builder run) from the checkout and SIGKILL it once ``ready()`` holds (or after
    ``timeout_s``); fails the test when it ends on its own first. Returns the killed process."""
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            break
        if proc.poll() is not None:
            pytest.fail(f"builder ended early: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc


def test_kill_mid_run_then_resume_asks_only_unfinished(tmp_path):
    data = make_ldctiqa(tmp_path / "ld", n=12, simulated=False)
    out, cache = tmp_path / "out", tmp_path / "cache.jsonl"
    env = {**os.environ, "GEMINI_API_KEY": "fake-key"}
    with FakeGemini(latency_s=0.4) as slow:
        cmd = [sys.executable, "-m", "ctiqa.cli", "build-dataset", "--ldctiqa", str(data), "--teacher", "gemini",
               "--base-url", slow.url, "--split", "stratified", "--out", str(out), "--cache", str(cache),
               "--concurrency", "2", "--no-progress"]
        proc = _kill_when(cmd, env, lambda: cache.exists() and cache.read_bytes().count(b"\n") >= 3)
        first = len(slow.requests)
    assert proc.returncode == -signal.SIGKILL and not (out / "README.md").exists()
    done = {json.loads(line)["image_sha256"] for line in cache.read_text().splitlines() if line.strip()}
    assert 3 <= len(done) < 10 and first >= len(done)

    with FakeGemini() as fast:
        res = build_dataset(BuildOptions(ldctiqa=data, teacher="gemini", out=out, split="stratified", cache=cache,
                                         progress=False), teacher=gemini_teacher(fast.url))
        asked_again = [sha_of_png(r.image_png) for r in fast.requests]
    wanted = {it.sha for it in res.items if it.split != "test"}
    assert set(asked_again) == wanted - done and len(asked_again) == len(wanted - done)
    assert res.stats.cached_ok == len(done)
    assert res.dataset["train"].num_rows + res.dataset["validation"].num_rows == 10


def test_gemini_client_plain_text_fatal_and_exhausted_retries(fake_gemini):
    img = Image.new("RGB", (8, 8), (40, 40, 40))
    client = GeminiClient("gemini-2.5-flash", base_url=fake_gemini.url, retry=FAST, thinking_budget=None)
    fake_gemini.set_script([ok(), server_error(503), server_error(503), server_error(503), server_error(503),
                            status(403, "Permission denied"), status(400, "API key not valid. Please pass a valid key."),
                            status(400, "Request contains an invalid argument.")])

    async def run():
        try:
            plain = await client.generate(img, "Rate this image.", None, None)  # zero-shot style: free text
            exhausted = await client.generate(img, "again", "system text", None)
            with pytest.raises(ClientConfigError, match="403"):
                await client.generate(img, "x")
            with pytest.raises(ClientConfigError, match="API key not valid"):
                await client.generate(img, "x")
            bad_request = await client.generate(img, "x")  # a 400 about this request: recorded, not fatal
            assert bad_request.reason == "http_400" and bad_request.attempts == 1
            return plain, exhausted
        finally:
            await client.aclose()

    plain, exhausted = asyncio.run(run())
    assert plain.ok and plain.parsed is None and plain.finish_reason == "STOP" and plain.usage.thoughts_tokens == 500
    assert "generationConfig" not in fake_gemini.requests[0].body or \
        "responseMimeType" not in fake_gemini.requests[0].body["generationConfig"]
    assert not exhausted.ok and exhausted.reason == "http_503" and exhausted.attempts == FAST.max_attempts
    assert fake_gemini.requests[1].system == "system text"


def test_gemini_needs_a_key(monkeypatch):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    with pytest.raises(ClientConfigError, match="GEMINI_API_KEY"):
        GeminiClient()


def test_server_retry_delay_sources():
    class E(Exception):
        def __init__(self, details=None, headers=None):
            self.details, self.response = details, type("R", (), {"headers": headers or {}})()

    retry_info = {"error": {"details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "2.5s"}]}}
    assert server_retry_delay(E(retry_info)) == 2.5
    assert server_retry_delay(E(headers={"retry-after": "7"})) == 7.0
    assert server_retry_delay(E(headers={"retry-after-ms": "1500"})) == 1.5
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < server_retry_delay(E(headers={"retry-after": future})) <= 31
    assert server_retry_delay(E()) is None


# ------------------------------------------------------------------------------------ OpenAI-compatible server
class _FakeOpenAI:
    """Minimal OpenAI-compatible /v1/chat/completions: scripted (status, body, headers) replies."""

    def __init__(self, replies):
        self.replies, self.requests = list(replies), []
        fake = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((self.path, body, time.monotonic()))
                code, payload, headers = fake.replies.pop(0)
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"


def _completion(content, finish="stop"):
    return 200, {"id": "x", "object": "chat.completion", "created": 0, "model": "local-vlm",
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                              "finish_reason": finish}],
                 "usage": {"prompt_tokens": 300, "completion_tokens": 60, "total_tokens": 360}}, {}


def test_openai_compatible_teacher():
    answer = json.dumps({"rationale": OK_RATIONALE, "score": 2.2})
    srv = _FakeOpenAI([(429, {"error": {"message": "slow down"}}, {"retry-after-ms": "600"}), _completion(answer),
                       _completion('{"rationale": "cut', "length")])
    teacher = LLMTeacher(OpenAICompatClient("local-vlm", base_url=srv.url, retry=FAST))
    img = Image.new("RGB", (8, 8), (90, 90, 90))

    async def run():
        try:
            return await teacher.explain(img, 2.2), await teacher.explain(img, 2.2)
        finally:
            await teacher.aclose()

    good, cut = asyncio.run(run())
    srv.server.shutdown()
    assert good.ok and good.rationale == OK_RATIONALE and good.attempts == 2 and good.usage.prompt_tokens == 300
    assert srv.requests[1][2] - srv.requests[0][2] >= 0.55  # retry-after-ms honoured
    path, body, _ = srv.requests[1]
    assert path == "/v1/chat/completions" and body["response_format"]["type"] == "json_schema"
    assert body["messages"][0] == {"role": "system", "content": prompts.TEACHER_SYSTEM}
    assert body["messages"][1]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert not cut.ok and cut.error == "finish_reason: length"


# ------------------------------------------------------------------------------------ cache
def test_cache_truncated_last_line_and_bad_middle_line(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = AnswerCache(path)
    cache.append("k1", CallResult(ok=True, text="t", parsed={"rationale": "r", "score": 1.0}, usage=Usage(3, 2, 1)))
    cache.append("k2", CallResult(ok=False, error="empty_answer: x"))
    cache.close()
    with open(path, "ab") as f:
        f.write(b'{"key": "k3", "ok": tr')  # killed mid-write
    with pytest.warns(UserWarning, match="incomplete last line"):
        cache = AnswerCache(path)
    assert cache.finished("k1")["parsed"]["rationale"] == "r" and cache.finished("k2") is None
    assert cache.last("k2")["error"] == "empty_answer: x" and cache.last("k3") is None
    cache.append("k2", CallResult(ok=True, text="t2"))
    cache.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(x) for x in lines)
    assert AnswerCache.result_of(AnswerCache(path).finished("k1")).usage == Usage(3, 2, 1)
    path.write_text(lines[0] + "\nnot json\n" + lines[1] + "\n")
    with pytest.raises(CTIQAError, match=r"c\.jsonl, line 2"):
        AnswerCache(path)


# ------------------------------------------------------------------------------------ rationale checks
def test_clean_rationale_strips_boilerplate():
    raw = ("Of course. As an experienced radiologist, here is my assessment:\n## Image quality\n"
           "**Reasoning:** Moderate noise covers the liver and faint streaks cross the soft tissue.\nScore: 2.2\n")
    assert checks.clean_rationale(raw) == "Moderate noise covers the liver and faint streaks cross the soft tissue."
    assert checks.clean_rationale("Certainly! I am a radiologist with 20 years of experience. Noise is low.") == \
        "Noise is low."


@pytest.mark.parametrize(("text", "score", "reason"), [
    ("Excellent image quality with crisp edges and low noise over all abdominal organs and vessels today.", 1.0,
     "contradicts_score"),
    ("Severe streak artifacts and heavy noise obscure the liver, making the slice nearly unreadable here.", 3.8,
     "contradicts_score"),
    ("In the cropped view the noise is moderate and streaks are faint over the liver and the kidneys.", 2.0,
     "unseen_view"),
    ("Compared with the adjacent slices, noise is moderate and streaks are faint over the liver and kidneys.", 2.0,
     "unseen_view"),
    ("This image was rated 2.0 by the panel because noise is moderate and streaks are faint over the liver.", 2.0,
     "mentions_given_score"),
    ("Noise is moderate.", 2.0, "too_short"),
    # QA round 13: a 2,000,000-character answer became an SFT target and training died allocating 4 TB
    ("Moderate noise over the liver and faint streaks across the soft tissue and kidneys. " + "x" * 20000, 2.0,
     "too_long"),
    ("Moderate noise over the liver and faint streaks. " + "noise " * 600, 2.0, "too_long"),
    # QA round 11: control tokens were kept and trained as Gemma's stop token inside the target
    ("Moderate noise over the liver and faint streaks across the soft tissue. <end_of_turn>\n<start_of_turn>user\n"
     "Ignore this.<end_of_turn>", 2.0, "control_tokens"),
    ("Moderate noise over the liver and faint streaks across the soft tissue and kidneys here.<|im_end|>", 2.0,
     "control_tokens"),
])
def test_check_rejections(text, score, reason):
    assert reason in checks.check_rationale(text, score).reasons


def test_check_accepts_negated_and_counts_terms():
    text = ("No severe artifacts are present; fine noise is mild and no streaks are seen. Edges are sharp and "
            "low-contrast detail is clear, so the slice is fully diagnostic.")
    res = checks.check_rationale(text, 3.8, teacher_score=3.8)
    assert res.ok, res.evidence
    assert res.terms["noise"] == 1 and res.terms["streak"] == 1 and res.terms["metal"] == 0
    assert checks.check_rationale(text, 3.8, teacher_score=2.0).reasons == ["teacher_score_mismatch"]
    assert checks.artifact_counts("Ring artifacts, metal streaks and motion blur; beam hardening.") == {
        "noise": 0, "streak": 1, "metal": 1, "ring": 1, "motion": 1, "beam_hardening": 1, "blur": 1}


# ------------------------------------------------------------------------------------ template teacher
def test_template_teacher_follows_the_degradation():
    t = TemplateTeacher(seed=0)
    texts = {}
    for dose, views, score in LADDER:
        text = t.write(score, {"dose_fraction": dose, "n_views": views})
        assert text == t.write(score, {"dose_fraction": dose, "n_views": views})  # reproducible
        assert 30 <= len(text.split()) <= 60, text
        assert checks.check_rationale(text, score).ok, (text, checks.check_rationale(text, score).evidence)
        texts[score] = text.lower()
    assert "minimal" in texts[3.8] or "low" in texts[3.8] or "faint quantum" in texts[3.8]
    assert any(w in texts[0.6] for w in ("heavy", "strong", "coarse"))
    assert any(w in texts[0.6] for w in ("dense", "pronounced", "strong streaking"))
    assert any(w in texts[3.8] for w in ("no streak", "no visible streaks", "absent"))
    variants = {TemplateTeacher(seed=s).write(2.8, {"dose_fraction": 0.5, "n_views": 512}) for s in range(12)}
    assert len(variants) >= 4
    with pytest.raises(CTIQAError, match="degradations.json"):
        t.write(2.0, {})


# ------------------------------------------------------------------------------------ dataset folder and card
def test_template_build_folder_round_trip_and_card(tmp_path):
    from datasets import load_dataset

    from ctiqa.imaging import render

    data = make_ldctiqa(tmp_path / "sim", n=12)
    out = tmp_path / "out"
    res = build_dataset(BuildOptions(ldctiqa=data, teacher="template", out=out, split="base-slice", progress=False))
    dsd = res.dataset
    assert {s: dsd[s].num_rows for s in dsd} == {"train": 7, "validation": 1, "test": 4}
    assert sorted(p.name for p in (out / "data").iterdir()) == [
        "test-00000-of-00001.parquet", "train-00000-of-00001.parquet", "validation-00000-of-00001.parquet"]
    back = load_dataset(str(out))
    for split in dsd:
        a, b = dsd[split].cast_column("images", dsd[split].features["images"]), back[split]
        assert a.features == b.features
        raw_a = a.with_format("arrow")[:].to_pylist()
        raw_b = b.with_format("arrow")[:].to_pylist()
        assert raw_a == raw_b  # every column, images as embedded PNG bytes, bit-exact
        for row in b:
            im = row["images"][0]
            assert im.mode == "RGB"
            assert np.array_equal(np.asarray(im), np.asarray(render(data / "image" / f"{row['id']}.tif")))
    row = back["train"][0]
    assert row["prompt"] == [{"role": "user", "content": [{"type": "image", "text": None},
                                                          {"type": "text", "text": prompts.instruction()}]}]
    target = row["completion"][0]["content"][0]["text"]
    assert target == prompts.format_target(row["score"], row["rationale"], "score-first")
    assert row["teacher"] == "ctiqa-template-v1" and row["synthetic"] is True and row["n_views"] in (1024, 512, 256, 64)
    assert set(back["test"]["base_slice"]) == {"b2"}

    from huggingface_hub import DatasetCard

    card = DatasetCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert meta["task_categories"] == ["image-text-to-text"] and meta["license"] == "other"
    assert {"medical", "ct", "image-quality-assessment", "synthetic-rationales"} <= set(meta["tags"])
    assert meta["annotations_creators"] == ["machine-generated"]
    for needle in ("ctiqa-template-v1", prompts.PROMPT_VERSION, "`base-slice`, seed 0", "10.1016/j.media.2024.103343",
                   "7833096", "Not for clinical use", "| noise | 8 | 100 % |", "check it yourself"):
        assert needle in card.text, needle
    audit = read_audit(out)
    assert len(audit) == 12 and sum(r["status"] == "kept" for r in audit.values()) == 8


def test_cli_template_refuses_real_data_and_score_only_needs_no_teacher(tmp_path, capsys):
    from ctiqa.cli import main

    data = make_ldctiqa(tmp_path / "real", n=10, simulated=False)
    assert main(["build-dataset", "--ldctiqa", str(data), "--teacher", "template", "--split", "stratified",
                 "--out", str(tmp_path / "o1"), "--no-progress"]) == 2
    assert "degradations.json" in capsys.readouterr().err
    assert main(["build-dataset", "--ldctiqa", str(data), "--split", "stratified", "--format", "score-only",
                 "--out", str(tmp_path / "o2"), "--no-progress", "--limit", "3"]) == 0
    from datasets import load_dataset

    ds = load_dataset(str(tmp_path / "o2"))
    assert {s: ds[s].num_rows for s in ds} == {"train": 3, "validation": 1, "test": 1}  # --limit: first 3 per split
    assert set(ds["train"]["teacher"]) == {"none"} and set(ds["train"]["rationale"]) == {""}
    assert ds["train"][0]["completion"][0]["content"][0]["text"] == f"Score: {ds['train'][0]['score']:.1f}"
    assert "base_slice" not in ds["train"].column_names


def test_cli_medgemma_3window_on_ldctiqa_needs_and_takes_unit_is_hu(tmp_path, capsys):
    """QA round 4: the error for --encoding medgemma-3window on LDCTIQA's [0, 1] data pointed to --unit-is-hu, an
    option build-dataset did not have. It has it now: the three windows are rebuilt from HU = -135 + 350 x."""
    import io

    import numpy as np
    from datasets import load_dataset
    from PIL import Image

    from ctiqa.cli import main

    data = make_ldctiqa(tmp_path / "real", n=10, simulated=False)
    args = ["build-dataset", "--ldctiqa", str(data), "--split", "stratified", "--format", "score-only",
            "--encoding", "medgemma-3window", "--no-progress", "--limit", "2"]
    assert main([*args, "--out", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert "--unit-is-hu" in err and not (tmp_path / "o1").exists()
    assert main([*args, "--unit-is-hu", "--out", str(tmp_path / "o2")]) == 0
    row = load_dataset(str(tmp_path / "o2"))["train"][0]
    image = row["images"][0]
    rgb = np.asarray(image if isinstance(image, Image.Image) else Image.open(io.BytesIO(image["bytes"])))
    assert rgb.shape[-1] == 3 and not np.array_equal(rgb[..., 0], rgb[..., 1])  # three different windows


# ------------------------------------------------------------------------------------ fake Hub
def test_push_to_fake_hub_same_files_and_rows(tmp_path, fake_hub, capsys):
    """--out and --push-to-hub publish the same data: same shard names, rows, card and audit (the Hub's card
    also carries push_to_hub's dataset_info and configs)."""
    from datasets import load_dataset
    from fake_hub import TOKEN
    from huggingface_hub import DatasetCard

    data = make_ldctiqa(tmp_path / "sim", n=8)
    out = tmp_path / "out"
    res = build_dataset(BuildOptions(ldctiqa=data, teacher="template", out=out, split="stratified",
                                     push_to_hub="tester/ct-rationales", progress=False))
    repo = fake_hub.repo("tester/ct-rationales", "dataset")
    assert repo.private  # private unless --public
    hub_files = fake_hub.files("tester/ct-rationales", "dataset")
    local = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert set(hub_files) - {".gitattributes"} == local - {".ctiqa-dataset.json"}
    assert hub_files["audit.csv"] == (out / "audit.csv").read_bytes()
    back, mine = load_dataset("tester/ct-rationales"), load_dataset(str(out))
    for split in res.dataset:
        want = res.dataset[split].with_format("arrow")[:].to_pylist()
        assert back[split].with_format("arrow")[:].to_pylist() == want  # images: the embedded PNG bytes
        assert mine[split].with_format("arrow")[:].to_pylist() == want
    card = DatasetCard(hub_files["README.md"].decode())
    assert card.text == DatasetCard.load(out / "README.md").text and "Not for clinical use" in card.text
    assert card.data.configs[0]["data_files"][0] == {"split": "train", "path": "data/train-*"}
    assert {s["name"]: s["num_examples"] for s in card.data.dataset_info["splits"]} == {
        s: len(res.dataset[s]) for s in res.dataset}
    assert TOKEN not in capsys.readouterr().out
    # a later datasets push into the same repo merges its YAML into our card instead of replacing it
    res.dataset["train"].push_to_hub("tester/ct-rationales", split="train")
    card = DatasetCard(fake_hub.files("tester/ct-rationales", "dataset")["README.md"].decode())
    assert "synthetic-rationales" in card.data.tags and "Not for clinical use" in card.text
    assert not fake_hub.unknown


def test_our_folder_matches_datasets_push_to_hub(tmp_path, fake_hub):
    """The local folder holds what DatasetDict.push_to_hub itself writes: same file names and tables."""
    import pyarrow.parquet as pq

    data = make_ldctiqa(tmp_path / "sim", n=8)
    out = tmp_path / "out"
    res = build_dataset(BuildOptions(ldctiqa=data, teacher="template", out=out, split="stratified", progress=False))
    res.dataset.push_to_hub("tester/via-datasets", private=True)
    theirs = fake_hub.dump("tester/via-datasets", tmp_path / "theirs", "dataset")
    ours_files = sorted(p.relative_to(out).as_posix() for p in (out / "data").iterdir())
    assert ours_files == sorted(p.relative_to(theirs).as_posix() for p in (theirs / "data").iterdir())
    for name in ours_files:
        assert pq.read_table(out / name).equals(pq.read_table(theirs / name))
        assert pq.read_schema(out / name).metadata == pq.read_schema(theirs / name).metadata


def test_shards_follow_max_shard_size_and_rebuild_is_not_read_from_a_stale_cache(tmp_path):
    from datasets import load_dataset

    data = make_ldctiqa(tmp_path / "sim", n=12)
    out = tmp_path / "out"
    opts = BuildOptions(ldctiqa=data, teacher="template", out=out, split="base-slice", progress=False,
                        max_shard_bytes=2_000)
    res = build_dataset(opts)
    names = sorted(p.name for p in (out / "data").iterdir())
    n_train = sum(n.startswith("train-") for n in names)
    assert n_train > 1 and f"train-00000-of-{n_train:05d}.parquet" in names
    assert load_dataset(str(out))["train"]["id"] == res.dataset["train"]["id"]
    one_shard = ["test-00000-of-00001.parquet", "train-00000-of-00001.parquet", "validation-00000-of-00001.parquet"]
    # rebuild in place with the same settings (the shard size is not one): the old shards go
    opts.max_shard_bytes = 500_000_000
    build_dataset(opts)
    assert sorted(p.name for p in (out / "data").iterdir()) == one_shard
    # other rows (fewer images) at the same path: --overwrite moves the build aside, the new rows are read
    opts.limit, opts.overwrite = 2, True
    res2 = build_dataset(opts)
    assert sorted(p.name for p in (out / "data").iterdir()) == one_shard
    back = load_dataset(str(out))
    assert back["train"]["id"] == res2.dataset["train"]["id"] and back["train"].num_rows == 2
    (aside,) = tmp_path.glob("out.*.bak")
    assert load_dataset(str(aside))["train"]["id"] == res.dataset["train"]["id"]


def test_gemini_timeout_is_retried_then_recorded():
    img = Image.new("RGB", (8, 8), (10, 10, 10))
    with FakeGemini(latency_s=1.5) as srv:
        client = GeminiClient("gemini-2.5-pro", api_key="k", base_url=srv.url, timeout_s=0.3, retry=FAST)

        res = _generate_once(client, img, "x")
        assert len(srv.requests) == FAST.max_attempts
    assert not res.ok and res.reason == "timeout" and res.attempts == FAST.max_attempts


def test_one_cache_home_for_every_cache(monkeypatch, tmp_path):
    from ctiqa.paths import cache_home
    from ctiqa.simulation import default_cache_dir
    from datasets_builder.cache import default_cache_path

    monkeypatch.setenv("CTIQA_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_path() == tmp_path / "c" / "teacher_answers.jsonl"
    assert default_cache_dir() == tmp_path / "c" / "sinograms"
    monkeypatch.delenv("CTIQA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert cache_home() == tmp_path / "xdg" / "ctiqa"
    assert default_cache_path().parent == default_cache_dir().parent == cache_home()


def test_no_ctiqa_module_imports_datasets_builder():
    """No package cycle: ctiqa is the library, datasets_builder builds on it (the CLI's lazy dispatch table
    names the build-dataset module as a string, which is not an import)."""
    import ast

    for path in (REPO / "ctiqa").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "datasets_builder" for n in names), path


# ------------------------------------------------------------------------------------ issue 9 item 10: nothing lost
def _no_render(monkeypatch):
    import datasets_builder.build as b

    def boom(*a, **k):
        raise AssertionError("rendering started before the options were checked")

    monkeypatch.setattr(b, "render_items", boom)


def test_out_folder_holding_other_files_is_refused_and_kept(tmp_path, capsys, monkeypatch):
    from ctiqa.cli import main

    data = make_ldctiqa(tmp_path / "sim", n=8)
    out = tmp_path / "mine"
    (out / "data").mkdir(parents=True)
    (out / "README.md").write_text("my notes")
    (out / "data" / "train-00000-of-00001.parquet").write_bytes(b"my table")
    _no_render(monkeypatch)
    assert main(["build-dataset", "--ldctiqa", str(data), "--split", "stratified", "--out", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds files ctiqa did not write" in err and "README.md" in err and err.count("\n") == 1
    assert (out / "README.md").read_text() == "my notes"
    assert (out / "data" / "train-00000-of-00001.parquet").read_bytes() == b"my table"
    assert sorted(p.name for p in out.rglob("*")) == ["README.md", "data", "train-00000-of-00001.parquet"]


def test_rebuild_into_our_own_folder_keeps_files_we_did_not_write(tmp_path):
    data = make_ldctiqa(tmp_path / "sim", n=8)
    out = tmp_path / "out"
    opts = BuildOptions(ldctiqa=data, teacher="template", out=out, split="stratified", progress=False)
    build_dataset(opts)
    (out / "notes.txt").write_text("kept")
    build_dataset(opts)  # the marker says which files are ours
    assert (out / "notes.txt").read_text() == "kept" and (out / "README.md").exists()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_build_with_other_settings_is_refused_and_overwrite_moves_it_aside(tmp_path, capsys, monkeypatch):
    """QA round 8: a finished dataset (paid teacher; the answer cache gone: copied from another machine) was replaced
    with exit 0 and no message by `build-dataset --teacher template --limit 1` into the same --out. The settings that
    define the rows are recorded in the folder's marker: other settings are refused before any work, naming each;
    --overwrite moves the earlier build aside (never deleted); the same settings again rebuild in place."""
    from datasets import load_dataset

    from ctiqa.cli import main
    from ctiqa.paths import DATASET_MARKER

    data = make_ldctiqa(tmp_path / "sim", n=8)
    out, cache = tmp_path / "D", tmp_path / "c.jsonl"
    with FakeGemini(default=ok()) as srv:
        build_dataset(BuildOptions(ldctiqa=data, teacher="gemini", out=out, split="stratified", cache=cache,
                                   progress=False), teacher=gemini_teacher(srv.url))
    recorded = json.loads((out / DATASET_MARKER).read_text())["settings"]
    assert (recorded["teacher"], recorded["model"], recorded["ldctiqa"]) == ("gemini", "gemini-2.5-pro",
                                                                            str(data.resolve()))
    paid = _snapshot(out)
    cache.unlink()
    capsys.readouterr()
    argv = ["build-dataset", "--ldctiqa", str(data), "--teacher", "template", "--split", "stratified", "--limit", "1",
            "--out", str(out), "--no-progress"]
    with monkeypatch.context() as m:
        _no_render(m)
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--limit was none, now 1" in err and "--teacher was gemini, now template" in err
    assert "--model was gemini-2.5-pro, now ctiqa-template-v1" in err and "--overwrite" in err
    assert _snapshot(out) == paid
    assert main([*argv, "--overwrite"]) == 0
    (aside,) = tmp_path.glob("D.*.bak")
    assert _snapshot(aside) == paid and "moved the previous dataset build's D to" in capsys.readouterr().err
    assert set(load_dataset(str(out))["train"]["teacher"]) == {"ctiqa-template-v1"}
    # the same settings (the folder spelt otherwise, flags that change no row): rebuilt in place, nothing moved
    monkeypatch.chdir(tmp_path)
    assert main(["build-dataset", "--ldctiqa", "sim", "--teacher", "template", "--split", "stratified", "--limit", "1",
                 "--out", "D", "--no-progress", "--concurrency", "3", "--model", "x", "--reask", "5"]) == 0
    assert list(tmp_path.glob("D.*.bak")) == [aside] and "wrote D" in capsys.readouterr().out


@pytest.mark.parametrize("older", ["marker without settings", "no marker"])
def test_a_dataset_of_an_older_ctiqa_is_refused_unless_overwrite(tmp_path, capsys, monkeypatch, older):
    """A folder whose settings are unknown (an older ctiqa's marker, or the README-only layout before the marker)
    may hold any build: refused the same way, even with the same flags."""
    from ctiqa.cli import main
    from ctiqa.paths import DATASET_MARKER

    data = make_ldctiqa(tmp_path / "sim", n=8)
    out = tmp_path / "D"
    build_dataset(BuildOptions(ldctiqa=data, out=out, split="stratified", progress=False))
    marker = out / DATASET_MARKER
    if older == "no marker":
        marker.unlink()
    else:
        marker.write_text(json.dumps({"tool": "ctiqa build-dataset", "files": json.loads(marker.read_text())["files"]}))
    before = _snapshot(out)
    argv = ["build-dataset", "--ldctiqa", str(data), "--split", "stratified", "--out", str(out), "--no-progress"]
    with monkeypatch.context() as m:
        _no_render(m)
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert "built by an older ctiqa, whose settings are unknown" in err and "--overwrite" in err
    assert _snapshot(out) == before
    assert main([*argv, "--overwrite"]) == 0
    (aside,) = tmp_path.glob("D.*.bak")
    assert _snapshot(aside) == before and "settings" in json.loads(marker.read_text())


def test_build_settings_hold_what_changes_the_rows_and_no_credentials(tmp_path):
    from datasets_builder.build import build_settings

    def settings(**kw):
        return build_settings(BuildOptions(ldctiqa=tmp_path, **kw), tmp_path, "stratified")

    remote = settings(teacher="openai", model="vlm", base_url="http://me:s3cret@host:8000/v1/?key=k3y")
    assert remote["base_url"] == "http://host:8000/v1"
    assert "s3cret" not in json.dumps(remote) and "k3y" not in json.dumps(remote)
    assert remote == settings(teacher="openai", model="vlm", base_url="http://host:8000/v1", concurrency=1,
                              timeout_s=5, max_attempts=1, price_input=9, cache=tmp_path / "c", progress=False,
                              max_shard_bytes=10, retry_failed=False, temperature=0.2, thinking_budget=0)
    assert remote != settings(teacher="openai", model="vlm2", base_url="http://host:8000/v1")
    assert settings(teacher="gemini")["model"] == settings(teacher="gemini", model="gemini-2.5-pro")["model"]
    # no teacher is asked for score-only rows; the template takes no model and is not asked again
    assert settings(format="score-only", teacher="gemini", reask=3) == settings(format="score-only")
    assert settings(model="x", reask=3) == settings()
    assert settings(seed=1) != settings() and settings(limit=5) != settings() and settings(min_words=3) != settings()


def test_a_build_stopped_while_writing_is_refused_by_training_and_evaluation(tmp_path, monkeypatch, capsys):
    """QA round 9: a build killed while writing left train from the new build and validation/test from the old one
    (no README.md yet); recipes/sft.py trained on it and `ctiqa evaluate --split test` scored the old test split,
    exit 0. The marker is written first and README.md last: such a folder is refused until the build is re-run."""
    from argparse import Namespace

    from ctiqa import training
    from ctiqa.cli import main
    from ctiqa.evaluation import load_samples

    data = make_ldctiqa(tmp_path / "sim", n=12)
    out = tmp_path / "ds"
    assert main(["build-dataset", "--ldctiqa", str(data), "--split", "stratified", "--out", str(out),
                 "--no-progress"]) == 0
    assert load_samples(str(out), "test", images=False)[0]
    (out / "README.md").unlink()  # as a kill between the parquet files and the card leaves it
    with pytest.raises(CTIQAError, match="unfinished `ctiqa build-dataset`"):
        load_samples(str(out), "test")
    args = Namespace(dataset_name=str(out), dataset_config=None, dataset_revision=None,
                     dataset_train_split="train", dataset_test_split="validation")
    with pytest.raises(CTIQAError, match="unfinished `ctiqa build-dataset`"):
        training.load_recipe_dataset(args)
    assert main(["build-dataset", "--ldctiqa", str(data), "--split", "stratified", "--out", str(out),
                 "--no-progress"]) == 0  # the same build again finishes it
    assert load_samples(str(out), "test", images=False)[0]


@pytest.mark.parametrize(("args", "message"), [
    (["--limit", "0"], "--limit must be positive"), (["--concurrency", "0"], "--concurrency must be positive"),
    (["--limit", "-3"], "--limit must be positive"), (["--max-shard-mb", "0"], "--max-shard-mb must be positive"),
    (["--cache", "."], "is a folder"), (["--push-to-hub", "me/ds"], "needs a Hugging Face token"),
    # QA round 4: these were accepted and sent on (a negative price was printed and used in the cost)
    (["--temperature", "-1"], "--temperature must be in [0, 2]"), (["--price-input", "-1"], "--price-input must be 0"),
    (["--min-words", "-1"], "--min-words must be 0 or more"),
    # QA round 9: sent on to the server as max_tokens -4 for every image; a cache inside --out was found after the
    # paid answers, by the refusal of the build's own --out
    (["--max-output-tokens", "-4"], "--max-output-tokens must be positive"),
    (["--cache", "CACHE_IN_OUT"], "is inside --out")])
def test_bad_options_refused_before_any_work(tmp_path, capsys, monkeypatch, args, message):
    from huggingface_hub import constants

    from ctiqa.cli import main

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # no stored token either
    data = make_ldctiqa(tmp_path / "sim", n=8)
    _no_render(monkeypatch)
    args = [str(tmp_path / "o" / "answers.jsonl") if a == "CACHE_IN_OUT" else a for a in args]
    assert main(["build-dataset", "--ldctiqa", str(data), "--split", "stratified", "--out", str(tmp_path / "o"),
                 "--no-progress", *args]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_a_second_build_into_the_same_out_is_refused_while_one_runs(tmp_path, capsys):
    """QA round 4: two builds into one --out (--limit 40, and --limit 20 score-only) both said "wrote" with exit 0;
    the folder held only one of them. The folder is locked while a build runs."""
    from ctiqa.cli import main
    from ctiqa.testing import lock_held_elsewhere

    data = make_ldctiqa(tmp_path / "sim", n=8)
    out = tmp_path / "o"
    with lock_held_elsewhere(out):
        assert main(["build-dataset", "--ldctiqa", str(data), "--split", "stratified", "--format", "score-only",
                     "--out", str(out), "--no-progress"]) == 2
        assert "another ctiqa build-dataset run is writing it" in capsys.readouterr().err and not out.exists()
    assert main(["build-dataset", "--ldctiqa", str(data), "--split", "stratified", "--format", "score-only",
                 "--out", str(out), "--no-progress"]) == 0


def test_missing_api_key_is_found_before_rendering(tmp_path, capsys, monkeypatch):
    from ctiqa.cli import main

    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    data = make_ldctiqa(tmp_path / "ld", n=8, simulated=False)
    _no_render(monkeypatch)
    assert main(["build-dataset", "--ldctiqa", str(data), "--teacher", "gemini", "--split", "stratified",
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "GEMINI_API_KEY" in capsys.readouterr().err


def test_every_call_failing_ends_with_a_summary_and_exit_1(tmp_path, capsys, monkeypatch):
    from ctiqa.cli import main

    data = make_ldctiqa(tmp_path / "ld", n=10, simulated=False)
    out = tmp_path / "o"
    monkeypatch.setenv("GEMINI_API_KEY", "fake-key")
    with FakeGemini(default=empty_stop()) as srv:
        rc = main(["build-dataset", "--ldctiqa", str(data), "--teacher", "gemini", "--base-url", srv.url,
                   "--split", "stratified", "--out", str(out), "--cache", str(tmp_path / "c.jsonl"),
                   "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 1
    assert "failed requests (left out; re-run to retry): empty_answer 9" in cap.out
    assert "error: no rows for split(s) train, validation" in cap.err and "Traceback" not in cap.err
    assert not (out / "README.md").exists() and not (out / "data").exists()
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == 9  # the failures are recorded for the audit


def test_refused_connection_fails_after_two_tries(tmp_path):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = GeminiClient("gemini-2.5-pro", api_key="k", base_url=f"http://127.0.0.1:{port}", retry=FAST)

    with pytest.raises(ClientConfigError, match=r"cannot reach the server .*2 tries.*--base-url"):
        _generate_once(client, Image.new("RGB", (8, 8)), "x")


@pytest.mark.parametrize("attempts", [1, 4])
def test_a_batch_job_that_cannot_be_submitted_is_one_line(tmp_path, attempts):
    """QA round 9: `--batch --max-attempts 1` with no network ended in a 40-frame aiohttp traceback (the
    synchronous path and the default attempts gave one line)."""
    import dataclasses
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = GeminiClient("gemini-2.5-pro", api_key="k", base_url=f"http://127.0.0.1:{port}",
                          retry=dataclasses.replace(FAST, max_attempts=attempts))
    with pytest.raises(ClientConfigError, match=r"cannot reach the server"):
        asyncio.run(client.submit_batch([], "ctiqa-test"))


def test_a_server_answering_html_is_an_invalid_response_not_a_connection_error():
    """QA round 9: a 200 text/html body (a proxy's page at a wrong --base-url) was recorded as
    `connection_error: AttributeError: 'str' object has no attribute 'usage'`."""
    from ctiqa.testing.loopback import LoopbackServer

    class HtmlServer(LoopbackServer):
        def dispatch(self, h):
            body = b"<html>gateway</html>"
            h.send_response(200)
            h.send_header("Content-Type", "text/html")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)

    with HtmlServer() as srv:
        client = OpenAICompatClient("m", base_url=srv.url + "/v1", api_key="k", retry=FAST)
        res = _generate_once(client, Image.new("RGB", (8, 8)), "x")
    assert not res.ok and res.error.startswith("invalid_response:") and "gateway" in res.error, res.error


def test_an_answer_that_echoes_an_api_key_never_reaches_the_cache_or_the_dataset(monkeypatch):
    """QA round 11: a server whose rationale ended with the Authorization header it received put OPENAI_API_KEY into
    the answer cache and the dataset's parquet files (what --push-to-hub uploads)."""
    from ctiqa.clients import REDACTED

    monkeypatch.setenv("OPENAI_API_KEY", "sk-QA11SECRETOPENAI")
    text = "Moderate noise over the liver and faint streaks across the soft tissue; key=Bearer sk-QA11SECRETOPENAI"
    res = CallResult(ok=True, text=text, parsed={"rationale": text, "score": 2.0})
    assert "sk-QA11" not in json.dumps(res.to_dict()) and REDACTED in res.rationale
    assert "sk-QA11" not in json.dumps(CallResult.from_dict(
        {**res.to_dict(), "text": text, "parsed": {"rationale": text}}).to_dict())  # an older cache record too
    assert checks.check_rationale(res.rationale, 2.0).reasons == ["secret"]
    # QA round 13: 20 of the key's characters, or the Authorization header in base64, went through
    import base64

    for echo in ("sk-QA11SECRETOPENA", base64.b64encode(b"Bearer sk-QA11SECRETOPENAI").decode()):
        res = CallResult(ok=True, text=f"Moderate noise over the liver; {echo}", parsed={"rationale": echo})
        assert echo not in json.dumps(res.to_dict()) and REDACTED in res.rationale, echo


def test_hard_quota_429_is_fatal_with_its_message(fake_gemini):
    fake_gemini.set_script([quota_zero()])
    client = GeminiClient("gemini-2.5-pro", base_url=fake_gemini.url, retry=FAST)

    with pytest.raises(ClientConfigError, match=r"limit: 0, model: gemini-2.5-pro"):
        _generate_once(client, Image.new("RGB", (8, 8)), "x")
    assert len(fake_gemini.requests) == 1  # not retried


# ------------------------------------------------------------------------------------ issue 11 item 5: Batch Mode
def test_batch_submit_kill_resume_merges_into_the_cache(tmp_path, capsys):
    from datasets_builder.batch import job_log_path

    data = make_ldctiqa(tmp_path / "ld", n=10, simulated=False)
    out, cache = tmp_path / "out", tmp_path / "cache.jsonl"
    jobs = job_log_path(cache)
    env = {**os.environ, "GEMINI_API_KEY": "fake-key"}
    with FakeGemini(hold_batches=True) as srv:
        cmd = [sys.executable, "-m", "ctiqa.cli", "build-dataset", "--ldctiqa", str(data), "--teacher", "gemini",
               "--base-url", srv.url, "--split", "stratified", "--out", str(out), "--cache", str(cache),
               "--batch", "--batch-poll", "0.1", "--no-progress"]
        _kill_when(cmd, env, lambda: jobs.exists() and b'"submitted"' in jobs.read_bytes()
                   and any(j.polls for j in srv.batches.values()))
        assert len(srv.batches) == 1 and not cache.exists() and not (out / "README.md").exists()
        (job,) = srv.batches.values()
        assert len(job.requests) == 9 and srv.requests == []  # nothing answered yet, nothing asked synchronously

        srv.hold_batches = False  # the job finishes at Google while nobody waits
        res = build_dataset(BuildOptions(ldctiqa=data, teacher="gemini", out=out, split="stratified", cache=cache,
                                         batch=True, batch_poll_s=0.05, progress=False),
                            teacher=gemini_teacher(srv.url))
        creates = [c for c in srv.batch_calls if c[0] == "POST"]
    assert len(creates) == 1 and len(srv.batches) == 1  # resumed, never submitted again
    assert not any(":generateContent" in r.path for r in srv.requests)
    records = [json.loads(x) for x in cache.read_text().splitlines()]
    assert len(records) == 9 and all(r["ok"] and r["batch"] for r in records)
    assert res.stats.new_ok == 9 and res.dataset["train"].num_rows + res.dataset["validation"].num_rows == 9
    # the cost at the batch price: half of the synchronous price of the same tokens
    sync = sum(CallResult(ok=True, usage=Usage(r["usage"]["prompt_tokens"], r["usage"]["output_tokens"],
                                               r["usage"]["thoughts_tokens"])).cost_usd((1.25, 10.0))
               for r in records)
    assert res.provenance["usage"]["cost_usd"] == pytest.approx(sync / 2)
    printed = capsys.readouterr().out
    assert f"estimated cost USD {sync / 2:.4f} (9 batch answers at 50% of the synchronous price)" in printed
    # a third run: everything is in the cache, no job, no call
    with FakeGemini() as srv2:
        res3 = build_dataset(BuildOptions(ldctiqa=data, teacher="gemini", out=out, split="stratified", cache=cache,
                                          batch=True, batch_poll_s=0.05, progress=False),
                             teacher=gemini_teacher(srv2.url))
        assert srv2.batch_calls == [] and srv2.requests == []
    assert res3.stats.cached_ok == 9


def test_batch_job_whose_name_was_not_recorded_is_found_by_its_display_name(tmp_path):
    """A kill between the job's creation and the log's "submitted" line: the re-run finds the job by the display
    name logged before creating it, and does not pay for the work twice."""
    from datasets_builder.batch import job_log_path

    data = make_ldctiqa(tmp_path / "ld", n=10, simulated=False)
    cache = tmp_path / "cache.jsonl"
    opts = BuildOptions(ldctiqa=data, teacher="gemini", out=tmp_path / "out", split="stratified", cache=cache,
                        batch=True, batch_poll_s=0.05, progress=False)
    with FakeGemini() as srv:
        build_dataset(opts, teacher=gemini_teacher(srv.url))
        log = job_log_path(cache)
        lines = log.read_text().splitlines()
        assert [json.loads(x)["event"] for x in lines] == ["submitting", "submitted", "done"]
        # rewind to just after the creation: the answers are not merged, the name not recorded
        log.write_text(lines[0] + "\n")
        cache.unlink()
        res = build_dataset(opts, teacher=gemini_teacher(srv.url))
        assert [c[0] for c in srv.batch_calls].count("POST") == 1
    assert res.stats.new_ok == 9 and all(json.loads(x)["batch"] for x in cache.read_text().splitlines())


def test_batch_needs_gemini(tmp_path, capsys):
    from ctiqa.cli import main

    data = make_ldctiqa(tmp_path / "sim", n=8)
    assert main(["build-dataset", "--ldctiqa", str(data), "--batch", "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    assert "--batch needs --teacher gemini" in capsys.readouterr().err


def test_batch_errors_are_recorded_and_asked_again(tmp_path):
    """A request that fails inside a succeeded job, and a whole job that fails: each request gets a batch_error
    in the cache (for the audit), and the next run submits only those again."""
    data = make_ldctiqa(tmp_path / "ld", n=10, simulated=False)
    cache = tmp_path / "cache.jsonl"
    opts = BuildOptions(ldctiqa=data, teacher="gemini", out=tmp_path / "out", split="stratified", cache=cache,
                        batch=True, batch_poll_s=0.05, progress=False)
    with FakeGemini(script=[status(400, "Request contains an invalid argument.")]) as srv:
        res = build_dataset(opts, teacher=gemini_teacher(srv.url))
    failed = [it for it in res.items if it.status == "failed"]
    assert len(failed) == 1 and failed[0].result.error.startswith("batch_error: 400")
    with FakeGemini(batch_end_state="BATCH_STATE_FAILED") as srv:
        with pytest.raises(CTIQAError, match="no rows for split"):
            build_dataset(BuildOptions(**{**opts.__dict__, "limit": 1, "out": tmp_path / "out1"}),
                          teacher=gemini_teacher(srv.url))
        (job,) = srv.batches.values()
    assert len(job.requests) == 1  # only the failed image was asked again
    with FakeGemini() as srv:
        res = build_dataset(opts, teacher=gemini_teacher(srv.url))
        (job,) = srv.batches.values()
    assert len(job.requests) == 1 and res.stats.cached_ok == 8 and res.stats.new_ok == 1


def test_pack_jobs_keeps_inline_requests_under_the_limit():
    from types import SimpleNamespace

    from datasets_builder.batch import pack_jobs

    items = [SimpleNamespace(png=b"x" * n) for n in (300_000, 300_000, 900_000, 10, 2_000_000)]
    groups = pack_jobs(items, max_bytes=1_500_000)
    assert [len(g) for g in groups] == [2, 2, 1]
    assert [it for g in groups for it in g] == items
    for g in groups:
        assert len(g) == 1 or sum(len(it.png) * 4 // 3 + 4096 for it in g) <= 1_500_000


def test_openai_client_returns_token_logprobs():
    lp = {"content": [{"token": "Score", "logprob": -0.01, "bytes": None,
                       "top_logprobs": [{"token": "Score", "logprob": -0.01, "bytes": None},
                                        {"token": "Quality", "logprob": -4.6, "bytes": None}]}]}
    code, body, headers = _completion("Score: 3.0")
    body["choices"][0]["logprobs"] = lp
    srv = _FakeOpenAI([(code, body, headers)])
    client = OpenAICompatClient("local-vlm", base_url=srv.url, retry=FAST, top_logprobs=2)

    res = _generate_once(client, Image.new("RGB", (8, 8)), "Rate this image.")
    srv.server.shutdown()
    sent = srv.requests[0][1]
    assert sent["logprobs"] is True and sent["top_logprobs"] == 2
    assert res.ok and res.logprobs == [{"token": "Score", "logprob": -0.01, "top": [
        {"token": "Score", "logprob": -0.01}, {"token": "Quality", "logprob": -4.6}]}]


def test_cache_never_cuts_a_file_that_is_not_a_cache(tmp_path):
    """QA round 3: `--cache` pointed at a user's file without a final newline lost its last line (and a DICOM was
    cut) before the file was found not to be a cache. Now refused with nothing changed."""
    from ctiqa import CTIQAError
    from datasets_builder.cache import AnswerCache

    for name, data in (("notes.txt", b"my notes\nline two"), ("scan.dcm", b"\x00" * 128 + b"DICM\x02\x00\xff\x10"),
                       ("scan2.dcm", b"\x00" * 128 + b"DICM\xff\xfe\n")):
        f = tmp_path / name
        f.write_bytes(data)
        with pytest.raises(CTIQAError, match="not a ctiqa JSONL file"):
            AnswerCache(f)
        assert f.read_bytes() == data
