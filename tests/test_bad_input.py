"""Bring your own data, safely: one test per class of bad (or odd) input.

Each blocked class runs the real main job (`bonmf run --data DIR`, in-process, the whole
Dagster graph) against a state that already holds a production model versioned with DVC in a
git repo, and asserts the exit code, the file and line the message names, and that the
production model, the registry, the accepted data and the git/DVC state are exactly as
before. Accepted and repaired classes are asserted on the snapshot and the checks.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bonmf_core.config import ChecksConfig, DataConfig
from bonmf_core.content.features import tiny_image_features
from bonmf_core.data.readers import load_dataset
from bonmf_core.errors import DataError
from bonmf_core.ops import stages
from byo_data import write_generic
from orchestration import cli
from test_registry import write_movielens

GOOD_RUN = ["--variants", "pop,id", "--encoders", "basic", "--epochs", "1", "-q",
            "--set", "promotion.floors={}"]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                          text=True).stdout


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    if folder.exists():
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return h.hexdigest()


def state_fingerprint(repo: Path, state: Path) -> dict:
    """Everything a failed run must leave as it was: production model, registry rows,
    accepted data versions, git refs and working tree, the DVC cache and remote."""
    with sqlite3.connect(state / "bonmf.db") as db:
        rows = {table: db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
                for table in ("model_versions", "promotion_events")}
        rows["accepted"] = db.execute("SELECT content_hash, status, profile_json FROM "
                                      "dataset_snapshots WHERE status = 'accepted' "
                                      "ORDER BY 1").fetchall()
    return {"production": _tree_digest(state / "production"), **rows,
            "refs": _git(repo, "for-each-ref", "--format=%(refname) %(objectname)"),
            "head": _git(repo, "rev-parse", "HEAD"),
            "worktree": _git(repo, "status", "--porcelain", "--ignored"),
            "dvc_cache": _tree_digest(repo / ".dvc" / "cache"),
            "remote": _tree_digest(state / "dvc-remote")}


@pytest.fixture(scope="module")
def production(tmp_path_factory):
    """A git + DVC repo whose state holds a promoted, versioned model from generic data."""
    repo = tmp_path_factory.mktemp("repo")
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty",
         "-m", "init")
    subprocess.run([str(Path(os.sys.executable).parent / "dvc"), "init", "-q"], cwd=repo,
                   check=True)
    (repo / ".gitignore").write_text("state/\n")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "dvc init")
    good = write_generic(tmp_path_factory.mktemp("data") / "shop", images=True)
    state = repo / "state"
    code = _main(repo, state, "run", "--data", str(good), *GOOD_RUN)
    assert code == 0
    assert (state / "production" / "model").is_dir()
    return repo, state, good


def _main(repo: Path, state: Path, *argv: str) -> int:
    old_cwd, old_env = os.getcwd(), dict(os.environ)
    os.chdir(repo)
    os.environ["BONMF_STATE_DIR"] = str(state)
    try:
        return cli.main(list(argv))
    finally:   # run_pipeline sets DAGSTER_HOME & co.: leave the process as it was
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)


def _blocked(production, capsys, folder: Path, code: int, *expected: str) -> str:
    repo, state, _ = production
    before = state_fingerprint(repo, state)
    capsys.readouterr()
    assert _main(repo, state, "run", "--data", str(folder), *GOOD_RUN) == code
    out = capsys.readouterr()
    text = out.out + out.err
    for fragment in expected:
        assert fragment in text, text[-3000:]
    assert "Traceback" not in text and "Stack Trace" not in text
    assert state_fingerprint(repo, state) == before
    return text


def _copy(production, tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    shutil.copytree(production[2], folder, symlinks=True)
    return folder


def _edit_line(path: Path, number: int, text: str) -> None:
    """Replace file line `number` (1-based, the header is line 1)."""
    lines = path.read_text().split("\n")
    lines[number - 1] = text
    path.write_text("\n".join(lines))


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width × height pixels with almost no pixel data (a decompression
    bomb's shape: what a reader sees before it decodes anything)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


# -- blocked by a check: exit 1, file and line named, nothing changed ---------------------------

def test_wrong_field_count_is_a_parsing_failure_with_its_line(production, capsys, tmp_path):
    data = _copy(production, tmp_path)
    _edit_line(data / "interactions.csv", 6, "3,4,5")
    _blocked(production, capsys, data, 1, "check FAIL parsing", "interactions.csv:6",
             "expected 4 fields")


def test_unterminated_quote_is_a_parsing_failure(production, capsys, tmp_path):
    data = _copy(production, tmp_path)
    _edit_line(data / "items.csv", 9, '8,"Film 8 (1997),Drama,"text')
    _blocked(production, capsys, data, 1, "check FAIL parsing", "items.csv:9")


def test_non_numeric_rating_names_the_line(production, capsys, tmp_path):
    data = _copy(production, tmp_path)
    _edit_line(data / "interactions.csv", 8, "1,2,abc,880000005")
    _blocked(production, capsys, data, 1, "check FAIL interactions",
             "first at interactions.csv:8")


def test_rating_outside_the_declared_scale(production, capsys, tmp_path):
    data = _copy(production, tmp_path)
    (data / "dataset.yaml").write_text("rating_scale: [1, 5]\n")
    _edit_line(data / "interactions.csv", 4, "1,3,7,880000002")
    _blocked(production, capsys, data, 1, "ratings lie within the declared scale [1, 5]",
             "interactions.csv:4")


def test_missing_user_id_names_the_line(production, capsys, tmp_path):
    data = _copy(production, tmp_path)
    _edit_line(data / "interactions.csv", 11, ",9,4,880000100")
    _blocked(production, capsys, data, 1, "every interaction names its user_id",
             "interactions.csv:11")


def test_repeated_interaction_is_blocked(production, capsys, tmp_path):
    data = _copy(production, tmp_path)
    lines = (data / "interactions.csv").read_text().split("\n")
    _edit_line(data / "interactions.csv", 3, lines[1])
    _blocked(production, capsys, data, 1, "no interaction is repeated")


def test_unparseable_timestamp(production, capsys, tmp_path):
    data = _copy(production, tmp_path)
    _edit_line(data / "interactions.csv", 5, "1,4,3,yesterday")
    _blocked(production, capsys, data, 1, "every timestamp is a number", "interactions.csv:5")


def test_timestamp_in_the_future(production, capsys, tmp_path):
    data = _copy(production, tmp_path)
    _edit_line(data / "interactions.csv", 5, "1,4,3,4102444800")   # 2100-01-01
    _blocked(production, capsys, data, 1, "timestamps lie in", "interactions.csv:5")


def test_item_missing_from_the_catalog(production, capsys, tmp_path):
    data = _copy(production, tmp_path)
    _edit_line(data / "interactions.csv", 7, "1,999,4,880000006")
    _blocked(production, capsys, data, 1, "check FAIL referential", "interactions.csv:7")


def test_duplicate_catalog_id(production, capsys, tmp_path):
    data = _copy(production, tmp_path)
    _edit_line(data / "items.csv", 5, '3,"Another film",Drama,"x",posters/4.png')
    _blocked(production, capsys, data, 1, "item ids are unique", "items.csv:")


def test_blank_title(production, capsys, tmp_path):
    data = _copy(production, tmp_path)
    _edit_line(data / "items.csv", 6, '5," ",Drama,"x",posters/5.png')
    _blocked(production, capsys, data, 1, "no item's title is blank", "items.csv:6")


def test_missing_id_column(production, capsys, tmp_path):
    data = _copy(production, tmp_path)
    _edit_line(data / "interactions.csv", 1, "customer,item_id,rating,timestamp")
    _blocked(production, capsys, data, 1, "interactions have a 'user_id' column")


def test_absolute_image_path_outside_is_blocked_and_never_copied(production, capsys, tmp_path):
    data = _copy(production, tmp_path)
    _edit_line(data / "items.csv", 3, '2,"Film 2",Drama,"x",/etc/passwd')
    _blocked(production, capsys, data, 1, "stays inside the dataset folder", "items.csv:3")
    assert not list(production[1].rglob("passwd"))


def test_dotdot_escape_is_blocked(production, capsys, tmp_path):
    data = _copy(production, tmp_path)
    _edit_line(data / "items.csv", 4, '3,"Film 3",Drama,"x",../../../../etc/passwd')
    _blocked(production, capsys, data, 1, "stays inside the dataset folder", "items.csv:4")


def test_symlinked_poster_leading_outside_is_blocked(production, capsys, tmp_path):
    data = _copy(production, tmp_path)
    (data / "posters" / "5.png").unlink()
    (data / "posters" / "5.png").symlink_to("/etc/passwd")
    _blocked(production, capsys, data, 1, "stays inside the dataset folder", "items.csv:6")
    assert not list(production[1].rglob("passwd"))


def test_saved_dataset_with_an_escaping_image_path_is_blocked(production, capsys, tmp_path):
    saved = tmp_path / "saved"
    dataset = load_dataset(DataConfig(source=str(production[2])))
    dataset.items.loc[0, "image_path"] = "/etc/shadow"
    dataset.save(saved)
    _blocked(production, capsys, saved, 1, "stays inside the dataset folder")
    with pytest.raises(DataError, match="outside the dataset folder"):
        load_dataset(DataConfig(source=str(saved)))


def test_movielens_poster_link_outside_is_blocked(production, capsys, tmp_path):
    folder = write_movielens(tmp_path / "ml")
    poster = folder / "posters" / "1.jpg"
    poster.parent.mkdir(exist_ok=True)
    poster.unlink(missing_ok=True)
    poster.symlink_to("/etc/passwd")
    _blocked(production, capsys, folder, 1, "stays inside the dataset folder")


def test_header_only_interactions(production, capsys, tmp_path):
    data = _copy(production, tmp_path)
    (data / "interactions.csv").write_text("user_id,item_id,rating,timestamp\n")
    _blocked(production, capsys, data, 1, "the snapshot has interactions")


def test_parquet_row_is_named_by_row_number(production, capsys, tmp_path):
    data = _copy(production, tmp_path)
    frame = pd.read_csv(data / "interactions.csv", dtype=str)
    frame.loc[4, "rating"] = "five"
    (data / "interactions.csv").unlink()
    frame.to_parquet(data / "interactions.parquet", index=False)
    _blocked(production, capsys, data, 1, "every rating is a number",
             "first at interactions.parquet row 5")


# -- unreadable input: exit 2, file (and byte offset) named, nothing changed ---------------------

def test_latin1_line_inside_a_utf8_file(production, capsys, tmp_path):
    data = _copy(production, tmp_path)
    with open(data / "items.csv", "ab") as f:
        f.write('201,"Café ünïcode",Drama,"ok",\n'.encode())
        f.write('202,"Caf\xe9",Drama,"x",\n'.encode("latin-1"))
    _blocked(production, capsys, data, 2, "items.csv, line 203", "byte offset",
             "not valid utf-8")


def test_latin1_line_inside_a_utf8_movies_dat(production, capsys, tmp_path):
    folder = write_movielens(tmp_path / "ml")
    with open(folder / "movies.dat", "ab") as f:
        f.write("50::Amélie (2001)::Comedy\n".encode())
        f.write("51::Caf\xe9 (1999)::Drama\n".encode("latin-1"))
    _blocked(production, capsys, folder, 2, "movies.dat", "byte offset")


def test_garbage_bytes_overviews(production, capsys, tmp_path):
    folder = write_movielens(tmp_path / "ml")
    (folder / "overviews_tmdb.csv").write_bytes(bytes(range(128, 256)) * 8)
    _blocked(production, capsys, folder, 2, "overviews_tmdb.csv", "byte offset")


def test_utf16_file(production, capsys, tmp_path):
    data = _copy(production, tmp_path)
    text = (data / "interactions.csv").read_text()
    (data / "interactions.csv").write_bytes(text.encode("utf-16"))
    _blocked(production, capsys, data, 2, "interactions.csv", "NUL byte")


def test_missing_movies_dat(production, capsys, tmp_path):
    folder = write_movielens(tmp_path / "ml")
    (folder / "movies.dat").unlink()
    _blocked(production, capsys, folder, 2, "movies.dat", "required file is missing")


def test_folder_without_any_dataset(production, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    _blocked(production, capsys, tmp_path / "empty", 2, "not a dataset",
             "interactions.csv|tsv|parquet")


def test_empty_file(production, capsys, tmp_path):
    data = _copy(production, tmp_path)
    (data / "items.csv").write_bytes(b"")
    _blocked(production, capsys, data, 2, "items.csv", "file is empty")


def test_two_formats_of_one_table(production, capsys, tmp_path):
    data = _copy(production, tmp_path)
    pd.read_csv(data / "interactions.csv").to_parquet(data / "interactions.parquet")
    _blocked(production, capsys, data, 2, "both interactions.csv and interactions.parquet")


def test_unknown_key_in_dataset_yaml(production, capsys, tmp_path):
    data = _copy(production, tmp_path)
    (data / "dataset.yaml").write_text("colums: {user_id: customer}\n")
    _blocked(production, capsys, data, 2, "dataset.yaml", "unknown key(s) ['colums']")


def test_malformed_dataset_yaml(production, capsys, tmp_path):
    data = _copy(production, tmp_path)
    (data / "dataset.yaml").write_text("name: shop\ncolumns: {user_id: [\n")
    _blocked(production, capsys, data, 2, "dataset.yaml", "not valid YAML")


def test_verbose_brings_the_stack_trace_back(production, capsys, tmp_path):
    data = _copy(production, tmp_path)
    (data / "items.csv").write_bytes(b"")
    repo, state, _ = production
    capsys.readouterr()
    assert _main(repo, state, "run", "--data", str(data), *GOOD_RUN, "-v") == 2
    out = capsys.readouterr()
    assert "DataError" in out.err and ("Traceback" in out.err or "Stack Trace" in out.err)


# -- accepted or repaired: the snapshot and the checks say what happened ------------------------

def _snapshot(folder: Path, tmp_path: Path, **checks):
    info = stages.snapshot(DataConfig(source=str(folder)), root=tmp_path / "snapshots")
    raw, result = stages.validate(info["path"], ChecksConfig(**checks))
    return info, raw, result


def test_bom_and_crlf_are_accepted(production, tmp_path):
    data = _copy(production, tmp_path)
    for name in ("interactions.csv", "items.csv"):
        raw_bytes = (data / name).read_bytes().replace(b"\n", b"\r\n")
        (data / name).write_bytes(b"\xef\xbb\xbf" + raw_bytes)
    _, raw, result = _snapshot(data, tmp_path)
    assert result.passed, [c.description for c in result.blocking]
    assert list(raw.interactions.columns[:2]) == ["user_id", "item_id"]
    assert raw.interactions["user_id"].iloc[0] == "1"
    assert not raw.items["title"].str.contains("\r").any()


def test_declared_latin1_encoding_is_respected(production, tmp_path):
    data = _copy(production, tmp_path)
    items = (data / "items.csv").read_text().replace("Film 1 ", "Café 1 ")
    (data / "items.csv").write_bytes(items.encode("latin-1"))
    (data / "dataset.yaml").write_text("encoding: latin-1\nname: shop-latin\n")
    _, raw, result = _snapshot(data, tmp_path)
    assert result.passed and raw.name == "shop-latin"
    assert raw.items["title"].iloc[0].startswith("Café 1")


def test_tolerated_malformed_line_is_reported(production, tmp_path):
    data = _copy(production, tmp_path)
    _edit_line(data / "interactions.csv", 6, "3,4,5")
    info, raw, result = _snapshot(data, tmp_path, max_malformed_lines=1)
    assert result.passed
    assert result.check("parsing").statistics["malformed_lines"] == 1
    assert info["problems"]["interactions.csv"]["examples"][0]["line"] == 6
    assert info["n_interactions"] == 1500 - 1


def test_decompression_bomb_and_corrupt_images_count_as_unreadable(production, tmp_path):
    data = _copy(production, tmp_path)
    (data / "posters" / "1.png").write_bytes(_png_header(20000, 20000))
    (data / "posters" / "2.png").write_bytes(b"")
    (data / "posters" / "3.png").write_bytes(b"not an image at all")
    _, raw, result = _snapshot(data, tmp_path)
    catalog = result.check("catalog")
    assert result.passed and catalog.statistics["readable_image_share"] == pytest.approx(197 / 200)
    assert any("DecompressionBomb" in p for p in catalog.statistics["image_problems"])
    features, present = tiny_image_features(raw.items["image_path"].tolist()[:4])
    assert present.tolist() == [False, False, False, True] and np.isfinite(features).all()


def test_missing_poster_under_basic_features_does_not_crash(production, tmp_path):
    paths = [None, float("nan"), str(production[2] / "posters" / "1.png"), ""]
    features, present = tiny_image_features(paths)
    assert present.tolist() == [False, False, True, False]


def test_implicit_feedback_without_rating_or_time(production, tmp_path):
    data = _copy(production, tmp_path)
    frame = pd.read_csv(data / "interactions.csv")[["user_id", "item_id"]]
    frame.to_csv(data / "interactions.csv", index=False)
    _, raw, result = _snapshot(data, tmp_path)
    assert result.passed
    dataset = load_dataset(DataConfig(source=str(data)))
    assert "rating" not in dataset.interactions and not dataset.has_timestamps


def test_renamed_columns_through_dataset_yaml(production, tmp_path):
    data = _copy(production, tmp_path)
    frame = pd.read_csv(data / "interactions.csv").rename(
        columns={"user_id": "customer", "item_id": "sku", "timestamp": "ts"})
    frame["ts"] = pd.to_datetime(frame["ts"], unit="s").dt.strftime("%Y-%m-%dT%H:%M:%S")
    frame.to_csv(data / "interactions.csv", index=False)
    items = pd.read_csv(data / "items.csv").rename(columns={"item_id": "sku",
                                                            "text": "blurb"})
    items.to_csv(data / "items.csv", index=False)
    (data / "dataset.yaml").write_text(
        "columns: {user_id: customer, item_id: sku, timestamp: ts, text: [blurb]}\n")
    _, raw, result = _snapshot(data, tmp_path)
    assert result.passed and "blurb" in raw.items.columns
    original = load_dataset(DataConfig(source=str(production[2])))
    renamed = load_dataset(DataConfig(source=str(data)))
    assert (renamed.interactions["timestamp"].to_numpy()
            == original.interactions["timestamp"].to_numpy()).all()


def test_catalog_is_optional(production, tmp_path):
    data = _copy(production, tmp_path)
    (data / "items.csv").unlink()
    _, raw, result = _snapshot(data, tmp_path)
    assert result.passed and len(raw.items) == 200


def test_opaque_ids_and_repeat_pairs_at_new_times_are_accepted(production, tmp_path):
    """Ids are text ('-1' and '007' are ids, not numbers); the same (user, item) at another
    time is a repeat interaction (a re-purchase), kept; only the same time is a duplicate."""
    data = _copy(production, tmp_path)
    with open(data / "interactions.csv", "a") as f:
        f.write("-1,007,4,880000001\n1,1,5,881000000\n")
    with open(data / "items.csv", "a") as f:
        f.write('007,"Bond",Action,"' + "long " * 200_000 + '",\n')
    _, raw, result = _snapshot(data, tmp_path)
    assert result.passed, [c.description for c in result.blocking]
    assert "-1" in set(raw.interactions["user_id"]) and "007" in set(raw.items["item_id"])


def test_an_edited_poster_is_new_data(production, tmp_path):
    data = _copy(production, tmp_path)
    before, _, _ = _snapshot(data, tmp_path)
    from PIL import Image
    Image.new("RGB", (24, 36), (1, 2, 3)).save(data / "posters" / "7.png")
    after, _, _ = _snapshot(data, tmp_path)
    assert after["content_hash"] != before["content_hash"]
    ds_before = load_dataset(DataConfig(source=str(production[2])))
    ds_after = load_dataset(DataConfig(source=str(data)))
    assert ds_before.content_hash() != ds_after.content_hash()
