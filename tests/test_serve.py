"""``dim-mel serve`` (nel_model.inference.serve): the real server process on a free loopback port, spoken to over
HTTP. Its answers are ``dim-mel link``'s lines for the same mentions; concurrent clients get the answers of one;
bad input is a 400 with the toolkit's error line and the server goes on; limits are 413; the token is checked;
SIGTERM answers what is in flight and exits 0."""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from data_process.core.records import load_dataset
from nel_model.inference import linker as LK

ROOT = Path(__file__).resolve().parents[1]
START_S = 240           # a loaded 2-core machine: imports and the run's loading


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small run trained one epoch on a synthetic dataset with images and tiny CLIP features, and an input
    folder of its test mentions (``mentions.jsonl``, images in ``imgs/``): the folder the server reads images from."""
    from data_process.encode.features import FeatureSettings, build_features
    from data_process.fixtures.synthetic import SyntheticConfig, generate
    from data_process.fixtures.tiny_models.clip import save_tiny_clip
    from nel_model.train import main as train_main

    w = tmp_path_factory.mktemp("serve")
    data = generate(w / "data", SyntheticConfig(entities=24, mentions=80, seed=0, image_size=32), progress=False)
    clip = save_tiny_clip(w / "clip", image_size=32)
    build_features(data, w / "feat", FeatureSettings(clip=str(clip), max_len=16, region_grid=2), num_workers=0,
                   device="cpu", progress=False)
    train_main(["--config", str(ROOT / "configs" / "synthetic.yaml"), "--features", str(w / "feat"), "--output-dir",
                str(w / "run"), "--epochs", "1", "--threads", "1", "--device", "cpu"])
    ds = load_dataset(data)
    inp = w / "in"
    (inp / "imgs").mkdir(parents=True)
    objs = []
    for m in ds.split("test") + ds.split("dev"):
        obj = {"id": m.id, "sentence": m.sentence, "mention": m.mention, "gold_id": m.gold_id}
        if m.image:
            shutil.copy(ds.image_path(m.image), inp / "imgs" / Path(m.image).name)
            obj["image"] = f"imgs/{Path(m.image).name}"
        objs.append(obj)
    (inp / "mentions.jsonl").write_text("".join(json.dumps(o) + "\n" for o in objs))
    (w / "secret.png").write_bytes((inp / objs[0]["image"]).read_bytes())      # an image outside the root
    return {"root": w, "run": w / "run", "input": inp, "objs": objs}


class Served:
    """A ``dim-mel serve`` process on a free loopback port (``--port 0``; the port is read from its first line)."""

    def __init__(self, run: Path, *flags: str, env: dict[str, str] | None = None, log: Path):
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dim_mel", "serve", "--run", str(run), "--port", "0", "--threads", "1", *flags],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})},
            stdout=subprocess.DEVNULL, stderr=log.open("w"))
        self.port = self._port()

    def _port(self) -> int:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            for line in self.log.read_text().splitlines():
                if line.startswith("dim-mel serve: listening on http://127.0.0.1:"):
                    return int(line.split(":")[3].split()[0])
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            time.sleep(0.02)
        raise AssertionError("the server did not open its port")

    def call(self, method: str, path: str, body: object = None, headers: dict[str, str] | None = None,
             raw: bytes | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=START_S)
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        try:
            conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"null")
        finally:
            conn.close()

    def link(self, mentions: list[dict], top_k: int = 5, **kw) -> tuple[int, dict]:
        return self.call("POST", "/link", {"mentions": mentions, "top_k": top_k}, **kw)

    def wait_ready(self) -> list[int]:
        """The /health statuses seen until it answered 200."""
        seen, deadline = [], time.monotonic() + START_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            status, _ = self.call("GET", "/health")
            if not seen or seen[-1] != status:
                seen.append(status)
            if status == 200:
                return seen
            time.sleep(0.02)
        raise AssertionError("the server did not become ready")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=120)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    def __enter__(self) -> "Served":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _ids(results: list[dict]) -> list:
    return [(r["id"], [e["entity_id"] for e in r["entities"]], r.get("gold_rank")) for r in results]


def _scores(results: list[dict]) -> torch.Tensor:
    return torch.tensor([[e["score"] for e in r["entities"]] for r in results])


def test_serve_starts_links_and_stops_on_sigterm(tiny, tmp_path):
    """The quick tier's start, ask, stop: /health is 503 while the run loads and 200 after; /link answers
    ``dim-mel link``'s objects; SIGTERM exits 0."""
    with Served(tiny["run"], "--image-root", str(tiny["input"]), log=tmp_path / "log") as srv:
        seen = srv.wait_ready()
        assert seen == [503, 200], seen
        status, body = srv.link(tiny["objs"][:2], top_k=3)
        assert status == 200, body
        got = body["results"]
        assert [r["id"] for r in got] == [o["id"] for o in tiny["objs"][:2]]
        assert set(got[0]) == {"id", "mention", "entities", "gold_rank", "provenance"}
        assert [e["rank"] for e in got[0]["entities"]] == [1, 2, 3]
        assert set(got[0]["entities"][0]) == {"rank", "entity_id", "name", "description", "score", "stage"}
        status, info = srv.call("GET", "/info")
        assert status == 200 and info["kb"]["entities"] == 24 and info["stats"]["mentions"] >= 2
        assert srv.stop() == 0
    assert "dim-mel serve: stopped" in (tmp_path / "log").read_text()


def test_a_non_loopback_host_without_a_token_refuses_to_start(tiny):
    env = {k: v for k, v in os.environ.items() if k != "DIM_MEL_TOKEN"}
    proc = subprocess.run([sys.executable, "-m", "dim_mel", "serve", "--run", str(tiny["run"]), "--host", "0.0.0.0"],
                          cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[0] == ("error: --host 0.0.0.0: a server other machines can reach needs a bearer "
                                           "token (--token TOKEN or $DIM_MEL_TOKEN); on 127.0.0.1 it is optional")


@pytest.mark.slow
def test_the_answers_are_the_lines_dim_mel_link_writes(tiny, tmp_path):
    out = tmp_path / "linked.jsonl"
    assert LK.main(["--run", str(tiny["run"]), "--input", str(tiny["input"] / "mentions.jsonl"), "--out", str(out),
                    "--top-k", "5", "--no-progress"]) == 0
    linked = [json.loads(x) for x in out.read_text().splitlines()]
    with Served(tiny["run"], "--image-root", str(tiny["input"]), log=tmp_path / "log") as srv:
        srv.wait_ready()
        status, body = srv.link(tiny["objs"], top_k=5)
        assert status == 200, body
        served = body["results"]
        assert _ids(served) == _ids(linked)
        assert torch.allclose(_scores(served), _scores(linked), atol=2e-6, rtol=0)
        assert [r["provenance"] for r in served] == [r["provenance"] for r in linked]     # same input, run, K
        # an image sent as its bytes is the same image
        obj = next(o for o in tiny["objs"] if "image" in o)
        sent = {**{k: v for k, v in obj.items() if k != "image"},
                "image_base64": base64.b64encode((tiny["input"] / obj["image"]).read_bytes()).decode()}
        status, body = srv.link([sent], top_k=5)
        assert status == 200, body
        ref = next(r for r in linked if r["id"] == obj["id"])
        assert _ids(body["results"]) == _ids([ref])
        assert torch.allclose(_scores(body["results"]), _scores([ref]), atol=2e-6, rtol=0)
        assert srv.stop() == 0


@pytest.mark.slow
def test_eight_concurrent_clients_get_the_answers_of_one(tiny, tmp_path):
    """Requests that arrive together are linked in one batch; each mention's answer is the one it gets alone."""
    objs = tiny["objs"][:24]
    with Served(tiny["run"], "--image-root", str(tiny["input"]), "--batch-wait-ms", "300", "--max-batch", "64",
                log=tmp_path / "log") as srv:
        srv.wait_ready()
        alone = {}
        for o in objs:
            status, body = srv.link([o])
            assert status == 200, body
            alone[o["id"]] = body["results"][0]
        _, before = srv.call("GET", "/info")
        groups = [objs[t::8][::-1] for t in range(8)]          # 3 mentions each, another order
        answers: list = [None] * 8
        start = threading.Barrier(8)

        def client(t: int) -> None:
            start.wait()
            answers[t] = srv.link(groups[t])

        threads = [threading.Thread(target=client, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert all(status == 200 for status, _ in answers), answers
        _, after = srv.call("GET", "/info")
        assert after["stats"]["requests"] - before["stats"]["requests"] == 8
        assert after["stats"]["batches"] - before["stats"]["batches"] < 8          # batched together
        got = [r for _, body in answers for r in body["results"]]
        ref = [alone[r["id"]] for r in got]
        assert _ids(got) == _ids(ref)
        assert torch.allclose(_scores(got), _scores(ref), atol=2e-6, rtol=0)


@pytest.mark.slow
def test_bad_requests_get_400_or_413_and_the_server_goes_on(tiny, tmp_path):
    ok = tiny["objs"][0]
    with Served(tiny["run"], "--image-root", str(tiny["input"]), "--max-body-bytes", "20000", "--max-mentions", "5",
                "--max-image-bytes", "4000", log=tmp_path / "log") as srv:
        srv.wait_ready()
        status, body = srv.call("POST", "/link", raw=b'{"mentions": [')
        assert (status, body) == (400, {"error": "error: request, body: invalid JSON (Expecting value at line 1 "
                                                 "column 15)"})
        assert srv.link([ok])[0] == 200                                      # the next request is answered
        status, body = srv.link([ok, {"id": "x", "sentence": "s"}])
        assert (status, body["error"]) == (400, "error: request, mentions[1] (id 'x'), field 'mention': is missing")
        outside = tiny["root"] / "secret.png"
        for name, why in [("../secret.png", "'..' leads outside"), (str(outside), "absolute paths are not allowed")]:
            status, body = srv.link([{"id": "x", "sentence": "s", "mention": "m", "image": name}])
            assert status == 400 and body["error"].startswith(
                f"error: request, mentions[0] (id 'x'), field 'image': {name}: {why}"), body
        (tiny["input"] / "imgs" / "link.png").symlink_to(outside)
        status, body = srv.link([{"id": "x", "sentence": "s", "mention": "m", "image": "imgs/link.png"}])
        assert status == 400 and "a symlink that leads outside" in body["error"], body
        status, body = srv.link([ok], top_k=0)
        assert status == 400 and "field 'top_k'" in body["error"]
        status, body = srv.call("POST", "/link", {"mentions": [ok], "colour": 1})
        assert status == 400 and "field 'colour': is not a field of a link request" in body["error"]
        # limits: 413
        status, body = srv.call("POST", "/link", raw=b" " * 20001)
        assert (status, body) == (413, {"error": "error: request, body: 20001 bytes, more than 20000 "
                                                 "(--max-body-bytes)"})
        status, body = srv.link([dict(ok, id=f"m{i}") for i in range(6)])
        assert status == 413 and "6 mentions, more than 5 (--max-mentions)" in body["error"]
        big = base64.b64encode(os.urandom(6000)).decode()
        status, body = srv.link([{"id": "x", "sentence": "s", "mention": "m", "image_base64": big}])
        assert status == 413 and "field 'image_base64': the image is larger than 4000 bytes" in body["error"]
        status, body = srv.link([{"id": "x", "sentence": "s", "mention": "m", "image_base64": "not base64!"}])
        assert status == 400 and "field 'image_base64': not base64" in body["error"]
        status, body = srv.link([{"id": "x", "sentence": "s", "mention": "m",
                                  "image_base64": base64.b64encode(b"no image").decode()}])
        assert status == 400 and body["error"].startswith(
            "error: request, mentions[0] (id 'x'), field 'image_base64': cannot read the image (unreadable: "), body
        status, body = srv.call("POST", "/link", raw=b'{"mentions": [{"id": "x", "sentence": "s", "mention": "m", '
                                                     b'"image_base64": "AA==", "image_base64": "AA=="}]}')
        assert status == 400 and "field 'image_base64': given 2 times in the record" in body["error"], body
        status, body = srv.link([ok])
        assert status == 200 and body["results"][0]["id"] == ok["id"]
        assert srv.stop() == 0


@pytest.mark.slow
def test_the_token_is_required_when_set(tiny, tmp_path):
    ok = tiny["objs"][0]
    with Served(tiny["run"], "--image-root", str(tiny["input"]), env={"DIM_MEL_TOKEN": "s3cret"},
                log=tmp_path / "log") as srv:
        srv.wait_ready()                                               # /health asks for no token
        assert srv.link([ok])[0] == 401
        status, body = srv.link([ok], headers={"Authorization": "Bearer wrong"})
        assert status == 401 and body["error"].startswith("error: missing or wrong bearer token")
        assert srv.call("GET", "/info", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert srv.link([ok], headers={"Authorization": "Bearer s3cret"})[0] == 200


@pytest.mark.slow
def test_sigterm_answers_the_request_in_flight_and_exits_0(tiny, tmp_path):
    """A request whose body is still arriving when SIGTERM comes: no new connection is accepted, the request is
    answered once its body is in, and the server exits 0."""
    with Served(tiny["run"], "--image-root", str(tiny["input"]), log=tmp_path / "log") as srv:
        srv.wait_ready()
        body = json.dumps({"mentions": tiny["objs"][:2], "top_k": 3}).encode()
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=START_S)
        sock.sendall(b"POST /link HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
        deadline = time.monotonic() + 60
        while srv.call("GET", "/info")[1]["stats"]["arriving"] == 0:       # the handler is reading the body
            assert time.monotonic() < deadline
            time.sleep(0.01)
        srv.proc.send_signal(signal.SIGTERM)
        while True:                                                         # no longer accepting
            try:
                socket.create_connection(("127.0.0.1", srv.port), timeout=5).close()
            except ConnectionRefusedError:
                break
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert srv.proc.poll() is None                                      # still answering the request
        sock.sendall(body[10:])
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        answer = json.loads(resp.read())
        sock.close()
        assert resp.status == 200 and [r["id"] for r in answer["results"]] == [o["id"] for o in tiny["objs"][:2]]
        assert srv.proc.wait(timeout=120) == 0


@pytest.mark.slow
def test_serve_links_against_an_index_as_link_index_does(tiny, tmp_path):
    """``--index``: the server links against a ``dim-mel index`` folder (here the run's own KB), answering what
    ``dim-mel link --index`` writes; /info names the index; a folder that is no index is one error line."""
    from nel_model.inference import kb_index

    index = tmp_path / "index"
    assert kb_index.main(["--run", str(tiny["run"]), "--out", str(index), "--kind", "hnsw"]) == 0
    out = tmp_path / "linked.jsonl"
    assert LK.main(["--run", str(tiny["run"]), "--input", str(tiny["input"] / "mentions.jsonl"), "--out", str(out),
                    "--top-k", "5", "--index", str(index), "--no-progress"]) == 0
    linked = [json.loads(x) for x in out.read_text().splitlines()]
    with Served(tiny["run"], "--image-root", str(tiny["input"]), "--index", str(index), log=tmp_path / "log") as srv:
        srv.wait_ready()
        status, body = srv.link(tiny["objs"], top_k=5)
        assert status == 200, body
        assert _ids(body["results"]) == _ids(linked)
        assert [r["provenance"] for r in body["results"]] == [r["provenance"] for r in linked]
        status, info = srv.call("GET", "/info")
        assert status == 200 and info["kb"]["entities"] == 24 and info["kb"]["index"]["kind"] == "hnsw"
        assert srv.stop() == 0
    srv = Served(tiny["run"], "--index", str(tmp_path / "nowhere"), log=tmp_path / "log2")
    assert srv.proc.wait(timeout=START_S) == 2
    err = [x for x in (tmp_path / "log2").read_text().splitlines() if x.startswith("error: ")]
    assert err == [f"error: {tmp_path / 'nowhere'}: not an index folder (no manifest.json)"]


def test_one_requests_failure_is_that_requests_only():
    """The model worker links requests that arrive together in one call; when that call fails, each request is
    linked alone, so only the request whose mention fails gets the error."""
    from types import SimpleNamespace

    from nel_model.inference.linker import InputMention
    from nel_model.inference.serve import ModelWorker
    from nel_model.linking import LinkedMention, Query

    calls: list[list[str]] = []

    def link_many(queries, top_k):
        calls.append([q.id for q in queries])
        if any(q.mention == "bad" for q in queries):
            raise ValueError("bad mention")
        return [LinkedMention(id=q.id, mention=q.mention) for q in queries]

    retriever = SimpleNamespace(checkpoint_sha256="c", kb_fingerprint=lambda: {"kb": 1})
    worker = ModelWorker(SimpleNamespace(retriever=retriever, reranker=None, index=None, link_many=link_many), 0.5, 64)
    try:
        jobs = [worker.submit([InputMention(Query("s", m, id=i), 0, "h")], 3) for i, m in (("a", "good"), ("b", "bad"))]
        assert jobs[0].result(timeout=60)[0]["id"] == "a"
        with pytest.raises(ValueError, match="bad mention"):
            jobs[1].result(timeout=60)
    finally:
        worker.close()
    assert calls == [["a", "b"], ["a"], ["b"]] and worker.batches == 1
