"""nullcov.files: atomic files and folders, JSON and TSV written and read one way."""

import json

import pytest

from nullcov.files import (
    DiskFullError,
    atomic_folder,
    atomic_path,
    read_json,
    read_tsv,
    write_json,
    write_text,
    write_tsv,
)


def test_write_json_writes_what_json_dumps_gives_and_read_json_reads_it_back(tmp_path):
    data = {"b": [1, 2.5, None], "a": "ü"}
    path = write_json(tmp_path / "deep" / "x.json", data, indent=1, sort_keys=True)
    assert path == tmp_path / "deep" / "x.json"
    assert path.read_bytes() == json.dumps(data, indent=1, sort_keys=True).encode()  # byte for byte: caches compare
    assert read_json(path) == data
    write_json(path, data, newline=True, sort_keys=True, indent=2, ensure_ascii=False)
    assert path.read_text(encoding="utf-8") == json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json"]  # no temporary left beside it


def test_a_failed_write_json_leaves_the_old_file(tmp_path):
    path = write_json(tmp_path / "x.json", {"old": 1})
    with pytest.raises(TypeError):
        write_json(path, {"new": object()})  # not JSON: fails before the file is touched
    assert read_json(path) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_an_error_inside_atomic_path_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_text(tmp_path / "x.txt", "old\n")
    with pytest.raises(RuntimeError), atomic_path(path) as temporary:
        temporary.write_text("half of the new")
        raise RuntimeError("crash while writing")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_an_error_inside_atomic_folder_leaves_the_old_folder(tmp_path):
    folder = tmp_path / "model"
    with atomic_folder(folder) as temporary:
        write_text(temporary / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_folder(folder) as temporary:
        write_text(temporary / "a.txt", "new")
        raise RuntimeError("crash while writing")
    assert (folder / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_read_json_names_the_file_it_cannot_read(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_json(tmp_path / "missing.json")
    broken = write_text(tmp_path / "broken.json", '{"steps": [')
    with pytest.raises(ValueError, match=f"{broken} is not valid JSON"):
        read_json(broken)
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'"\xe9"')
    with pytest.raises(ValueError, match=f"{latin} is not valid JSON"):
        read_json(latin)


def test_tsv_round_trip(tmp_path):
    rows = [{"step": "alpha_00_0999", "value": 0.1, "count": 3}, {"step": "text", "value": 1e-300, "count": 0}]
    write_tsv(tmp_path / "t.tsv", rows, ["step", "value", "count"])
    assert (tmp_path / "t.tsv").read_text().splitlines()[0] == "step\tvalue\tcount"
    read = read_tsv(tmp_path / "t.tsv")
    assert read == [{"step": "alpha_00_0999", "value": "0.1", "count": "3"},
                    {"step": "text", "value": "1e-300", "count": "0"}]
    assert float(read[1]["value"]) == 1e-300  # floats as repr: exact


def test_a_file_larger_than_the_free_space_is_refused_naming_path_and_bytes(tmp_path, monkeypatch):
    import errno
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10_000, 9_000, 1_000))
    with pytest.raises(DiskFullError) as refused, atomic_path(tmp_path / "x.h5", size=5_000) as temporary:
        temporary.write_bytes(b"never")
    assert refused.value.errno == errno.ENOSPC
    message = str(refused.value)
    assert f"writing {tmp_path / 'x.h5'}: the file needs about 5000 bytes, 1000 bytes are free" in message
    assert message.endswith("(see docs/troubleshooting.md#no-space-left-on-device)")
    assert list(tmp_path.iterdir()) == []


def test_enospc_in_a_write_becomes_a_disk_full_error_and_a_killed_writers_temporary_goes(tmp_path):
    import errno
    import os

    stale = tmp_path / ".x.txt.tmp999999999"  # a pid no process has
    stale.write_text("left by a killed writer")
    with pytest.raises(DiskFullError, match=r"writing .*x.txt: the file needs at least 3 bytes"), \
            atomic_path(tmp_path / "x.txt") as temporary:
        temporary.write_text("abc")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []
