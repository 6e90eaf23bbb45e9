"""Model exports on a local folder: versioned (``final/<step>-<id>/``), each file with its sha256,
``LATEST`` written last; readers (read_checkpoint, fetch_model_dir, resolve_model_path, Serve's
config check) load only a complete, verified export and still load the older layouts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from raggen.errors import DataError
from raggen.models import exports
from raggen.models.exports import EXPORT_MANIFEST, EXPORT_MARKER, POINTER, ROOT_MARKER, find_export, model_folders
from raggen.models.loading import fetch_model_dir, resolve_model_path
from raggen.storage import LocalStore, sha256_file
from raggen.train.checkpointing import STATE_FILE, export_checkpoint, read_checkpoint, write_checkpoint


class FakeModel:
    """What write_checkpoint needs: ``save_pretrained(dir)`` writing an HF-looking folder."""

    def __init__(self, seed: int):
        self.seed = seed

    def save_pretrained(self, path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        Path(path, "config.json").write_text(json.dumps({"architectures": ["Fake"], "seed": self.seed}))
        Path(path, "model.safetensors").write_bytes(bytes(range(256)) * (4 + self.seed))


def _checkpoint(tmp_path: Path, step: int, name: str | None = None) -> Path:
    out = tmp_path / (name or f"ckpt-{step}")
    write_checkpoint(
        out,
        models={"generator": FakeModel(step), "query_encoder": FakeModel(step + 1)},
        step=step,
        config_yaml="train:\n  steps: 1\n",
    )
    return out


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_export_is_versioned_with_a_manifest_of_sha256s_and_a_pointer(tmp_path):
    root = tmp_path / "run" / "final"
    uri = export_checkpoint(_checkpoint(tmp_path, 3), str(root))
    name = Path(uri).name
    assert Path(uri).parent == root and name.startswith("3-")
    assert (root / POINTER).read_text() == f"{name}\n" and (root / ROOT_MARKER).is_file()
    manifest = json.loads((root / name / EXPORT_MANIFEST).read_text())
    assert manifest["step"] == 3 and manifest["name"] == name and manifest["models"] == ["generator", "query_encoder"]
    listed = {f["path"]: f["sha256"] for f in manifest["files"]}
    on_disk = {p.relative_to(root / name).as_posix() for p in (root / name).rglob("*") if p.is_file()}
    assert set(listed) == on_disk - {EXPORT_MANIFEST, EXPORT_MARKER}
    assert {"generator/config.json", "generator/model.safetensors", STATE_FILE, "config.yaml"} <= set(listed)
    assert all(sha256_file(root / name / rel) == digest for rel, digest in listed.items())


def test_a_complete_export_loads_through_its_pointer(tmp_path):
    root = tmp_path / "final"
    uri = export_checkpoint(_checkpoint(tmp_path, 3), str(root))
    state = read_checkpoint(root)  # the export root: LATEST's export, verified
    assert state.step == 3 and state.model_dirs["generator"] == os.path.join(uri, "generator")
    assert read_checkpoint(uri).step == 3  # one export's folder, named directly
    assert fetch_model_dir(str(root / "generator")) == os.path.join(uri, "generator")
    assert fetch_model_dir(os.path.join(uri, "query_encoder")) == os.path.join(uri, "query_encoder")
    assert resolve_model_path(str(root / "generator")) == os.path.join(uri, "generator")
    assert model_folders(str(root)) == {"generator", "query_encoder"}

    newer = export_checkpoint(_checkpoint(tmp_path, 5), str(root))  # LATEST moves to the newer one
    assert read_checkpoint(root).step == 5 and fetch_model_dir(str(root / "generator")).startswith(newer)
    older = export_checkpoint(_checkpoint(tmp_path, 4, "again"), str(root))  # never back to an older step
    assert (root / POINTER).read_text().strip() == Path(newer).name
    assert read_checkpoint(older).step == 4  # still complete and loadable when named


def test_a_tampered_or_incomplete_export_is_refused_with_one_line(tmp_path):
    root = tmp_path / "final"
    uri = Path(export_checkpoint(_checkpoint(tmp_path, 3), str(root)))
    weights = uri / "generator" / "model.safetensors"
    good = weights.read_bytes()
    _flip_byte(weights)
    for load in (lambda: read_checkpoint(root), lambda: fetch_model_dir(str(root / "generator"))):
        with pytest.raises(DataError, match=r"generator/model.safetensors does not match its sha256") as info:
            load()
        assert "\n" not in str(info.value)
    assert fetch_model_dir(str(root / "query_encoder"))  # a model's own files are what its load checks
    weights.write_bytes(good)
    (uri / STATE_FILE).unlink()
    with pytest.raises(DataError, match=rf"incomplete model export \({STATE_FILE} is missing\)"):
        read_checkpoint(root)
    with pytest.raises(DataError, match="has no reranker/"):
        fetch_model_dir(str(root / "reranker"))


def test_a_crash_before_the_pointer_leaves_nothing_loadable_as_complete(tmp_path, monkeypatch):
    root = tmp_path / "final"
    src = _checkpoint(tmp_path, 3)

    def crash(store, name, **kwargs):
        raise KeyboardInterrupt("killed between the files and the pointer")

    monkeypatch.setattr(exports, "move_pointer", crash)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(src, str(root))
    monkeypatch.undo()
    assert not (root / POINTER).exists()
    for load in (
        lambda: read_checkpoint(root),
        lambda: fetch_model_dir(str(root / "generator")),
        lambda: resolve_model_path(str(root / "generator")),
        lambda: model_folders(str(root)),
    ):
        with pytest.raises(DataError, match=r"final: incomplete model export \(no LATEST pointer"):
            load()


def test_a_crash_between_files_leaves_the_previous_export_in_service(tmp_path, monkeypatch):
    root = tmp_path / "final"
    first = export_checkpoint(_checkpoint(tmp_path, 3), str(root))
    src = _checkpoint(tmp_path, 5)
    real_upload = LocalStore.upload_file
    uploaded = []

    def dies_on_the_third_file(self, local_path, rel):
        if len(uploaded) == 2:
            raise OSError("disk gone")
        uploaded.append(rel)
        real_upload(self, local_path, rel)

    monkeypatch.setattr(LocalStore, "upload_file", dies_on_the_third_file)
    with pytest.raises(OSError):
        export_checkpoint(src, str(root))
    monkeypatch.undo()
    partial = root / uploaded[0].split("/")[0]
    assert (partial / EXPORT_MARKER).is_file() and not (partial / EXPORT_MANIFEST).exists()
    assert read_checkpoint(root).step == 3 and fetch_model_dir(str(root / "generator")).startswith(first)
    with pytest.raises(DataError, match=rf"{partial.name}: incomplete model export .*no export.json"):
        read_checkpoint(partial)  # the half-written export, named directly
    with pytest.raises(DataError, match="incomplete model export"):
        fetch_model_dir(str(partial / "generator"))


def test_the_pointer_is_written_last_and_the_state_file_after_the_models(tmp_path, monkeypatch):
    writes = []
    real_write, real_upload = LocalStore.write_bytes, LocalStore.upload_file

    def write(self, rel, data, **kw):
        writes.append(rel)
        return real_write(self, rel, data, **kw)

    def upload(self, local_path, rel):
        writes.append(rel)
        real_upload(self, local_path, rel)

    monkeypatch.setattr(LocalStore, "write_bytes", write)
    monkeypatch.setattr(LocalStore, "upload_file", upload)
    name = Path(export_checkpoint(_checkpoint(tmp_path, 3), str(tmp_path / "final"))).name
    assert writes[:2] == [ROOT_MARKER, f"{name}/{EXPORT_MARKER}"]
    assert writes[-3:] == [f"{name}/{STATE_FILE}", f"{name}/{EXPORT_MANIFEST}", POINTER]


@pytest.mark.parametrize("pointer", [b"../elsewhere\n", b"/etc\n", b"a/b\n", b"\xff\xfe\n", b"\n"])
def test_a_bad_pointer_is_refused(tmp_path, pointer):
    root = tmp_path / "final"
    export_checkpoint(_checkpoint(tmp_path, 3), str(root))
    (root / POINTER).write_bytes(pointer)
    with pytest.raises(DataError, match="LATEST: (names|not UTF-8)") as info:
        read_checkpoint(root)
    assert "\n" not in str(info.value)


def test_a_manifest_naming_a_file_outside_the_export_is_refused(tmp_path):
    root = tmp_path / "final"
    uri = Path(export_checkpoint(_checkpoint(tmp_path, 3), str(root)))
    manifest = json.loads((uri / EXPORT_MANIFEST).read_text())
    manifest["files"].append({"path": "../../secret", "sha256": "0" * 64})
    (uri / EXPORT_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="unsafe file name '../../secret'"):
        find_export(str(root))


def test_older_layouts_keep_loading(tmp_path):
    old_final = _checkpoint(tmp_path, 7, "final")  # the plain checkpoint folder older runs exported
    assert read_checkpoint(old_final).step == 7
    assert fetch_model_dir(str(old_final / "generator")) == str(old_final / "generator")
    assert model_folders(str(old_final)) == {"generator", "query_encoder"}
    hf = tmp_path / "plain-model"
    FakeModel(0).save_pretrained(str(hf))
    assert find_export(str(hf)) is None and fetch_model_dir(str(hf)) == str(hf)
    assert resolve_model_path("some-org/some-model") == "some-org/some-model"  # hub ids stay ids


def test_serve_config_reads_models_from_the_export_and_refuses_an_incomplete_one(tmp_path):
    from raggen.app.serving import app_args_from_config
    from raggen.config import load_config

    root = tmp_path / "final"
    export_checkpoint(_checkpoint(tmp_path, 3), str(root))
    args = app_args_from_config(load_config(overrides=[f"serve.model_dir={root}"]))
    assert args["generator"] == str(root / "generator") and args["query_encoder"]["name_or_path"] == str(
        root / "query_encoder"
    )
    assert not {"aws_access_key_id", "aws_secret_access_key", "aws_session_token"} & set(args["s3"] or {})
    (root / POINTER).unlink()
    with pytest.raises(DataError, match="incomplete model export"):
        app_args_from_config(load_config(overrides=[f"serve.model_dir={root}"]))


@pytest.mark.parametrize(
    "storage, name",
    [
        ("s3://b/runs/../x", "r"),
        ("s3://b//runs", "r"),
        ("s3://b/runs", "../r"),
        ("s3://b/runs", "/abs"),
        ("s3://b/runs", ""),
        ("/tmp/runs", "a/../../r"),
    ],
)
def test_run_paths_refuse_unsafe_s3_prefixes_and_names(storage, name):
    """Every S3 path training derives (Ray Train's storage path, the run's URI, its local scratch
    folder) goes through raggen.storage's safe-name check."""
    from raggen.train.trainer import local_run_dir, run_uri, storage_target

    with pytest.raises(ValueError, match="unsafe|empty"):
        run_uri(storage, name)
    with pytest.raises(ValueError, match="unsafe|empty"):
        local_run_dir(storage, name)
    if "//" in storage[len("s3://") :] or ".." in storage:
        with pytest.raises(ValueError, match="unsafe S3 prefix"):
            storage_target(storage, {"endpoint_url": "http://127.0.0.1:1"})


def test_an_index_refresh_from_an_export_records_the_export_it_used(tmp_path):
    from raggen.app.indexing import resolve_refresh_encoder
    from raggen.config import load_config

    src = tmp_path / "ckpt"
    write_checkpoint(src, models={"passage_encoder": FakeModel(1), "query_encoder": FakeModel(2)}, step=4)
    uri = export_checkpoint(src, str(tmp_path / "final"))
    picked = resolve_refresh_encoder(str(tmp_path / "final"), load_config())
    assert picked.name_or_path == os.path.join(uri, "passage_encoder") and picked.checkpoint == uri


def test_resolve_model_path_refuses_a_folder_of_an_unfinished_export(tmp_path, monkeypatch):
    root = tmp_path / "final"
    monkeypatch.setattr(LocalStore, "write_bytes", _no_manifest(LocalStore.write_bytes))
    with pytest.raises(OSError):
        export_checkpoint(_checkpoint(tmp_path, 3), str(root))
    monkeypatch.undo()
    partial = next(p for p in root.iterdir() if p.is_dir())
    assert (partial / "generator" / "config.json").is_file()  # the files are there, the manifest is not
    with pytest.raises(DataError, match="incomplete model export"):
        resolve_model_path(str(partial / "generator"))


def _no_manifest(real):
    def write(self, rel, data, **kw):
        if rel.endswith(EXPORT_MANIFEST):
            raise OSError("killed before the manifest")
        return real(self, rel, data, **kw)

    return write
