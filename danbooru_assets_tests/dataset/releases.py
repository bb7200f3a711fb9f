"""Trees in the layouts Danbooru's releases are downloaded in, with their records' quirks.

- :func:`write_danbooru2021`: ``metadata/posts000000000000.json`` in the dump form (``tags`` as
  a list of ``{id, name, category}`` objects, numbers as strings, ratings s/q/e) beside the
  same export's ``tags``, ``pools``, ``artists`` and ``notes`` tables, whose ids overlap the
  post ids on purpose;
- :func:`write_danbooru2020`: Danbooru2017-2020's year folders of extension-less files,
  ``metadata/2019/2019000000000000``, ``metadata/2020/2020000000000000``;
- :func:`write_live_api`: the live API's form (``tag_string_*``, ints, ratings g/s/q/e).

Quirks planted (each checked by the tests): string numbers, a row without an id, ``parent_id``
as "0", null, missing and a string id, category numbers as strings, booleans as JSON and as
strings, ``pools`` mixing ids and names, a tag listed twice.

Images: ``original/<bucket>/<id>.<ext>`` and, with ``with_512px``, the 512px release's copy
``512px/<bucket>/<id>.jpg`` (shrunk to fit 512x512, centred on black: :func:`to_512px`).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

# id: (width, height, ext) of the original
IMAGES = {1001: (900, 600, "png"), 2001: (300, 200, "jpg"), 1002: (640, 1024, "jpg"), 3003: (512, 512, "jpg")}


def to_512px(image: Image.Image, side: int = 512) -> Image.Image:
    """The 512px release's recipe: shrink (never enlarge) to fit ``side`` (whole pixels,
    rounded), centre on a black ``side`` square (offset floor((side - size) / 2))."""
    w, h = image.size
    scale = min(1.0, side / max(w, h))
    size = (max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5)))
    small = image.convert("RGB").resize(size, Image.Resampling.LANCZOS) if size != (w, h) else image.convert("RGB")
    canvas = Image.new("RGB", (side, side), (0, 0, 0))
    canvas.paste(small, ((side - size[0]) // 2, (side - size[1]) // 2))
    return canvas


def _image_bytes(image: Image.Image, ext: str) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG" if ext == "png" else "JPEG", quality=92)
    return buf.getvalue()


def write_images(root: Path, with_original: bool = True, with_512px: bool = False, images=IMAGES) -> None:
    for image_id, (w, h, ext) in images.items():
        bucket = f"{image_id % 1000:04d}"
        picture = Image.new("RGB", (w, h), (200, 180, 160))
        if with_original:
            (root / "original" / bucket).mkdir(parents=True, exist_ok=True)
            (root / "original" / bucket / f"{image_id}.{ext}").write_bytes(_image_bytes(picture, ext))
        if with_512px:
            (root / "512px" / bucket).mkdir(parents=True, exist_ok=True)
            (root / "512px" / bucket / f"{image_id}.jpg").write_bytes(_image_bytes(to_512px(picture), "jpg"))


def _dump_post(image_id: int, rating: str, tags: list[tuple[str, str, str]], **extra) -> dict:
    """A Danbooru2017-2021 dump record: strings for numbers, tags as objects."""
    w, h, ext = IMAGES.get(image_id, (100, 100, "jpg"))
    record = {
        "id": str(image_id), "created_at": "2021-03-04 05:06:07.123 UTC", "uploader_id": "12345",
        "score": "7", "source": "", "md5": f"{image_id:032x}", "last_commented_at": "1970-01-01 00:00:00 UTC",
        "rating": rating, "image_width": str(w), "image_height": str(h), "is_note_locked": False,
        "file_ext": ext, "last_noted_at": "1970-01-01 00:00:00 UTC", "is_rating_locked": False,
        "parent_id": "0", "has_children": False, "approver_id": "0", "file_size": "123456",
        "is_status_locked": False, "up_score": "7", "down_score": "0", "is_pending": False, "is_flagged": False,
        "is_deleted": False, "updated_at": "2021-05-06 07:08:09.123 UTC", "is_banned": False, "pixiv_id": "0",
        "tags": [{"id": tid, "name": name, "category": cat} for tid, name, cat in tags],
        "pools": [], "favs": ["1", "2"],
    }
    record.update(extra)
    return record


TAGS_1001 = [("470575", "1girl", "0"), ("212816", "solo", "0"), ("1001", "artist_x", "1"),
             ("470575", "1girl", "0"),  # listed twice, as the real dump sometimes does
             ("16509", "touhou", "3"), ("1002", "hakurei_reimu", "4"), ("13200", "highres", "5")]


def danbooru2021_posts() -> list[str]:
    """posts000000000000.json's lines (line 3 has no id)."""
    records = [
        _dump_post(1001, "s", TAGS_1001, pools=["1001", "Touhou Comics", 7]),  # pools: ids and names mixed
        _dump_post(2001, "q", [("470575", "1girl", "0"), ("1", "comic", 0)], parent_id=None, is_deleted="false"),
        {k: v for k, v in _dump_post(9999, "s", []).items() if k != "id"},  # a row without an id
        _dump_post(1002, "e", [("2", "2girls", "0")], parent_id="1001", is_banned="true", has_children="false"),
        {k: v for k, v in _dump_post(3003, "s", [("3", "scenery", "0")]).items() if k != "parent_id"},
    ]
    return [json.dumps(r, separators=(",", ":")) for r in records]


def write_danbooru2021(root: Path) -> Path:
    meta = root / "metadata"
    meta.mkdir(parents=True, exist_ok=True)
    (meta / "posts000000000000.json").write_text("\n".join(danbooru2021_posts()) + "\n")
    # The companion tables: ids 1001/1002/2001 collide with post ids on purpose.
    tags = [{"id": "1001", "name": "artist_x", "post_count": "3", "category": "1", "created_at": "2010-01-01",
             "updated_at": "2020-01-01", "is_deprecated": False},
            {"id": "1002", "name": "hakurei_reimu", "post_count": "9", "category": "4", "created_at": "2010-01-01",
             "updated_at": "2020-01-01", "is_deprecated": False},
            {"id": "2001", "name": "blue_sky", "post_count": "5", "category": "0", "created_at": "2010-01-01",
             "updated_at": "2020-01-01", "is_deprecated": False}]
    pools = [{"id": "1001", "name": "Touhou_Comics", "created_at": "2012-01-01", "updated_at": "2020-01-01",
              "description": "", "is_active": True, "is_deleted": False, "post_ids": ["1001", "2001"],
              "category": "series"}]
    artists = [{"id": "2001", "name": "artist_x", "group_name": "", "other_names": ["x"], "is_banned": False,
                "is_deleted": False, "created_at": "2011-01-01", "updated_at": "2020-01-01"}]
    notes = [{"id": "1002", "post_id": "1001", "x": "10", "y": "20", "width": "30", "height": "40",
              "body": "hello", "is_active": True, "version": "1", "created_at": "2015-01-01",
              "updated_at": "2015-01-01"}]
    for name, records in (("tags", tags), ("pools", pools), ("artists", artists), ("notes", notes)):
        (meta / f"{name}000000000000.json").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def write_danbooru2020(root: Path) -> Path:
    """Year folders of extension-less files (Danbooru2017-2020, and 2021's old-format tarball)."""
    meta = root / "metadata"
    for year, lines in (("2019", danbooru2021_posts()[:2]), ("2020", danbooru2021_posts()[2:])):
        (meta / year).mkdir(parents=True, exist_ok=True)
        (meta / year / f"{year}000000000000").write_text("\n".join(lines) + "\n")
    return root


def live_api_posts() -> list[str]:
    def post(image_id: int, rating: str, general: str, **extra) -> dict:
        w, h, ext = IMAGES.get(image_id, (100, 100, "jpg"))
        record = {
            "id": image_id, "created_at": "2023-01-02T03:04:05.678-05:00", "uploader_id": 12345, "score": 7,
            "source": "", "md5": f"{image_id:032x}", "rating": rating, "image_width": w, "image_height": h,
            "file_ext": ext, "parent_id": None, "has_children": False, "is_deleted": False, "is_banned": False,
            "tag_string": general, "tag_string_general": general, "tag_string_character": "",
            "tag_string_copyright": "original", "tag_string_artist": "someone", "tag_string_meta": "",
            "fav_count": 3, "file_size": 12345,
        }
        record.update(extra)
        return record

    records = [post(1001, "g", "1girl solo 1girl"), post(2001, "s", "1girl"), post(1002, "q", "2girls"),
               post(3003, "e", "scenery", parent_id=1001)]
    return [json.dumps(r) for r in records]


def write_live_api(root: Path) -> Path:
    meta = root / "metadata"
    meta.mkdir(parents=True, exist_ok=True)
    (meta / "posts.json").write_text("\n".join(live_api_posts()) + "\n")
    return root
