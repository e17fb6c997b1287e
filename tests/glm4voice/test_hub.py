import pytest

from glm4voice.hub import CheckpointNotFoundError, resolve_checkpoint


def test_local_folder_is_used_as_is(tmp_path):
    assert resolve_checkpoint(tmp_path) == tmp_path
    assert resolve_checkpoint(str(tmp_path)) == tmp_path


def test_file_and_garbage_are_rejected(tmp_path):
    file = tmp_path / "config.json"
    file.write_text("{}")
    with pytest.raises(CheckpointNotFoundError, match="is a file"):
        resolve_checkpoint(file)
    with pytest.raises(CheckpointNotFoundError, match="not a hub id"):
        resolve_checkpoint(tmp_path / "missing" / "deeper")


def test_hub_id_offline_without_cache_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import importlib

    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)
    try:
        with pytest.raises(CheckpointNotFoundError, match="THUDM/glm-4-voice-decoder"):
            resolve_checkpoint("THUDM/glm-4-voice-decoder")
    finally:
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)


def test_hub_id_resolves_from_local_cache(tmp_path, monkeypatch):
    """A hub id whose snapshot is in the cache resolves offline (no network in tests)."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--THUDM--glm-4-voice-decoder" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.yaml").write_text("sample_rate: 22050\n")
    (cache / "models--THUDM--glm-4-voice-decoder" / "refs").mkdir()
    (cache / "models--THUDM--glm-4-voice-decoder" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import importlib

    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)
    try:
        folder = resolve_checkpoint("THUDM/glm-4-voice-decoder")
        assert (folder / "config.yaml").read_text() == "sample_rate: 22050\n"
    finally:
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)
