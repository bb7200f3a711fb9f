"""Each Danbooru release as downloaded: metadata found by what it is, ratings in one
vocabulary, the image folder found or chosen, the 512px copy indexed."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from danbooru_assets.dataset.layout import DatasetLayout, DatasetRootError, resolve_image_folder
from danbooru_assets.dataset.metadata import convert_metadata_to_shards
from danbooru_assets.dataset.metadata_discovery import read_tag_categories
from danbooru_assets_tests.dataset.releases import (
    write_danbooru2020,
    write_danbooru2021,
    write_images,
    write_live_api,
)


def _convert(root: Path, out: Path):
    layout = DatasetLayout(root)
    found = layout.discover_metadata()
    posts = [f for f in found if f.kind == "posts"]
    categories, _ = read_tag_categories(found)
    _, report = convert_metadata_to_shards(
        [f.path for f in posts], out, names=[f.name for f in posts], tag_categories=categories or None
    )
    stored = pd.concat([pd.read_parquet(p) for p in sorted(out.glob("*.parquet"))]).set_index("image_id")
    return found, report, stored


def test_danbooru2021_companion_tables_never_become_posts(tmp_path: Path):
    root = write_danbooru2021(tmp_path / "d2021")
    found, report, stored = _convert(root, tmp_path / "out")
    assert {f.name: f.kind for f in found} == {
        "artists000000000000.json": "artists",
        "notes000000000000.json": "notes",
        "pools000000000000.json": "pools",
        "posts000000000000.json": "posts",
        "tags000000000000.json": "tags",
    }
    # The tags table's ids 1001, 1002 and 2001 are post ids too: the posts keep their own lines.
    assert sorted(stored.index) == [1001, 1002, 2001, 3003]
    assert report.records == 4 and report.bad_lines == 1 and report.duplicates == 0
    assert str(report.problems[0]) == "posts000000000000.json:3: unusable record (no 'id' field)"
    post = stored.loc[1001]
    assert post["md5"] == f"{1001:032x}"
    assert (post["rating"], post["rating_raw"], post["rating_era"]) == ("safe", "s", "before_2022")
    assert post["tags_general"] == "1girl solo"  # listed twice in the dump, stored once, order kept
    assert (post["tags_artist"], post["tags_copyright"], post["tags_character"], post["tags_meta"]) == (
        "artist_x", "touhou", "hakurei_reimu", "highres"
    )
    assert (post["meta_width"], post["meta_height"], post["score"]) == (900, 600, 7)
    # parent_id: "0" → none, null → none, "1001" → 1001, missing → none.
    assert pd.isna(post["parent_id"]) and pd.isna(stored.loc[2001, "parent_id"])
    assert stored.loc[1002, "parent_id"] == 1001 and pd.isna(stored.loc[3003, "parent_id"])
    # Booleans as JSON and as strings.
    assert stored.loc[2001, "is_deleted"] == False and stored.loc[1002, "is_banned"] == True  # noqa: E712
    assert stored.loc[1002, "has_children"] == False  # noqa: E712
    assert list(stored["rating"].loc[[2001, 1002, 3003]]) == ["questionable", "explicit", "safe"]


def test_danbooru2017_2020_year_folders_without_extension_are_read(tmp_path: Path):
    root = write_danbooru2020(tmp_path / "d2020")
    found, report, stored = _convert(root, tmp_path / "out")
    assert [(f.name, f.kind) for f in found] == [("2019/2019000000000000", "posts"), ("2020/2020000000000000", "posts")]
    assert sorted(stored.index) == [1001, 1002, 2001, 3003]
    assert str(report.problems[0]) == "2020/2020000000000000:1: unusable record (no 'id' field)"
    assert set(stored["rating_era"]) == {"before_2022"}


def test_live_api_ratings_are_the_2022_vocabulary(tmp_path: Path):
    root = write_live_api(tmp_path / "api")
    _, report, stored = _convert(root, tmp_path / "out")
    assert report.bad_lines == 0 and report.bad_values == 0
    assert stored["rating"].to_dict() == {1001: "general", 1002: "questionable", 2001: "sensitive", 3003: "explicit"}
    assert stored["rating_raw"].to_dict() == {1001: "g", 1002: "q", 2001: "s", 3003: "e"}
    assert set(stored["rating_era"]) == {"since_2022"}
    assert stored.loc[1001, "tags_general"] == "1girl solo"  # de-duplicated
    assert stored.loc[3003, "parent_id"] == 1001


def test_the_tags_table_gives_categories_to_a_flat_tag_string(tmp_path: Path):
    import json

    root = write_danbooru2021(tmp_path / "d2021")
    (root / "metadata" / "posts000000000000.json").write_text(
        json.dumps({"id": 5001, "rating": "g", "md5": "x", "tag_string": "blue_sky artist_x hakurei_reimu mystery"}) + "\n"
    )
    _, _, stored = _convert(root, tmp_path / "out")
    row = stored.loc[5001]
    assert (row["tags_general"], row["tags_artist"], row["tags_character"]) == ("blue_sky mystery", "artist_x", "hakurei_reimu")


def test_unknown_files_are_listed_not_guessed_at(tmp_path: Path):
    root = write_live_api(tmp_path / "api")
    meta = root / "metadata"
    (meta / "md5sums.txt").write_text("abc  posts.json\n")
    (meta / "other.json").write_text('{"hello": "world"}\n')
    (meta / "empty.json").write_text("")
    unknown = {f.name: f.why for f in DatasetLayout(root).discover_metadata() if f.kind == "unknown"}
    assert unknown == {
        "empty.json": "empty",
        "md5sums.txt": "no JSON object in its first 1 line(s) (JSON lines expected)",
        "other.json": "its first record is not a Danbooru post or table (hello)",
    }
    assert [p.name for p in DatasetLayout(root).metadata_files()] == ["posts.json"]


def test_image_folder_is_found_or_chosen(tmp_path: Path):
    root = tmp_path / "root"
    (root / "512px" / "0001").mkdir(parents=True)
    assert resolve_image_folder(root) == "512px"
    (root / "original" / "0001").mkdir(parents=True)
    with pytest.raises(DatasetRootError, match="holds both original/ and 512px/.*DANBOORU_IMAGE_FOLDER.*--image-folder"):
        resolve_image_folder(root)
    assert resolve_image_folder(root, "original") == "original"
    with pytest.raises(DatasetRootError, match="'1024px' is not one of original, 512px"):
        resolve_image_folder(root, "1024px")
    assert resolve_image_folder(tmp_path / "nothing") == "original"


def _materialize(root: Path, tmp_path: Path, image_folder: str = ""):
    from danbooru_assets.orchestration.assets.index import danbooru_metadata, shard_index
    from danbooru_assets.orchestration.io_manager import ParquetIOManagerFactory
    from danbooru_assets.orchestration.resources import DanbooruDatasetResource, StorageResource

    storage = StorageResource(base_path=str(tmp_path / "storage"))
    resources = {
        "dataset": DanbooruDatasetResource(root=str(root), image_folder=image_folder),
        "storage": storage,
        "io_manager": ParquetIOManagerFactory(storage=storage),
    }
    meta = dg.materialize([danbooru_metadata], resources=resources)
    md = {k: getattr(v, "value", v) for k, v in meta.asset_materializations_for_node("danbooru_metadata")[0].metadata.items()}
    indexes, index_md = {}, {}
    for shard in ("0001", "0002", "0003"):
        result = dg.materialize([danbooru_metadata.to_source_asset(), shard_index], resources=resources, partition_key=shard)
        mat = result.asset_materializations_for_node("shard_index")[0]
        index_md = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
        indexes[shard] = pd.read_parquet(tmp_path / "storage" / "shard_index" / f"{shard}.parquet")
    return md, pd.concat(indexes.values()).set_index("image_id"), index_md


def test_danbooru2021_with_the_512px_folder_through_the_assets(tmp_path: Path):
    root = write_danbooru2021(tmp_path / "d2021")
    write_images(root, with_original=False, with_512px=True)
    md, index, index_md = _materialize(root, tmp_path)
    assert md["post_files"] == 1 and md["companion_tables_skipped"] == 3 and md["unknown_files"] == 0
    assert "`tags000000000000.json`: tags table" in md["companion_tables"]
    assert md["records"] == 4 and md["bad_lines"] == 1
    assert index_md["image_folder"] == str(root / "512px")
    assert sorted(index.index) == [1001, 1002, 2001, 3003]
    assert set(index["status"]) == {"ok"}
    assert set(index["ext"]) == {"jpg"} and set(index["rel_path"].str[:6]) == {"512px/"}
    # The file is the padded square; the metadata's size (the original's) is not its size.
    assert (index["width"] == 512).all() and (index["height"] == 512).all() and set(index["size_source"]) == {"header"}
    assert index.loc[1001, "meta_width"] == 900 and index.loc[1001, "meta_file_ext"] == "png"
    assert index.loc[1001, "rating"] == "safe" and index.loc[1001, "tags_general"] == "1girl solo"


def test_both_folders_need_a_choice_and_the_choice_is_indexed(tmp_path: Path):
    root = write_live_api(tmp_path / "api")
    write_images(root, with_original=True, with_512px=True)
    with pytest.raises(Exception, match="holds both original/ and 512px/"):
        _materialize(root, tmp_path)
    _, index, index_md = _materialize(root, tmp_path, image_folder="original")
    assert index_md["image_folder"] == str(root / "original")
    assert index.loc[1001, "rel_path"] == "original/0001/1001.png"
    assert (index.loc[1001, "width"], index.loc[1001, "height"], index.loc[1001, "size_source"]) == (900, 600, "metadata")


def test_prefilter_judges_a_512px_copy_by_its_original(tmp_path: Path):
    from danbooru_assets.dataset.prefilter import apply_prefilter
    from danbooru_assets.settings import PrefilterSettings

    index = pd.DataFrame([
        # 512px copy of a 2000x400 png: the file is a 512 square jpg, the original is 5:1
        {"image_id": 1, "rel_path": "512px/0001/1.jpg", "ext": "jpg", "width": 512, "height": 512,
         "meta_width": 2000, "meta_height": 400, "meta_file_ext": "png"},
        {"image_id": 2, "rel_path": "512px/0002/2.jpg", "ext": "jpg", "width": 512, "height": 512,
         "meta_width": None, "meta_height": None, "meta_file_ext": None},  # no size: no size rule
        {"image_id": 3, "rel_path": "original/0003/3.jpg", "ext": "jpg", "width": 100, "height": 100,
         "meta_width": 100, "meta_height": 100, "meta_file_ext": "jpg"},
    ]).assign(status="ok", rating="safe", score=1, is_deleted=False, is_banned=False, tags_general="")
    table, _ = apply_prefilter(index, PrefilterSettings(file_types=["jpg"]))
    assert table.set_index("image_id")["reasons"].to_dict() == {1: "file_type|aspect_ratio", 2: "", 3: "too_small"}


def test_old_rating_letters_in_a_settings_file_are_refused_with_their_meaning(tmp_path: Path):
    from danbooru_assets.settings import SettingsError, load_settings

    path = tmp_path / "settings.yaml"
    path.write_text("prefilter:\n  ratings: [s, q]\n")
    with pytest.raises(SettingsError) as info:
        load_settings(path)
    text = str(info.value)
    assert "settings.yaml" in text and "'s' means sensitive (since 2022) or safe (before 2022" in text
    assert "general, sensitive, questionable, explicit, safe" in text
    path.write_text("prefilter:\n  ratings: [general, safe]\n")
    assert load_settings(path).prefilter.ratings == ["general", "safe"]


def test_a_rule_on_general_keeps_live_posts_and_says_what_old_safe_posts_are(tmp_path: Path):
    """``ratings: [general]`` no longer drops Danbooru2021 posts by a letter clash: their
    rating is the word ``safe``, kept only where the rule lists it."""
    from danbooru_assets.dataset.prefilter import apply_prefilter
    from danbooru_assets.settings import PrefilterSettings

    index = pd.DataFrame({
        "image_id": [1, 2, 3], "rating": ["general", "sensitive", "safe"], "status": "ok", "ext": "jpg",
        "width": 800, "height": 800, "score": 1, "is_deleted": False, "is_banned": False, "tags_general": "",
    })
    reasons = lambda ratings: apply_prefilter(index, PrefilterSettings(ratings=ratings))[0]["reasons"].tolist()  # noqa: E731
    assert reasons(["general"]) == ["", "rating", "rating"]
    assert reasons(["general", "safe"]) == ["", "rating", ""]


def test_an_api_form_file_without_any_g_is_read_as_before_2022(tmp_path: Path):
    """A 2021 mirror in the API's shape has no "g" (Danbooru added it in 2022): its "s" is
    safe. The live API file beside it keeps "s" as sensitive."""
    import json

    root = write_live_api(tmp_path / "api")
    old = [{"id": 7001, "rating": "s", "md5": "a", "tag_string_general": "1girl"},
           {"id": 7002, "rating": "q", "md5": "b", "tag_string_general": "1girl"}]
    (root / "metadata" / "danbooru2021_api.json").write_text("".join(json.dumps(r) + "\n" for r in old))
    _, report, stored = _convert(root, tmp_path / "out")
    assert stored.loc[7001, ["rating", "rating_raw", "rating_era"]].tolist() == ["safe", "s", "before_2022"]
    assert stored.loc[7002, ["rating", "rating_era"]].tolist() == ["questionable", "before_2022"]
    assert stored.loc[2001, ["rating", "rating_era"]].tolist() == ["sensitive", "since_2022"]
    assert "ratings read as before 2022" in str(report.files[0]) and "before 2022" not in str(report.files[1])
