"""Readers: MovieLens-1M directories and generic CSV/Parquet tables, on real files."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bonmf_core.data.dataset import Dataset
from bonmf_core.errors import DataError
from bonmf_core.config import DataConfig
from bonmf_core.data.readers import load_dataset, read_movielens

# -- a small MovieLens-1M-format directory -------------------------------------------------

RATINGS = """\
2::20::4::978300000
1::10::5::978300760
10::20::3::978302109
3::30::1::978301968
2::10::2::978300100
"""
# Unrated 50 comes before unrated 40: catalog-only items keep movies.dat order.
MOVIES = """\
10::Café au Lait (1993)::Comedy
50::Unrated Fifty (2000)::Drama|Romance
20::"Quoted" Title, The (1998)::Action|Sci-Fi
30::Thirty (1999)::Documentary
40::Forty (1999)::
"""
# Unsorted, and '10' sorts before '2' as a string: the index must follow the number.
USERS = """\
10::M::25::4::12345
2::F::1::10::48067
1::M::56::16::70072
3::F::35::7::55117
4::M::18::0::02139
"""
OVERVIEWS = (
    "movieId,title,genres,year,tmdb_id,tmdb_title,tmdb_release_date,tmdb_overview,"
    "tmdb_runtime,tmdb_genres,tmdb_top_cast,tmdb_keywords\n"
    '10,Café au Lait (1993),Comedy,1993,1,Métisse,1993-08-04,"A love story, in Paris.",'
    '94,Comedy,Julie Mauduech,"paris, love"\n'
    '20,"""Quoted"" Title, The (1998)",Action,1998,2,Quoted,1998-01-01,Ünïcode plot.,90,'
    "Action,Someone,\n"
    "30,Thirty (1999),Documentary,1999,,,,,,,,\n"
)


def _image_bytes(fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 6), (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


def write_ml(root: Path, *, ratings=RATINGS, movies=MOVIES, users=USERS,
             overviews=OVERVIEWS, posters=True) -> Path:
    """Write a ML-1M-format directory; pass None to leave a file out, bytes to write as is."""
    root.mkdir(parents=True, exist_ok=True)
    for name, text, encoding in (("ratings.dat", ratings, "ascii"),
                                 ("movies.dat", movies, "iso-8859-1"),
                                 ("users.dat", users, "ascii"),
                                 ("overviews_tmdb.csv", overviews, "utf-8")):
        if text is not None:
            data = text if isinstance(text, bytes) else text.encode(encoding)
            (root / name).write_bytes(data)
    if posters:
        folder = root / "posters"
        folder.mkdir(exist_ok=True)
        (folder / "10.jpg").write_bytes(_image_bytes("JPEG"))
        (folder / "20.jpg").write_bytes(_image_bytes("PNG"))  # a PNG under a .jpg name
        (folder / "30.png").write_bytes(_image_bytes("PNG"))
        (folder / ".DS_Store").write_bytes(b"junk")
    return root


@pytest.fixture
def ml_dir(tmp_path: Path) -> Path:
    return write_ml(tmp_path / "ml-tiny")


def test_movielens_id_maps(ml_dir):
    ds = read_movielens(ml_dir)
    # items: first appearance in ratings.dat, then unrated movies in movies.dat order
    assert list(ds.item_ids) == ["20", "10", "30", "50", "40"]
    # users: ascending numeric UserID, users.dat users without ratings included
    assert list(ds.user_ids) == ["1", "2", "3", "4", "10"]
    assert ds.interactions["user"].tolist() == [1, 0, 4, 2, 1]
    assert ds.interactions["item"].tolist() == [0, 1, 0, 2, 1]
    assert ds.name == "ml-tiny"


def test_movielens_values_and_dtypes(ml_dir):
    ds = read_movielens(ml_dir)
    inter = ds.interactions
    assert list(inter.columns) == ["user", "item", "rating", "timestamp"]
    assert [str(t) for t in inter.dtypes] == ["int64", "int64", "float32", "int64"]
    assert inter["rating"].tolist() == [4.0, 5.0, 3.0, 1.0, 2.0]
    assert inter["timestamp"].tolist() == [978300000, 978300760, 978302109, 978301968,
                                           978300100]
    assert ds.rating_scale == (1.0, 5.0)
    items = ds.items.set_index("item_id")
    assert items.loc["10", "title"] == "Café au Lait (1993)"  # decoded as ISO-8859-1
    assert items.loc["20", "title"] == '"Quoted" Title, The (1998)'  # quotes are data
    assert items.loc["50", "genres"] == "Drama|Romance"
    assert items.loc["40", "genres"] == ""


def test_movielens_side_information(ml_dir):
    ds = read_movielens(ml_dir)
    items = ds.items.set_index("item_id")
    assert list(ds.items.columns) == ["item_id", "title", "genres", "image_path", "overview",
                                      "keywords"]
    assert ds.text_fields == ["overview", "keywords"]
    assert items.loc["10", "overview"] == "A love story, in Paris."
    assert items.loc["10", "keywords"] == "paris, love"
    assert items.loc["20", "overview"] == "Ünïcode plot."
    assert items.loc["20", "keywords"] == ""
    assert items.loc["30", "overview"] == "" and items.loc["40", "overview"] == ""
    posters = (ml_dir / "posters").resolve()
    assert items.loc["10", "image_path"] == str(posters / "10.jpg")
    assert items.loc["20", "image_path"] == str(posters / "20.jpg")  # PNG content, .jpg name
    assert items.loc["30", "image_path"] == str(posters / "30.png")
    assert items[["image_path"]].loc[["40", "50"]].isna().all().all()
    assert all(Path(p).is_absolute() for p in items["image_path"].dropna())


def test_movielens_users(ml_dir):
    users = read_movielens(ml_dir).users
    assert list(users.columns) == ["user_id", "gender", "age", "occupation"]
    assert users.loc[4].tolist() == ["10", "M", "25", "4"]
    assert users.loc[0].tolist() == ["1", "M", "56", "16"]


def test_movielens_without_optional_files(tmp_path):
    root = write_ml(tmp_path / "bare", users=None, overviews=None, posters=False)
    ds = read_movielens(root)
    assert list(ds.user_ids) == ["1", "2", "3", "10"]  # users seen in ratings, by number
    assert list(ds.users.columns) == ["user_id"]
    assert list(ds.items.columns) == ["item_id", "title", "genres", "image_path"]
    assert ds.items["image_path"].isna().all()


def test_movielens_side_files_switched_off_or_elsewhere(tmp_path, ml_dir):
    off = read_movielens(ml_dir, overviews=None, posters=None)
    assert "overview" not in off.items.columns and off.items["image_path"].isna().all()
    elsewhere = tmp_path / "side"
    elsewhere.mkdir()
    (elsewhere / "ov.csv").write_text(OVERVIEWS, encoding="utf-8")
    os.rename(ml_dir / "posters", elsewhere / "pics")
    ds = read_movielens(ml_dir, overviews=elsewhere / "ov.csv", posters=str(elsewhere / "pics"))
    assert ds.items["overview"].iloc[1] == "A love story, in Paris."
    assert ds.items["image_path"].notna().sum() == 3


def test_movielens_tolerates_utf8_movies_and_crlf(tmp_path):
    root = write_ml(tmp_path / "win", movies=MOVIES.replace("\n", "\r\n").encode("utf-8"),
                    ratings=RATINGS.replace("\n", "\r\n"))
    ds = read_movielens(root)
    assert ds.items.set_index("item_id").loc["10", "title"] == "Café au Lait (1993)"
    assert len(ds.interactions) == 5


def _replace_line(text: str, line: int, new: str) -> str:
    lines = text.splitlines(keepends=True)
    lines[line - 1] = new + "\n"
    return "".join(lines)


@pytest.mark.parametrize("file, content, line, words", [
    ("ratings.dat", RATINGS.replace("::", "\t"), 1, ["'::'", "tab-separated"]),
    ("ratings.dat", RATINGS.replace("::", ","), 1, ["'::'", "comma-separated"]),
    ("ratings.dat", _replace_line(RATINGS, 3, "1::10::5"), 3, ["expected 4", "found 3"]),
    ("ratings.dat", _replace_line(RATINGS, 4, "1::10::5::978300760::x"), 4, ["found 5"]),
    ("ratings.dat", RATINGS + "\n1::10::5::978300760\n", 6, ["found 1"]),  # blank line
    ("ratings.dat", _replace_line(RATINGS, 2, "x::10::5::978300760"), 2,
     ["field 'UserID'", "integer", "'x'"]),
    ("ratings.dat", _replace_line(RATINGS, 5, "1::10.5::5::978300760"), 5,
     ["field 'MovieID'", "integer"]),
    ("ratings.dat", _replace_line(RATINGS, 2, "1::10::5::97830.5"), 2,
     ["field 'Timestamp'", "integer"]),
    ("ratings.dat", _replace_line(RATINGS, 3, "1::10::::978300760"), 3,
     ["field 'Rating'", "number"]),
    ("ratings.dat", _replace_line(RATINGS, 4, "1::10::6::978300760"), 4,
     ["field 'Rating'", "outside", "1-5"]),
    ("ratings.dat", _replace_line(RATINGS, 1, "1::10::0::978300760"), 1, ["outside"]),
    ("ratings.dat", _replace_line(RATINGS, 5, "1::99::3::978300760"), 5,
     ["field 'MovieID'", "'99'", "movies.dat"]),
    ("ratings.dat", _replace_line(RATINGS, 2, "77::10::3::978300760"), 2,
     ["field 'UserID'", "'77'", "users.dat"]),
    ("movies.dat", _replace_line(MOVIES, 3, "abc::Title (1999)::Drama"), 3,
     ["field 'MovieID'", "'abc'"]),
    ("movies.dat", _replace_line(MOVIES, 4, "10::Again (1999)::Drama"), 4,
     ["field 'MovieID'", "more than once"]),
    ("movies.dat", _replace_line(MOVIES, 2, "50::Unrated Fifty (2000)"), 2, ["expected 3"]),
    ("users.dat", _replace_line(USERS, 3, "1::M::56::16::70072::x"), 3, ["expected 5"]),
    ("users.dat", _replace_line(USERS, 5, "2::M::18::0::02139"), 5,
     ["field 'UserID'", "more than once"]),
    ("overviews_tmdb.csv", OVERVIEWS.encode("utf-8").replace(b"Thirty", b"Th\xefrty"), 4,
     ["utf-8"]),
    ("overviews_tmdb.csv", OVERVIEWS.replace("tmdb_overview", "overview"), None,
     ["'tmdb_overview' not found", "tmdb_keywords"]),
    ("overviews_tmdb.csv", OVERVIEWS.replace("\n30,", "\nthirty,"), 4,
     ["field 'movieId'", "'thirty'"]),
])
def test_movielens_malformed(tmp_path, file, content, line, words):
    root = write_ml(tmp_path / "bad", **{file.split(".")[0].split("_")[0]: content})
    with pytest.raises(DataError) as info:
        read_movielens(root)
    message = str(info.value)
    assert file in message
    assert info.value.line == line
    if line is not None:
        assert f"line {line}" in message
    for word in words:
        assert word in message


def test_movielens_missing_and_undecodable_files(tmp_path):
    with pytest.raises(DataError, match="ratings.dat.*missing"):
        read_movielens(write_ml(tmp_path / "a", ratings=None))
    with pytest.raises(DataError, match="movies.dat.*missing"):
        read_movielens(write_ml(tmp_path / "b", movies=None))
    with pytest.raises(DataError, match="not found"):
        read_movielens(tmp_path / "nowhere")
    with pytest.raises(DataError, match="ratings.dat.*UTF-16"):
        read_movielens(write_ml(tmp_path / "c", ratings=RATINGS.encode("utf-16")))
    with pytest.raises(DataError, match="ratings.dat.*empty"):
        read_movielens(write_ml(tmp_path / "d", ratings=""))
    with pytest.raises(DataError, match="posters folder not found"):
        read_movielens(write_ml(tmp_path / "e"), posters=tmp_path / "no-posters")
    with pytest.raises(DataError, match="ov.csv.*missing"):
        read_movielens(write_ml(tmp_path / "f"), overviews=tmp_path / "ov.csv")


def test_save_load_round_trip(ml_dir, tmp_path):
    ds = read_movielens(ml_dir)
    back = Dataset.load(ds.save(tmp_path / "saved"))
    pd.testing.assert_frame_equal(back.interactions, ds.interactions)
    pd.testing.assert_frame_equal(back.items, ds.items)
    pd.testing.assert_frame_equal(back.users, ds.users)
    assert back.rating_scale == ds.rating_scale and back.name == ds.name
    assert back.content_hash() == ds.content_hash()


# -- a generic data folder (through load_dataset, as every entry point reads it) -----------

INTERACTIONS_CSV = """\
who,what,stars,when
u9,b,4.5,2021-01-01T00:00:00Z
u1,a,3,2021-01-01 01:00:00
u9,a,1,2021-01-02T00:00:00+01:00
u2,007,5,2021-01-03 00:00:00
"""
ITEMS_CSV = """\
what,name,kind,picture,blurb
a,Item A,x|y,img/a.jpg,"About A, with comma"
007,Bond,spy,,
b,,z,,About B
c,Catalog Only,,img/../c.png,About C
"""
USERS_CSV = """\
who,segment
u1,new
u2,
u9,old
u5,old
"""
DESCRIPTION = """\
name: shop
rating_scale: [1, 5]
columns: {user_id: who, item_id: what, rating: stars, timestamp: when, title: name,
          genres: kind, image_path: picture, text: [blurb], user_attributes: [segment]}
"""


def _folder(root: Path, **files: str | bytes) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        name = name.replace("_", ".", 1) if name != "dataset_yaml" else "dataset.yaml"
        (root / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return root


@pytest.fixture
def shop(tmp_path) -> Path:
    return _folder(tmp_path.resolve() / "shop", interactions_csv=INTERACTIONS_CSV,
                   items_csv=ITEMS_CSV, users_csv=USERS_CSV, dataset_yaml=DESCRIPTION)


def _load(folder: Path) -> Dataset:
    return load_dataset(DataConfig(source=str(folder)))


def test_generic_folder(shop):
    ds = _load(shop)
    assert ds.name == "shop"
    assert list(ds.item_ids) == ["b", "a", "007", "c"]  # '007' stays a string
    inter = ds.interactions
    assert inter["item"].tolist() == [0, 1, 1, 2]
    assert inter["rating"].dtype == np.float32 and inter["rating"].tolist() == [4.5, 3, 1, 5]
    # naive datetimes are UTC; '+01:00' is converted
    assert inter["timestamp"].tolist() == [1609459200, 1609462800, 1609542000, 1609632000]
    items = ds.items.set_index("item_id")
    assert items.loc["a", "title"] == "Item A" and items.loc["c", "title"] == "Catalog Only"
    assert items["genres"].tolist() == ["z", "x|y", "spy", ""]
    assert items.loc["a", "image_path"] == str(shop / "img" / "a.jpg")   # relative to the folder
    assert items.loc["c", "image_path"] == str(shop / "c.png")           # '..' collapsed, inside
    assert pd.isna(items.loc["b", "image_path"])
    assert items["blurb"].tolist() == ["About B", "About A, with comma", "", "About C"]
    users = ds.users.set_index("user_id")
    assert users.loc["u1", "segment"] == "new" and users.loc["u5", "segment"] == "old"
    assert ds.rating_scale == (1, 5)


def test_generic_parquet_matches_csv(shop, tmp_path):
    from_csv = _load(shop)
    parquet = _folder(tmp_path / "pq", dataset_yaml=DESCRIPTION.replace("name: shop",
                                                                        "name: shop"))
    for table in ("interactions", "items", "users"):
        frame = pd.read_csv(shop / f"{table}.csv", dtype=str, keep_default_na=False,
                            na_values=[""])
        if table == "interactions":
            frame["stars"] = frame["stars"].astype(float)
            frame["when"] = pd.to_datetime(frame["when"], utc=True, format="mixed")
        frame.to_parquet(parquet / f"{table}.parquet", index=False)
    (parquet / "img").mkdir()
    from_parquet = _load(parquet)
    pd.testing.assert_frame_equal(from_parquet.interactions, from_csv.interactions)
    pd.testing.assert_frame_equal(from_parquet.users, from_csv.users)
    assert (from_parquet.items.drop(columns="image_path")
            .equals(from_csv.items.drop(columns="image_path")))


def test_generic_minimal_tsv_and_parquet_int_ids(tmp_path):
    folder = _folder(tmp_path / "log", interactions_tsv='user_id\titem_id\tts\n1\t"x\t100\n'
                                                         '2\tNA\t200\n1\t"x\t300\n',
                     dataset_yaml="columns: {timestamp: ts}\n")
    ds = _load(folder)
    assert ds.name == "log" and list(ds.item_ids) == ['"x', "NA"]   # TSV quotes are data
    assert ds.items["title"].tolist() == ['"x', "NA"] and ds.items["image_path"].isna().all()
    assert ds.interactions["timestamp"].tolist() == [100, 200, 300]
    assert "rating" not in ds.interactions and ds.rating_scale is None
    ints = tmp_path / "ints"
    ints.mkdir()
    pd.DataFrame({"user_id": [5, 3, 5], "item_id": [7, 8, 8]}).to_parquet(
        ints / "interactions.parquet")
    ds = _load(ints)
    assert list(ds.user_ids) == ["5", "3"] and list(ds.item_ids) == ["7", "8"]


@pytest.mark.parametrize("content, description, line, words", [
    ("user,item_id\nu,a\n", None, None, ["no 'user_id' column", "['user', 'item_id']"]),
    ("user_id,item_id,r\nu,a,4\nu,b,four\n", "columns: {rating: r}", 3,
     ["field 'r'", "'four'"]),
    ("user_id,item_id,rating\nu,a,4\nu,b,\n", None, 3, ["field 'rating'"]),
    ("user_id,item_id,rating\nu,a,4\nu,b,4\nu,c,10\n", "rating_scale: [1, 5]", 4,
     ["outside the declared scale [1, 5]"]),
    ("user_id,item_id\nu,a\n,b\n", None, 3, ["field 'user_id'", "missing"]),
    ("user_id,item_id,timestamp\nu,a,2021-01-01\nu,b,yesterday\n", None, 3,
     ["field 'timestamp'", "'yesterday'"]),
    ("user_id,item_id\nu,a\nu,a\n", None, 3, ["appears more than once"]),
    ("user_id,item_id\nu,a\nu,b\nv,caf\xe9\n".encode("latin-1") + "é".encode(), None, 4,
     ["not valid utf-8", "byte offset"]),
    ("user_id,item_id\n", None, None, ["holds no interactions"]),
    ('user_id,item_id\nu,a\nu,"b\n', None, 3, ["does not parse as CSV"]),
    ("", None, None, ["file is empty"]),
])
def test_generic_malformed(tmp_path, content, description, line, words):
    files = {"interactions_csv": content}
    if description:
        files["dataset_yaml"] = description + "\n"
    with pytest.raises(DataError) as info:
        _load(_folder(tmp_path / "d", **files))
    message = str(info.value)
    assert "interactions.csv" in message and info.value.line == line, message
    for word in words:
        assert word in message


def test_generic_unreadable_parquet(tmp_path):
    with pytest.raises(DataError, match="interactions.parquet"):
        _load(_folder(tmp_path / "d", interactions_parquet=b"not parquet"))


def test_generic_catalog_and_users_errors(tmp_path):
    inter = "user_id,item_id\nu,a\nu,b\nv,z\n"
    with pytest.raises(DataError, match=r"interactions\.csv, line 4, field 'item_id': item 'z' "
                                        r"is not in the catalog"):
        _load(_folder(tmp_path / "a", interactions_csv=inter, items_csv="item_id,title\na,A\nb,B\n"))
    with pytest.raises(DataError, match=r"items\.csv, line 5, field 'item_id'.*more than once"):
        _load(_folder(tmp_path / "b", interactions_csv=inter,
                      items_csv="item_id,title\na,A\nb,B\nz,Z\na,A2\n"))
    untitled = _load(_folder(tmp_path / "c", interactions_csv=inter,
                             items_csv="item_id,name\na,A\nb,B\nz,Z\n"))
    assert untitled.items["title"].tolist() == ["a", "b", "z"]   # shown by id
    with pytest.raises(DataError, match=r"interactions\.csv, line 4, field 'user_id': user 'v' "
                                        r"is not in the users table"):
        _load(_folder(tmp_path / "d", interactions_csv=inter, users_csv="user_id,age\nu,3\n"))
    with pytest.raises(DataError, match=r"user attribute column 'segment' not found"):
        _load(_folder(tmp_path / "e", interactions_csv=inter, users_csv="user_id,age\nu,3\nv,4\n",
                      dataset_yaml="columns: {user_attributes: [segment]}\n"))
    with pytest.raises(DataError, match="outside the dataset folder"):
        _load(_folder(tmp_path / "f", interactions_csv=inter,
                      items_csv=f"item_id,title,image_path\na,A,\nb,B,\nz,Z,{tmp_path}/x.jpg\n"))


# -- the real MovieLens-1M ------------------------------------------------------------------

# `ml1m` (session fixture, conftest.py) skips cleanly where ../shared is absent.


def test_real_ml1m_counts(ml1m):
    assert len(ml1m.interactions) == 1_000_209
    assert ml1m.n_users == 6_040 and ml1m.n_items == 3_883
    assert ml1m.interactions["item"].nunique() == 3_706
    assert ml1m.interactions["item"].max() == 3_705  # rated items come first
    assert ml1m.item_ids[0] == "1193"  # first line of ratings.dat
    assert list(ml1m.user_ids[:3]) == ["1", "2", "3"] and ml1m.user_ids[-1] == "6040"
    assert ml1m.items["image_path"].notna().sum() == 3_872
    assert ml1m.text_fields == ["overview", "keywords"]
    assert (ml1m.items["overview"] != "").sum() > 3_500
    assert ml1m.interactions["rating"].between(1, 5).all()


def test_real_ml1m_latin1_titles(ml1m):
    titles = set(ml1m.items["title"])
    assert "Misérables, Les (1995)" in titles
    assert "Alien³ (1992)" in titles
    assert "Pokémon: The First Movie (1998)" in titles
    assert not any("Ã" in t for t in titles)  # no UTF-8 / Latin-1 mojibake


def test_real_ml1m_matches_ncf_test_file(ml1m, ncf_dir):
    """NCF's user = UserID - 1 and item = first appearance in ratings.dat: ours must agree."""
    path = ncf_dir / "ml-1m.test.rating"
    ncf = pd.read_csv(path, sep="\t", header=None, names=["user", "item", "rating", "timestamp"])
    assert len(ncf) == 6_040
    # every line, not only the first 50: a merge over 6k rows costs nothing
    found = ncf.merge(ml1m.interactions, on=["user", "item", "timestamp"], how="left",
                      suffixes=("_ncf", ""))
    assert len(found) == len(ncf)
    assert found["rating"].notna().all()
    assert (found["rating"] == found["rating_ncf"]).all()
