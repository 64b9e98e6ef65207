"""Hostile input and faults in the augment steps (enrich, caption): a kill while writing, hostile answers and HTTP
bodies, image paths that lead outside the dataset or block, mistyped cache records, a full disk, bad config values,
a killed caption run's decoding workers."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from data_process.augment import caption, enrich
from data_process.core import durable_io
from data_process.core.entry import run_main
from data_process.core.records import DataError, DatasetInfo, Entity, Mention, load_dataset, save_dataset
from data_process.core.settings import ConfigError
from fake_openai_server import Action
from llm_fixtures import REPO_ROOT, enrich_args, fake_server, make_toy_dataset, read_jsonl  # noqa: F401

pytestmark = pytest.mark.timeout(120)


def _exit_code(main, argv) -> int:
    with pytest.raises(SystemExit) as exit_:
        run_main(main, argv)
    return exit_.value.code


def _jpeg(color=(200, 30, 30), size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


class FakeCaptioner:
    """A captioner that records how many images it saw."""

    id = "fake-captioner"
    model_name = "fake"

    def __init__(self):
        self.images = 0

    def caption(self, images, prompts):
        self.images += len(images)
        return [f"caption {i}" for i in range(len(images))]


def _caption_dataset(root: Path, images: dict[str, str | None]) -> Path:
    """One entity; one mention per ``{mention id: image name}``; ``images/ok.jpg`` exists."""
    (root / "images").mkdir(parents=True)
    (root / "images" / "ok.jpg").write_bytes(_jpeg())
    ments = [Mention(mid, f"Here {mid} is.", mid, "E1", "train", image=img) for mid, img in images.items()]
    save_dataset(root, DatasetInfo("hostile", "test"), [Entity("E1", "Alice")], ments)
    return root


# ---------------------------------------------------------------------------------------------
# 1. A kill while writing the output leaves a folder nothing accepts, never a mix of two runs

KILL_AT_WRITE = """
import os, signal, sys
from pathlib import Path
from data_process.core import durable_io, records
write = durable_io.atomic_write_bytes
def killing_write(path, data):
    if Path(path).name == sys.argv[1]:
        os.kill(os.getpid(), signal.SIGKILL)
    write(path, data)
durable_io.atomic_write_bytes = records.atomic_write_bytes = killing_write
"""


def _run_killed_at(name: str, script: str, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")])}
    proc = subprocess.run([sys.executable, "-c", KILL_AT_WRITE + textwrap.dedent(script), name, *args],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_enrich_killed_while_writing_its_output_leaves_no_mixed_set(tmp_path, fake_server):
    data = make_toy_dataset(tmp_path / "toy", n=2, with_images=False)
    out = tmp_path / "plus"
    assert enrich.main(enrich_args(data, out, fake_server)) == 0  # run A: complete
    # run B (another model: other answers) is killed while its report is written, after its records
    args = enrich_args(data, out, fake_server, "--model", "other-model")
    _run_killed_at(enrich.REPORT_FILE, "from data_process.augment import enrich; enrich.main(sys.argv[2:])", *args)
    with pytest.raises(DataError, match="incomplete"):
        load_dataset(out)  # run B's records beside run A's "complete" report never pass for a dataset
    assert enrich.main(enrich_args(data, out, fake_server, "--model", "other-model")) == 0  # the rerun mends it
    ds = load_dataset(out)
    assert {e.enrichment["provenance"]["model"] for e in ds.entities} == {"other-model"}
    assert json.loads((out / enrich.REPORT_FILE).read_text())["llm"]["model"] == "other-model"


@pytest.mark.slow
def test_caption_killed_while_writing_its_output_leaves_no_mixed_set(tmp_path):
    data = _caption_dataset(tmp_path / "data", {"m1": "images/ok.jpg"})
    out = tmp_path / "out"
    caption.caption_dataset(data, out, FakeCaptioner(), caption.CaptionConfig(prompt="A {mention}", num_workers=0),
                            progress=False)
    script = """
        from data_process.augment import caption
        from test_hostile_augment import FakeCaptioner
        cfg = caption.CaptionConfig(prompt="B {mention}", num_workers=0)
        caption.caption_dataset(sys.argv[2], sys.argv[3], FakeCaptioner(), cfg, progress=False)
    """
    _run_killed_at(caption.REPORT_FILE, script, str(data), str(out))
    with pytest.raises(DataError, match="incomplete"):
        load_dataset(out)


# ---------------------------------------------------------------------------------------------
# 2. Hostile answers and HTTP bodies


def test_deeply_nested_answer_is_cached_as_failed_and_never_paid_again(tmp_path, fake_server):
    data = make_toy_dataset(tmp_path / "toy", n=2, with_images=False)
    out = tmp_path / "plus"
    fake_server.responder = lambda body, i: (Action.content('{"description": ' + "[" * 20000)
                                             if "Entity 0" in json.dumps(body) else None)
    args = enrich_args(data, out, fake_server, "--kinds", "entities", "--answer-retries", "0")
    assert enrich.main(args) == 0
    asked = len(fake_server.requests)
    rep = json.loads((out / enrich.REPORT_FILE).read_text())
    assert rep["counts"]["entity"] == {"total": 2, "ok": 1, "failed": 1, "missing": 0}
    assert rep["run"]["invalid_answers"] == 1
    assert enrich.main(args) == 0
    assert len(fake_server.requests) == asked  # the failed answer is cached: not asked (paid) again


class Stop(BaseException):
    """Stands for the process dying while it parses an answer."""


def test_answer_is_cached_before_it_is_parsed(tmp_path, fake_server, monkeypatch):
    data = make_toy_dataset(tmp_path / "toy", n=1, with_images=False)
    out = tmp_path / "plus"
    args = enrich_args(data, out, fake_server, "--kinds", "entities")

    def dying_parser(*a, **k):
        raise Stop()

    with monkeypatch.context() as m:
        m.setattr(enrich, "parse_answer", dying_parser)
        with pytest.raises(Stop):
            enrich.main(args)
    assert len(fake_server.requests) == 1
    assert enrich.main(args) == 0
    assert len(fake_server.requests) == 1  # the rerun parsed the cached answer instead of asking again
    assert load_dataset(out).entities[0].enrichment is not None


def test_any_parser_exception_is_an_invalid_answer(tmp_path, fake_server, monkeypatch):
    data = make_toy_dataset(tmp_path / "toy", n=1, with_images=False)
    out = tmp_path / "plus"
    calls = []
    real = enrich.parse_answer

    def flaky_parser(text, instructions=None):
        calls.append(text)
        if len(calls) == 1:
            raise KeyError("boom")
        return real(text, instructions)

    monkeypatch.setattr(enrich, "parse_answer", flaky_parser)
    assert enrich.main(enrich_args(data, out, fake_server, "--kinds", "entities")) == 0
    assert len(fake_server.requests) == 2  # asked again once, shown the error
    [rec] = [r for r in read_jsonl(out / enrich.CACHE_FILE) if r["status"] == "ok"]
    assert rec["errors"] == ["unparseable answer (KeyError: 'boom')"]


def test_malformed_http_200_bodies_are_failed_items_and_the_run_goes_on(tmp_path, fake_server):
    data = make_toy_dataset(tmp_path / "toy", n=3, with_images=False)
    out = tmp_path / "plus"

    def responder(body, i):
        user = json.dumps(body)
        if "Entity 0" in user:
            return Action.body("<html>502 from a proxy, but HTTP 200</html>")
        if "Entity 1" in user:
            return Action.content_value(5)
        return None

    fake_server.responder = responder
    args = enrich_args(data, out, fake_server, "--kinds", "entities", "--max-retries", "1")
    assert enrich.main(args) == enrich.EXIT_INCOMPLETE
    rep = json.loads((out / enrich.REPORT_FILE).read_text())
    assert rep["counts"]["entity"] == {"total": 3, "ok": 1, "failed": 0, "missing": 2}
    assert rep["run"]["errors"] == 2 and rep["complete"] is False
    assert sorted(f["id"] for f in rep["failures"]) == ["Q0", "Q1"]
    assert all("malformed response" in f["errors"][0] for f in rep["failures"])
    assert len(fake_server.requests) == 2 * 2 + 1  # each malformed one tried 1 + max_retries times
    assert load_dataset(out).entities[2].enrichment is not None


def test_dry_run_leaves_a_torn_cache_as_it_is(tmp_path, fake_server):
    data = make_toy_dataset(tmp_path / "toy", n=2, with_images=False)
    out = tmp_path / "plus"
    args = enrich_args(data, out, fake_server)
    assert enrich.main(args) == 0
    cache = out / enrich.CACHE_FILE
    torn = cache.read_bytes()[:-40]
    cache.write_bytes(torn)
    before = sorted(p.name for p in out.iterdir())
    assert enrich.main(args + ["--dry-run", "1"]) == 0
    assert cache.read_bytes() == torn
    assert sorted(p.name for p in out.iterdir()) == before  # no .corrupt file either
    assert len(fake_server.requests) == 4


# ---------------------------------------------------------------------------------------------
# 3. Image paths that lead outside the dataset folder or block


def test_caption_refuses_images_outside_the_folder(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(_jpeg((0, 0, 255)))
    data = tmp_path / "data"
    data_images = {"ok": "images/ok.jpg", "absolute": str(outside / "secret.jpg"), "dotdot": "../outside/secret.jpg",
                   "link": "images/link.jpg", "nul": "images/ok.jpg\x00.png"}
    _caption_dataset(data, data_images)
    (data / "images" / "link.jpg").symlink_to(outside / "secret.jpg")
    cap = FakeCaptioner()
    stats = caption.caption_dataset(data, tmp_path / "out", cap, caption.CaptionConfig(num_workers=0),
                                    progress=False)
    assert (stats.captioned, stats.failed, cap.images) == (1, 4, 1)
    reasons = {f["mention_id"]: f["reason"] for f in stats.failures}
    assert "absolute paths are not allowed" in reasons["absolute"]
    assert "outside" in reasons["dotdot"] and "symlink" in reasons["link"]
    assert "NUL byte" in reasons["nul"]
    report = json.loads((tmp_path / "out" / caption.REPORT_FILE).read_text())
    assert report["failed"] == 4


@pytest.mark.timeout(60)
def test_caption_image_that_is_a_fifo_is_failed_not_a_hang(tmp_path):
    data = _caption_dataset(tmp_path / "data", {"ok": "images/ok.jpg", "fifo": "images/fifo.jpg"})
    os.mkfifo(data / "images" / "fifo.jpg")
    stats = caption.caption_dataset(data, tmp_path / "out", FakeCaptioner(), caption.CaptionConfig(num_workers=0),
                                    progress=False)
    assert (stats.captioned, stats.failed) == (1, 1)
    assert stats.failures[0]["reason"] == "not a regular file: a FIFO"


# ---------------------------------------------------------------------------------------------
# 4. Mistyped cache records, a full disk


def test_enrich_mistyped_cache_record_is_an_error_naming_file_and_line(tmp_path, fake_server, capsys):
    data = make_toy_dataset(tmp_path / "toy", n=1, with_images=False)
    out = tmp_path / "plus"
    args = enrich_args(data, out, fake_server, "--kinds", "entities")
    assert enrich.main(args) == 0
    cache = out / enrich.CACHE_FILE
    lines = cache.read_text().splitlines()
    last = json.loads(lines[-1])
    cache.write_text("\n".join(lines[:-1] + [json.dumps({**last, "answer": 5})]) + "\n")
    capsys.readouterr()
    assert _exit_code(enrich.main, args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {cache}, line {len(lines)}, field 'answer': must be an object")
    assert "Traceback" not in err and len(fake_server.requests) == 1  # nothing asked again


def test_caption_mistyped_cache_record_is_an_error_naming_file_and_line(tmp_path):
    data = _caption_dataset(tmp_path / "data", {"m1": "images/ok.jpg"})
    out = tmp_path / "out"
    cfg = caption.CaptionConfig(num_workers=0)
    caption.caption_dataset(data, out, FakeCaptioner(), cfg, progress=False)
    cache = out / caption.CACHE_FILE
    [line] = cache.read_text().splitlines()
    cache.write_text(json.dumps({**json.loads(line), "text": 5}) + "\n")
    with pytest.raises(DataError, match=rf"{cache}, line 1, field 'text': must be a string, got 5"):
        caption.caption_dataset(data, out, FakeCaptioner(), cfg, progress=False)


def _disk_full(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_enrich_full_disk_is_one_error_line(tmp_path, fake_server, monkeypatch, capsys):
    data = make_toy_dataset(tmp_path / "toy", n=2, with_images=False)
    monkeypatch.setattr(durable_io.os, "fsync", _disk_full)
    assert _exit_code(enrich.main, enrich_args(data, tmp_path / "plus", fake_server)) == 2
    err = capsys.readouterr().err
    assert "no space left on device" in err and "Traceback" not in err


def test_caption_full_disk_is_one_error_line(tmp_path, monkeypatch, capsys):
    from data_process.augment import captioners

    data = _caption_dataset(tmp_path / "data", {"m1": "images/ok.jpg"})
    monkeypatch.setattr(captioners, "Blip2Captioner", lambda *a, **k: FakeCaptioner())
    monkeypatch.setattr(durable_io.os, "fsync", _disk_full)
    argv = ["--data", str(data), "--out", str(tmp_path / "out"), "--num-workers", "0", "--quiet"]
    assert _exit_code(caption.main, argv) == 2
    err = capsys.readouterr().err
    assert "no space left on device" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# 5. Config values of the wrong type, unknown keys


@pytest.mark.parametrize("text, key", [("concurrency: lots\n", "concurrency"), ("max_tokens: 3.7\n", "max_tokens"),
                                       ("temprature: 0.5\n", "temprature"), ("kinds: [entities, people]\n", "kinds"),
                                       ("prices: {gpt-x: 3}\n", "prices.gpt-x"),
                                       ("response_format: xml\n", "response_format"),
                                       ("api_key: sk-123\n", "api_key")])
def test_enrich_bad_config_names_file_and_key(tmp_path, capsys, text, key):
    data = make_toy_dataset(tmp_path / "toy", n=1, with_images=False)
    cfg = tmp_path / "enrich.yaml"
    cfg.write_text("model: fake-model\n" + text)
    argv = ["--data", str(data), "--out", str(tmp_path / "plus"), "--config", str(cfg), "--dry-run", "0"]
    assert _exit_code(enrich.main, argv) == 2
    assert capsys.readouterr().err.startswith(f"error: {cfg}: {key}: ")


@pytest.mark.parametrize("text, key", [("num_workers: lots\n", "num_workers"), ("batch_size: 3.7\n", "batch_size"),
                                       ("dtype: fp8\n", "dtype"), ("plain_caption: maybe\n", "plain_caption")])
def test_caption_bad_config_names_file_and_key(tmp_path, text, key):
    cfg = tmp_path / "caption.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=rf"caption.yaml: {key}: "):
        caption.load_config_file(cfg)


def test_shipped_configs_load():
    cfg = enrich.load_config(None)
    assert cfg["kinds"] == ("entities", "mentions") and cfg["prices"]["gpt-4o"]["prompt"] == 2.5
    assert caption.load_config_file(REPO_ROOT / "configs" / "caption.yaml")["num_workers"] == 2


# ---------------------------------------------------------------------------------------------
# 6. A killed caption run's decoding workers exit


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        out |= {int(c) for c in (task / "children").read_text().split()}
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc (Linux)")
@pytest.mark.timeout(180)
@pytest.mark.slow
def test_killed_caption_run_leaves_no_decoding_worker(tmp_path):
    from data_process.fixtures.tiny_models.blip2 import save_tiny_blip2

    model = save_tiny_blip2(tmp_path / "blip2", seed=0)
    n = 400  # enough images that the run is mid-way when it is killed
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    for i in range(n):
        (root / "images" / f"{i}.jpg").write_bytes(_jpeg(((7 * i) % 256, (13 * i) % 256, 90), size=(96, 64)))
    ments = [Mention(f"m{i}", "Here x is.", "x", "E1", "train", image=f"images/{i}.jpg") for i in range(n)]
    save_dataset(root, DatasetInfo("many", "test"), [Entity("E1", "Alice")], ments)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "data_process.augment.caption", "--data", str(root), "--out",
                             str(out), "--model", str(model), "--device", "cpu", "--num-workers", "2",
                             "--batch-size", "16", "--max-new-tokens", "4", "--quiet"],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while not (len(workers) >= 2 and (out / caption.CACHE_FILE).is_file()
                   and (out / caption.CACHE_FILE).stat().st_size > 0):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the caption run never got going"
            workers |= _children(proc.pid)
            time.sleep(0.05)
        workers |= _children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [w for w in workers if _alive(w)]
    finally:
        if proc.poll() is None:
            proc.kill()
    for w in survivors:  # do not leave them behind when the test fails
        os.kill(w, signal.SIGKILL)
    assert survivors == []
