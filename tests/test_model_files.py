"""find_model_file: a file of a model, from its folder or its hub cache snapshot
(how the MTP layers and processor files of the source are read)."""

import huggingface_hub.constants

from ream_modifiers.model_files import find_model_file


def test_a_hub_model_file_is_found_in_its_cache_snapshot(tmp_path, monkeypatch):
    # no request leaves the machine (CI has no hub access)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "models--acme--tiny-moe"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    found = find_model_file("acme/tiny-moe", "config.json", cache_dir=str(tmp_path))
    assert found == snapshot / "config.json"
    absent = find_model_file("acme/absent", "config.json", cache_dir=str(tmp_path))
    assert absent is None
    assert find_model_file(str(snapshot), "config.json") == snapshot / "config.json"
    assert find_model_file(str(snapshot), "preprocessor_config.json") is None
