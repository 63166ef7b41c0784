"""QA round 2: failed server calls are failures. `ctiqa predict --server` and `ctiqa evaluate --server` ask again
on a re-run for rows whose call failed (HTTP 500, ...), the re-scored row replaces the failed one, a run where no
slice got a score exits 1; two `ctiqa predict` runs into one --out are refused. A small OpenAI-compatible server
that answers HTTP 500 or a valid chat completion, no model needed."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from ctiqa import CTIQAError
from ctiqa.cli import main as ctiqa_main
from ctiqa.testing.loopback import send_json, start_server, stop_server

ANSWER = {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
          "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                       "message": {"role": "assistant", "content": "Score: 2.0\nReasoning: fine."}}],
          "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


class Server:
    """``fail`` True: every request gets HTTP 500; False: a valid answer (score 2.0). Counts requests."""

    def __init__(self):
        self.fail, self.requests = True, 0
        self.server = start_server(self.dispatch)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def dispatch(self, h):
        h.rfile.read(int(h.headers.get("Content-Length") or 0))
        self.requests += 1
        if self.fail:
            return send_json(h, 500, {"error": {"message": "scripted failure"}})
        return send_json(h, 200, ANSWER)


@pytest.fixture
def server(monkeypatch):
    from ctiqa.clients import RetryPolicy
    from ctiqa.serving import ServerScorer

    init = ServerScorer.__init__

    def fast(self, *a, **k):  # the default backoff waits ~30 s over 6 attempts
        k["retry"] = k.get("retry") or RetryPolicy(max_attempts=2, initial_delay=0.01, max_delay=0.02, jitter=0.0)
        init(self, *a, **k)

    monkeypatch.setattr(ServerScorer, "__init__", fast)
    srv = Server()
    yield srv
    stop_server(srv.server)


def _tiff(path, n=3):
    ramp = np.linspace(0.3, 0.6, 64 * 64, dtype=np.float32).reshape(64, 64)
    tifffile.imwrite(path, np.stack([ramp + 0.01 * k for k in range(n)]), photometric="minisblack")
    return path


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predict_server_retries_failed_rows_and_exits_1_when_nothing_scored(server, tmp_path, capsys):
    img, out = _tiff(tmp_path / "s.tif"), tmp_path / "scores.jsonl"
    args = ["predict", str(img), "--server", server.url, "--model", "m", "--out", str(out)]
    assert ctiqa_main(args) == 1  # every call failed: not a success
    err = capsys.readouterr().err
    assert "no slice got a score: 3 slice(s) failed" in err and "http_500" in err
    assert len(_rows(out)) == 3 and all(r["error"] and r["parsed_score"] is None for r in _rows(out))
    n = server.requests
    server.fail = False
    assert ctiqa_main(args) == 0  # the failed rows are asked again, not "resumed"
    assert server.requests > n
    rows = _rows(out)
    assert sorted(r["slice"] for r in rows) == [0, 1, 2]  # one row per slice: the new row replaced the failed one
    assert all(r["parsed_score"] == 2.0 and not r.get("error") for r in rows)
    series = _rows(tmp_path / "scores.series.jsonl")
    assert [s["n_slices"] for s in series] == [3]
    n = server.requests
    assert ctiqa_main(args) == 0 and server.requests == n  # now done: nothing asked again
    assert "resumed: 3" in capsys.readouterr().err


def test_predict_csv_failed_rows_are_replaced(server, tmp_path):
    img, out = _tiff(tmp_path / "s.tif", n=2), tmp_path / "scores.csv"
    args = ["predict", str(img), "--server", server.url, "--model", "m", "--out", str(out)]
    assert ctiqa_main(args) == 1
    server.fail = False
    assert ctiqa_main(args) == 0
    import csv

    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["slice"], r["parsed_score"], r["error"]) for r in rows] == [("0", "2.0", ""), ("1", "2.0", "")]


def test_evaluate_server_asks_failed_calls_again(server, tmp_path):
    from ctiqa.testing.sft_data import write_dataset

    data = write_dataset(tmp_path / "ds", {"train": 1, "validation": 1, "test": 3})
    args = ["evaluate", "--dataset", str(data), "--server", server.url, "--model", "m", "--max-new-tokens", "20",
            "--bootstrap", "20", "--out", str(tmp_path / "ev")]
    assert ctiqa_main(args) != 0  # 3 API errors, no usable score
    n = server.requests
    server.fail = False
    assert ctiqa_main(args) == 0
    assert server.requests >= n + 3  # the failed calls were not answered from the answer cache
    rows = _rows(tmp_path / "ev" / "predictions.jsonl")
    assert len(rows) == 3 and all(r["parsed_score"] == 2.0 and not r.get("error") for r in rows)


def test_a_second_predict_into_the_same_out_is_refused(tmp_path):
    from ctiqa.predict import RowSink
    from ctiqa.testing import lock_held_elsewhere

    out = tmp_path / "scores.jsonl"
    with lock_held_elsewhere(out), pytest.raises(CTIQAError, match=rf"--out {out}: another ctiqa predict run is "
                                                                    "writing it"):
        RowSink(out, {"model": "fake"}, False)
    assert not out.exists()
    sink = RowSink(out, {"model": "fake"}, False)  # free again: the lock file left behind is harmless
    assert "another ctiqa predict run is writing it" in _open_in_other_process(out)  # a second run, as QA ran it
    sink.close()
    assert _open_in_other_process(out) == "opened"  # released by close()


def _open_in_other_process(out):
    """Open ``out`` as a second ``ctiqa predict`` process would; its error line, or "opened"."""
    code = ("from pathlib import Path\nfrom ctiqa import CTIQAError\nfrom ctiqa.predict import RowSink\n"
            f"try:\n RowSink(Path({str(out)!r}), {{'model': 'fake'}}, False).close()\n print('opened')\n"
            "except CTIQAError as e:\n print(e)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_a_new_run_never_takes_an_earlier_deployments_answers(server, tmp_path, capsys):
    """QA round 4: the server answer cache was global (the ctiqa cache folder) and keyed by URL + served model name:
    after a re-deployment under the same name (new weights, or a server failing every request), a NEW --out got the
    old model's scores with exit 0 and the server was never asked. The answer log now belongs to the run."""
    img = _tiff(tmp_path / "s.tif")
    server.fail = False
    assert ctiqa_main(["predict", str(img), "--server", server.url, "--model", "m", "--out",
                       str(tmp_path / "a.jsonl")]) == 0
    assert [r["parsed_score"] for r in _rows(tmp_path / "a.jsonl")] == [2.0, 2.0, 2.0]
    assert (tmp_path / "a.answers.jsonl").is_file()
    n = server.requests
    server.fail = True  # the same name now serves something that fails every request
    assert ctiqa_main(["predict", str(img), "--server", server.url, "--model", "m", "--out",
                       str(tmp_path / "b.jsonl")]) == 1
    assert server.requests > n and all(r["parsed_score"] is None for r in _rows(tmp_path / "b.jsonl"))
    # evaluate: a new --out asks the server again, its answers are logged in that --out
    from ctiqa.testing.sft_data import write_dataset

    data = write_dataset(tmp_path / "ds", {"train": 1, "validation": 1, "test": 2})
    ev = ["evaluate", "--dataset", str(data), "--server", server.url, "--model", "m", "--max-new-tokens", "20",
          "--bootstrap", "20"]
    server.fail = False
    assert ctiqa_main([*ev, "--out", str(tmp_path / "e1")]) == 0 and (tmp_path / "e1" / "server_answers.jsonl").is_file()
    n = server.requests
    server.fail = True
    assert ctiqa_main([*ev, "--out", str(tmp_path / "e2")]) != 0  # failures, not the first deployment's scores
    assert server.requests > n
    n = server.requests
    # the same --out resumes from its own rows and log: nothing is asked again
    server.fail = False
    assert ctiqa_main(["predict", str(img), "--server", server.url, "--model", "m", "--out",
                       str(tmp_path / "a.jsonl")]) == 0
    assert server.requests == n
    capsys.readouterr()


def test_credentials_in_a_server_url_are_never_printed_or_written(server, tmp_path, capsys):
    """QA round 5: `--server http://admin:PW@host/v1` showed PW in the progress bar and wrote it 3 times into
    results.json (server, served model, command line); `?token=` went into predict's run.json."""
    from ctiqa.testing.sft_data import write_dataset

    server.fail = False
    host = server.url.split("://", 1)[1]
    secret_url = f"http://admin:hunter2pw@{host}"
    data = write_dataset(tmp_path / "ds", {"train": 1, "validation": 1, "test": 2})
    assert ctiqa_main(["evaluate", "--dataset", str(data), "--server", secret_url, "--model", "m",
                       "--max-new-tokens", "20", "--bootstrap", "0", "--out", str(tmp_path / "ev")]) == 0
    img = _tiff(tmp_path / "s.tif", n=1)
    ctiqa_main(["predict", str(img), "--server", secret_url + "?token=TOKQ", "--model", "m",
                "--out", str(tmp_path / "p.jsonl")])
    captured = capsys.readouterr()
    written = "".join(f.read_text(errors="replace") for f in tmp_path.rglob("*") if f.is_file() and f.suffix in
                      (".json", ".jsonl", ".csv", ".md", ".html"))
    for text in (written, captured.out, captured.err):
        assert "hunter2pw" not in text and "TOKQ" not in text
    assert "http://***@" in (tmp_path / "ev" / "results.json").read_text()
